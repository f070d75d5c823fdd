//! The worker of one vhost-user-net queue pair: a thread with its own epoll serving the
//! pair's transmitq (ring 2N+1) and the kicks of its receiveq (ring 2N).
//!
//! It waits on three eventfds: the two kicks and the stop fd.
//!
//! - Transmit: on a kick, it takes chains with kicks disabled, hands the frames to the
//!   [`NetPort`] in ring order, in batches of up to 128 ([`NetPort::transmit_batch`]), and
//!   returns the chains (used length 0) in batches, then calls [`NetPort::flush`]. A pass
//!   takes at most [`TX_BUDGET`] chains, then lets the receive side run before it goes on
//!   (without sleeping). Kicks are re-enabled only when the ring is empty (EVENT_IDX-safe: it
//!   drains again if entries arrived meanwhile), and after a stream only once the worker has
//!   stopped watching the ring for more (`QueuePairWorker::poll_tx`).
//! - Receive: frames for the guest are written into its receiveq by whoever pushes them (see
//!   [`super::rx`]); the worker hands the ring to the pair's [`RxQueue`] when
//!   it starts, takes it back when it stops, and on a receive kick (the guest added buffers
//!   while frames waited) moves the waiting frames in.
//!
//! Invariant: used entries are published in batches with one used-idx store
//! ([`Vring::complete_batch`]); and when the worker returns (stop), every chain it took is
//! back in the used ring, so GET_VRING_BASE is exact.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::NetBackend;
use super::frame::{TxDrop, append_tx_frame};
use super::header::VirtioNetHeader;
use super::port::{NetPort, TxBatch};
use super::rx::RxQueue;
use super::stats::{Counter, Counters};
use crate::chain::Descriptor;
use crate::vring::Vring;

const TOKEN_RX_KICK: u64 = 0;
const TOKEN_TX_KICK: u64 = 1;
const TOKEN_STOP: u64 = 2;

/// Transmit chains taken per pass before the receive side gets a turn.
pub const TX_BUDGET: usize = 256;

/// Frames handed to the port at once (it takes its locks once per batch).
const TX_BATCH: usize = 128;

/// Bytes of frames after which a batch goes to the port even if shorter (TSO frames are large).
const TX_BATCH_BYTES: usize = 256 << 10;

/// Used entries gathered before they are published (and the guest possibly interrupted).
const USED_BATCH: usize = 64;

/// How many guest-caused problems a worker logs at `warn` before it goes quiet (debug level).
const LOUD_LOG_LIMIT: u32 = 16;

/// How long a worker that just moved frames watches its transmitq before it sleeps (see
/// [`QueuePairWorker::poll_tx`]).
const POLL_WINDOW: Duration = Duration::from_micros(50);

/// Frames a transmit pass must have taken for the worker to poll afterwards: a stream, not a lone
/// frame (a ping's round trip would rather have the CPU free for whoever answers it).
const POLL_AFTER_FRAMES: usize = 8;

/// Whether a transmit pass that took `frames` chains moved a stream (see [`POLL_AFTER_FRAMES`]).
fn is_stream(frames: usize) -> bool {
    frames >= POLL_AFTER_FRAMES
}

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
    /// Frames read from the transmitq, not yet handed to the port.
    batch: TxBatch,
    /// Chains the last transmit pass took.
    last_pass: usize,
    tx_used: Vec<(u16, u32)>,
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
            batch: TxBatch::default(),
            last_pass: 0,
            tx_used: Vec::with_capacity(USED_BATCH),
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

    /// Serves the pair until `stop` fires; see the module docs. The receiveq `rx` is handed
    /// to the pair's receive queue meanwhile and comes back here when the worker stops.
    pub(crate) fn run(
        &mut self,
        rx: Vring,
        tx: &mut Vring,
        stop: &EventFd,
    ) -> (Vring, Result<(), WorkerError>) {
        let rx_kick = rx.kick().try_clone();
        let settings = &self.backend.settings;
        self.rx_queue
            .attach(rx, settings.mrg_rxbuf(), settings.guest_offloads());
        let result = match rx_kick {
            Ok(rx_kick) => self.serve(&rx_kick, tx, stop),
            Err(e) => Err(self.os("dup receive kick")(e)),
        };
        let mem = tx.memory();
        self.publish(tx, &mem);
        tx.notify(&mem);
        let rx = self
            .rx_queue
            .detach()
            .expect("only the pair's worker detaches its receive ring");
        (rx, result)
    }

    fn serve(
        &mut self,
        rx_kick: &EventFd,
        tx: &mut Vring,
        stop: &EventFd,
    ) -> Result<(), WorkerError> {
        let epoll = Epoll::new().map_err(self.os("epoll_create"))?;
        for (fd, token, what) in [
            (rx_kick.as_raw_fd(), TOKEN_RX_KICK, "epoll add receive kick"),
            (
                tx.kick().as_raw_fd(),
                TOKEN_TX_KICK,
                "epoll add transmit kick",
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

        // Whatever was kicked before this worker started.
        let mut tx_more = self.process_tx(tx);
        let mut events = [EpollEvent::default(); 3];
        let mut streaming = self.streaming();
        loop {
            // With transmit work left over from a full pass, or found by polling, only look for events.
            tx_more = tx_more || (streaming && self.poll_tx(tx));
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
                        consume(rx_kick).map_err(self.os("read receive kick"))?;
                        rx_work = true;
                    }
                    TOKEN_TX_KICK => {
                        tx.consume_kick().map_err(self.os("read transmit kick"))?;
                        tx_work = true;
                    }
                    TOKEN_STOP => return Ok(()),
                    _ => {}
                }
            }
            streaming = false;
            if tx_work {
                tx_more = self.process_tx(tx);
                streaming = self.streaming();
            }
            if rx_work {
                self.rx_queue.drain();
            }
        }
    }

    /// Watches the transmitq for up to [`POLL_WINDOW`] after a pass that moved a stream of frames (at
    /// least [`POLL_AFTER_FRAMES`]): under load the driver's next frames usually come within
    /// microseconds, and taking them here saves its kick and this thread's wake-up (a cross-CPU wake-up
    /// costs 10–20 µs on our VMs, which bounds a ping-pong of bursts). It yields the CPU between looks,
    /// so a worker on the same CPU with frames to move (the other port's, say) runs meanwhile rather
    /// than wait for the window to close. An idle queue costs one window after its last stream, then
    /// sleeps. True if frames arrived.
    ///
    /// The pass before left the driver's kicks off (see [`QueuePairWorker::streaming`]): a driver
    /// that kicks for every burst while the worker watches anyway pays a syscall (a VM exit, for a
    /// guest) each time for nothing. They go back on when the window closes, before the worker sleeps.
    pub(crate) fn poll_tx(&self, tx: &mut Vring) -> bool {
        let mem = tx.memory();
        let deadline = Instant::now() + POLL_WINDOW;
        loop {
            if tx.has_available(&mem) {
                return true;
            }
            if Instant::now() >= deadline {
                // Frames that came while kicks were off are taken now rather than left for a kick.
                return tx.enable_notification(&mem);
            }
            std::thread::yield_now();
        }
    }

    /// Whether the last transmit pass moved a stream (at least [`POLL_AFTER_FRAMES`]): it then left
    /// the driver's kicks off, and the worker must watch the ring next ([`QueuePairWorker::poll_tx`]),
    /// which turns them back on.
    fn streaming(&self) -> bool {
        is_stream(self.last_pass)
    }

    /// One transmit pass; returns whether the budget ran out with chains possibly left.
    pub(crate) fn process_tx(&mut self, tx: &mut Vring) -> bool {
        let mem = tx.memory();
        self.process_tx_in(tx, mem)
    }

    /// [`QueuePairWorker::process_tx`] from snapshot `mem`, which may have been taken before the newest.
    pub(crate) fn process_tx_in(&mut self, tx: &mut Vring, mut mem: Arc<GuestMemoryMmap>) -> bool {
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
                self.transmit(tx, &mut mem, head, offloads);
                if self.tx_used.len() >= USED_BATCH.min(usize::from(tx.size())) {
                    self.publish(tx, &mem);
                }
            }
            if budget == 0 {
                more = true;
                break;
            }
            // A stream leaves kicks off: the worker watches the ring next (`streaming`).
            if is_stream(TX_BUDGET - budget) || !tx.enable_notification(&mem) {
                break;
            }
        }
        self.send_batch();
        self.publish(tx, &mem);
        self.port.flush(self.pair);
        tx.notify(&mem);
        self.last_pass = TX_BUDGET - budget;
        more
    }

    fn transmit(
        &mut self,
        tx: &Vring,
        mem: &mut Arc<GuestMemoryMmap>,
        head: u16,
        offloads: super::HostOffloads,
    ) {
        let before = self.batch.buffer().len();
        let mut parsed = self.read_tx_frame(tx, mem, head, offloads);
        if parsed.is_err()
            && let Some(newer) = tx.newer_memory(mem)
        {
            // The frame may lie in a region the driver added since `mem` was taken (a failed read appends
            // nothing): read it again in the newest snapshot, which the rest of the pass then uses.
            *mem = newer;
            parsed = self.read_tx_frame(tx, mem, head, offloads);
        }
        match parsed {
            Ok(header) => {
                let len = self.batch.buffer().len() - before;
                self.batch.push(header, len);
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
        if self.batch.len() >= TX_BATCH || self.batch.buffer().len() >= TX_BATCH_BYTES {
            self.send_batch();
        }
    }

    /// Reads chain `head` and appends its frame to the batch; on error nothing is appended.
    fn read_tx_frame(
        &mut self,
        tx: &Vring,
        mem: &GuestMemoryMmap,
        head: u16,
        offloads: super::HostOffloads,
    ) -> Result<VirtioNetHeader, TxDrop> {
        match tx.read_chain(mem, head, &mut self.descs) {
            Ok(()) => append_tx_frame(mem, &self.descs, offloads, self.batch.buffer()),
            Err(e) => Err(TxDrop::Chain(e)),
        }
    }

    /// Hands the gathered frames to the port.
    fn send_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let taken = self.port.transmit_batch(self.pair, &self.batch);
        self.counters.add(Counter::TxFrames, taken.frames);
        self.counters.add(Counter::TxBytes, taken.bytes);
        let refused = (self.batch.len() as u64).saturating_sub(taken.frames);
        if refused > 0 {
            self.counters.add(Counter::TxRefused, refused);
        }
        self.batch.clear();
    }

    /// Publishes the gathered used entries of the transmitq.
    fn publish(&mut self, tx: &mut Vring, mem: &GuestMemoryMmap) {
        if self.tx_used.is_empty() {
            return;
        }
        if let Err(e) = tx.complete_batch(mem, &self.tx_used) {
            warn!(
                pair = self.pair,
                queue = tx.index(),
                "cannot return chains to the used ring: {e}"
            );
        }
        self.tx_used.clear();
    }
}

/// Consumes a kick (a dup of the ring's kick fd; the frontend owns its blocking mode).
fn consume(kick: &EventFd) -> io::Result<()> {
    match kick.read() {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e),
    }
}
