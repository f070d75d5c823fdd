//! The worker of one vhost-user-blk virtqueue: a thread with its own epoll and its own
//! `vstore::IoQueue` (one io_uring).
//!
//! It waits on three eventfds: the ring's kick, the IoQueue's completion fd and the stop fd
//! the handler signals. On a kick it drains the available ring with notifications disabled,
//! re-enabling them and draining again until nothing new arrived (EVENT_IDX-safe), submits
//! everything with one `commit`, and signals the call fd only if the driver asked for it
//! (`needs_notification`). On completions it writes each status byte, returns the chain to the
//! used ring and signals likewise.
//!
//! Invariant: a head is in `slots` exactly while the block store may still touch its buffers;
//! its slot holds the guest memory snapshot the buffers were translated in, so the mapping
//! outlives the I/O. The worker never returns — not on stop, not on error — before the IoQueue
//! has no request in flight.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_OK, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vstore::{IoError, IoQueue, IoRequest, OpKind, Segment};

use super::BlkBackend;
use super::request::{Limits, Parsed, Request, STATUS_IOERR, parse};
use crate::chain::Descriptor;
use crate::vring::Vring;

const TOKEN_KICK: u64 = 0;
const TOKEN_IO: u64 = 1;
const TOKEN_STOP: u64 = 2;

/// Longest a worker looks for more work before it sleeps (see [`QueueWorker::poll`]).
const POLL_WINDOW: Duration = Duration::from_micros(50);

/// Decides whether a worker polls before it sleeps, from what it has seen of its queue: it polls only for what
/// usually arrives within [`POLL_WINDOW`] — the driver's next request when the queue has fallen idle, or the next
/// completion while requests are in flight. A disk slower than the window, or a guest that pauses between
/// requests, turns polling off by itself; it comes back when they speed up.
#[derive(Debug, Default)]
struct PollGovernor {
    /// Moving average of how long the block store takes per request, in µs.
    service_us: u64,
    /// Moving average of how long the driver takes to send a request once the queue is idle, in µs.
    idle_us: u64,
    /// When the queue last fell idle (nothing in flight, everything answered).
    idle_since: Option<Instant>,
}

impl PollGovernor {
    fn average(old: u64, sample: Duration) -> u64 {
        let sample = u64::try_from(sample.as_micros()).unwrap_or(u64::MAX);
        // An eighth of each new sample: steady, yet a change of pace shows within a few requests.
        old - old / 8 + sample / 8
    }

    fn served(&mut self, took: Duration) {
        self.service_us = Self::average(self.service_us, took);
    }

    fn idle(&mut self) {
        self.idle_since.get_or_insert_with(Instant::now);
    }

    fn requests_arrived(&mut self) {
        if let Some(since) = self.idle_since.take() {
            self.idle_us = Self::average(self.idle_us, since.elapsed());
        }
    }

    fn worth_polling(&self, in_flight: usize) -> bool {
        let window = u64::try_from(POLL_WINDOW.as_micros()).unwrap_or(u64::MAX);
        if in_flight == 0 {
            self.idle_us < window
        } else {
            self.service_us < window
        }
    }
}

/// How many guest-caused problems a worker logs at `warn` before it goes quiet (debug level):
/// a hostile guest must not be able to flood the daemon's log.
const LOUD_LOG_LIMIT: u32 = 16;

/// A worker could not go on.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// epoll / eventfd / io_uring setup or wait failed.
    #[error("queue {queue}: {what}: {source}")]
    Os {
        queue: u16,
        what: &'static str,
        source: io::Error,
    },
}

/// A request handed to the block store and not yet reaped.
struct Pending {
    status_addr: GuestAddress,
    /// Bytes written into the chain on success, status included.
    used_len: u32,
    op: OpKind,
    bytes: u64,
    started: Instant,
    /// Host buffers the block store reads or writes; valid while `mem` lives.
    segments: Vec<Segment>,
    mem: Arc<GuestMemoryMmap>,
    /// Sub-requests (DISCARD / WRITE_ZEROES segments) still outstanding.
    remaining: u32,
    error: Option<IoError>,
}

fn tag(head: u16, sub: u32) -> u64 {
    (u64::from(head) << 32) | u64::from(sub)
}

fn head_of(tag: u64) -> usize {
    (tag >> 32) as usize
}

/// State of one running queue.
pub(crate) struct QueueWorker<'a> {
    backend: &'a BlkBackend,
    queue: u16,
    io: IoQueue,
    slots: Vec<Option<Pending>>,
    descs: Vec<Descriptor>,
    finished: Vec<usize>,
    /// Completions added to the used ring since the last `needs_notification`.
    unsignalled: bool,
    loud_logs: u32,
    poll: PollGovernor,
}

impl<'a> QueueWorker<'a> {
    pub(crate) fn new(backend: &'a BlkBackend, vring: &Vring) -> Result<Self, WorkerError> {
        let queue = vring.index();
        let io =
            IoQueue::new(u32::from(vring.size()).max(32)).map_err(|source| WorkerError::Os {
                queue,
                what: "cannot create the io_uring queue",
                source,
            })?;
        Ok(QueueWorker {
            backend,
            queue,
            io,
            slots: (0..vring.size()).map(|_| None).collect(),
            descs: Vec::with_capacity(16),
            finished: Vec::new(),
            unsignalled: false,
            loud_logs: 0,
            poll: PollGovernor::default(),
        })
    }

    /// Requests submitted and not yet completed.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// Serves the ring until `stop` fires; see the module docs.
    pub(crate) fn run(&mut self, vring: &mut Vring, stop: &EventFd) -> Result<(), WorkerError> {
        // A write the cluster state cannot record yet pauses this queue until it can, or until we are stopped.
        self.io
            .wait_for_the_cluster_until(std::os::fd::AsRawFd::as_raw_fd(stop));
        let result = self.serve(vring, stop);
        // Whatever happened, no buffer may stay with the kernel once we return.
        let drained = self.drain(vring);
        result.and(drained)
    }

    fn os(&self, what: &'static str) -> impl FnOnce(io::Error) -> WorkerError {
        let queue = self.queue;
        move |source| WorkerError::Os {
            queue,
            what,
            source,
        }
    }

    fn serve(&mut self, vring: &mut Vring, stop: &EventFd) -> Result<(), WorkerError> {
        let epoll = Epoll::new().map_err(self.os("epoll_create"))?;
        let add = |fd, token| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(std::os::fd::AsRawFd::as_raw_fd(vring.kick()), TOKEN_KICK)
            .map_err(self.os("epoll add kick"))?;
        add(self.io.completion_fd(), TOKEN_IO).map_err(self.os("epoll add completions"))?;
        add(std::os::fd::AsRawFd::as_raw_fd(stop), TOKEN_STOP)
            .map_err(self.os("epoll add stop"))?;

        // Resubmitted heads and anything queued before we started (a kick may predate us).
        self.process_available(vring)?;
        let mut events = [EpollEvent::default(); 4];
        loop {
            // After work found by polling, only a look at the events (no sleep): a stop must be seen even while
            // the guest keeps the queue busy, or GET_VRING_BASE would wait for the guest to pause.
            let timeout = if self.poll(vring)? { 0 } else { -1 };
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.os("epoll_wait")(e)),
            };
            let mut kicked = false;
            let mut stopping = false;
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_KICK => {
                        vring.consume_kick().map_err(self.os("read kick eventfd"))?;
                        kicked = true;
                    }
                    TOKEN_STOP => stopping = true,
                    _ => {}
                }
            }
            self.reap(vring);
            if stopping {
                return Ok(());
            }
            if kicked {
                self.process_available(vring)?;
            }
            self.signal(vring);
        }
    }

    /// Looks for more work for up to [`POLL_WINDOW`] before the worker goes to sleep in epoll: right after
    /// activity the next request (at low depth) or the next completions (at high depth) usually follow within
    /// microseconds, and finding them here saves a sleep, a wake-up and the eventfd traffic in both directions.
    /// An idle queue looks once for the window and then sleeps; it never burns a core. Between looks it yields its
    /// CPU, so the guest's vCPU thread or another queue's worker that shares it is not held up. True if it did work.
    fn poll(&mut self, vring: &mut Vring) -> Result<bool, WorkerError> {
        if self.io.in_flight() == 0 {
            self.poll.idle();
        }
        if !self.poll.worth_polling(self.io.in_flight()) {
            return Ok(false);
        }
        let mem = vring.memory();
        let deadline = Instant::now() + POLL_WINDOW;
        loop {
            if self.io.completions_ready() {
                self.reap(vring);
                self.signal(vring);
                return Ok(true);
            }
            if vring.has_available(&mem) {
                self.process_available(vring)?;
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            // Another thread on this CPU (the guest's vCPU, another queue's worker) runs first if
            // it is ready: a worker spinning in its way delays the very request it waits for.
            std::thread::yield_now();
        }
    }

    /// Takes every available chain, submits what needs the block store, completes the rest.
    pub(crate) fn process_available(&mut self, vring: &mut Vring) -> Result<(), WorkerError> {
        let mem = vring.memory();
        self.process_available_in(vring, mem)
    }

    /// [`QueueWorker::process_available`] from snapshot `mem`, which may have been taken before the newest.
    pub(crate) fn process_available_in(
        &mut self,
        vring: &mut Vring,
        mut mem: Arc<GuestMemoryMmap>,
    ) -> Result<(), WorkerError> {
        let b = self.backend;
        // What the config space advertises (for the largest ring), not this ring's size: with
        // indirect descriptors a request's segment count does not depend on the ring.
        let limits = b.settings.limits(
            b.volume.layout().size,
            b.block_size,
            b.read_only,
            b.queue_size,
        );
        loop {
            vring.disable_notification(&mem);
            // Each request goes to the kernel as soon as it is parsed, not with the rest of the batch: a batch
            // submitted at once reaches the disk as one burst, finishes as one, and comes back from the driver as
            // one, so at high depth the requests travel as a convoy and the disk idles between convoys (QD32 reads
            // at 0.8-0.9x qemu-storage-daemon, which also submits one at a time; 1.02-1.15x after).
            while let Some(head) = vring.pop(&mem) {
                // Its buffers may lie in a region the driver added after `mem` was taken: look again now that
                // the request is seen (the region was published before the driver could make it available).
                if let Some(newer) = vring.newer_memory(&mem) {
                    mem = newer;
                }
                self.poll.requests_arrived();
                self.start_request(vring, &mem, head, &limits);
                self.io.commit().map_err(self.os("io_uring submit"))?;
            }
            if !vring.enable_notification(&mem) {
                break;
            }
        }
        self.signal(vring);
        Ok(())
    }

    fn loud(&mut self) -> bool {
        self.loud_logs += 1;
        self.loud_logs <= LOUD_LOG_LIMIT
    }

    fn start_request(
        &mut self,
        vring: &mut Vring,
        mem: &Arc<GuestMemoryMmap>,
        head: u16,
        limits: &Limits,
    ) {
        let started = Instant::now();
        let chain = vring.read_chain(mem, head, &mut self.descs);
        let parsed = parse(mem, chain.map(|()| &self.descs[..]), limits);
        let (status_addr, request) = match parsed {
            Parsed::NoStatus(error) => {
                if self.loud() {
                    warn!(
                        queue = self.queue,
                        head, "malformed request returned without status: {error}"
                    );
                } else {
                    debug!(
                        queue = self.queue,
                        head, "malformed request returned without status: {error}"
                    );
                }
                self.complete(vring, mem, head, 0);
                return;
            }
            Parsed::Reject {
                status_addr,
                status,
                error,
                req_type,
            } => {
                if self.loud() {
                    warn!(queue = self.queue, head, status, "request refused: {error}");
                } else {
                    debug!(queue = self.queue, head, status, "request refused: {error}");
                }
                if let Some(op) = req_type.and_then(op_of) {
                    self.backend
                        .volume
                        .stats()
                        .record(op, 0, started.elapsed(), false);
                }
                self.finish(vring, mem, head, status_addr, status, 1);
                return;
            }
            Parsed::Ready {
                status_addr,
                request,
            } => (status_addr, request),
        };
        if self
            .slots
            .get(usize::from(head))
            .is_none_or(|s| s.is_some())
        {
            // The driver offered a head that is still ours: a driver bug we cannot answer
            // without corrupting the request already running under that head.
            if self.loud() {
                warn!(
                    queue = self.queue,
                    head, "driver reused a descriptor head still in flight; ignored"
                );
            }
            return;
        }
        let used_len = u32::try_from(request.written_bytes() + 1).unwrap_or(u32::MAX);
        match request {
            Request::GetId { dest } => {
                let serial = &self.backend.serial;
                let mut done = 0usize;
                let mut ok = true;
                for (gpa, len) in dest {
                    ok &= mem.write_slice(&serial[done..done + len], gpa).is_ok();
                    done += len;
                }
                let status = if ok {
                    VIRTIO_BLK_S_OK as u8
                } else {
                    STATUS_IOERR
                };
                self.backend
                    .volume
                    .stats()
                    .record(OpKind::GetId, 0, started.elapsed(), ok);
                self.finish(
                    vring,
                    mem,
                    head,
                    status_addr,
                    status,
                    if ok { used_len } else { 1 },
                );
            }
            Request::Read { len: 0, .. } | Request::Write { len: 0, .. } => {
                // Nothing to move; the block store is not bothered with empty transfers.
                self.finish(
                    vring,
                    mem,
                    head,
                    status_addr,
                    VIRTIO_BLK_S_OK as u8,
                    used_len,
                );
            }
            Request::Read {
                offset,
                len,
                segments,
            } => {
                self.submit_one(
                    head,
                    status_addr,
                    used_len,
                    OpKind::Read,
                    len,
                    started,
                    segments,
                    mem,
                    |s| IoRequest::Read {
                        offset,
                        segments: s,
                    },
                );
            }
            Request::Write {
                offset,
                len,
                segments,
            } => {
                let write_through = self.backend.settings.write_through();
                self.submit_one(
                    head,
                    status_addr,
                    used_len,
                    OpKind::Write,
                    len,
                    started,
                    segments,
                    mem,
                    |s| IoRequest::Write {
                        offset,
                        segments: s,
                        write_through,
                    },
                );
            }
            Request::Flush => {
                self.submit_one(
                    head,
                    status_addr,
                    used_len,
                    OpKind::Flush,
                    0,
                    started,
                    Vec::new(),
                    mem,
                    |_| IoRequest::Flush,
                );
            }
            Request::Discard { ranges } | Request::WriteZeroes { ranges, .. }
                if ranges.is_empty() =>
            {
                // Only zero-length segments: nothing to do.
                self.finish(
                    vring,
                    mem,
                    head,
                    status_addr,
                    VIRTIO_BLK_S_OK as u8,
                    used_len,
                );
            }
            Request::Discard { ranges } => {
                let reqs: Vec<IoRequest<'_>> = ranges
                    .iter()
                    .map(|r| IoRequest::Discard {
                        offset: r.offset,
                        len: r.len,
                    })
                    .collect();
                self.submit_many(
                    head,
                    status_addr,
                    used_len,
                    OpKind::Discard,
                    started,
                    mem,
                    reqs,
                );
            }
            Request::WriteZeroes { ranges, unmap } => {
                let reqs: Vec<IoRequest<'_>> = ranges
                    .iter()
                    .map(|r| IoRequest::WriteZeroes {
                        offset: r.offset,
                        len: r.len,
                        may_unmap: unmap,
                    })
                    .collect();
                self.submit_many(
                    head,
                    status_addr,
                    used_len,
                    OpKind::WriteZeroes,
                    started,
                    mem,
                    reqs,
                );
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn submit_one(
        &mut self,
        head: u16,
        status_addr: GuestAddress,
        used_len: u32,
        op: OpKind,
        bytes: u64,
        started: Instant,
        segments: Vec<Segment>,
        mem: &Arc<GuestMemoryMmap>,
        build: impl for<'s> FnOnce(&'s [Segment]) -> IoRequest<'s>,
    ) {
        let pending = Pending {
            status_addr,
            used_len,
            op,
            bytes,
            started,
            segments,
            mem: Arc::clone(mem),
            remaining: 1,
            error: None,
        };
        let slot = self.slots[usize::from(head)].insert(pending);
        let request = build(&slot.segments);
        // SAFETY: the segments point into guest memory mapped by `slot.mem`, a snapshot that
        // the slot keeps alive until this tag is reaped (the slot is only cleared in `reap`, and
        // `run` drains the queue before returning); they were bounds-checked against that
        // snapshot's regions by `parse`. The worker never reads or writes these buffers itself
        // while the request is in flight.
        unsafe { self.io.submit(&self.backend.volume, request, tag(head, 0)) };
    }

    #[allow(clippy::too_many_arguments)]
    fn submit_many(
        &mut self,
        head: u16,
        status_addr: GuestAddress,
        used_len: u32,
        op: OpKind,
        started: Instant,
        mem: &Arc<GuestMemoryMmap>,
        requests: Vec<IoRequest<'_>>,
    ) {
        self.slots[usize::from(head)] = Some(Pending {
            status_addr,
            used_len,
            op,
            bytes: 0,
            started,
            segments: Vec::new(),
            mem: Arc::clone(mem),
            remaining: requests.len() as u32,
            error: None,
        });
        for (sub, request) in requests.into_iter().enumerate() {
            // SAFETY: DISCARD and WRITE_ZEROES carry no guest buffers.
            unsafe {
                self.io
                    .submit(&self.backend.volume, request, tag(head, sub as u32))
            };
        }
    }

    /// Collects finished requests and returns them to the driver.
    fn reap(&mut self, vring: &mut Vring) {
        let Self {
            io,
            slots,
            finished,
            ..
        } = self;
        io.reap(|tag, result| {
            let Some(Some(p)) = slots.get_mut(head_of(tag)) else {
                return;
            };
            if let Err(e) = result {
                p.error.get_or_insert(e);
            }
            p.remaining = p.remaining.saturating_sub(1);
            if p.remaining == 0 {
                finished.push(head_of(tag));
            }
        });
        let done = std::mem::take(&mut self.finished);
        for &head in &done {
            let Some(p) = self.slots[head].take() else {
                continue;
            };
            let ok = p.error.is_none();
            self.poll.served(p.started.elapsed());
            self.backend.volume.stats().record(
                p.op,
                if ok { p.bytes } else { 0 },
                p.started.elapsed(),
                ok,
            );
            let (status, used_len) = match &p.error {
                None => (VIRTIO_BLK_S_OK as u8, p.used_len),
                Some(e) => {
                    if self.loud() {
                        warn!(queue = self.queue, head, op = ?p.op, "request failed: {e}");
                    } else {
                        debug!(queue = self.queue, head, op = ?p.op, "request failed: {e}");
                    }
                    (STATUS_IOERR, 1)
                }
            };
            // `head` indexes `slots`, which has one entry per ring descriptor (a u16 ring).
            self.finish(vring, &p.mem, head as u16, p.status_addr, status, used_len);
        }
        self.finished = done;
        self.finished.clear();
    }

    /// Writes the status byte and returns the chain with `used_len` bytes written.
    fn finish(
        &mut self,
        vring: &mut Vring,
        mem: &GuestMemoryMmap,
        head: u16,
        at: GuestAddress,
        status: u8,
        used_len: u32,
    ) {
        if mem.write_obj(status, at).is_err() {
            // parse() checked the address against this very snapshot; cannot happen.
            warn!(
                queue = self.queue,
                head, "status byte no longer writable; returning the chain empty"
            );
            self.complete(vring, mem, head, 0);
            return;
        }
        self.complete(vring, mem, head, used_len);
    }

    fn complete(&mut self, vring: &mut Vring, mem: &GuestMemoryMmap, head: u16, used_len: u32) {
        match vring.complete(mem, head, used_len) {
            Ok(()) => self.unsignalled = true,
            Err(e) => warn!(
                queue = self.queue,
                head, "cannot return the chain to the used ring: {e}"
            ),
        }
    }

    fn signal(&mut self, vring: &mut Vring) {
        if self.unsignalled {
            self.unsignalled = false;
            let mem = vring.memory();
            vring.notify(&mem);
        }
    }

    /// Waits for every request in flight and returns it to the driver.
    pub(crate) fn drain(&mut self, vring: &mut Vring) -> Result<(), WorkerError> {
        while self.io.in_flight() > 0 {
            if let Err(e) = self.io.wait() {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The kernel may still own buffers of the requests left: keep their guest memory
                // mapped for the life of the process rather than risk it being reused.
                std::mem::forget(std::mem::take(&mut self.slots));
                return Err(self.os("waiting for requests in flight")(e));
            }
            self.reap(vring);
        }
        self.reap(vring);
        self.signal(vring);
        Ok(())
    }
}

fn op_of(req_type: u32) -> Option<OpKind> {
    match req_type {
        VIRTIO_BLK_T_IN => Some(OpKind::Read),
        VIRTIO_BLK_T_OUT => Some(OpKind::Write),
        VIRTIO_BLK_T_FLUSH => Some(OpKind::Flush),
        VIRTIO_BLK_T_GET_ID => Some(OpKind::GetId),
        VIRTIO_BLK_T_DISCARD => Some(OpKind::Discard),
        VIRTIO_BLK_T_WRITE_ZEROES => Some(OpKind::WriteZeroes),
        _ => None,
    }
}

#[cfg(test)]
mod poll_tests {
    use super::*;

    #[test]
    fn polls_for_fast_disks_and_quick_drivers_only() {
        let mut governor = PollGovernor::default();
        assert!(
            governor.worth_polling(0) && governor.worth_polling(1),
            "starts optimistic"
        );
        for _ in 0..32 {
            governor.served(Duration::from_micros(400));
        }
        assert!(
            !governor.worth_polling(1),
            "a slow disk turns completion polling off"
        );
        assert!(
            governor.worth_polling(0),
            "the idle side is judged on its own"
        );
        for _ in 0..64 {
            governor.served(Duration::from_micros(5));
        }
        assert!(
            governor.worth_polling(1),
            "a disk that speeds up turns it back on"
        );
    }

    #[test]
    fn a_long_pause_turns_idle_polling_off_until_the_driver_speeds_up() {
        let mut governor = PollGovernor {
            idle_since: Some(Instant::now() - Duration::from_secs(1)),
            ..PollGovernor::default()
        };
        governor.requests_arrived();
        assert!(!governor.worth_polling(0));
        for _ in 0..128 {
            governor.idle();
            governor.requests_arrived();
        }
        assert!(governor.worth_polling(0));
    }
}
