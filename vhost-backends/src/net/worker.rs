//! The worker of one vhost-user-net queue pair: a thread with its own epoll serving the
//! pair's receiveq (ring 2N) and transmitq (ring 2N+1).
//!
//! It waits on four eventfds: the two kicks, the pair's [`RxQueue`] wake-up and the stop fd.
//!
//! - Transmit: on a kick, it takes chains with kicks disabled, hands each frame to the
//!   [`NetPort`] in ring order and returns the chains (used length 0) in one batch per pass,
//!   then calls [`NetPort::flush`]. A pass takes at most [`TX_BUDGET`] chains, then lets the
//!   receive side run before it goes on (without sleeping). Kicks are re-enabled only when the
//!   ring is empty (EVENT_IDX-safe: it drains again if entries arrived meanwhile).
//! - Receive: when frames are queued (wake-up) or the guest added buffers (kick), it moves
//!   frames into receive chains: with MRG_RXBUF over as many chains as needed (`num_buffers`
//!   set), without it into one chain that must hold header and frame (else the frame is
//!   dropped and the chain kept for the next one). With no buffers left, the frame waits in
//!   the queue and the worker asks the guest for a kick.
//!
//! Invariant: used entries are published in batches with one used-idx store
//! ([`Vring::complete_batch`]), so the guest never sees part of a multi-buffer frame; and when
//! the worker returns (stop), every chain it took is back in the used ring — receive chains
//! it was holding for frames to come are returned empty — so GET_VRING_BASE is exact.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;

use tracing::{debug, warn};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::NetBackend;
use super::frame::{RxChain, check_rx_chain, read_tx_frame, write_rx_frame};
use super::header::{FLAG_DATA_VALID, FLAG_NEEDS_CSUM, HEADER_LEN, finish_checksum};
use super::port::{NetPort, RxFrame, RxQueue};
use super::stats::{Counter, Counters};
use crate::chain::Descriptor;
use crate::vring::Vring;

const TOKEN_RX_KICK: u64 = 0;
const TOKEN_TX_KICK: u64 = 1;
const TOKEN_RX_QUEUE: u64 = 2;
const TOKEN_STOP: u64 = 3;

/// Transmit chains taken per pass before the receive side gets a turn.
pub const TX_BUDGET: usize = 256;

/// Used entries gathered before they are published (and the guest possibly interrupted).
const USED_BATCH: usize = 64;

/// How many guest-caused problems a worker logs at `warn` before it goes quiet (debug level).
const LOUD_LOG_LIMIT: u32 = 16;

/// A worker could not go on.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// epoll / eventfd setup or wait failed.
    #[error("queue pair {pair}: {what}: {source}")]
    Os {
        pair: u16,
        what: &'static str,
        source: io::Error,
    },
}

/// State of one running queue pair.
pub(crate) struct QueuePairWorker<'a> {
    pair: u16,
    port: &'a dyn NetPort,
    backend: &'a NetBackend,
    rx_queue: &'a RxQueue,
    counters: &'a Counters,
    descs: Vec<Descriptor>,
    /// Transmit gather buffer: header + frame.
    tx_buf: Vec<u8>,
    tx_used: Vec<(u16, u32)>,
    rx_used: Vec<(u16, u32)>,
    /// Receive chains taken from the ring and not yet filled, oldest first.
    held: VecDeque<RxChain>,
    loud_logs: u32,
}

impl<'a> QueuePairWorker<'a> {
    pub(crate) fn new(backend: &'a NetBackend, pair: u16) -> Self {
        let qp = &backend.pairs[usize::from(pair)];
        QueuePairWorker {
            pair,
            port: &*backend.port,
            backend,
            rx_queue: &qp.rx,
            counters: &qp.counters,
            descs: Vec::with_capacity(16),
            tx_buf: Vec::with_capacity(2048),
            tx_used: Vec::with_capacity(USED_BATCH),
            rx_used: Vec::with_capacity(USED_BATCH),
            held: VecDeque::new(),
            loud_logs: 0,
        }
    }

    fn os(&self, what: &'static str) -> impl FnOnce(io::Error) -> WorkerError {
        let pair = self.pair;
        move |source| WorkerError::Os { pair, what, source }
    }

    fn loud(&mut self) -> bool {
        self.loud_logs = self.loud_logs.saturating_add(1);
        self.loud_logs <= LOUD_LOG_LIMIT
    }

    /// Serves the pair until `stop` fires; see the module docs.
    pub(crate) fn run(
        &mut self,
        rx: &mut Vring,
        tx: &mut Vring,
        stop: &EventFd,
    ) -> Result<(), WorkerError> {
        let result = self.serve(rx, tx, stop);
        self.finish(rx, tx);
        result
    }

    fn serve(&mut self, rx: &mut Vring, tx: &mut Vring, stop: &EventFd) -> Result<(), WorkerError> {
        let epoll = Epoll::new().map_err(self.os("epoll_create"))?;
        for (fd, token, what) in [
            (
                rx.kick().as_raw_fd(),
                TOKEN_RX_KICK,
                "epoll add receive kick",
            ),
            (
                tx.kick().as_raw_fd(),
                TOKEN_TX_KICK,
                "epoll add transmit kick",
            ),
            (
                self.rx_queue.wake_fd().as_raw_fd(),
                TOKEN_RX_QUEUE,
                "epoll add receive queue",
            ),
            (stop.as_raw_fd(), TOKEN_STOP, "epoll add stop"),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(self.os(what))?;
        }

        // Whatever was queued or kicked before this worker started.
        let mut tx_more = self.process_tx(tx);
        self.deliver_rx(rx);
        let mut events = [EpollEvent::default(); 4];
        loop {
            // With transmit work left over from a full pass, only look for events.
            let timeout = if tx_more { 0 } else { -1 };
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.os("epoll_wait")(e)),
            };
            let (mut rx_work, mut tx_work) = (false, tx_more);
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_RX_KICK => {
                        rx.consume_kick().map_err(self.os("read receive kick"))?;
                        rx_work = true;
                    }
                    TOKEN_TX_KICK => {
                        tx.consume_kick().map_err(self.os("read transmit kick"))?;
                        tx_work = true;
                    }
                    TOKEN_RX_QUEUE => {
                        self.rx_queue.consume_wake();
                        rx_work = true;
                    }
                    TOKEN_STOP => return Ok(()),
                    _ => {}
                }
            }
            if tx_work {
                tx_more = self.process_tx(tx);
            }
            if rx_work {
                self.deliver_rx(rx);
            }
        }
    }

    /// One transmit pass; returns whether the budget ran out with chains possibly left.
    pub(crate) fn process_tx(&mut self, tx: &mut Vring) -> bool {
        let mem = tx.memory();
        let offloads = self.backend.settings.host_offloads();
        let mut budget = TX_BUDGET;
        let mut more = false;
        loop {
            tx.disable_notification(&mem);
            while budget > 0 {
                let Some(head) = tx.pop(&mem) else {
                    break;
                };
                budget -= 1;
                self.transmit(tx, &mem, head, offloads);
                if self.tx_used.len() >= USED_BATCH.min(usize::from(tx.size())) {
                    self.publish(tx, &mem, true);
                }
            }
            if budget == 0 {
                more = true;
                break;
            }
            if !tx.enable_notification(&mem) {
                break;
            }
        }
        self.publish(tx, &mem, true);
        self.port.flush(self.pair);
        tx.notify(&mem);
        more
    }

    fn transmit(
        &mut self,
        tx: &Vring,
        mem: &GuestMemoryMmap,
        head: u16,
        offloads: super::HostOffloads,
    ) {
        let parsed = match tx.read_chain(mem, head, &mut self.descs) {
            Ok(()) => read_tx_frame(mem, &self.descs, offloads, &mut self.tx_buf),
            Err(e) => Err(super::frame::TxDrop::Chain(e)),
        };
        match parsed {
            Ok(header) => {
                let frame = &self.tx_buf[HEADER_LEN..];
                if self.port.transmit(self.pair, &header, frame) {
                    self.counters.add(Counter::TxFrames, 1);
                    self.counters.add(Counter::TxBytes, frame.len() as u64);
                } else {
                    self.counters.add(Counter::TxRefused, 1);
                }
            }
            Err(drop) => {
                self.counters.add(drop.counter(), 1);
                if self.loud() {
                    warn!(pair = self.pair, head, "transmit frame dropped: {drop}");
                } else {
                    debug!(pair = self.pair, head, "transmit frame dropped: {drop}");
                }
            }
        }
        self.tx_used.push((head, 0));
    }

    /// Moves queued frames into the guest's receive buffers until the queue is empty or the
    /// guest has no buffers left.
    pub(crate) fn deliver_rx(&mut self, rx: &mut Vring) {
        let mem = rx.memory();
        let mrg = self.backend.settings.mrg_rxbuf();
        let offloads = self.backend.settings.guest_offloads();
        let ring_size = usize::from(rx.size());
        // Kicks are only wanted while frames wait for buffers.
        rx.disable_notification(&mem);
        while let Some(mut item) = self.rx_queue.pop() {
            if !self.adapt_offloads(&mut item, offloads) {
                continue;
            }
            let needed = HEADER_LEN + item.frame.len();
            let chains = if mrg {
                self.fill_held(rx, &mem, |held| {
                    held.iter().map(RxChain::capacity).sum::<usize>() >= needed
                        || held.len() >= ring_size
                });
                let (mut have, mut count) = (0usize, 0usize);
                for chain in &self.held {
                    if have >= needed {
                        break;
                    }
                    have += chain.capacity();
                    count += 1;
                }
                if have < needed {
                    if self.held.len() >= ring_size {
                        // Even the whole ring cannot hold it: the guest's buffers are too
                        // small for this frame. Drop it rather than block the queue forever.
                        self.counters.add(Counter::RxTooBig, 1);
                        if self.loud() {
                            warn!(
                                pair = self.pair,
                                frame = item.frame.len(),
                                room = have,
                                "frame larger than all receive buffers together; dropped"
                            );
                        }
                        continue;
                    }
                    if self.wait_for_buffers(rx, &mem, item) {
                        continue;
                    }
                    break;
                }
                count
            } else {
                self.fill_held(rx, &mem, |held| !held.is_empty());
                let Some(room) = self.held.front().map(RxChain::capacity) else {
                    if self.wait_for_buffers(rx, &mem, item) {
                        continue;
                    }
                    break;
                };
                if room < needed {
                    // This guest posts buffers too small for the frame; the chain stays for
                    // the next frame.
                    self.counters.add(Counter::RxTooBig, 1);
                    if self.loud() {
                        warn!(
                            pair = self.pair,
                            frame = item.frame.len(),
                            buffer = room,
                            "frame does not fit a receive buffer (no MRG_RXBUF); dropped"
                        );
                    }
                    continue;
                }
                1
            };
            if self.rx_used.len() + chains > USED_BATCH.min(ring_size) {
                self.publish(rx, &mem, false);
            }
            item.header.num_buffers = chains as u16;
            let used: Vec<RxChain> = self.held.drain(..chains).collect();
            match write_rx_frame(&mem, &used, &item.header, &item.frame, &mut self.rx_used) {
                Ok(()) => {
                    self.counters.add(Counter::RxFrames, 1);
                    self.counters.add(Counter::RxBytes, item.frame.len() as u64);
                }
                Err(e) => {
                    // The memory table changed under chains held from before: give them back
                    // empty and drop the frame.
                    self.counters.add(Counter::RxBadChains, used.len() as u64);
                    if self.loud() {
                        warn!(pair = self.pair, "receive buffer left guest memory: {e}");
                    }
                    self.rx_used.extend(used.iter().map(|c| (c.head, 0)));
                }
            }
        }
        self.publish(rx, &mem, false);
        rx.notify(&mem);
    }

    /// Applies what the guest negotiated to a frame's header; `false` if it must be dropped.
    fn adapt_offloads(&mut self, item: &mut RxFrame, offloads: super::GuestOffloads) -> bool {
        let h = &mut item.header;
        if !offloads.accepts_gso(h) {
            self.counters.add(Counter::RxOffload, 1);
            if self.loud() {
                warn!(
                    pair = self.pair,
                    gso_type = h.gso_type,
                    "GSO frame for a guest that did not negotiate it; dropped (the switch must segment)"
                );
            }
            return false;
        }
        if !offloads.csum {
            if h.needs_csum() && !finish_checksum(&mut item.frame, h.csum_start, h.csum_offset) {
                self.counters.add(Counter::RxOffload, 1);
                return false;
            }
            h.flags &= !(FLAG_NEEDS_CSUM | FLAG_DATA_VALID);
            h.csum_start = 0;
            h.csum_offset = 0;
        }
        true
    }

    /// Takes receive chains from the ring into `held` until `enough` holds or the ring is
    /// empty; malformed chains are returned empty on the way.
    fn fill_held(
        &mut self,
        rx: &mut Vring,
        mem: &GuestMemoryMmap,
        enough: impl Fn(&VecDeque<RxChain>) -> bool,
    ) {
        while !enough(&self.held) {
            let Some(head) = rx.pop(mem) else {
                return;
            };
            let checked = match rx.read_chain(mem, head, &mut self.descs) {
                Ok(()) => check_rx_chain(mem, head, &self.descs),
                Err(e) => Err(super::frame::RxChainError::Chain(e)),
            };
            match checked {
                Ok(chain) => self.held.push_back(chain),
                Err(e) => {
                    self.counters.add(Counter::RxBadChains, 1);
                    if self.loud() {
                        warn!(pair = self.pair, head, "receive chain returned unused: {e}");
                    }
                    if self.rx_used.len() >= usize::from(rx.size()) {
                        self.publish(rx, mem, false);
                    }
                    self.rx_used.push((head, 0));
                }
            }
        }
    }

    /// No room for `item`: it goes back to the head of the queue and the guest is asked to
    /// kick when it adds buffers. `true` if buffers arrived meanwhile (try again).
    fn wait_for_buffers(&mut self, rx: &mut Vring, mem: &GuestMemoryMmap, item: RxFrame) -> bool {
        self.rx_queue.unpop(item);
        // Publish what is done first: the guest refills what it gets back.
        self.publish(rx, mem, false);
        rx.notify(mem);
        if rx.enable_notification(mem) {
            rx.disable_notification(mem);
            return true;
        }
        false
    }

    /// Publishes the gathered used entries of one ring.
    fn publish(&mut self, vring: &mut Vring, mem: &GuestMemoryMmap, transmit: bool) {
        let used = if transmit {
            &mut self.tx_used
        } else {
            &mut self.rx_used
        };
        if used.is_empty() {
            return;
        }
        if let Err(e) = vring.complete_batch(mem, used) {
            warn!(
                pair = self.pair,
                queue = vring.index(),
                "cannot return chains to the used ring: {e}"
            );
        }
        used.clear();
    }

    /// Returns every chain still held (receive chains waiting for frames go back empty) and
    /// publishes what is pending, so the rings stop at exact positions.
    fn finish(&mut self, rx: &mut Vring, tx: &mut Vring) {
        let mem = rx.memory();
        let held: Vec<(u16, u32)> = self.held.drain(..).map(|c| (c.head, 0)).collect();
        for entry in held {
            if self.rx_used.len() >= usize::from(rx.size()) {
                self.publish(rx, &mem, false);
            }
            self.rx_used.push(entry);
        }
        self.publish(rx, &mem, false);
        rx.notify(&mem);
        let mem = tx.memory();
        self.publish(tx, &mem, true);
        tx.notify(&mem);
    }

    /// Receive chains held for frames to come (for tests).
    #[cfg(test)]
    pub(crate) fn held_chains(&self) -> usize {
        self.held.len()
    }
}
