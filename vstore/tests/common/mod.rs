//! Test harness shared by vstore's integration tests: disk files under the target directory
//! (a real file system with O_DIRECT, unlike a tmpfs /tmp), aligned or deliberately misaligned
//! guest-like buffers, and synchronous wrappers around `IoQueue`.

#![allow(dead_code)] // each test binary uses its own subset

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vstore::replica::{ReplicaConnection, ReplicaDirectory, ReplicaGrant, serve_connection};
use vstore::{
    IoError, IoQueue, IoRequest, LocalPool, LocalVolume, Segment, VolumeId, VolumeLayout,
};

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

/// Re-opens a disk after a "restart" within the test process: the queues just dropped may still
/// hold the file, and so its lock, for a moment while the kernel tears their io_uring down, as a
/// killed daemon's do (the daemon waits the same way).
pub fn reopen_disk(pool: &LocalPool, path: &Path) -> vstore::DiskInfo {
    pool.open_disk_waiting(path, Duration::from_secs(10), || {})
        .expect("re-open disk")
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

/// The cluster's view, as a test sets it: (volume, extent) → epoch.
#[derive(Default)]
pub struct Directory {
    layouts: Mutex<HashMap<VolumeId, VolumeLayout>>,
    epochs: Mutex<HashMap<(VolumeId, u64), u64>>,
}

impl ReplicaDirectory for Directory {
    fn replica(&self, volume: VolumeId, extent: u64) -> Option<ReplicaGrant> {
        let epoch = *self.epochs.lock().unwrap().get(&(volume, extent))?;
        let layout = *self.layouts.lock().unwrap().get(&volume)?;
        Some(ReplicaGrant { epoch, layout })
    }
}

pub struct Server {
    pub address: String,
    pub directory: Arc<Directory>,
    pub pool: Arc<LocalPool>,
    _dir: tempfile::TempDir,
}

/// A pool with one disk, served on a loopback port by a thread per connection.
pub fn server() -> Server {
    let dir = test_dir();
    let pool = pool();
    add_file_disk(&pool, dir.path(), "d0", 16 * MIB);
    let directory = Arc::new(Directory::default());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let serving: Arc<dyn ReplicaDirectory> = directory.clone();
    let served = Arc::clone(&pool);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (pool, directory) = (Arc::clone(&served), Arc::clone(&serving));
            std::thread::spawn(move || {
                let _ = serve_connection(stream, pool, directory);
            });
        }
    });
    Server {
        address,
        directory,
        pool,
        _dir: dir,
    }
}

impl Server {
    /// A volume of `size` bytes whose extents this node holds at `epoch`.
    pub fn volume(&self, size: u64, epoch: u64) -> VolumeLayout {
        let layout = layout(size);
        self.hold(layout, epoch);
        layout
    }

    /// Makes this node a replica of every extent of `layout` at `epoch`.
    pub fn hold(&self, layout: VolumeLayout, epoch: u64) {
        let size = layout.size;
        self.directory
            .layouts
            .lock()
            .unwrap()
            .insert(layout.id, layout);
        for extent in 0..size.div_ceil(layout.extent_size) {
            self.set_epoch(layout.id, extent, epoch);
        }
    }

    pub fn set_epoch(&self, volume: VolumeId, extent: u64, epoch: u64) {
        self.directory
            .epochs
            .lock()
            .unwrap()
            .insert((volume, extent), epoch);
    }

    pub fn connect(&self) -> ReplicaConnection {
        ReplicaConnection::connect(&self.address, Duration::from_secs(2)).unwrap()
    }
}
