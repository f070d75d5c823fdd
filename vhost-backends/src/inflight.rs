//! The shared inflight region (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`) for split virtqueues.
//!
//! The backend allocates a memfd on `GET_INFLIGHT_FD`, the frontend keeps it and hands it back
//! with `SET_INFLIGHT_FD` after every (re)connect. Because the frontend holds the memory, it
//! survives a crash of this process: a restarted backend finds in it which descriptor heads it had
//! taken from the available ring without returning them, and submits those again.
//!
//! Layout, per queue (QEMU's vhost-user spec, "Inflight I/O tracking", split rings), native
//! endian, every queue region starting on a 64-byte boundary:
//!
//! ```text
//! u64 features | u16 version | u16 desc_num | u16 last_batch_head | u16 used_idx   (16 bytes)
//! desc[desc_num]: u8 inflight | u8 padding[5] | u16 next | u64 counter          (16 bytes each)
//! ```
//!
//! After the queue regions comes a Vessel-private trailer of [`DEVICE_STATE_SIZE`] bytes (the frontend treats the
//! whole region as opaque memory of the size we asked for): state the device must keep across a crash of this
//! process but not across a device reset, such as the cache mode the guest chose. A reset makes the frontend
//! free the region and ask for a fresh one, which starts with an empty trailer.
//!
//! This module owns the mapping and the bookkeeping protocol; the [`crate::vring::Vring`] of a
//! running queue worker calls it in the order the spec demands:
//!
//! - pop a head: `counter` := next counter, then `inflight` := 1, before the request is submitted;
//! - complete a head: `last_batch_head` := head, publish the used element and used `idx`, then
//!   `inflight` := 0, then `used_idx` := ring used idx. Every store is a release store, so after a
//!   crash at any point either the head is still marked inflight (and is resubmitted) or the used
//!   ring already carries it (and the repair below clears the stale mark).
//!
//! Invariant kept: a head is marked inflight exactly while the device owns it, i.e. between its
//! pop from the available ring and the store of the used idx that returns it. Every index read
//! from the region is bounds-checked before use, so a corrupt region can lose requests but never
//! make this process touch memory outside the mapping.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU64, Ordering};

/// Version written into a queue region the first time its ring starts.
pub const INFLIGHT_VERSION: u16 = 1;

const QUEUE_HEADER_SIZE: usize = 16;
const DESC_STATE_SIZE: usize = 16;
const QUEUE_REGION_ALIGN: usize = 64;

// Offsets inside a queue header.
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
// Offsets inside a descriptor state entry.
const OFF_INFLIGHT: usize = 0;
const OFF_NEXT: usize = 6;
const OFF_COUNTER: usize = 8;

/// Bytes of the device-state trailer after the queue regions.
pub const DEVICE_STATE_SIZE: usize = 64;
/// Most bytes of device state the trailer holds.
pub const MAX_DEVICE_STATE: usize = DEVICE_STATE_SIZE - TRAILER_HEADER;
/// Trailer layout: u32 magic | u8 version | u8 length | state bytes.
const TRAILER_HEADER: usize = 6;
const TRAILER_MAGIC: u32 = u32::from_le_bytes(*b"VSDS");
const TRAILER_VERSION: u8 = 1;

/// Largest split ring the virtio spec allows.
const MAX_QUEUE_SIZE: u16 = 32768;
/// Upper bound on queues a region may describe (virtio-blk and virtio-net stay far below).
const MAX_QUEUES: u16 = 1024;

/// What can go wrong with an inflight region.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// The frontend asked for a region shape we refuse.
    #[error(
        "inflight region of {num_queues} queues x {queue_size} descriptors is invalid: \
         queues must be 1..={MAX_QUEUES} and the queue size 1..={MAX_QUEUE_SIZE}"
    )]
    InvalidShape { num_queues: u16, queue_size: u16 },
    /// memfd_create/ftruncate/fcntl failed.
    #[error(
        "cannot create the inflight memfd ({bytes} bytes): {source}; check RLIMIT_NOFILE and free memory"
    )]
    Create { bytes: usize, source: io::Error },
    /// The file handed back by the frontend is smaller than the region it describes.
    #[error(
        "inflight file from the frontend holds {file_size} bytes but the region needs {needed} \
         bytes from offset {offset}; the frontend sent a truncated or foreign inflight fd"
    )]
    TooSmall {
        file_size: u64,
        needed: u64,
        offset: u64,
    },
    /// mmap offset not page aligned.
    #[error("inflight mmap offset {0:#x} is not page aligned")]
    MisalignedOffset(u64),
    /// mmap failed.
    #[error("cannot map the inflight region ({bytes} bytes): {source}")]
    Map { bytes: usize, source: io::Error },
    /// A queue region describes fewer descriptors than the ring that uses it.
    #[error(
        "inflight region of queue {queue} tracks {desc_num} descriptors but the ring has \
         {ring_size}; the frontend must renegotiate the inflight fd (GET_INFLIGHT_FD)"
    )]
    RingTooLarge {
        queue: u16,
        desc_num: u16,
        ring_size: u16,
    },
}

/// Bytes one queue's region takes, header included, rounded up to 64.
pub fn queue_region_size(queue_size: u16) -> usize {
    let raw = QUEUE_HEADER_SIZE + DESC_STATE_SIZE * usize::from(queue_size);
    raw.div_ceil(QUEUE_REGION_ALIGN) * QUEUE_REGION_ALIGN
}

/// A `MAP_SHARED` mapping, unmapped when the last queue handle and the region drop it.
#[derive(Debug)]
struct SharedMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; every access goes through atomics at aligned
// offsets, so handing the pointer to other threads is sound.
unsafe impl Send for SharedMapping {}
// SAFETY: as above, concurrent access is only through atomic operations.
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    fn map(file: &File, offset: u64, len: usize) -> Result<Self, InflightError> {
        let off =
            libc::off_t::try_from(offset).map_err(|_| InflightError::MisalignedOffset(offset))?;
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) of a file we hold open; the
        // result is checked before use and never aliases Rust-owned memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(InflightError::Map {
                bytes: len,
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| InflightError::Map {
            bytes: len,
            source: io::Error::other("mmap returned NULL"),
        })?;
        Ok(SharedMapping { ptr, len })
    }

    /// An atomic view of the `T`-sized slot at `offset`.
    ///
    /// Panics never: callers pass offsets computed from validated queue indices; the assertion
    /// below is a debug aid only.
    fn atomic<T>(&self, offset: usize) -> &T {
        debug_assert!(offset + std::mem::size_of::<T>() <= self.len);
        debug_assert!(offset.is_multiple_of(std::mem::align_of::<T>()));
        // Sound because: offset + size_of::<T>() lies inside the mapping (callers only build offsets
        // from queue indices < num_queues and descriptor indices < desc_num, both validated
        // against the mapping length at creation); the mapping is page aligned and every field
        // offset in the layout is a multiple of its size, so the pointer is aligned for T, which
        // is always one of the std atomic integer types; the mapping outlives `&self`.
        let ptr = self.ptr.as_ptr().wrapping_add(offset).cast::<T>();
        // SAFETY: see above: in bounds, aligned, alive for `&self`, only accessed atomically.
        unsafe { &*ptr }
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned and nothing borrows the mapping any
        // more (all handles hold an Arc to self and are gone).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// The inflight region of a whole device: one queue region per virtqueue.
#[derive(Debug)]
pub struct InflightRegion {
    file: File,
    mapping: Arc<SharedMapping>,
    num_queues: u16,
    queue_size: u16,
    /// Offset of the device-state trailer, when the mapping has one (a region of our own making).
    trailer: Option<usize>,
}

impl InflightRegion {
    /// Allocates a zeroed memfd for `num_queues` rings of up to `queue_size` descriptors
    /// (`GET_INFLIGHT_FD`). Its size is sealed so the frontend cannot shrink it under us.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<Self, InflightError> {
        check_shape(num_queues, queue_size)?;
        let queues_bytes = usize::from(num_queues) * queue_region_size(queue_size);
        let bytes = queues_bytes + DEVICE_STATE_SIZE;
        let create_err = |source| InflightError::Create { bytes, source };
        // SAFETY: the name is a NUL-terminated static string; the returned fd is checked.
        let fd = unsafe {
            libc::memfd_create(
                c"vessel-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(create_err(io::Error::last_os_error()));
        }
        // SAFETY: fd is a freshly created descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(bytes as u64).map_err(create_err)?;
        // SAFETY: plain fcntl on an fd we own; the result is checked.
        let rc = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
            )
        };
        if rc < 0 {
            return Err(create_err(io::Error::last_os_error()));
        }
        let mapping = Arc::new(SharedMapping::map(&file, 0, bytes)?);
        let region = InflightRegion {
            file,
            mapping,
            num_queues,
            queue_size,
            trailer: Some(queues_bytes),
        };
        for q in 0..num_queues {
            region
                .header_u16(q, OFF_DESC_NUM)
                .store(queue_size, Ordering::Release);
        }
        Ok(region)
    }

    /// Maps a region the frontend hands back (`SET_INFLIGHT_FD`).
    pub fn open(
        file: File,
        mmap_offset: u64,
        mmap_size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        check_shape(num_queues, queue_size)?;
        let needed = usize::from(num_queues) * queue_region_size(queue_size);
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        if !mmap_offset.is_multiple_of(page) {
            return Err(InflightError::MisalignedOffset(mmap_offset));
        }
        let file_size = file
            .metadata()
            .map_err(|source| InflightError::Map {
                bytes: needed,
                source,
            })?
            .len();
        let too_small = || InflightError::TooSmall {
            file_size,
            needed: needed as u64,
            offset: mmap_offset,
        };
        if mmap_size < needed as u64 {
            return Err(too_small());
        }
        // Touching a page past the end of the file would raise SIGBUS in this process.
        match mmap_offset.checked_add(needed as u64) {
            Some(end) if end <= file_size => {}
            _ => return Err(too_small()),
        }
        // The trailer is there when the region is one we made (it is as large as we asked for).
        let with_trailer = needed + DEVICE_STATE_SIZE;
        let has_trailer = mmap_size >= with_trailer as u64
            && mmap_offset
                .checked_add(with_trailer as u64)
                .is_some_and(|end| end <= file_size);
        let len = if has_trailer { with_trailer } else { needed };
        let mapping = Arc::new(SharedMapping::map(&file, mmap_offset, len)?);
        Ok(InflightRegion {
            file,
            mapping,
            num_queues,
            queue_size,
            trailer: has_trailer.then_some(needed),
        })
    }

    /// The memfd, to pass to the frontend.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Bytes of the mapping the frontend must keep.
    pub fn mmap_size(&self) -> u64 {
        let queues = usize::from(self.num_queues) * queue_region_size(self.queue_size);
        (queues + self.trailer.map_or(0, |_| DEVICE_STATE_SIZE)) as u64
    }

    /// The device state last saved with [`InflightRegion::save_device_state`], if any.
    pub fn device_state(&self) -> Option<Vec<u8>> {
        let base = self.trailer?;
        let magic = self
            .mapping
            .atomic::<std::sync::atomic::AtomicU32>(base)
            .load(Ordering::Acquire);
        let version = self
            .mapping
            .atomic::<AtomicU8>(base + 4)
            .load(Ordering::Acquire);
        let len = usize::from(
            self.mapping
                .atomic::<AtomicU8>(base + 5)
                .load(Ordering::Acquire),
        );
        if magic != TRAILER_MAGIC || version != TRAILER_VERSION || len > MAX_DEVICE_STATE {
            return None;
        }
        Some(
            (0..len)
                .map(|i| {
                    self.mapping
                        .atomic::<AtomicU8>(base + TRAILER_HEADER + i)
                        .load(Ordering::Acquire)
                })
                .collect(),
        )
    }

    /// Saves `state` (at most [`MAX_DEVICE_STATE`] bytes) in the trailer; false if the region has no trailer or
    /// the state is too large. The magic is written last, so a crash mid-way leaves no state rather than a torn one.
    pub fn save_device_state(&self, state: &[u8]) -> bool {
        let Some(base) = self.trailer else {
            return false;
        };
        let Ok(len) = u8::try_from(state.len()) else {
            return false;
        };
        if state.len() > MAX_DEVICE_STATE {
            return false;
        }
        let magic = self.mapping.atomic::<std::sync::atomic::AtomicU32>(base);
        magic.store(0, Ordering::Release);
        self.mapping
            .atomic::<AtomicU8>(base + 4)
            .store(TRAILER_VERSION, Ordering::Relaxed);
        self.mapping
            .atomic::<AtomicU8>(base + 5)
            .store(len, Ordering::Relaxed);
        for (i, byte) in state.iter().enumerate() {
            self.mapping
                .atomic::<AtomicU8>(base + TRAILER_HEADER + i)
                .store(*byte, Ordering::Relaxed);
        }
        magic.store(TRAILER_MAGIC, Ordering::Release);
        true
    }

    /// Number of queue regions.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Descriptors per queue region.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The handle of queue `index`, or `None` if the region has no such queue.
    pub fn queue(&self, index: u16) -> Option<InflightQueue> {
        (index < self.num_queues).then(|| InflightQueue {
            mapping: Arc::clone(&self.mapping),
            base: usize::from(index) * queue_region_size(self.queue_size),
            index,
            capacity: self.queue_size,
            desc_num: self.queue_size,
            counter: 0,
        })
    }

    fn header_u16(&self, queue: u16, field: usize) -> &AtomicU16 {
        self.mapping
            .atomic(usize::from(queue) * queue_region_size(self.queue_size) + field)
    }
}

fn check_shape(num_queues: u16, queue_size: u16) -> Result<(), InflightError> {
    if num_queues == 0 || num_queues > MAX_QUEUES || queue_size == 0 || queue_size > MAX_QUEUE_SIZE
    {
        return Err(InflightError::InvalidShape {
            num_queues,
            queue_size,
        });
    }
    Ok(())
}

/// What a ring (re)start learned from its inflight region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Where to resume reading the available ring.
    pub next_avail: u16,
    /// Heads taken but never returned before the previous backend stopped, oldest first.
    pub resubmit: Vec<u16>,
    /// Stale inflight marks cleared because the used ring already held them.
    pub repaired: u16,
    /// `true` when the region was fresh (first start): nothing was recovered.
    pub fresh: bool,
}

/// One queue's slice of the inflight region, owned by the worker running that queue.
#[derive(Debug)]
pub struct InflightQueue {
    mapping: Arc<SharedMapping>,
    base: usize,
    index: u16,
    /// Entries the mapping holds for this queue.
    capacity: u16,
    /// Entries in use (the ring size once recovered).
    desc_num: u16,
    counter: u64,
}

impl InflightQueue {
    fn header_u16(&self, field: usize) -> &AtomicU16 {
        self.mapping.atomic(self.base + field)
    }

    fn desc_off(&self, head: u16) -> usize {
        self.base + QUEUE_HEADER_SIZE + usize::from(head) * DESC_STATE_SIZE
    }

    fn inflight_flag(&self, head: u16) -> &AtomicU8 {
        self.mapping.atomic(self.desc_off(head) + OFF_INFLIGHT)
    }

    fn next_field(&self, head: u16) -> &AtomicU16 {
        self.mapping.atomic(self.desc_off(head) + OFF_NEXT)
    }

    fn counter_field(&self, head: u16) -> &AtomicU64 {
        self.mapping.atomic(self.desc_off(head) + OFF_COUNTER)
    }

    /// Brings the region in line with the ring when the ring starts, and says where to resume.
    ///
    /// `ring_used_idx` is the `idx` of the used ring in guest memory, `base` what the frontend
    /// sent with SET_VRING_BASE (used only for a fresh region). A partially committed last batch
    /// (region `used_idx` behind the ring's) is repaired first; every head still marked is then
    /// resubmitted in counter order and `next_avail` = used idx + number of resubmitted heads.
    pub fn recover(
        &mut self,
        ring_size: u16,
        ring_used_idx: u16,
        base: u16,
    ) -> Result<Recovery, InflightError> {
        let stored_desc_num = self.header_u16(OFF_DESC_NUM).load(Ordering::Acquire);
        if ring_size > self.capacity {
            return Err(InflightError::RingTooLarge {
                queue: self.index,
                desc_num: self.capacity,
                ring_size,
            });
        }
        let version = self.header_u16(OFF_VERSION).load(Ordering::Acquire);
        if version == 0 || stored_desc_num != self.capacity {
            // First start on this region (or a region written by someone with another layout):
            // nothing to recover. Record the ring's used idx so a later start does not mistake
            // the difference for a half-committed batch.
            for head in 0..self.capacity {
                self.inflight_flag(head).store(0, Ordering::Relaxed);
            }
            self.header_u16(OFF_DESC_NUM)
                .store(self.capacity, Ordering::Relaxed);
            self.header_u16(OFF_LAST_BATCH_HEAD)
                .store(0, Ordering::Relaxed);
            self.header_u16(OFF_USED_IDX)
                .store(ring_used_idx, Ordering::Relaxed);
            self.header_u16(OFF_VERSION)
                .store(INFLIGHT_VERSION, Ordering::Release);
            self.desc_num = ring_size;
            self.counter = 0;
            return Ok(Recovery {
                next_avail: base,
                resubmit: Vec::new(),
                repaired: 0,
                fresh: true,
            });
        }
        self.desc_num = ring_size;

        // Step 1: repair a batch whose used idx reached the ring but whose marks were not cleared.
        let region_used = self.header_u16(OFF_USED_IDX).load(Ordering::Acquire);
        let mut repaired = 0u16;
        if region_used != ring_used_idx {
            let batch = ring_used_idx.wrapping_sub(region_used);
            let mut head = self.header_u16(OFF_LAST_BATCH_HEAD).load(Ordering::Acquire);
            // A batch can never hold more entries than the ring; a larger difference means the
            // region is stale, and the walk is bounded anyway.
            for _ in 0..batch.min(self.capacity) {
                if head >= self.capacity {
                    break;
                }
                if self.inflight_flag(head).swap(0, Ordering::AcqRel) != 0 {
                    repaired += 1;
                }
                head = self.next_field(head).load(Ordering::Acquire);
            }
            self.header_u16(OFF_USED_IDX)
                .store(ring_used_idx, Ordering::Release);
        }

        // Step 2: collect what is still marked, oldest first.
        let mut pending: Vec<(u64, u16)> = Vec::new();
        for head in 0..self.capacity {
            if self.inflight_flag(head).load(Ordering::Acquire) == 0 {
                continue;
            }
            if head >= ring_size {
                // Cannot belong to this ring: the ring shrank. Forget it rather than hand the
                // guest a head it never made.
                self.inflight_flag(head).store(0, Ordering::Release);
                continue;
            }
            pending.push((self.counter_field(head).load(Ordering::Acquire), head));
        }
        pending.sort_unstable();
        self.counter = pending.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        let resubmit: Vec<u16> = pending.into_iter().map(|(_, head)| head).collect();
        // resubmit.len() <= ring_size <= 32768, so it fits a u16.
        let next_avail = ring_used_idx.wrapping_add(resubmit.len() as u16);
        Ok(Recovery {
            next_avail,
            resubmit,
            repaired,
            fresh: false,
        })
    }

    /// Marks `head` as owned by the device. Call before the request reaches the backend store.
    pub fn mark_inflight(&mut self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        self.counter_field(head)
            .store(self.counter, Ordering::Relaxed);
        self.counter = self.counter.wrapping_add(1);
        self.inflight_flag(head).store(1, Ordering::Release);
    }

    /// First half of returning `head`: record it as the last batch, before the used ring is
    /// written.
    pub fn begin_complete(&self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        let previous = self.header_u16(OFF_LAST_BATCH_HEAD).load(Ordering::Relaxed);
        self.next_field(head).store(previous, Ordering::Relaxed);
        self.header_u16(OFF_LAST_BATCH_HEAD)
            .store(head, Ordering::Release);
    }

    /// Second half of returning `head`, after the used ring idx became `used_idx`.
    pub fn finish_complete(&self, head: u16, used_idx: u16) {
        if head < self.desc_num {
            self.inflight_flag(head).store(0, Ordering::Release);
        }
        self.header_u16(OFF_USED_IDX)
            .store(used_idx, Ordering::Release);
    }

    /// Whether `head` is marked inflight (for tests and diagnostics).
    pub fn is_inflight(&self, head: u16) -> bool {
        head < self.capacity && self.inflight_flag(head).load(Ordering::Acquire) != 0
    }

    /// The queue index this handle belongs to.
    pub fn index(&self) -> u16 {
        self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(region: &InflightRegion, q: u16, ring_size: u16) -> InflightQueue {
        let mut queue = region.queue(q).unwrap();
        let r = queue.recover(ring_size, 0, 0).unwrap();
        assert!(r.fresh);
        assert_eq!(r.next_avail, 0);
        queue
    }

    /// Completes `head` the way a running vring does, `used` being the ring idx afterwards.
    fn complete(queue: &InflightQueue, head: u16, used: u16) {
        queue.begin_complete(head);
        queue.finish_complete(head, used);
    }

    #[test]
    fn region_size_is_aligned_and_fits_every_descriptor() {
        for qs in [1u16, 2, 128, 256, 1024, 32768] {
            let size = queue_region_size(qs);
            assert_eq!(size % 64, 0);
            assert!(size >= 16 + 16 * usize::from(qs));
        }
        let region = InflightRegion::create(4, 256).unwrap();
        assert_eq!(
            region.mmap_size(),
            (4 * queue_region_size(256) + DEVICE_STATE_SIZE) as u64
        );
        assert_eq!(region.file().metadata().unwrap().len(), region.mmap_size());
    }

    #[test]
    fn invalid_shapes_are_refused() {
        assert!(matches!(
            InflightRegion::create(0, 256),
            Err(InflightError::InvalidShape { .. })
        ));
        assert!(matches!(
            InflightRegion::create(1, 0),
            Err(InflightError::InvalidShape { .. })
        ));
        assert!(matches!(
            InflightRegion::create(1, 40000),
            Err(InflightError::InvalidShape { .. })
        ));
    }

    #[test]
    fn memfd_is_sealed_against_shrinking() {
        let region = InflightRegion::create(1, 8).unwrap();
        assert!(region.file().set_len(0).is_err());
    }

    #[test]
    fn clean_stop_resumes_at_used_idx_without_resubmission() {
        let region = InflightRegion::create(1, 8).unwrap();
        let mut q = started(&region, 0, 8);
        for head in 0..4 {
            q.mark_inflight(head);
        }
        for (i, head) in (0..4).enumerate() {
            complete(&q, head, i as u16 + 1);
        }
        let mut again = region.queue(0).unwrap();
        let r = again.recover(8, 4, 4).unwrap();
        assert_eq!(
            r,
            Recovery {
                next_avail: 4,
                resubmit: vec![],
                repaired: 0,
                fresh: false
            }
        );
    }

    #[test]
    fn crash_with_requests_in_flight_resubmits_in_counter_order() {
        let region = InflightRegion::create(2, 16).unwrap();
        let mut q = started(&region, 1, 16);
        // Popped in this order: 5, 2, 9, 7. Then 2 completes (used idx 1).
        for head in [5u16, 2, 9, 7] {
            q.mark_inflight(head);
        }
        complete(&q, 2, 1);
        drop(q); // the crash: nothing else runs

        // A new process maps the same memfd.
        let file = region.file().try_clone().unwrap();
        let reopened = InflightRegion::open(file, 0, region.mmap_size(), 2, 16).unwrap();
        let mut q = reopened.queue(1).unwrap();
        let r = q.recover(16, 1, 0).unwrap();
        assert!(!r.fresh);
        assert_eq!(r.resubmit, vec![5, 9, 7]);
        assert_eq!(r.next_avail, 4, "used idx 1 + 3 heads in flight");
        assert_eq!(r.repaired, 0);
        // Queue 0 was never started: still fresh.
        let r0 = reopened.queue(0).unwrap().recover(16, 0, 0).unwrap();
        assert!(r0.fresh);
    }

    #[test]
    fn crash_between_used_idx_and_clearing_is_repaired() {
        let region = InflightRegion::create(1, 8).unwrap();
        let mut q = started(&region, 0, 8);
        q.mark_inflight(3);
        q.mark_inflight(6);
        // Head 3 is being returned: last batch recorded, used ring idx published (to 1) ...
        q.begin_complete(3);
        // ... and the process dies before inflight[3] := 0 and used_idx := 1.
        drop(q);
        let mut q = region.queue(0).unwrap();
        let r = q.recover(8, 1, 0).unwrap();
        assert_eq!(r.repaired, 1);
        assert_eq!(r.resubmit, vec![6]);
        assert_eq!(r.next_avail, 2);
        assert!(!q.is_inflight(3));
    }

    #[test]
    fn crash_before_used_ring_publish_resubmits_the_head() {
        let region = InflightRegion::create(1, 8).unwrap();
        let mut q = started(&region, 0, 8);
        q.mark_inflight(4);
        // last_batch_head recorded, but the used ring idx never moved (still 0).
        q.begin_complete(4);
        drop(q);
        let mut q = region.queue(0).unwrap();
        let r = q.recover(8, 0, 0).unwrap();
        assert_eq!(r.repaired, 0);
        assert_eq!(r.resubmit, vec![4]);
        assert_eq!(r.next_avail, 1);
    }

    #[test]
    fn repair_walks_a_whole_batch_through_next_links() {
        let region = InflightRegion::create(1, 8).unwrap();
        let mut q = started(&region, 0, 8);
        for head in [1u16, 2, 3] {
            q.mark_inflight(head);
        }
        // A batch of two (2 then 3) reached the used ring (idx 0 -> 2) but the marks stayed.
        q.begin_complete(2);
        q.begin_complete(3);
        drop(q);
        let mut q = region.queue(0).unwrap();
        let r = q.recover(8, 2, 0).unwrap();
        assert_eq!(r.repaired, 2);
        assert_eq!(r.resubmit, vec![1]);
        assert_eq!(r.next_avail, 3);
    }

    #[test]
    fn new_requests_after_recovery_order_after_resubmitted_ones() {
        let region = InflightRegion::create(1, 8).unwrap();
        let mut q = started(&region, 0, 8);
        q.mark_inflight(0);
        q.mark_inflight(1);
        drop(q);
        let mut q = region.queue(0).unwrap();
        let r = q.recover(8, 0, 0).unwrap();
        assert_eq!(r.resubmit, vec![0, 1]);
        // Head 0 completes, a new head 5 is popped, then crash again.
        complete(&q, 0, 1);
        q.mark_inflight(5);
        drop(q);
        let mut q = region.queue(0).unwrap();
        let r = q.recover(8, 1, 0).unwrap();
        assert_eq!(r.resubmit, vec![1, 5]);
        assert_eq!(r.next_avail, 3);
    }

    #[test]
    fn fresh_region_records_ring_used_idx() {
        // A region created while the ring already progressed (e.g. a new memfd after a guest
        // reset raced with a restart) must not be "repaired" on the next start.
        let region = InflightRegion::create(1, 8).unwrap();
        let mut q = region.queue(0).unwrap();
        let r = q.recover(8, 37, 37).unwrap();
        assert!(r.fresh);
        assert_eq!(r.next_avail, 37);
        q.mark_inflight(0);
        drop(q);
        let mut q = region.queue(0).unwrap();
        let r = q.recover(8, 37, 0).unwrap();
        assert_eq!(r.repaired, 0);
        assert_eq!(r.resubmit, vec![0]);
        assert_eq!(r.next_avail, 38);
    }

    #[test]
    fn corrupt_region_indices_are_bounded() {
        let region = InflightRegion::create(1, 8).unwrap();
        let q = started(&region, 0, 8);
        // Garbage from a broken frontend: last_batch_head and a next link out of range, used
        // idx far behind the ring.
        q.header_u16(OFF_LAST_BATCH_HEAD)
            .store(60000, Ordering::Relaxed);
        q.header_u16(OFF_USED_IDX).store(100, Ordering::Relaxed);
        drop(q);
        let mut q = region.queue(0).unwrap();
        let r = q.recover(8, 5000, 0).unwrap();
        assert_eq!(r.resubmit, Vec::<u16>::new());
        assert_eq!(r.next_avail, 5000);
    }

    #[test]
    fn heads_beyond_a_shrunk_ring_are_dropped() {
        let region = InflightRegion::create(1, 16).unwrap();
        let mut q = started(&region, 0, 16);
        q.mark_inflight(12);
        q.mark_inflight(3);
        drop(q);
        let mut q = region.queue(0).unwrap();
        let r = q.recover(8, 0, 0).unwrap();
        assert_eq!(r.resubmit, vec![3]);
        assert!(!q.is_inflight(12));
    }

    #[test]
    fn ring_larger_than_region_is_refused() {
        let region = InflightRegion::create(1, 8).unwrap();
        let mut q = region.queue(0).unwrap();
        assert!(matches!(
            q.recover(16, 0, 0),
            Err(InflightError::RingTooLarge { .. })
        ));
    }

    #[test]
    fn open_refuses_truncated_files_and_bad_offsets() {
        let region = InflightRegion::create(2, 64).unwrap();
        let size = region.mmap_size();
        let f = || region.file().try_clone().unwrap();
        assert!(matches!(
            InflightRegion::open(f(), 0, size, 4, 64),
            Err(InflightError::TooSmall { .. })
        ));
        assert!(matches!(
            InflightRegion::open(f(), 4096, size, 2, 64),
            Err(InflightError::TooSmall { .. })
        ));
        assert!(matches!(
            InflightRegion::open(f(), 100, size, 2, 64),
            Err(InflightError::MisalignedOffset(100))
        ));
        assert!(InflightRegion::open(f(), 0, size, 2, 64).is_ok());
    }

    #[test]
    fn device_state_survives_a_reopen_and_a_fresh_region_has_none() {
        let region = InflightRegion::create(2, 8).unwrap();
        assert_eq!(region.device_state(), None);
        assert!(region.save_device_state(&[1, 0]));
        assert!(!region.save_device_state(&[0; MAX_DEVICE_STATE + 1]));
        let file = region.file().try_clone().unwrap();
        let size = region.mmap_size();
        drop(region);
        let reopened = InflightRegion::open(file, 0, size, 2, 8).unwrap();
        assert_eq!(reopened.device_state(), Some(vec![1, 0]));
        // A frontend that maps only the queue regions gets no trailer, and nothing breaks.
        let file = reopened.file().try_clone().unwrap();
        let short = InflightRegion::open(file, 0, size - DEVICE_STATE_SIZE as u64, 2, 8).unwrap();
        assert_eq!(short.device_state(), None);
        assert!(!short.save_device_state(&[1]));
        assert_eq!(InflightRegion::create(2, 8).unwrap().device_state(), None);
    }
}
