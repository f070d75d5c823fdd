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
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
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

    /// Signals the call eventfd if the driver wants an interrupt for what was completed since
    /// the last call (EVENT_IDX aware). Returns whether it signalled.
    pub fn notify(&mut self, mem: &GuestMemoryMmap) -> bool {
        match self.queue.needs_notification(mem) {
            Ok(false) => false,
            // On a guest memory error, err on the side of waking the driver.
            Ok(true) | Err(_) => {
                self.call.signal();
                true
            }
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
