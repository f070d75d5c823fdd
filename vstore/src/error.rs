//! Errors of the block store.
//!
//! [`StoreError`] is for management calls (disks, volumes): every message names the disk or
//! volume and, where there is one, says what to do. [`IoError`] is the result of one guest
//! request; the device turns it into a virtio status.

use std::io;
use std::path::PathBuf;

use crate::{DiskId, VolumeId};

/// A management operation on the pool failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "extent size {extent_size} is invalid: use a multiple of 1 MiB from 1 MiB to 1 GiB (default 64 MiB)"
    )]
    InvalidExtentSize { extent_size: u64 },

    #[error("disk file '{}' does not exist; pass --size to create it as a sparse file", path.display())]
    DiskFileMissing { path: PathBuf },

    #[error("'{}' is neither a regular file nor a block device; give a disk file or a block device", path.display())]
    NotADisk { path: PathBuf },

    #[error("'{}' is a block device, its size is fixed; omit --size", path.display())]
    SizeOnBlockDevice { path: PathBuf },

    #[error("disk file '{}' already exists with {actual} bytes, not the {requested} asked for; omit --size to use it as it is", path.display())]
    SizeMismatch {
        path: PathBuf,
        actual: u64,
        requested: u64,
    },

    #[error("disk '{}' has {size} bytes, too small for one {extent_size}-byte extent plus metadata; give at least {needed} bytes", path.display())]
    DiskTooSmall {
        path: PathBuf,
        size: u64,
        extent_size: u64,
        needed: u64,
    },

    #[error("'{}' carries no Vessel disk header; add it with `vessel disk add` first", path.display())]
    NotVesselDisk { path: PathBuf },

    #[error("'{}' holds data that is not a Vessel disk (its first 4 KiB are not zero); wipe it first (e.g. `wipefs -a`) if it is really meant for Vessel", path.display())]
    ForeignData { path: PathBuf },

    #[error("disk header of '{}' is corrupt: {reason}; restore the disk or wipe and re-add it", path.display())]
    HeaderCorrupt { path: PathBuf, reason: String },

    #[error("disk '{}' uses on-disk format version {version}, this build reads only version 1; run a newer vesseld", path.display())]
    UnsupportedVersion { path: PathBuf, version: u32 },

    #[error("slot table entry {slot} of disk '{}' is corrupt (checksum or flags); the disk needs repair before it can be used", path.display())]
    SlotEntryCorrupt { path: PathBuf, slot: u64 },

    #[error("disk '{}' is {size} bytes but its header needs {expected}; was the file truncated?", path.display())]
    DiskTruncated {
        path: PathBuf,
        size: u64,
        expected: u64,
    },

    #[error("disk '{}' was formatted with {disk}-byte extents but the pool uses {pool}-byte extents", path.display())]
    ExtentSizeMismatch { path: PathBuf, disk: u64, pool: u64 },

    #[error("disk {id} at '{}' is already in the pool (as '{}')", path.display(), existing.display())]
    DiskAlreadyInPool {
        id: DiskId,
        path: PathBuf,
        existing: PathBuf,
    },

    #[error("disk {id} at '{}' holds {slots} allocated extents; re-open it with open_disk (daemon restart) instead of adding it, or delete those volumes first", path.display())]
    DiskHasExtents {
        id: DiskId,
        path: PathBuf,
        slots: u64,
    },

    #[error("disk {id} not found in the pool; `vessel disk list` shows the disks")]
    DiskNotFound { id: DiskId },

    #[error("disk {id} at '{}' is busy: {slots} extents are allocated on it; delete or move the volumes using it first", path.display())]
    DiskBusy {
        id: DiskId,
        path: PathBuf,
        slots: u64,
    },

    #[error("disk '{}' is locked by another process (another vesseld?)", path.display())]
    DiskLocked { path: PathBuf },

    #[error("disk '{}' does not support O_DIRECT I/O; put disk files on ext4 or xfs, or use a block device", path.display())]
    DirectIoUnsupported { path: PathBuf },

    #[error("disk '{}' needs {align}-byte aligned O_DIRECT I/O; only 512 to 4096 bytes are supported", path.display())]
    DiskAlignmentUnsupported { path: PathBuf, align: u32 },

    #[error("volume {volume} is open for I/O (attached or in use); detach it first")]
    VolumeBusy { volume: VolumeId },

    #[error(
        "volume {volume}: block size {block_size} is not supported; use a power of two from {min} to 4096"
    )]
    BlockSizeUnsupported {
        volume: VolumeId,
        block_size: u32,
        min: u32,
    },

    #[error("volume {volume}: size {size} is not a multiple of its block size {block_size}")]
    SizeNotBlockMultiple {
        volume: VolumeId,
        size: u64,
        block_size: u32,
    },

    #[error("volume {volume}: extent size {volume_extent} differs from the pool's {pool_extent}")]
    VolumeExtentSizeMismatch {
        volume: VolumeId,
        volume_extent: u64,
        pool_extent: u64,
    },

    #[error("volume {volume} is already open with block size {open}, not {requested}")]
    VolumeLayoutMismatch {
        volume: VolumeId,
        open: u32,
        requested: u32,
    },

    #[error(
        "volume {volume}: cannot shrink from {size} to {new_size} bytes; only growing is supported"
    )]
    ShrinkRefused {
        volume: VolumeId,
        size: u64,
        new_size: u64,
    },

    #[error(
        "volume {volume}: size {size} exceeds the {max} bytes one volume can have with this extent size"
    )]
    VolumeTooLarge {
        volume: VolumeId,
        size: u64,
        max: u64,
    },

    #[error("volume {volume}: extent {extent} is claimed by two slots (disk '{}' slot {first_slot} and disk '{}' slot {second_slot}); the pool needs repair", first_disk.display(), second_disk.display())]
    DuplicateExtent {
        volume: VolumeId,
        extent: u64,
        first_disk: PathBuf,
        first_slot: u64,
        second_disk: PathBuf,
        second_slot: u64,
    },

    #[error("volume {volume}: extent {extent} lives on disk '{}', which needs {align}-byte I/O, more than the volume's {block_size}-byte blocks", path.display())]
    ExtentOnIncompatibleDisk {
        volume: VolumeId,
        extent: u64,
        path: PathBuf,
        align: u32,
        block_size: u32,
    },

    #[error("I/O error {op} disk '{}': {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

impl StoreError {
    pub(crate) fn io(path: &std::path::Path, op: &'static str, source: io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }
}

/// One guest request failed.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error(
        "request at byte {offset}, {len} bytes, runs past the end of volume {volume} ({size} bytes)"
    )]
    OutOfRange {
        volume: VolumeId,
        offset: u64,
        len: u64,
        size: u64,
    },

    #[error(
        "request at byte {offset}, {len} bytes, is not aligned to the {block_size}-byte blocks of volume {volume}"
    )]
    Misaligned {
        volume: VolumeId,
        offset: u64,
        len: u64,
        block_size: u32,
    },

    #[error(
        "volume {volume}: no free space in the pool for extent {extent}; add a disk or delete volumes"
    )]
    NoSpace { volume: VolumeId, extent: u64 },

    /// An error from the kernel (the errno of a failed read, write, sync or fallocate), or from
    /// a slot-table update that a first write or a discard needed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),

    /// A replica on another node failed the request or could not be reached.
    #[error("{0}")]
    Replica(#[from] crate::remote::RemoteError),
}

impl From<StoreError> for IoError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Io { source, .. } => IoError::Io(source),
            other => IoError::Io(io::Error::other(other)),
        }
    }
}
