//! A started virtqueue as its worker thread sees it.
//!
//! The handler builds a [`Vring`] when a ring becomes ready and moves it into the queue worker;
//! the worker hands it back when it stops, so the handler can answer GET_VRING_BASE with
//! [`Vring::next_avail`]. Everything a device does with the ring goes through here, which is
//! what keeps the inflight region honest: [`Vring::pop`] marks a head inflight before the device
//! sees it and [`Vring::complete`] clears it only after the used ring carries it (see
//! [`crate::inflight`] for the ordering). Heads recovered from the inflight region after a
//! reconnect are handed out by `pop` first, oldest first, before any new available entry.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::eventfd::EventFd;

use crate::chain::{ChainError, Descriptor, TableEntry, read_chain, walk_chain};
use crate::inflight::InflightQueue;

/// `VRING_USED_F_NO_NOTIFY`: the device asks the driver not to kick (without EVENT_IDX).
const USED_F_NO_NOTIFY: u16 = 1;

/// `VRING_AVAIL_F_NO_INTERRUPT`: the driver asks the device not to interrupt (without EVENT_IDX).
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// An eventfd the frontend may replace while the ring runs (SET_VRING_CALL / SET_VRING_ERR).
#[derive(Debug, Default)]
pub struct EventSlot(Mutex<Option<EventFd>>);

impl EventSlot {
    /// An empty slot: signals go nowhere until the frontend sends an fd.
    pub fn new() -> Self {
        EventSlot(Mutex::new(None))
    }

    /// Installs `fd`, dropping (closing) the previous one.
    pub fn replace(&self, fd: Option<EventFd>) {
        *self.lock() = fd;
    }

    /// Writes 1 to the eventfd if there is one. A failed write (the frontend closed its end
    /// does not fail an eventfd write, so only a full counter can) loses nothing: the counter
    /// being full means the frontend has a wake-up pending anyway.
    pub fn signal(&self) {
        if let Some(fd) = self.lock().as_ref() {
            let _ = fd.write(1);
        }
    }

    /// Whether an fd is installed.
    pub fn is_set(&self) -> bool {
        self.lock().is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<EventFd>> {
        match self.0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// Where a ring's three parts lie in one snapshot of guest memory, which `mem` keeps mapped.
///
/// The hot path touches the rings several times per request or frame; translating each access
/// through the memory table (a region search, then a bounds-checked volatile access) cost a
/// tenth of the frame switching time. The handler checked the rings' alignment (virtio 1.2
/// 2.7: descriptor table 16, available ring 2, used ring 4 bytes) before the ring started, and
/// each part lies whole inside one region here, so every access below is an in-bounds, aligned
/// access to memory that stays mapped as long as this map lives.
///
/// The driver writes the rings concurrently from another process: every access is atomic or
/// volatile, never through a Rust reference to guest memory.
#[derive(Debug)]
struct RingMap {
    mem: Arc<GuestMemoryMmap>,
    size: u16,
    /// `size` descriptors of 16 bytes.
    desc: *const u8,
    /// flags, idx, `size` ring entries, used_event: 6 + 2 * size bytes.
    avail: *const u8,
    /// flags, idx, `size` elements of 8 bytes, avail_event: 6 + 8 * size bytes.
    used: *mut u8,
}

// SAFETY: the pointers are addresses inside the mappings `mem` owns; they stay valid on any
// thread for as long as the map (and with it `mem`) lives. Accesses through them are atomic or
// volatile, as for any memory the guest shares.
unsafe impl Send for RingMap {}

impl RingMap {
    /// The ring of `queue` in `mem`; `None` if a part is not inside one region of it or is
    /// misaligned.
    fn new(mem: Arc<GuestMemoryMmap>, queue: &Queue) -> Option<RingMap> {
        let size = queue.size();
        // A split ring's size is a power of two (virtio 1.2 §2.7; the handler and `Queue` refuse others), so a
        // position wraps by a mask rather than a division.
        if !size.is_power_of_two() {
            return None;
        }
        let host = |gpa: u64, len: usize, align: usize| -> Option<*mut u8> {
            let slice = mem.get_slice(GuestAddress(gpa), len).ok()?;
            let ptr = slice.ptr_guard_mut().as_ptr();
            (ptr as usize).is_multiple_of(align).then_some(ptr)
        };
        let entries = usize::from(size);
        let desc = host(queue.desc_table(), 16 * entries, 16)?;
        let avail = host(queue.avail_ring(), 6 + 2 * entries, 2)?;
        let used = host(queue.used_ring(), 6 + 8 * entries, 4)?;
        Some(RingMap {
            mem,
            size,
            desc,
            avail,
            used,
        })
    }

    /// Word `index` of the available ring: flags, idx, `size` entries, used_event.
    fn avail_word(&self, index: usize) -> &AtomicU16 {
        assert!(index < 3 + usize::from(self.size));
        let word = self.avail.cast::<u16>().cast_mut().wrapping_add(index);
        // SAFETY: inside the available ring's 3 + size words, which are 2-aligned and stay
        // mapped while `self` lives.
        unsafe { AtomicU16::from_ptr(word) }
    }

    /// Word `index` of the used ring counted in u16: flags, idx, then the elements (two words
    /// each as u32) and avail_event at `2 + 4 * size`.
    fn used_word(&self, index: usize) -> &AtomicU16 {
        assert!(index < 3 + 4 * usize::from(self.size));
        let word = self.used.cast::<u16>().wrapping_add(index);
        // SAFETY: inside the used ring's 6 + 8 * size bytes, 4-aligned, mapped while `self` lives.
        unsafe { AtomicU16::from_ptr(word) }
    }

    /// Half `half` (0 = id, 1 = len) of the used element in slot `slot`.
    fn used_elem(&self, slot: usize, half: usize) -> &AtomicU32 {
        assert!(slot < usize::from(self.size) && half < 2);
        let word = self
            .used
            .wrapping_add(4 + 8 * slot + 4 * half)
            .cast::<u32>();
        // SAFETY: inside the used ring, 4-aligned (the ring is, and elements are 8 bytes),
        // mapped while `self` lives.
        unsafe { AtomicU32::from_ptr(word) }
    }

    /// The driver's available index.
    fn avail_idx(&self, order: Ordering) -> u16 {
        u16::from_le(self.avail_word(1).load(order))
    }

    /// Available ring entry at ring position `position`.
    fn avail_entry(&self, position: u16) -> u16 {
        // The Acquire load of the index that showed this entry ordered it.
        u16::from_le(
            self.avail_word(2 + usize::from(position & (self.size - 1)))
                .load(Ordering::Relaxed),
        )
    }

    /// The driver's available-ring flags (`VRING_AVAIL_F_NO_INTERRUPT`).
    fn avail_flags(&self) -> u16 {
        u16::from_le(self.avail_word(0).load(Ordering::Relaxed))
    }

    /// The driver's `used_event` (after the available ring).
    fn used_event(&self) -> u16 {
        u16::from_le(
            self.avail_word(2 + usize::from(self.size))
                .load(Ordering::Relaxed),
        )
    }

    /// Writes the used element at ring position `position`; the driver sees it once
    /// [`RingMap::publish_used`] moves the index past it.
    fn write_used(&self, position: u16, head: u16, len: u32) {
        let slot = usize::from(position & (self.size - 1));
        self.used_elem(slot, 0)
            .store(u32::from(head).to_le(), Ordering::Relaxed);
        self.used_elem(slot, 1)
            .store(len.to_le(), Ordering::Relaxed);
    }

    /// Publishes used elements up to `next_used` (Release: the elements first).
    fn publish_used(&self, next_used: u16) {
        self.used_word(1)
            .store(next_used.to_le(), Ordering::Release);
    }

    fn set_used_flags(&self, flags: u16) {
        self.used_word(0).store(flags.to_le(), Ordering::Relaxed);
    }

    /// Writes `avail_event` (after the used ring).
    fn set_avail_event(&self, value: u16) {
        self.used_word(2 + 4 * usize::from(self.size))
            .store(value.to_le(), Ordering::Relaxed);
    }

    /// Descriptor `index` of the ring's own table (`index < size`, which the chain walk checks).
    fn descriptor(&self, index: u32) -> TableEntry {
        assert!(index < u32::from(self.size));
        let entry = self
            .desc
            .wrapping_add(16 * index as usize)
            .cast::<[u64; 2]>();
        // SAFETY: a 16-byte entry inside the 16-aligned table, mapped while `self` lives;
        // volatile, because the driver may rewrite it at any time (a driver bug, harmless here:
        // the walk checks what it reads).
        let words = unsafe { std::ptr::read_volatile(entry) };
        TableEntry::from_words(words)
    }
}

/// A running split virtqueue: the `virtio_queue::Queue` state plus everything the vhost-user
/// protocol attaches to it. The rings are read and written through a `RingMap` of the current
/// memory snapshot; `queue` keeps the ring's configuration and positions.
#[derive(Debug)]
pub struct Vring {
    index: u16,
    queue: Queue,
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
    /// The rings in the newest snapshot `map` was asked for; `None` if they do not lie inside
    /// guest memory (then nothing is taken from or returned to the ring).
    map: Option<RingMap>,
    /// The available index as last read: entries up to it are taken without reading it again.
    avail_seen: u16,
    kick: EventFd,
    call: Arc<EventSlot>,
    inflight: Option<InflightQueue>,
    resubmit: VecDeque<u16>,
    indirect: bool,
    overrun_reported: bool,
    unmapped_reported: bool,
    /// `next_used` when the driver was last considered for an interrupt: EVENT_IDX asks whether
    /// `used_event` lies in what was published since.
    considered_used: u16,
}

impl Vring {
    /// Wraps a ready `queue` (addresses set, `next_avail`/`next_used` positioned). Fails if a
    /// part of the ring does not lie inside one region of guest memory.
    pub fn new(
        index: u16,
        queue: Queue,
        memory: GuestMemoryAtomic<GuestMemoryMmap>,
        kick: EventFd,
        call: Arc<EventSlot>,
        indirect: bool,
    ) -> Result<Self, virtio_queue::Error> {
        let map = RingMap::new(memory.memory().into_inner(), &queue)
            .ok_or(virtio_queue::Error::FindMemoryRegion)?;
        Ok(Vring {
            index,
            considered_used: queue.next_used(),
            avail_seen: queue.next_avail(),
            queue,
            memory,
            map: Some(map),
            kick,
            call,
            inflight: None,
            resubmit: VecDeque::new(),
            indirect,
            overrun_reported: false,
            unmapped_reported: false,
        })
    }

    /// Makes `self.map` fit a caller working on snapshot `mem`. The map follows the newest
    /// snapshot: when the caller's differs from the map's, the memory table changed (the caller
    /// may hold either the older or the newer one), and the map is rebuilt only if it is not
    /// already on the newest.
    #[inline]
    fn refresh_map(&mut self, mem: &GuestMemoryMmap) {
        if self.map_on(mem).is_none() {
            self.remap();
        }
    }

    /// [`Vring::refresh_map`] after a memory table change (rare: not inlined into every ring access).
    #[cold]
    fn remap(&mut self) {
        let newest = self.memory.memory().into_inner();
        let on_newest = self
            .map
            .as_ref()
            .is_some_and(|map| Arc::ptr_eq(&map.mem, &newest));
        if !on_newest {
            self.map = RingMap::new(newest, &self.queue);
            if self.map.is_some() {
                self.unmapped_reported = false;
            } else if !self.unmapped_reported {
                self.unmapped_reported = true;
                tracing::warn!(
                    queue = self.index,
                    "the ring no longer lies inside guest memory; it is not served until it is back"
                );
            }
        }
    }

    /// The map if it is on snapshot `mem` (for `&self` readers, which fall back to the memory
    /// accessors otherwise).
    fn map_on(&self, mem: &GuestMemoryMmap) -> Option<&RingMap> {
        self.map
            .as_ref()
            .filter(|map| std::ptr::eq(Arc::as_ptr(&map.mem), mem))
    }

    /// Attaches the ring's inflight region and the heads to resubmit before new ones.
    pub fn with_inflight(mut self, inflight: InflightQueue, resubmit: Vec<u16>) -> Self {
        self.inflight = Some(inflight);
        self.resubmit = resubmit.into();
        self
    }

    /// The queue index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Ring size chosen by the driver.
    pub fn size(&self) -> u16 {
        self.queue.size()
    }

    /// Whether VIRTIO_RING_F_EVENT_IDX is in effect.
    pub fn event_idx(&self) -> bool {
        self.queue.event_idx_enabled()
    }

    /// The kick eventfd, for the worker's epoll.
    pub fn kick(&self) -> &EventFd {
        &self.kick
    }

    /// A snapshot of guest memory; requests keep a clone while they are in flight.
    pub fn memory(&self) -> Arc<GuestMemoryMmap> {
        self.memory.memory().into_inner()
    }

    /// The newest snapshot if the frontend changed the memory table since `mem` was taken, else `None`. A chain
    /// popped after `mem` was taken may point into a region only a newer snapshot holds: the frontend adds a region
    /// (ADD_MEM_REG, which the handler publishes before it acknowledges), then makes a chain in it available, while
    /// the worker still holds the snapshot it took for the pass.
    pub fn newer_memory(&self, mem: &GuestMemoryMmap) -> Option<Arc<GuestMemoryMmap>> {
        let newest = self.memory.memory();
        (!std::ptr::eq(&*newest, mem)).then(|| newest.into_inner())
    }

    /// Next available-ring position (what GET_VRING_BASE reports).
    pub fn next_avail(&self) -> u16 {
        self.queue.next_avail()
    }

    /// Next used-ring position.
    pub fn next_used(&self) -> u16 {
        self.queue.next_used()
    }

    /// Heads still waiting to be resubmitted.
    pub fn pending_resubmits(&self) -> usize {
        self.resubmit.len()
    }

    /// Takes the next descriptor head: first those recovered from the inflight region, then
    /// the available ring. The head is marked inflight before it is returned.
    #[inline]
    pub fn pop(&mut self, mem: &GuestMemoryMmap) -> Option<u16> {
        // The common case, small enough to inline: an entry the last read of the available index already showed,
        // on a ring with no inflight region, nothing to resubmit and the map on `mem`.
        let next = self.queue.next_avail();
        if self.resubmit.is_empty()
            && self.inflight.is_none()
            && self.avail_seen != next
            && let Some(map) = self.map_on(mem)
        {
            let head = map.avail_entry(next);
            if head < self.queue.size() {
                self.queue.set_next_avail(next.wrapping_add(1));
                return Some(head);
            }
        }
        self.pop_slow(mem)
    }

    /// [`Vring::pop`] in every case.
    #[inline(never)]
    fn pop_slow(&mut self, mem: &GuestMemoryMmap) -> Option<u16> {
        if let Some(head) = self.resubmit.pop_front() {
            return Some(head);
        }
        let size = self.queue.size();
        self.refresh_map(mem);
        let map = self.map.as_ref()?;
        loop {
            let next = self.queue.next_avail();
            if self.avail_seen == next {
                let idx = map.avail_idx(Ordering::Acquire);
                // More than a ring ahead is a driver bug: take nothing (see
                // `enable_notification`, which reports it).
                if idx == next || idx.wrapping_sub(next) > size {
                    return None;
                }
                self.avail_seen = idx;
            }
            let head = map.avail_entry(next);
            self.queue.set_next_avail(next.wrapping_add(1));
            if head >= size {
                // A driver bug: there is no descriptor to return to the used ring. Skip the
                // entry; the driver will time the request out.
                tracing::warn!(
                    queue = self.index,
                    head,
                    "available ring holds an out-of-range head; skipped"
                );
                continue;
            }
            if let Some(inflight) = self.inflight.as_mut() {
                inflight.mark_inflight(head);
            }
            return Some(head);
        }
    }

    /// Reads the descriptor chain of `head` into `out`.
    #[inline]
    pub fn read_chain(
        &self,
        mem: &GuestMemoryMmap,
        head: u16,
        out: &mut Vec<Descriptor>,
    ) -> Result<(), ChainError> {
        // Most chains of a net device are one descriptor: no walk for those, and small enough to inline.
        if let Some(map) = self.map_on(mem)
            && head < self.queue.size()
        {
            let entry = map.descriptor(u32::from(head));
            if entry.is_alone() {
                out.clear();
                out.push(entry.descriptor());
                return Ok(());
            }
        }
        self.read_chain_slow(mem, head, out)
    }

    /// [`Vring::read_chain`] in every case.
    #[inline(never)]
    fn read_chain_slow(
        &self,
        mem: &GuestMemoryMmap,
        head: u16,
        out: &mut Vec<Descriptor>,
    ) -> Result<(), ChainError> {
        let size = self.queue.size();
        match self.map_on(mem) {
            Some(map) => walk_chain(
                mem,
                |index| Ok(map.descriptor(index)),
                size,
                head,
                self.indirect,
                out,
            ),
            None => read_chain(
                mem,
                GuestAddress(self.queue.desc_table()),
                size,
                head,
                self.indirect,
                out,
            ),
        }
    }

    /// Returns `head` to the driver with `len` bytes written, keeping the inflight region in
    /// step (batches of one: the used idx is published per element).
    pub fn complete(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        len: u32,
    ) -> Result<(), virtio_queue::Error> {
        self.complete_batch(mem, &[(head, len)])
    }

    /// Returns several heads at once, `(head, bytes written)` in order, behind a single store of
    /// the used idx: the driver sees all of them or none. A vhost-user-net frame spread over
    /// several receive buffers (MRG_RXBUF) needs that, or the driver may find the first buffer
    /// announcing `num_buffers` before the rest are there. The inflight region is kept in step
    /// as one batch (every head is linked from `last_batch_head` before the idx moves, so a
    /// crash in between is repaired on restart).
    pub fn complete_batch(
        &mut self,
        mem: &GuestMemoryMmap,
        used: &[(u16, u32)],
    ) -> Result<(), virtio_queue::Error> {
        let Some((&(last_head, _), rest)) = used.split_last() else {
            return Ok(());
        };
        let size = self.queue.size();
        if used.len() > usize::from(size) || used.iter().any(|&(head, _)| head >= size) {
            return Err(virtio_queue::Error::InvalidDescriptorIndex);
        }
        let start = self.queue.next_used();
        self.refresh_map(mem);
        let Some(map) = self.map.as_ref() else {
            return Err(virtio_queue::Error::FindMemoryRegion);
        };
        if let Some(inflight) = self.inflight.as_ref() {
            for &(head, _) in used {
                inflight.begin_complete(head);
            }
        }
        for (i, &(head, len)) in used.iter().enumerate() {
            // Past the published idx: the driver does not look at these slots yet.
            map.write_used(start.wrapping_add(i as u16), head, len);
        }
        // `used.len() <= size <= u16::MAX`.
        let next_used = start.wrapping_add(used.len() as u16);
        map.publish_used(next_used);
        self.queue.set_next_used(next_used);
        if let Some(inflight) = self.inflight.as_ref() {
            // The region's used idx moves last, so a crash before it is a batch to repair.
            for &(head, _) in rest {
                inflight.finish_complete(head, start);
            }
            inflight.finish_complete(last_head, next_used);
        }
        Ok(())
    }

    /// Signals the call eventfd if the driver wants an interrupt for what was completed since
    /// the last call (EVENT_IDX aware). Returns whether it signalled.
    pub fn notify(&mut self, mem: &GuestMemoryMmap) -> bool {
        let now = self.queue.next_used();
        let since = std::mem::replace(&mut self.considered_used, now);
        // Every used entry must be visible before the driver's wishes are read (virtio 1.2
        // 2.7.10): it re-checks the used ring after it changes them.
        std::sync::atomic::fence(Ordering::SeqCst);
        self.refresh_map(mem);
        let wanted = match self.map.as_ref() {
            // Interrupt iff used_event is among the entries published since `since`.
            Some(map) if self.queue.event_idx_enabled() => {
                let event = map.used_event();
                now.wrapping_sub(event).wrapping_sub(1) < now.wrapping_sub(since)
            }
            // Without EVENT_IDX, a driver that polls (DPDK's) sets VRING_AVAIL_F_NO_INTERRUPT, and
            // then the device SHOULD NOT interrupt (virtio 1.2 2.7.7.2): an eventfd write per batch
            // nobody reads.
            Some(map) => map.avail_flags() & AVAIL_F_NO_INTERRUPT == 0,
            // Without the ring, err on the side of waking the driver.
            None => true,
        };
        if wanted {
            self.call.signal();
        }
        wanted
    }

    /// Whether the driver has made requests available that `pop` has not taken yet (or heads wait to be
    /// resubmitted). A read of the available index only, for a worker that polls briefly before it sleeps.
    pub fn has_available(&self, mem: &GuestMemoryMmap) -> bool {
        if !self.resubmit.is_empty() {
            return true;
        }
        let idx = match self.map_on(mem) {
            Some(map) => map.avail_idx(Ordering::Acquire),
            None => match self.queue.avail_idx(mem, Ordering::Acquire) {
                Ok(idx) => idx.0,
                Err(_) => return false,
            },
        };
        let ahead = idx.wrapping_sub(self.queue.next_avail());
        ahead != 0 && ahead <= self.queue.size()
    }

    /// Asks the driver not to kick while the worker drains the ring.
    pub fn disable_notification(&mut self, mem: &GuestMemoryMmap) {
        // With EVENT_IDX the driver kicks only when it passes `avail_event`, which stays where
        // `enable_notification` left it: nothing to write.
        self.refresh_map(mem);
        if !self.queue.event_idx_enabled()
            && let Some(map) = self.map.as_ref()
        {
            map.set_used_flags(USED_F_NO_NOTIFY);
        }
    }

    /// Re-enables kicks; returns `true` if entries arrived meanwhile (drain again).
    ///
    /// An available index more than a ring ahead of what was consumed is a driver bug (or stale
    /// memory): `pop` cannot take anything then, so this reports nothing new instead of letting
    /// the worker spin, and the ring waits for the next kick.
    pub fn enable_notification(&mut self, mem: &GuestMemoryMmap) -> bool {
        let next = self.queue.next_avail();
        let event_idx = self.queue.event_idx_enabled();
        self.refresh_map(mem);
        let Some(map) = self.map.as_ref() else {
            return false;
        };
        if event_idx {
            // `next_avail`, not the current index: a kick for anything not yet taken.
            map.set_avail_event(next);
        } else {
            map.set_used_flags(0);
        }
        // The write above must be visible before the index is read again, or a request made
        // meanwhile could go without a kick.
        std::sync::atomic::fence(Ordering::SeqCst);
        let idx = map.avail_idx(Ordering::Relaxed);
        if idx == next {
            self.overrun_reported = false;
            return false;
        }
        let overrun = idx.wrapping_sub(next) > self.queue.size();
        if overrun && !self.overrun_reported {
            self.overrun_reported = true;
            tracing::warn!(
                queue = self.index,
                next_avail = next,
                "available ring index runs more than a ring ahead; ignoring the ring until the driver fixes it"
            );
        }
        !overrun
    }

    /// Consumes a kick. Call it only when epoll reported the kick fd readable: the frontend
    /// owns the fd's blocking mode. `Ok(false)` if another reader took the count first.
    pub fn consume_kick(&self) -> io::Result<bool> {
        match self.kick.read() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use vhost::vhost_user::message::VhostUserMemoryRegion;
    use vm_memory::Bytes;

    use super::*;
    use crate::memory::MemoryTable;

    const SIZE: u16 = 8;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const MEM: u64 = 0x10000;

    /// A table of one region over `file`, which stands for the frontend's shared memory.
    fn table_over(table: &mut MemoryTable, file: &File, va: u64) {
        table
            .set_table(
                &[VhostUserMemoryRegion::new(0, MEM, va, 0)],
                vec![file.try_clone().unwrap()],
            )
            .unwrap();
    }

    fn vring(memory: GuestMemoryAtomic<GuestMemoryMmap>, event_idx: bool) -> Vring {
        let mut queue = Queue::new(SIZE).unwrap();
        queue
            .try_set_desc_table_address(GuestAddress(DESC))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(AVAIL))
            .unwrap();
        queue.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        Vring::new(
            0,
            queue,
            memory,
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            Arc::new(EventSlot::new()),
            false,
        )
        .unwrap()
    }

    /// The driver offers descriptor `head` (one 512-byte buffer) as available entry `position`.
    fn offer(mem: &GuestMemoryMmap, position: u16, head: u16) {
        let desc = virtio_queue::desc::split::Descriptor::new(0x8000, 512, 0, 0);
        mem.write_obj(desc, GuestAddress(DESC + 16 * u64::from(head)))
            .unwrap();
        let entry = AVAIL + 4 + 2 * u64::from(position % SIZE);
        mem.write_obj(head, GuestAddress(entry)).unwrap();
        mem.write_obj(position.wrapping_add(1), GuestAddress(AVAIL + 2))
            .unwrap();
    }

    fn used_idx(mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// The frontend's shared memory (a file) and a table of one region over it.
    fn shared_memory() -> (File, MemoryTable) {
        let file = tempfile::tempfile().unwrap();
        file.set_len(MEM).unwrap();
        let mut table = MemoryTable::new();
        table_over(&mut table, &file, 0x7f00_0000_0000);
        (file, table)
    }

    #[test]
    fn the_ring_is_served_across_memory_table_changes() {
        let (file, mut table) = shared_memory();
        let old = table.memory().memory().into_inner();
        let mut ring = vring(table.memory(), false);

        offer(&old, 0, 3);
        assert_eq!(ring.pop(&old), Some(3));
        let mut descs = Vec::new();
        ring.read_chain(&old, 3, &mut descs).unwrap();
        assert_eq!(descs.len(), 1);
        assert_eq!((descs[0].addr, descs[0].len), (GuestAddress(0x8000), 512));
        ring.complete(&old, 3, 512).unwrap();
        assert_eq!(used_idx(&old), 1);

        // The frontend sends a new table over the same memory: a new mapping, a new snapshot.
        table_over(&mut table, &file, 0x7f00_1000_0000);
        let new = table.memory().memory().into_inner();
        assert!(!Arc::ptr_eq(&old, &new));
        offer(&new, 1, 5);
        // A worker still on the old snapshot, then one on the new: both see the same ring.
        assert_eq!(ring.pop(&old), Some(5));
        ring.read_chain(&new, 5, &mut descs).unwrap();
        assert_eq!(descs[0].len, 512);
        ring.complete(&new, 5, 0).unwrap();
        assert_eq!(used_idx(&new), 2);
        assert_eq!(ring.pop(&new), None);

        // A table without the ring's memory: nothing is taken or returned, nothing panics.
        table
            .set_table(
                &[VhostUserMemoryRegion::new(
                    0x100000,
                    MEM,
                    0x7f00_2000_0000,
                    0,
                )],
                vec![file.try_clone().unwrap()],
            )
            .unwrap();
        let moved = table.memory().memory().into_inner();
        assert_eq!(ring.pop(&moved), None);
        assert!(ring.complete(&moved, 5, 0).is_err());
        assert!(!ring.enable_notification(&moved));
        // Back in place, the ring carries on where it was.
        table_over(&mut table, &file, 0x7f00_3000_0000);
        let back = table.memory().memory().into_inner();
        offer(&back, 2, 6);
        assert_eq!(ring.pop(&back), Some(6));
    }

    #[test]
    fn notifications_follow_event_idx_and_used_flags() {
        let (_file, table) = shared_memory();
        let mem = table.memory().memory().into_inner();

        let mut plain = vring(table.memory(), false);
        plain.disable_notification(&mem);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED)).unwrap(), 1);
        assert!(!plain.enable_notification(&mem));
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED)).unwrap(), 0);
        offer(&mem, 0, 1);
        assert!(
            plain.enable_notification(&mem),
            "an entry arrived meanwhile"
        );

        let mut evented = vring(table.memory(), true);
        assert_eq!(evented.pop(&mem), Some(1));
        assert!(!evented.enable_notification(&mem));
        let avail_event = USED + 4 + 8 * u64::from(SIZE);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(avail_event)).unwrap(), 1);
        // used_event 0: the driver wants an interrupt once entry 0 is used, not again after.
        evented.complete(&mem, 1, 0).unwrap();
        assert!(evented.notify(&mem));
        offer(&mem, 1, 2);
        assert_eq!(evented.pop(&mem), Some(2));
        evented.complete(&mem, 2, 0).unwrap();
        assert!(!evented.notify(&mem));
    }

    #[test]
    fn without_event_idx_a_driver_that_polls_is_not_interrupted() {
        let (_file, table) = shared_memory();
        let mem = table.memory().memory().into_inner();
        let mut ring = vring(table.memory(), false);
        let mut used = 0;
        let mut complete = |ring: &mut Vring| {
            offer(&mem, used, used % SIZE);
            assert_eq!(ring.pop(&mem), Some(used % SIZE));
            ring.complete(&mem, used % SIZE, 0).unwrap();
            used += 1;
            ring.notify(&mem)
        };
        assert!(complete(&mut ring), "flags 0: every batch interrupts");
        // VRING_AVAIL_F_NO_INTERRUPT, as DPDK's polling driver sets it.
        mem.write_obj(1u16, GuestAddress(AVAIL)).unwrap();
        assert!(!complete(&mut ring));
        assert!(!complete(&mut ring));
        mem.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
        assert!(complete(&mut ring), "the driver wants interrupts again");
    }
}
