//! Disk management: formatting, re-opening, re-adopting, refusing corrupt or foreign disks.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;
use vstore::{IoQueue, LocalPool, StoreError};

/// Flips one byte of a file, going around O_DIRECT (the pool holding it is gone by then).
fn flip_byte(path: &Path, offset: u64) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    byte[0] ^= 0x10;
    file.write_all_at(&byte, offset).unwrap();
    file.sync_all().unwrap();
}

#[test]
fn add_disk_creates_sparse_file_and_reports_it() {
    let dir = test_dir();
    let pool = pool();
    let path = dir.path().join("d0");
    let info = pool.add_disk(&path, Some(64 * MIB)).unwrap();
    assert_eq!(info.path, path);
    assert_eq!(info.slots, 63, "1 MiB of 64 goes to header and table");
    assert_eq!(info.capacity, 63 * MIB);
    assert_eq!((info.used, info.slots_used), (0, 0));
    assert!(!info.block_device);
    assert!(info.min_block_size == 512 || info.min_block_size == 4096);
    assert_eq!(pool.min_block_size(), info.min_block_size);
    assert_eq!(pool.disks(), vec![info]);
    // Sparse: formatting wrote only metadata.
    let allocated =
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).unwrap()) * 512;
    assert!(
        allocated < 2 * MIB,
        "{allocated} bytes allocated for a fresh disk"
    );
}

#[test]
fn add_disk_errors_say_what_to_do() {
    let dir = test_dir();
    let pool = pool();
    let missing = dir.path().join("missing");
    let err = pool.add_disk(&missing, None).unwrap_err();
    assert!(matches!(err, StoreError::DiskFileMissing { .. }), "{err:?}");
    assert!(err.to_string().contains("--size"), "{err}");
    assert!(!missing.exists());

    let small = dir.path().join("small");
    let err = pool.add_disk(&small, Some(MIB)).unwrap_err();
    assert!(matches!(err, StoreError::DiskTooSmall { .. }), "{err:?}");
    assert!(
        !small.exists(),
        "a file we created for a failed add is removed"
    );

    let foreign = dir.path().join("foreign");
    std::fs::write(&foreign, vec![0x5a; 8 * MIB as usize]).unwrap();
    let err = pool.add_disk(&foreign, None).unwrap_err();
    assert!(matches!(err, StoreError::ForeignData { .. }), "{err:?}");
    assert_eq!(
        std::fs::read(&foreign).unwrap()[0],
        0x5a,
        "foreign data untouched"
    );

    let sized = dir.path().join("sized");
    std::fs::write(&sized, vec![0; 4 * MIB as usize]).unwrap();
    let err = pool.add_disk(&sized, Some(8 * MIB)).unwrap_err();
    assert!(
        matches!(err, StoreError::SizeMismatch { actual, requested, .. } if actual == 4 * MIB && requested == 8 * MIB),
        "{err:?}"
    );
    // The same file without --size is fine: zeroes are not foreign data.
    assert_eq!(pool.add_disk(&sized, None).unwrap().slots, 3);

    let err = pool.add_disk(dir.path(), None).unwrap_err();
    assert!(matches!(err, StoreError::NotADisk { .. }), "{err:?}");
    assert!(LocalPool::try_new(MIB + 1).is_err());
    assert!(LocalPool::try_new(0).is_err());
    assert!(LocalPool::try_new(2 << 30).is_err());
    assert!(LocalPool::try_new(1 << 30).is_ok());
}

#[test]
fn same_disk_twice_is_refused() {
    let dir = test_dir();
    let pool = pool();
    let path = add_file_disk(&pool, dir.path(), "d0", 16 * MIB);
    let err = pool.add_disk(&path, None).unwrap_err();
    assert!(
        matches!(err, StoreError::DiskAlreadyInPool { .. }),
        "{err:?}"
    );
    // Another path to the same file.
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    assert!(matches!(
        pool.open_disk(&link).unwrap_err(),
        StoreError::DiskAlreadyInPool { .. }
    ));
    // Another pool (another daemon) cannot open it while this one holds it.
    let other = LocalPool::new(EXTENT);
    assert!(matches!(
        other.open_disk(&path).unwrap_err(),
        StoreError::DiskLocked { .. }
    ));
    assert_eq!(pool.disks().len(), 1);
}

#[test]
fn opening_a_locked_disk_waits_for_its_holder_to_let_go() {
    let dir = test_dir();
    let holder = pool();
    let path = add_file_disk(&holder, dir.path(), "d0", 16 * MIB);
    let other = LocalPool::new(EXTENT);
    // A wait shorter than the hold ends in the lock error, after saying once that it waits.
    let mut said = 0;
    let started = std::time::Instant::now();
    assert!(matches!(
        other
            .open_disk_waiting(&path, std::time::Duration::from_millis(200), || said += 1)
            .unwrap_err(),
        StoreError::DiskLocked { .. }
    ));
    assert!(started.elapsed() >= std::time::Duration::from_millis(200));
    assert_eq!(said, 1);
    // The holder lets go during a longer wait: the disk opens.
    let release = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(holder);
    });
    let info = other
        .open_disk_waiting(&path, std::time::Duration::from_secs(30), || {})
        .unwrap();
    release.join().unwrap();
    assert_eq!(other.disks().len(), 1);
    assert_eq!(other.disks()[0].id, info.id);
}

#[test]
fn remove_disk_refuses_while_extents_live_and_readd_keeps_id() {
    let dir = test_dir();
    let pool = pool();
    let path = add_file_disk(&pool, dir.path(), "d0", 16 * MIB);
    let id = pool.disks()[0].id;
    let volume = pool.open_volume(layout(4 * MIB)).unwrap();
    let volume_id = volume.layout().id;
    let mut queue = IoQueue::new(8).unwrap();
    write(&mut queue, &volume, 0, &pattern(1, 4096)).unwrap();
    drop(volume);

    let err = pool.remove_disk(id).unwrap_err();
    assert!(
        matches!(err, StoreError::DiskBusy { slots: 1, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("delete"), "{err}");
    assert_eq!(pool.delete_volume(volume_id).unwrap(), 1);
    let removed = pool.remove_disk(id).unwrap();
    assert_eq!(removed.id, id);
    assert!(pool.disks().is_empty());
    assert!(matches!(
        pool.remove_disk(id).unwrap_err(),
        StoreError::DiskNotFound { .. }
    ));

    // An empty Vessel disk is re-adopted with its id.
    let again = pool.add_disk(&path, None).unwrap();
    assert_eq!(again.id, id);
}

#[test]
fn disk_with_extents_is_refused_by_add_and_reopened_by_open_disk() {
    let dir = test_dir();
    let path = dir.path().join("d0");
    let (id, volume_layout) = {
        let pool = pool();
        let info = pool.add_disk(&path, Some(16 * MIB)).unwrap();
        let volume = pool.open_volume(layout(8 * MIB)).unwrap();
        let mut queue = IoQueue::new(8).unwrap();
        write(&mut queue, &volume, 3 * MIB, &pattern(7, 8192)).unwrap();
        (info.id, volume.layout())
    };
    let pool = pool();
    let err = pool.add_disk(&path, None).unwrap_err();
    assert!(
        matches!(err, StoreError::DiskHasExtents { slots: 1, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("open_disk"), "{err}");
    let info = pool.open_disk(&path).unwrap();
    assert_eq!((info.id, info.slots_used), (id, 1));
    assert_eq!(pool.volumes_on_disk(), vec![(volume_layout.id, 1)]);
    let volume = pool.open_volume(volume_layout).unwrap();
    let mut queue = IoQueue::new(8).unwrap();
    assert_eq!(
        read(&mut queue, &volume, 3 * MIB, 8192).unwrap(),
        pattern(7, 8192)
    );
}

#[test]
fn readopting_with_another_extent_size_keeps_the_id() {
    let dir = test_dir();
    let path = dir.path().join("d0");
    let id = LocalPool::new(EXTENT)
        .add_disk(&path, Some(32 * MIB))
        .unwrap()
        .id;
    let pool = LocalPool::new(4 * MIB);
    let err = pool.open_disk(&path).unwrap_err();
    assert!(
        matches!(err, StoreError::ExtentSizeMismatch { disk, pool, .. } if disk == MIB && pool == 4 * MIB),
        "{err:?}"
    );
    let info = pool.add_disk(&path, None).unwrap();
    assert_eq!(info.id, id);
    assert_eq!(info.slots, 7);
}

#[test]
fn open_disk_refuses_blank_corrupt_and_truncated_disks() {
    let dir = test_dir();
    let blank = dir.path().join("blank");
    std::fs::write(&blank, vec![0; 4 * MIB as usize]).unwrap();
    let err = pool().open_disk(&blank).unwrap_err();
    assert!(matches!(err, StoreError::NotVesselDisk { .. }), "{err:?}");

    let path = dir.path().join("d0");
    pool().add_disk(&path, Some(16 * MIB)).unwrap();

    // A flipped bit in the header: refused with the disk's path in the message.
    flip_byte(&path, 40);
    let err = pool().open_disk(&path).unwrap_err();
    assert!(matches!(err, StoreError::HeaderCorrupt { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert!(matches!(
        pool().add_disk(&path, None).unwrap_err(),
        StoreError::HeaderCorrupt { .. }
    ));
    flip_byte(&path, 40);
    pool().open_disk(&path).unwrap();

    // A truncated file.
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(12 * MIB).unwrap();
    let err = pool().open_disk(&path).unwrap_err();
    assert!(
        matches!(err, StoreError::DiskTruncated { size, expected, .. } if size == 12 * MIB && expected == 16 * MIB),
        "{err:?}"
    );
}

#[test]
fn newer_format_version_is_refused() {
    let dir = test_dir();
    let path = dir.path().join("d0");
    pool().add_disk(&path, Some(16 * MIB)).unwrap();
    // Version is the little-endian u32 after the 8-byte magic.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    file.write_all_at(&2u32.to_le_bytes(), 8).unwrap();
    let err = pool().open_disk(&path).unwrap_err();
    assert!(
        matches!(err, StoreError::UnsupportedVersion { version: 2, .. }),
        "{err:?}"
    );
}

#[test]
fn corrupt_slot_entry_is_refused_with_its_slot() {
    let dir = test_dir();
    let path = dir.path().join("d0");
    {
        let pool = pool();
        pool.add_disk(&path, Some(16 * MIB)).unwrap();
        let volume = pool.open_volume(layout(8 * MIB)).unwrap();
        let mut queue = IoQueue::new(8).unwrap();
        for extent in 0..3 {
            write(&mut queue, &volume, extent * MIB, &pattern(1, 512)).unwrap();
        }
    }
    // Slot 2's entry: table at 4096, 32 bytes per entry; byte 20 is inside its extent field.
    flip_byte(&path, 4096 + 2 * 32 + 20);
    let err = pool().open_disk(&path).unwrap_err();
    assert!(
        matches!(err, StoreError::SlotEntryCorrupt { slot: 2, .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    flip_byte(&path, 4096 + 2 * 32 + 20);
    assert_eq!(pool().open_disk(&path).unwrap().slots_used, 3);
}
