//! Test harness shared by vstore's integration tests: disk files under the target directory
//! (a real file system with O_DIRECT, unlike a tmpfs /tmp), aligned or deliberately misaligned
//! guest-like buffers, and synchronous wrappers around `IoQueue`.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vstore::{IoError, IoQueue, IoRequest, LocalPool, LocalVolume, Segment, VolumeLayout};

pub const MIB: u64 = 1 << 20;
pub const EXTENT: u64 = MIB;

/// A fresh directory under the cargo target dir, removed when dropped.
pub fn test_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vstore-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("create test dir")
}

pub fn pool() -> Arc<LocalPool> {
    Arc::new(LocalPool::new(EXTENT))
}

/// Adds a new sparse disk file `name` of `size` bytes.
pub fn add_file_disk(pool: &LocalPool, dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    pool.add_disk(&path, Some(size)).expect("add disk");
    path
}

/// A pool with one sparse file disk `d0` in a fresh directory, and a volume on it. Keep `dir`
/// alive as long as the pool.
pub struct OneDisk {
    pub dir: tempfile::TempDir,
    pub pool: Arc<LocalPool>,
    pub volume: Arc<LocalVolume>,
}

pub fn one_disk_volume(disk_size: u64, volume_size: u64) -> OneDisk {
    let dir = test_dir();
    let pool = pool();
    add_file_disk(&pool, dir.path(), "d0", disk_size);
    let volume = pool.open_volume(layout(volume_size)).expect("open volume");
    OneDisk { dir, pool, volume }
}

pub fn layout(size: u64) -> VolumeLayout {
    VolumeLayout {
        id: uuid::Uuid::new_v4(),
        size,
        block_size: 512,
        extent_size: EXTENT,
    }
}

/// Memory standing in for guest RAM: `len` bytes starting `misalign` bytes past a 4 KiB boundary.
pub struct GuestBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl GuestBuf {
    pub fn new(len: usize, misalign: usize) -> Self {
        let storage = vec![0u8; len + misalign + 4096];
        let base = storage.as_ptr() as usize;
        let start = base.next_multiple_of(4096) - base + misalign;
        Self {
            storage,
            start,
            len,
        }
    }

    pub fn from_bytes(data: &[u8], misalign: usize) -> Self {
        let mut buf = Self::new(data.len(), misalign);
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }

    /// Splits the buffer into segments of the given lengths (the last takes the rest).
    pub fn segments(&mut self, lens: &[usize]) -> Vec<Segment> {
        let base = self.as_mut_slice().as_mut_ptr();
        let mut at = 0;
        let mut out = Vec::new();
        for &len in lens {
            let len = len.min(self.len - at);
            if len > 0 {
                out.push(Segment {
                    addr: base.wrapping_add(at),
                    len,
                });
            }
            at += len;
        }
        if at < self.len {
            out.push(Segment {
                addr: base.wrapping_add(at),
                len: self.len - at,
            });
        }
        out
    }
}

/// Runs one request to completion.
pub fn run(
    queue: &mut IoQueue,
    volume: &Arc<LocalVolume>,
    request: IoRequest<'_>,
) -> Result<(), IoError> {
    // SAFETY: the segments in `request` borrow buffers that outlive this call, and the request
    // is reaped before it returns.
    unsafe { queue.submit(volume, request, 1) };
    queue.commit().expect("commit");
    let mut result = None;
    while result.is_none() {
        queue.wait().expect("wait");
        queue.reap(|tag, r| {
            assert_eq!(tag, 1);
            result = Some(r);
        });
    }
    assert_eq!(queue.in_flight(), 0);
    result.unwrap()
}

pub fn write(
    queue: &mut IoQueue,
    volume: &Arc<LocalVolume>,
    offset: u64,
    data: &[u8],
) -> Result<(), IoError> {
    let mut buf = GuestBuf::from_bytes(data, 0);
    let segments = buf.segments(&[]);
    run(
        queue,
        volume,
        IoRequest::Write {
            offset,
            segments: &segments,
            write_through: false,
        },
    )
}

pub fn read(
    queue: &mut IoQueue,
    volume: &Arc<LocalVolume>,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, IoError> {
    let mut buf = GuestBuf::new(len, 0);
    buf.as_mut_slice().fill(0xee); // so that a read which fills nothing is noticed
    let segments = buf.segments(&[]);
    run(
        queue,
        volume,
        IoRequest::Read {
            offset,
            segments: &segments,
        },
    )?;
    Ok(buf.as_slice().to_vec())
}

/// Deterministic non-zero bytes, different for every (seed, position).
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[2] ^ seed | 1)
        .collect()
}
