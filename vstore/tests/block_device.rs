//! Block-device disks, through a loop device with 4 KiB logical sectors: formatting zeroes old
//! contents, alignment is detected, and volumes with smaller blocks are kept off the device.
//! Needs root (losetup); skipped with a message otherwise.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use vstore::{IoQueue, IoRequest, StoreError, VolumeLayout};

/// A loop device over a file, detached on drop.
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    fn attach(file: &Path, sector_size: u32) -> Self {
        let out = Command::new("losetup")
            .args([
                "--find",
                "--show",
                "--sector-size",
                &sector_size.to_string(),
            ])
            .arg(file)
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            path: PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn loop_device_with_4k_sectors() {
    if !is_root() {
        eprintln!("skipping loop_device_with_4k_sectors: losetup needs root");
        return;
    }
    let dir = test_dir();
    // Old contents everywhere but the first 4 KiB: formatting must zero them, or a new volume
    // would read them.
    let backing = dir.path().join("backing");
    let mut old = vec![0x77u8; 64 * MIB as usize];
    old[..4096].fill(0);
    std::fs::write(&backing, &old).unwrap();
    drop(old);
    let device = LoopDevice::attach(&backing, 4096);

    let pool = pool();
    let err = pool.add_disk(&device.path, Some(64 * MIB)).unwrap_err();
    assert!(
        matches!(err, StoreError::SizeOnBlockDevice { .. }),
        "{err:?}"
    );
    let info = pool.add_disk(&device.path, None).unwrap();
    assert!(info.block_device);
    assert_eq!(info.min_block_size, 4096);
    assert_eq!(info.slots, 63);
    assert_eq!(pool.min_block_size(), 4096);

    // 512-byte blocks cannot be served by this device.
    let err = pool.open_volume(layout(8 * MIB)).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::BlockSizeUnsupported {
                block_size: 512,
                min: 4096,
                ..
            }
        ),
        "{err:?}"
    );

    let volume_layout = VolumeLayout {
        block_size: 4096,
        ..layout(8 * MIB)
    };
    let volume = pool.open_volume(volume_layout).unwrap();
    let mut queue = IoQueue::new(8).unwrap();
    let mut model = vec![0u8; 8 * MIB as usize];
    let data = pattern(3, 3 * MIB as usize);
    write(&mut queue, &volume, MIB / 2, &data).unwrap();
    model[(MIB / 2) as usize..(MIB / 2) as usize + data.len()].copy_from_slice(&data);
    assert!(
        read(&mut queue, &volume, 0, model.len()).unwrap() == model,
        "old device contents showed through"
    );
    assert!(matches!(
        write(&mut queue, &volume, 512, &[1; 512]).unwrap_err(),
        vstore::IoError::Misaligned { .. }
    ));

    run(
        &mut queue,
        &volume,
        IoRequest::Discard {
            offset: MIB - 8192,
            len: MIB + 16384,
        },
    )
    .unwrap();
    model[(MIB - 8192) as usize..(2 * MIB + 8192) as usize].fill(0);
    run(
        &mut queue,
        &volume,
        IoRequest::WriteZeroes {
            offset: 3 * MIB,
            len: 4096,
            may_unmap: false,
        },
    )
    .unwrap();
    model[3 * MIB as usize..3 * MIB as usize + 4096].fill(0);
    run(&mut queue, &volume, IoRequest::Flush).unwrap();
    assert!(read(&mut queue, &volume, 0, model.len()).unwrap() == model);
    assert_eq!(
        volume.allocated_bytes(),
        3 * MIB,
        "extent 1 was covered whole and freed"
    );

    // A file disk beside it takes the 512-byte volumes; they never land on the 4 KiB device.
    add_file_disk(&pool, dir.path(), "file", 16 * MIB);
    let small_blocks = pool.open_volume(layout(8 * MIB)).unwrap();
    for extent in 0..8 {
        write(&mut queue, &small_blocks, extent * MIB, &[5; 512]).unwrap();
    }
    let disks = pool.disks();
    assert_eq!(
        (disks[0].slots_used, disks[1].slots_used),
        (3, 8),
        "{disks:?}"
    );

    // Re-opened after a restart, the device still holds the data.
    let id = info.id;
    drop((volume, small_blocks, queue, pool));
    let pool = common::pool();
    assert_eq!(reopen_disk(&pool, &device.path).id, id);
    let volume = pool.open_volume(volume_layout).unwrap();
    let mut queue = IoQueue::new(8).unwrap();
    assert!(read(&mut queue, &volume, 0, model.len()).unwrap() == model);

    // Everything went to the device itself, not around it.
    drop((volume, queue, pool));
    let mut header = [0u8; 8];
    std::fs::File::open(&backing)
        .unwrap()
        .read_exact_at(&mut header, 0)
        .unwrap();
    assert_eq!(&header, b"VESSELDK");
}
