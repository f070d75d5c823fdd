//! Harness shared by the integration tests: a vstore volume on a file-backed disk under the
//! cargo target directory (ext4, so O_DIRECT works; never a tmpfs), a device socket next to it,
//! and small waiting helpers.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vstore::{LocalPool, LocalVolume, VolumeLayout};

pub const MIB: u64 = 1 << 20;
pub const EXTENT: u64 = MIB;

/// A volume on a fresh disk; everything is removed when dropped.
pub struct TestVolume {
    pub dir: tempfile::TempDir,
    pub pool: Arc<LocalPool>,
    pub volume: Arc<LocalVolume>,
    pub disk: PathBuf,
}

impl TestVolume {
    /// A socket path inside the test directory.
    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

pub fn test_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vhost-it-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("create test dir")
}

/// A `size`-byte volume (512-byte blocks, 1 MiB extents) on a 256 MiB sparse disk.
pub fn volume(size: u64) -> TestVolume {
    let dir = test_dir();
    let pool = Arc::new(LocalPool::new(EXTENT));
    let disk = dir.path().join("disk0");
    pool.add_disk(&disk, Some(256 * MIB)).expect("add disk");
    let layout = VolumeLayout {
        id: uuid::Uuid::new_v4(),
        size,
        block_size: 512,
        extent_size: EXTENT,
    };
    let volume = pool.open_volume(layout).expect("open volume");
    TestVolume {
        dir,
        pool,
        volume,
        disk,
    }
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// Deterministic pseudo-random bytes for a (offset, generation) pair, so a checker can tell
/// which write a block came from.
pub fn pattern(buf: &mut [u8], offset: u64, generation: u64) {
    let mut x = offset.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ generation.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}
