//! The receive side of one queue pair: frames from the switch side into the guest's receiveq.
//!
//! Whoever has a frame for the guest — another port's queue worker, the switching core —
//! calls [`RxQueue::push`] on its own thread, and the frame is copied straight into the
//! guest's receive buffers there: no hand-off to another thread, no intermediate buffer. The
//! used entries are gathered and published by [`RxQueue::flush`] at the end of the pusher's
//! batch (with one used-idx store, and an interrupt if the guest asks for one), so a burst
//! costs the guest one wake-up.
//!
//! The ring is reachable this way while the pair's worker runs: the worker hands it in when it
//! starts (`RxQueue::attach`) and takes it back when it stops (`RxQueue::detach`). A frame
//! arriving while the guest has no buffers left, or while the worker is stopped, waits in the
//! queue's backlog (bounded; frames behind it wait too, so order holds); the guest is asked to
//! kick when it adds buffers, and the worker then moves the backlog in (`RxQueue::drain`).
//!
//! A queue is *open* from the first start of its pair's worker on a connection until the
//! frontend disconnects. While closed (no guest, or the guest's link is down because the
//! frontend went away), pushes are refused; when the frontend disconnects, frames still queued
//! are dropped and counted, so a reconnected guest never receives stale frames.
//!
//! Offloads: a pushed frame carries a [`VirtioNetHeader`]. A partial checksum
//! (`FLAG_NEEDS_CSUM`) is completed in software for a guest without GUEST_CSUM; a GSO frame the
//! guest did not negotiate (see [`crate::net::GuestOffloads`]) is dropped and counted — the
//! pusher must segment such frames itself.
//!
//! Invariant: every receive chain taken from the ring is either holding a frame's bytes in the
//! used entries gathered for publication, or held for the next frame; `RxQueue::detach`
//! returns the held ones empty and publishes everything, so GET_VRING_BASE is exact.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{debug, warn};
use vessel_proto::checksum;
use vm_memory::GuestMemoryMmap;

use super::config::GuestOffloads;
use super::frame::{RxChain, check_rx_chain, write_rx_frame, write_rx_frame_in_one};
use super::header::{FLAG_DATA_VALID, FLAG_NEEDS_CSUM, HEADER_LEN, VirtioNetHeader};
use super::port::MAX_FRAME_LEN;
use super::stats::{Counter, Counters};
use crate::chain::Descriptor;
use crate::vring::Vring;

/// Used entries gathered before they are published even within one batch.
const USED_BATCH: usize = 64;

/// How many guest-caused problems a queue logs at `warn` before it goes quiet (debug level).
const LOUD_LOG_LIMIT: u32 = 16;

/// A frame waiting for the guest's receive buffers.
#[derive(Debug)]
struct Waiting {
    header: VirtioNetHeader,
    frame: Vec<u8>,
}

/// Why [`RxQueue::push`] refused a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    Full,
    TooBig,
    Closed,
    /// Counted by the ring already (offload the guest cannot take, frame larger than its
    /// buffers).
    Dropped,
}

/// Frames on their way into one queue pair's receiveq, pushed from any thread; see the module
/// docs.
#[derive(Debug)]
pub struct RxQueue {
    state: Mutex<RxState>,
    capacity: usize,
    open: AtomicBool,
    counters: Arc<Counters>,
    refused_full: AtomicU64,
    refused_too_big: AtomicU64,
    refused_closed: AtomicU64,
}

#[derive(Debug, Default)]
struct RxState {
    /// Frames waiting for buffers (or for the worker to start), oldest first.
    backlog: VecDeque<Waiting>,
    /// The guest's receiveq, while the pair's worker runs.
    ring: Option<RxRing>,
}

/// The guest's receiveq with what is taken from it and not yet returned.
#[derive(Debug)]
struct RxRing {
    vring: Vring,
    /// Guest memory as of the last flush (taken once per batch, not per frame; `None` only
    /// while in use).
    mem: Option<Arc<GuestMemoryMmap>>,
    pair: u16,
    mrg: bool,
    offloads: GuestOffloads,
    /// Receive chains taken from the ring and not yet filled, oldest first.
    held: VecDeque<RxChain>,
    /// Filled chains not yet published.
    used: Vec<(u16, u32)>,
    /// Frames and bytes delivered and not yet counted (counted when published).
    delivered: (u64, u64),
    counters: Arc<Counters>,
    /// Whether entries were published since the guest was last considered for an interrupt.
    unnotified: bool,
    descs: Vec<Descriptor>,
    /// A frame whose checksum is completed here (for a guest without GUEST_CSUM).
    scratch: Vec<u8>,
    loud_logs: u32,
}

/// What became of a frame offered to the ring.
enum Placed {
    Delivered,
    /// Dropped and counted.
    Dropped,
    /// The guest has no room for it now.
    NoRoom,
}

impl RxQueue {
    /// An empty, closed queue whose backlog holds at most `capacity` frames (at least 1),
    /// counting into `counters`.
    pub(crate) fn new(capacity: usize, counters: Arc<Counters>) -> RxQueue {
        RxQueue {
            state: Mutex::new(RxState::default()),
            capacity: capacity.max(1),
            open: AtomicBool::new(false),
            counters,
            refused_full: AtomicU64::new(0),
            refused_too_big: AtomicU64::new(0),
            refused_closed: AtomicU64::new(0),
        }
    }

    /// Delivers a copy of `frame` with `header` into the guest's receive buffers, or queues it
    /// until the guest has room; call [`RxQueue::flush`] at the end of a batch. `false` (counted
    /// in the device's stats, and to be counted as a drop by the caller) when the backlog is
    /// full (the guest is not taking frames fast enough), the frame is longer than
    /// [`MAX_FRAME_LEN`] or shorter than an Ethernet header, the queue is closed, or the guest
    /// cannot take it (an offload it did not negotiate, larger than all its buffers). Any
    /// thread; never waits for the guest. A pusher with several frames uses [`RxQueue::batch`].
    pub fn push(&self, header: &VirtioNetHeader, frame: &[u8]) -> bool {
        self.push_locked(&mut self.lock(), header, frame)
    }

    /// Holds the queue for a batch of pushes from this thread: its lock is taken once for all of them
    /// rather than once per frame (each lock and unlock is a full barrier on x86, which waits for the
    /// frame just written into guest memory — cache lines the guest's CPU owns). Ending the batch
    /// (dropping it) flushes. Other pushers, and the worker's drain, wait meanwhile: keep a batch
    /// short, and never take a second queue's batch while holding one.
    pub fn batch(&self) -> RxBatch<'_> {
        RxBatch {
            queue: self,
            state: self.lock(),
        }
    }

    fn push_locked(&self, state: &mut RxState, header: &VirtioNetHeader, frame: &[u8]) -> bool {
        let refusal = match self.try_push(state, header, frame) {
            Ok(()) => return true,
            Err(refusal) => refusal,
        };
        let counter = match refusal {
            Refusal::Full => &self.refused_full,
            Refusal::TooBig => &self.refused_too_big,
            Refusal::Closed => &self.refused_closed,
            Refusal::Dropped => return false,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        false
    }

    fn try_push(
        &self,
        state: &mut RxState,
        header: &VirtioNetHeader,
        frame: &[u8],
    ) -> Result<(), Refusal> {
        if frame.len() > MAX_FRAME_LEN || frame.len() < 14 {
            return Err(Refusal::TooBig);
        }
        if !self.is_open() {
            return Err(Refusal::Closed);
        }
        let RxState { backlog, ring } = state;
        if backlog.is_empty()
            && let Some(ring) = ring
        {
            let placed = ring.with_memory(|ring, mem| {
                loop {
                    match ring.place(mem, &self.counters, header, frame) {
                        Placed::NoRoom if ring.wait_for_buffers(mem) => continue,
                        placed => break placed,
                    }
                }
            });
            match placed {
                Placed::Delivered => return Ok(()),
                Placed::Dropped => return Err(Refusal::Dropped),
                Placed::NoRoom => {}
            }
        }
        if backlog.len() >= self.capacity {
            return Err(Refusal::Full);
        }
        backlog.push_back(Waiting {
            header: *header,
            frame: frame.to_vec(),
        });
        Ok(())
    }

    /// Publishes what was delivered since the last flush and interrupts the guest if it asks
    /// for it. Cheap when nothing is pending.
    pub fn flush(&self) {
        Self::flush_locked(&mut self.lock());
    }

    fn flush_locked(state: &mut RxState) {
        if let Some(ring) = &mut state.ring {
            ring.mem = Some(ring.vring.memory());
            ring.with_memory(|ring, mem| {
                ring.publish(mem);
                ring.notify(mem);
            });
        }
    }

    /// Frames waiting for the guest's buffers.
    pub fn len(&self) -> usize {
        self.lock().backlog.len()
    }

    /// Whether no frame is waiting.
    pub fn is_empty(&self) -> bool {
        self.lock().backlog.is_empty()
    }

    /// Whether the queue accepts frames (its pair runs or ran on the current connection); a
    /// switch spreading flows over queue pairs picks among the open ones.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Largest number of frames waiting.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// (full, too big or runt, closed) refusals so far.
    pub(crate) fn refusals(&self) -> (u64, u64, u64) {
        (
            self.refused_full.load(Ordering::Relaxed),
            self.refused_too_big.load(Ordering::Relaxed),
            self.refused_closed.load(Ordering::Relaxed),
        )
    }

    /// Opens the queue and serves `vring` (the pair's receiveq) from now on; what waited goes
    /// in first. `mrg` and `offloads` are what the guest negotiated.
    pub(crate) fn attach(&self, vring: Vring, mrg: bool, offloads: GuestOffloads) {
        self.open.store(true, Ordering::Release);
        let mut state = self.lock();
        state.ring = Some(RxRing {
            pair: vring.index() / 2,
            mem: Some(vring.memory()),
            vring,
            mrg,
            offloads,
            held: VecDeque::new(),
            used: Vec::with_capacity(USED_BATCH),
            delivered: (0, 0),
            counters: Arc::clone(&self.counters),
            unnotified: false,
            descs: Vec::with_capacity(4),
            scratch: Vec::new(),
            loud_logs: 0,
        });
        Self::drain_locked(&mut state, &self.counters);
    }

    /// Stops serving the receiveq and hands it back, at an exact position: held chains are
    /// returned empty and everything is published.
    pub(crate) fn detach(&self) -> Option<Vring> {
        let mut ring = self.lock().ring.take()?;
        let mem = ring.vring.memory();
        ring.publish(&mem);
        while let Some(chain) = ring.held.pop_front() {
            ring.used.push((chain.head, 0));
            if ring.used.len() >= usize::from(ring.vring.size()) {
                ring.publish(&mem);
            }
        }
        ring.publish(&mem);
        ring.notify(&mem);
        Some(ring.vring)
    }

    /// Moves waiting frames into the guest's buffers until none wait or the guest has no
    /// room left (then it is asked to kick when it adds buffers), and publishes. The worker
    /// calls it when the guest kicks the receiveq.
    pub(crate) fn drain(&self) {
        Self::drain_locked(&mut self.lock(), &self.counters);
    }

    fn drain_locked(state: &mut RxState, counters: &Counters) {
        let RxState { backlog, ring } = state;
        let Some(ring) = ring else {
            return;
        };
        // The memory as of now, kept for the pushes that follow.
        ring.mem = Some(ring.vring.memory());
        ring.with_memory(|ring, mem| {
            // Kicks are only wanted while frames wait for buffers.
            ring.vring.disable_notification(mem);
            while let Some(item) = backlog.pop_front() {
                match ring.place(mem, counters, &item.header, &item.frame) {
                    Placed::Delivered | Placed::Dropped => {}
                    Placed::NoRoom => {
                        let retry = ring.wait_for_buffers(mem);
                        backlog.push_front(item);
                        if !retry {
                            break;
                        }
                    }
                }
            }
            ring.publish(mem);
            ring.notify(mem);
        });
    }

    /// Opens the queue without a ring: frames wait until the worker starts (for tests).
    #[cfg(test)]
    pub(crate) fn open(&self) {
        self.open.store(true, Ordering::Release);
    }

    /// Closes the queue and drops what waits, counting it as dropped for a link down.
    pub(crate) fn close(&self) {
        self.open.store(false, Ordering::Release);
        let dropped = std::mem::take(&mut self.lock().backlog).len();
        self.counters.add(Counter::RxLinkDown, dropped as u64);
    }

    fn lock(&self) -> MutexGuard<'_, RxState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Receive chains held for frames to come (for tests).
    #[cfg(test)]
    pub(crate) fn held_chains(&self) -> usize {
        self.lock().ring.as_ref().map_or(0, |ring| ring.held.len())
    }
}

/// A batch of pushes into one [`RxQueue`], holding its lock; see [`RxQueue::batch`].
#[derive(Debug)]
pub struct RxBatch<'q> {
    queue: &'q RxQueue,
    state: MutexGuard<'q, RxState>,
}

impl RxBatch<'_> {
    /// [`RxQueue::push`] within the batch.
    pub fn push(&mut self, header: &VirtioNetHeader, frame: &[u8]) -> bool {
        self.queue.push_locked(&mut self.state, header, frame)
    }
}

impl Drop for RxBatch<'_> {
    fn drop(&mut self) {
        RxQueue::flush_locked(&mut self.state);
    }
}

impl RxRing {
    /// Runs `f` with the ring and the guest memory it works on.
    fn with_memory<R>(&mut self, f: impl FnOnce(&mut RxRing, &GuestMemoryMmap) -> R) -> R {
        let mem = self.mem.take().unwrap_or_else(|| self.vring.memory());
        let result = f(self, &mem);
        self.mem = Some(mem);
        result
    }

    fn loud(&mut self) -> bool {
        self.loud_logs = self.loud_logs.saturating_add(1);
        self.loud_logs <= LOUD_LOG_LIMIT
    }

    /// Writes one frame into the chains it needs: with MRG_RXBUF over as many as it takes
    /// (`num_buffers` set), without it into one chain that must hold header and frame (else the
    /// frame is dropped and the chain kept for the next one).
    fn place(
        &mut self,
        mem: &GuestMemoryMmap,
        counters: &Counters,
        header: &VirtioNetHeader,
        frame: &[u8],
    ) -> Placed {
        let mut header = *header;
        if !self.offloads.accepts_gso(&header) {
            counters.add(Counter::RxOffload, 1);
            if self.loud() {
                warn!(
                    pair = self.pair,
                    gso_type = header.gso_type,
                    "GSO frame for a guest that did not negotiate it; dropped (the switch must segment)"
                );
            }
            return Placed::Dropped;
        }
        let mut completed = false;
        if !self.offloads.csum {
            if header.needs_csum() {
                self.scratch.clear();
                self.scratch.extend_from_slice(frame);
                if !checksum::complete_partial(
                    &mut self.scratch,
                    header.csum_start,
                    header.csum_offset,
                ) {
                    counters.add(Counter::RxOffload, 1);
                    return Placed::Dropped;
                }
                completed = true;
            }
            header.flags &= !(FLAG_NEEDS_CSUM | FLAG_DATA_VALID);
            header.csum_start = 0;
            header.csum_offset = 0;
        }
        let ring_size = usize::from(self.vring.size());
        // If the chain it took is of another kind, it is held now (or was returned malformed): on
        // with the general way.
        if self.held.is_empty()
            && !completed
            && let Some(placed) = self.place_in_one(mem, counters, &header, frame)
        {
            return placed;
        }
        let needed = HEADER_LEN + frame.len();
        let chains = if self.mrg {
            let mut have: usize = self.held.iter().map(RxChain::capacity).sum();
            while have < needed && self.held.len() < ring_size {
                if self.take_chain(mem, counters).is_none() {
                    break;
                }
                // A malformed chain on the way sends the held ones back before it: count again.
                have = self.held.iter().map(RxChain::capacity).sum();
            }
            if have < needed {
                if self.held.len() < ring_size {
                    return Placed::NoRoom;
                }
                // Even the whole ring cannot hold it: the guest's buffers are too small for
                // this frame. Drop it rather than block the queue forever.
                counters.add(Counter::RxTooBig, 1);
                if self.loud() {
                    warn!(
                        pair = self.pair,
                        frame = frame.len(),
                        room = have,
                        "frame larger than all receive buffers together; dropped"
                    );
                }
                return Placed::Dropped;
            }
            let mut room = 0;
            self.held
                .iter()
                .take_while(|chain| {
                    let short = room < needed;
                    room += chain.capacity();
                    short
                })
                .count()
        } else {
            if self.held.is_empty() && self.take_chain(mem, counters).is_none() {
                return Placed::NoRoom;
            }
            let room = self.held.front().map_or(0, RxChain::capacity);
            if room < needed {
                // This guest posts buffers too small for the frame; the chain stays for the
                // next frame.
                counters.add(Counter::RxTooBig, 1);
                if self.loud() {
                    warn!(
                        pair = self.pair,
                        frame = frame.len(),
                        buffer = room,
                        "frame does not fit a receive buffer (no MRG_RXBUF); dropped"
                    );
                }
                return Placed::Dropped;
            }
            1
        };
        self.make_room(mem, chains);
        // `chains` is at most the ring size, a u16.
        header.num_buffers = chains as u16;
        let frame = if completed { &self.scratch[..] } else { frame };
        let filled = &self.held.make_contiguous()[..chains];
        match write_rx_frame(mem, filled, &header, frame, &mut self.used) {
            Ok(()) => {
                self.delivered.0 += 1;
                self.delivered.1 += frame.len() as u64;
            }
            Err(e) => {
                // The memory table changed under chains held from before: give them back
                // empty and drop the frame.
                counters.add(Counter::RxBadChains, chains as u64);
                let heads: Vec<(u16, u32)> = filled.iter().map(|c| (c.head, 0)).collect();
                self.used.extend(heads);
                if self.loud() {
                    warn!(pair = self.pair, "receive buffer left guest memory: {e}");
                }
            }
        }
        self.held.drain(..chains);
        Placed::Delivered
    }

    /// The common case first (no chain held): the next chain is one buffer with room for the frame
    /// (with its `header`, whose `num_buffers` this sets), written at once, with none of the held
    /// chains' bookkeeping, which took a third of the instructions the switch spends on a small frame. `None` if the
    /// chain is of another kind; it is then held (or returned, if malformed) as [`RxRing::take_chain`]
    /// would, and the general way goes on from there.
    fn place_in_one(
        &mut self,
        mem: &GuestMemoryMmap,
        counters: &Counters,
        header: &VirtioNetHeader,
        frame: &[u8],
    ) -> Option<Placed> {
        let Some(head) = self.vring.pop(mem) else {
            return Some(Placed::NoRoom);
        };
        let read = self.vring.read_chain(mem, head, &mut self.descs);
        if read.is_ok() {
            self.make_room(mem, 1);
            let header = VirtioNetHeader {
                num_buffers: 1,
                ..*header
            };
            if let Some(len) = write_rx_frame_in_one(mem, &self.descs, &header, frame) {
                self.used.push((head, len));
                self.delivered.0 += 1;
                self.delivered.1 += frame.len() as u64;
                return Some(Placed::Delivered);
            }
        }
        self.keep_chain(mem, counters, head, read);
        None
    }

    /// Publishes the gathered used entries first if `chains` more would take them past a batch.
    fn make_room(&mut self, mem: &GuestMemoryMmap, chains: usize) {
        if self.used.len() + chains > USED_BATCH.min(usize::from(self.vring.size())) {
            self.publish(mem);
        }
    }

    /// Takes the next usable receive chain from the ring into `held` and returns its capacity;
    /// malformed chains are returned empty on the way. `None` when the ring is empty.
    fn take_chain(&mut self, mem: &GuestMemoryMmap, counters: &Counters) -> Option<usize> {
        loop {
            let head = self.vring.pop(mem)?;
            let read = self.vring.read_chain(mem, head, &mut self.descs);
            if let Some(capacity) = self.keep_chain(mem, counters, head, read) {
                return Some(capacity);
            }
        }
    }

    /// Holds the chain `head` just read into `descs` (`read` says how that went) and returns its
    /// capacity; a malformed one is returned empty instead (`None`).
    fn keep_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        counters: &Counters,
        head: u16,
        read: Result<(), crate::chain::ChainError>,
    ) -> Option<usize> {
        let checked = match read {
            Ok(()) => check_rx_chain(mem, head, &self.descs),
            Err(e) => Err(super::frame::RxChainError::Chain(e)),
        };
        match checked {
            Ok(chain) => {
                let capacity = chain.capacity();
                self.held.push_back(chain);
                Some(capacity)
            }
            Err(e) => {
                counters.add(Counter::RxBadChains, 1);
                if self.loud() {
                    warn!(pair = self.pair, head, "receive chain returned unused: {e}");
                } else {
                    debug!(pair = self.pair, head, "receive chain returned unused: {e}");
                }
                // Chains go back in the order they came (VIRTIO_F_IN_ORDER): the ones held for a frame first, empty
                // (nothing is written into a held chain before the frame has all the room it needs). Chains taken
                // and not yet published never outnumber the ring, so `used` stays within a ring's worth.
                while let Some(held) = self.held.pop_front() {
                    self.used.push((held.head, 0));
                }
                self.used.push((head, 0));
                None
            }
        }
    }

    /// No room for a frame: publish what is done (the guest refills what it gets back) and
    /// ask the guest to kick when it adds buffers. `true` if buffers arrived meanwhile (try
    /// again).
    fn wait_for_buffers(&mut self, mem: &GuestMemoryMmap) -> bool {
        self.publish(mem);
        self.notify(mem);
        if self.vring.enable_notification(mem) {
            self.vring.disable_notification(mem);
            return true;
        }
        false
    }

    /// Publishes the gathered used entries, and counts the frames they hold.
    fn publish(&mut self, mem: &GuestMemoryMmap) {
        if self.used.is_empty() {
            return;
        }
        let (frames, bytes) = std::mem::take(&mut self.delivered);
        if frames > 0 {
            self.counters.add(Counter::RxFrames, frames);
            self.counters.add(Counter::RxBytes, bytes);
        }
        if let Err(e) = self.vring.complete_batch(mem, &self.used) {
            warn!(
                pair = self.pair,
                queue = self.vring.index(),
                "cannot return chains to the used ring: {e}"
            );
        }
        self.used.clear();
        self.unnotified = true;
    }

    /// Interrupts the guest for what was published, if it asks for that.
    fn notify(&mut self, mem: &GuestMemoryMmap) {
        if std::mem::take(&mut self.unnotified) {
            self.vring.notify(mem);
        }
    }
}
