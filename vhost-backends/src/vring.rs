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
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
};
use vmm_sys_util::eventfd::EventFd;

use crate::chain::{ChainError, Descriptor, read_chain};
use crate::inflight::InflightQueue;

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

/// A running split virtqueue: the `virtio_queue::Queue` state plus everything the vhost-user
/// protocol attaches to it.
#[derive(Debug)]
pub struct Vring {
    index: u16,
    queue: Queue,
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
    kick: EventFd,
    call: Arc<EventSlot>,
    inflight: Option<InflightQueue>,
    resubmit: VecDeque<u16>,
    indirect: bool,
    overrun_reported: bool,
    /// `next_used` when the driver was last considered for an interrupt: EVENT_IDX asks whether
    /// `used_event` lies in what was published since.
    considered_used: u16,
}

impl Vring {
    /// Wraps a ready `queue` (addresses set, `next_avail`/`next_used` positioned).
    pub fn new(
        index: u16,
        queue: Queue,
        memory: GuestMemoryAtomic<GuestMemoryMmap>,
        kick: EventFd,
        call: Arc<EventSlot>,
        indirect: bool,
    ) -> Self {
        let considered_used = queue.next_used();
        Vring {
            index,
            queue,
            memory,
            kick,
            call,
            inflight: None,
            resubmit: VecDeque::new(),
            indirect,
            overrun_reported: false,
            considered_used,
        }
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
    pub fn pop(&mut self, mem: &GuestMemoryMmap) -> Option<u16> {
        if let Some(head) = self.resubmit.pop_front() {
            return Some(head);
        }
        loop {
            let head = self.queue.pop_descriptor_chain(mem)?.head_index();
            if head >= self.queue.size() {
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
    pub fn read_chain(
        &self,
        mem: &GuestMemoryMmap,
        head: u16,
        out: &mut Vec<Descriptor>,
    ) -> Result<(), ChainError> {
        read_chain(
            mem,
            GuestAddress(self.queue.desc_table()),
            self.queue.size(),
            head,
            self.indirect,
            out,
        )
    }

    /// Returns `head` to the driver with `len` bytes written, keeping the inflight region in
    /// step (batches of one: the used idx is published per element).
    pub fn complete(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        len: u32,
    ) -> Result<(), virtio_queue::Error> {
        if let Some(inflight) = self.inflight.as_ref() {
            inflight.begin_complete(head);
        }
        self.queue.add_used(mem, head, len)?;
        if let Some(inflight) = self.inflight.as_ref() {
            inflight.finish_complete(head, self.queue.next_used());
        }
        Ok(())
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
        let Some((&(last_head, last_len), rest)) = used.split_last() else {
            return Ok(());
        };
        let size = self.queue.size();
        if used.len() > usize::from(size) || used.iter().any(|&(head, _)| head >= size) {
            return Err(virtio_queue::Error::InvalidDescriptorIndex);
        }
        if let Some(inflight) = self.inflight.as_ref() {
            for &(head, _) in used {
                inflight.begin_complete(head);
            }
        }
        let start = self.queue.next_used();
        let ring = GuestAddress(self.queue.used_ring());
        for (i, &(head, len)) in rest.iter().enumerate() {
            // Slots past the published idx: the driver does not look at them yet.
            let slot = u64::from(start.wrapping_add(i as u16) % size);
            let at = ring
                .checked_add(4 + 8 * slot)
                .ok_or(virtio_queue::Error::AddressOverflow)?;
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            elem[4..].copy_from_slice(&len.to_le_bytes());
            mem.write_slice(&elem, at)
                .map_err(virtio_queue::Error::GuestMemory)?;
        }
        // `rest.len() < size <= u16::MAX`.
        self.queue
            .set_next_used(start.wrapping_add(rest.len() as u16));
        if let Err(e) = self.queue.add_used(mem, last_head, last_len) {
            self.queue.set_next_used(start);
            return Err(e);
        }
        if let Some(inflight) = self.inflight.as_ref() {
            // The region's used idx moves last, so a crash before it is a batch to repair.
            for &(head, _) in rest {
                inflight.finish_complete(head, start);
            }
            inflight.finish_complete(last_head, self.queue.next_used());
        }
        Ok(())
    }

    /// Signals the call eventfd if the driver wants an interrupt for what was completed since
    /// the last call (EVENT_IDX aware). Returns whether it signalled.
    pub fn notify(&mut self, mem: &GuestMemoryMmap) -> bool {
        let now = self.queue.next_used();
        let since = std::mem::replace(&mut self.considered_used, now);
        let wanted = if self.queue.event_idx_enabled() {
            // Every used entry must be visible before used_event is read (virtio 1.2 2.7.10).
            std::sync::atomic::fence(Ordering::SeqCst);
            match self.used_event(mem) {
                // Interrupt iff used_event is among the entries published since `since`.
                Some(event) => now.wrapping_sub(event).wrapping_sub(1) < now.wrapping_sub(since),
                // On a guest memory error, err on the side of waking the driver.
                None => true,
            }
        } else {
            // Without EVENT_IDX every batch interrupts (VRING_AVAIL_F_NO_INTERRUPT is only a
            // hint; virtio-queue ignores it too).
            true
        };
        if wanted {
            self.call.signal();
        }
        wanted
    }

    /// The driver's `used_event` (the word after the available ring).
    fn used_event(&self, mem: &GuestMemoryMmap) -> Option<u16> {
        let at = GuestAddress(self.queue.avail_ring())
            .checked_add(4 + 2 * u64::from(self.queue.size()))?;
        mem.load::<u16>(at, Ordering::Relaxed)
            .ok()
            .map(u16::from_le)
    }

    /// Whether the driver has made requests available that `pop` has not taken yet (or heads wait to be
    /// resubmitted). A read of the available index only, for a worker that polls briefly before it sleeps.
    pub fn has_available(&self, mem: &GuestMemoryMmap) -> bool {
        if !self.resubmit.is_empty() {
            return true;
        }
        match self.queue.avail_idx(mem, Ordering::Acquire) {
            Ok(idx) => {
                let ahead = idx.0.wrapping_sub(self.queue.next_avail());
                ahead != 0 && ahead <= self.queue.size()
            }
            Err(_) => false,
        }
    }

    /// Asks the driver not to kick while the worker drains the ring.
    pub fn disable_notification(&mut self, mem: &GuestMemoryMmap) {
        let _ = self.queue.disable_notification(mem);
    }

    /// Re-enables kicks; returns `true` if entries arrived meanwhile (drain again).
    ///
    /// An available index more than a ring ahead of what was consumed is a driver bug (or stale
    /// memory): `pop` cannot take anything then, so this reports nothing new instead of letting
    /// the worker spin, and the ring waits for the next kick.
    pub fn enable_notification(&mut self, mem: &GuestMemoryMmap) -> bool {
        if !self.queue.enable_notification(mem).unwrap_or(false) {
            self.overrun_reported = false;
            return false;
        }
        let overrun = match self.queue.avail_idx(mem, Ordering::Acquire) {
            Ok(idx) => idx.0.wrapping_sub(self.queue.next_avail()) > self.queue.size(),
            Err(_) => true,
        };
        if overrun && !self.overrun_reported {
            self.overrun_reported = true;
            tracing::warn!(
                queue = self.index,
                next_avail = self.queue.next_avail(),
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
