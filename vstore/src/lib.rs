//! vstore: Vessel's node-local block store.
//!
//! A pool of disks (regular files or block devices) is carved into fixed-size extents.
//! Volumes are thin: an extent gets a physical slot on a disk at its first write, unwritten
//! extents read as zeroes, and discarding a whole extent gives its slot back. Volume I/O runs
//! over io_uring with O_DIRECT, one [`IoQueue`] per worker thread, straight from the caller's
//! buffers when they are aligned.
//!
//! vstore knows nothing of virtio, Raft or gRPC: the vhost-user-blk device programs against
//! [`LocalPool`], [`LocalVolume`] and [`IoQueue`]; the daemon decides which disks and volumes
//! exist (from the cluster metadata) and calls [`LocalPool::open_disk`] / [`LocalPool::add_disk`]
//! and [`LocalPool::open_volume`].
//!
//! Map of the crate:
//! - `format`: the on-disk layout (header, slot table), version 1.
//! - `disk`: one disk — O_DIRECT fd, slot table, slot life cycle.
//! - `pool`: the disks, placement, the volume registry.
//! - `volume`: a volume's extent map and the leases that make slot reuse safe.
//! - `queue`: io_uring submission and completion of volume requests.
//! - `stats`: per-volume counters and latency histogram.
//! - `replica`: serving other nodes' extent I/O (the replica side of the data path).
//! - `remote`: sending extent I/O to other nodes' replicas (the writer side of the data path).
//! - `rebuild`: copying extents to a replica being built while the guest writes.
//! - `activity`: the activity log of a replicated volume (extents with writes in flight).

pub mod activity;
mod aligned;
mod disk;
mod error;
mod format;
mod pool;
mod queue;
pub mod rebuild;
pub mod remote;
pub mod replica;
mod stats;
mod volume;

use std::path::PathBuf;

pub use error::{IoError, StoreError};
pub use pool::LocalPool;
pub use queue::{IoQueue, IoRequest, Segment};
pub use stats::{LATENCY_BUCKETS_US, LatencyHistogram, OpKind, StatsSnapshot, VolumeStats};
pub use volume::LocalVolume;

/// A volume's id, assigned by the control plane.
pub type VolumeId = uuid::Uuid;
/// A disk's id, written into its header when it is formatted.
pub type DiskId = uuid::Uuid;

/// Extent size used unless configured otherwise.
pub const DEFAULT_EXTENT_SIZE: u64 = 64 << 20;

/// Shape of a volume, as the control plane knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VolumeLayout {
    pub id: VolumeId,
    /// Bytes; a multiple of `block_size`.
    pub size: u64,
    /// Logical block size the guest sees: a power of two from 512 to 4096. Every request's
    /// offset and length must be a multiple of it.
    pub block_size: u32,
    /// Must equal the pool's extent size.
    pub extent_size: u64,
}

/// A disk of the pool, as `vessel disk list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    pub id: DiskId,
    pub path: PathBuf,
    /// Data bytes: slots × extent size.
    pub capacity: u64,
    /// Bytes of allocated (or still being released) slots.
    pub used: u64,
    pub slots: u64,
    pub slots_used: u64,
    pub block_device: bool,
    /// Smallest O_DIRECT offset/length alignment the disk accepts; volumes with a smaller block
    /// size never get extents on it.
    pub min_block_size: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>() {}

    #[test]
    fn shared_types_are_thread_safe() {
        assert_send_sync::<LocalPool>();
        assert_send_sync::<LocalVolume>();
        assert_send_sync::<VolumeStats>();
        assert_send::<IoQueue>();
    }
}
