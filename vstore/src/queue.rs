//! Volume I/O over io_uring: one [`IoQueue`] per worker thread.
//!
//! A request is split at extent boundaries into sub-I/Os, each aimed at one slot on one disk
//! (or satisfied at once: a read of an unallocated extent fills the segments with zeroes).
//! Reads and writes go straight from and to the caller's segments (read/write for one
//! segment, readv/writev for more) when every segment is aligned for the disk's O_DIRECT;
//! otherwise through an aligned bounce buffer. Discards and write-zeroes free the extents they cover whole (see
//! [`crate::volume`]) and punch or zero the rest with fallocate. A flush is an fdatasync on
//! every disk the volume has data on.
//!
//! The queue hands on completions: `reap` reports each request once, after all its sub-I/Os
//! finished, with the first error any of them met. Completions reach the worker through the
//! eventfd registered on the ring; where the kernel allows, their processing is deferred to
//! the worker's `reap` (see `build_ring`), which binds a queue to one thread.
//!
//! Invariants: every sub-I/O holds its slot's lease, and every request holds its volume,
//! until the request is reaped (see the slot-reuse invariant in [`crate::volume`]); and no
//! buffer or iovec array the kernel may still touch is freed or moved — the queue waits for
//! its SQEs on drop, and the heap blocks behind iovec arrays never move once submitted.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{IoUring, opcode, squeue, types};
use vmm_sys_util::eventfd::EventFd;

use vessel_proto::frame::{FLAG_DURABLE, Header, Kind, MAX_PAYLOAD, Opcode};

use crate::aligned::AlignedBuf;
use crate::disk::{Disk, PUNCH_MODE, ZERO_MODE};
use crate::error::IoError;
use crate::remote::{Fault, Inbox, NodeId, Outcome, RemoteError, Routing, Settlement};
use crate::volume::{ExtentLease, LocalVolume, extent_count};

/// Most iovecs one readv/writev takes (Linux UIO_MAXIOV); a piece with more segments goes
/// through a bounce buffer.
const IOV_MAX: usize = 1024;
/// Bounce buffers kept for reuse, and the largest size kept, so a burst of huge unaligned
/// requests does not pin memory for the life of the queue.
const BOUNCE_POOL_BUFFERS: usize = 16;
const BOUNCE_POOL_MAX_LEN: usize = 1 << 20;
/// Largest range one discard or write-zeroes frame to a replica covers.
const REMOTE_ZERO_CHUNK: u64 = 1 << 30;

/// One guest memory segment. The caller guarantees validity until the request is reaped.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    pub addr: *mut u8,
    pub len: usize,
}

/// A request on a volume. Offsets and lengths are bytes and must be multiples of the volume's
/// block size.
#[derive(Debug)]
pub enum IoRequest<'a> {
    Read {
        offset: u64,
        segments: &'a [Segment],
    },
    /// `write_through`: durable before completion (RWF_DSYNC).
    Write {
        offset: u64,
        segments: &'a [Segment],
        write_through: bool,
    },
    /// Makes every write completed before it durable: fdatasync on each disk the volume has
    /// data on.
    Flush,
    /// The range reads back as zeroes afterwards; its space is given back.
    Discard { offset: u64, len: u64 },
    /// The range reads back as zeroes afterwards; with `may_unmap` its space may be given back,
    /// without it the space stays allocated so later writes cannot fail for lack of space.
    WriteZeroes {
        offset: u64,
        len: u64,
        may_unmap: bool,
    },
}

impl IoRequest<'_> {
    /// Whether the request changes data (a write, discard or write-zeroes).
    fn writes(&self) -> bool {
        matches!(
            self,
            Self::Write { .. } | Self::Discard { .. } | Self::WriteZeroes { .. }
        )
    }

    /// The extents a request that changes data touches (none for others, or when its range
    /// overflows: it is refused anyway).
    fn extents(&self, extent_size: u64) -> Vec<u64> {
        let (offset, len) = match self {
            Self::Write {
                offset, segments, ..
            } => (*offset, segments.iter().map(|s| s.len as u64).sum::<u64>()),
            Self::Discard { offset, len } | Self::WriteZeroes { offset, len, .. } => {
                (*offset, *len)
            }
            _ => return Vec::new(),
        };
        match (len, offset.checked_add(len)) {
            (0, _) | (_, None) => Vec::new(),
            (_, Some(end)) if extent_size > 0 => {
                (offset / extent_size..end.div_ceil(extent_size)).collect()
            }
            _ => Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum SubKind {
    #[default]
    Read,
    Write,
    Fallocate,
    Sync,
    /// Sent to a replica on another node; completes through the queue's inbox.
    Remote,
}

/// A sub-op bound for another node's replica of an extent.
#[derive(Debug, Clone, Copy)]
struct RemoteOp {
    node: NodeId,
    opcode: Opcode,
    extent: u64,
    /// Byte offset within the extent.
    within: u64,
    length: u32,
    epoch: u64,
    durable: bool,
}

/// One SQE's worth of a request (re-queued on a short transfer).
#[derive(Debug, Default)]
struct SubOp {
    kind: SubKind,
    /// The slot a read, write or fallocate goes to; pinned until the request is reaped.
    lease: Option<Arc<ExtentLease>>,
    /// The disk a sync goes to.
    disk: Option<Arc<Disk>>,
    /// Device offset of the next byte.
    offset: u64,
    /// Bytes still to transfer, or the fallocate length.
    remaining: u64,
    /// The iovecs handed to the kernel: the caller's segments, or the bounce buffer.
    iov: Vec<libc::iovec>,
    /// First iovec not yet transferred (after a short transfer).
    iov_start: usize,
    /// The caller's segments when a bounce buffer stands in for them.
    guest: Vec<libc::iovec>,
    bounce: Option<AlignedBuf>,
    rw_flags: i32,
    fallocate_mode: i32,
    /// For routed reads and writes: where the op's data starts in the request's segments.
    data_start: u64,
    remote: Option<RemoteOp>,
    /// Nodes a remote read already failed on.
    tried: Vec<NodeId>,
}

impl SubOp {
    fn target_disk(&self) -> Option<&Arc<Disk>> {
        self.lease
            .as_ref()
            .map(|lease| &lease.disk)
            .or(self.disk.as_ref())
    }

    fn entry(&self, user_data: u64) -> Option<squeue::Entry> {
        let fd = types::Fd(self.target_disk()?.fd());
        let iov = &self.iov[self.iov_start..];
        // One buffer (the usual 4 KiB guest request): the non-vectored opcodes spare the
        // kernel importing an iovec array.
        let single = match iov {
            [one] => u32::try_from(one.iov_len)
                .ok()
                .map(|len| (one.iov_base.cast::<u8>(), len)),
            _ => None,
        };
        let entry = match (self.kind, single) {
            (SubKind::Read, Some((buf, len))) => {
                opcode::Read::new(fd, buf, len).offset(self.offset).build()
            }
            (SubKind::Read, None) => opcode::Readv::new(fd, iov.as_ptr(), iov.len() as u32)
                .offset(self.offset)
                .build(),
            (SubKind::Write, Some((buf, len))) => opcode::Write::new(fd, buf, len)
                .offset(self.offset)
                .rw_flags(self.rw_flags)
                .build(),
            (SubKind::Write, None) => opcode::Writev::new(fd, iov.as_ptr(), iov.len() as u32)
                .offset(self.offset)
                .rw_flags(self.rw_flags)
                .build(),
            (SubKind::Fallocate, _) => opcode::Fallocate::new(fd, self.remaining)
                .offset(self.offset)
                .mode(self.fallocate_mode)
                .build(),
            (SubKind::Sync, _) => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            (SubKind::Remote, _) => return None,
        };
        Some(entry.user_data(user_data))
    }

    /// Moves past `n` transferred bytes.
    fn advance(&mut self, n: u64) {
        self.remaining -= n;
        self.offset += n;
        let mut n = n as usize;
        while n > 0 && self.iov_start < self.iov.len() {
            let iov = &mut self.iov[self.iov_start];
            if n >= iov.iov_len {
                n -= iov.iov_len;
                self.iov_start += 1;
            } else {
                iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(n).cast();
                iov.iov_len -= n;
                n = 0;
            }
        }
    }
}

#[derive(Debug, Default)]
struct Request {
    tag: u64,
    volume: Option<Arc<LocalVolume>>,
    /// SQEs queued and not yet completed.
    pending: u32,
    error: Option<IoError>,
    /// The rebuild guard's sequence number a routed write was counted under (see `submit`).
    write_sequence: Option<u64>,
    /// Extents a routed write counted in the activity log (see `submit`).
    active_extents: Vec<u64>,
    /// `ops[..used]` belong to this request; the rest keep their capacity for reuse.
    ops: Vec<SubOp>,
    used: usize,
}

impl Request {
    /// Takes the next sub-op, reset but keeping its vectors' capacity.
    fn next_op(&mut self, kind: SubKind) -> usize {
        if self.used == self.ops.len() {
            self.ops.push(SubOp::default());
        }
        let op = &mut self.ops[self.used];
        op.kind = kind;
        op.offset = 0;
        op.remaining = 0;
        op.iov_start = 0;
        op.rw_flags = 0;
        op.fallocate_mode = 0;
        op.data_start = 0;
        op.remote = None;
        op.tried.clear();
        self.used += 1;
        self.used - 1
    }

    fn fail(&mut self, error: IoError) {
        self.error.get_or_insert(error);
    }
}

/// Appends to `out` the iovecs covering bytes `start..start + len` of the segments.
fn take_range(segments: &[Segment], mut start: u64, mut len: u64, out: &mut Vec<libc::iovec>) {
    for segment in segments {
        if len == 0 {
            return;
        }
        let seg_len = segment.len as u64;
        if start >= seg_len {
            start -= seg_len;
            continue;
        }
        let n = (seg_len - start).min(len);
        out.push(libc::iovec {
            iov_base: segment.addr.wrapping_add(start as usize).cast(),
            iov_len: n as usize,
        });
        start = 0;
        len -= n;
    }
}

/// Walks the caller's segments, handing out consecutive byte ranges as iovecs.
struct SegmentCursor<'a> {
    segments: &'a [Segment],
    index: usize,
    offset: usize,
}

impl SegmentCursor<'_> {
    fn take(&mut self, mut len: u64, out: &mut Vec<libc::iovec>) {
        while len > 0 {
            let Some(segment) = self.segments.get(self.index) else {
                return;
            };
            let available = segment.len - self.offset;
            if available == 0 {
                self.index += 1;
                self.offset = 0;
                continue;
            }
            let n = available.min(usize::try_from(len).unwrap_or(usize::MAX));
            out.push(libc::iovec {
                iov_base: segment.addr.wrapping_add(self.offset).cast(),
                iov_len: n,
            });
            self.offset += n;
            len -= n as u64;
        }
    }
}

/// Packs (request index, sub-op index) into an SQE's user data.
fn user_data(request: usize, op: usize) -> u64 {
    ((request as u64) << 32) | op as u64
}

/// Per-worker I/O queue: an io_uring with an eventfd registered on it. `Send`, not `Sync`.
///
/// A queue belongs to the thread that first commits, waits or reaps on it (the kernel enforces
/// a single issuer): create it anywhere, then use it from one worker thread only.
pub struct IoQueue {
    ring: IoUring,
    eventfd: EventFd,
    requests: Vec<Request>,
    free_requests: Vec<usize>,
    finished: VecDeque<(u64, Result<(), IoError>)>,
    /// Requests submitted and not yet reaped.
    in_flight: usize,
    /// SQEs queued or in the kernel: what must complete before buffers may be freed.
    sqes_outstanding: usize,
    bounce_pool: Vec<AlignedBuf>,
    /// Bytes that went through bounce buffers: stays 0 while callers' buffers are aligned.
    bounced_bytes: u64,
    cqe_batch: Vec<(u64, i32)>,
    /// The ring defers completion work to this thread's next GETEVENTS (Linux 6.1+), instead of
    /// interrupting it once per completion; see `build_ring`.
    deferred: bool,
    enabled: bool,
    /// Outcomes of sub-ops sent to other nodes; signals `eventfd`.
    inbox: Arc<Inbox>,
    remote_batch: Vec<(u64, Outcome)>,
    /// Sub-ops sent to other nodes and not yet answered.
    remote_outstanding: usize,
    /// Whether requests follow a volume's routing to other nodes (false for a queue serving
    /// replica requests, which act on this node's disks alone).
    routed: bool,
    /// Readable once the queue's owner is told to stop: until then a write waits for the cluster
    /// state to record it in the activity log (see [`IoQueue::wait_for_the_cluster_until`]).
    stop_signal: Option<RawFd>,
}

/// Builds the ring with SINGLE_ISSUER | DEFER_TASKRUN | TASKRUN_FLAG where the kernel has them
/// (Linux 6.1+): completions then wait as task work until the worker collects them in `reap`
/// or `wait`, in one batch, rather than each interrupting the worker — measurably more IOPS at
/// high queue depth. The registered eventfd still fires when such work is pending, and
/// TASKRUN_FLAG tells userspace whether collecting needs a syscall at all. The ring starts
/// disabled, so that its single issuer is the thread that first uses it, not its creator.
/// Older kernels get a plain ring.
fn build_ring(entries: u32, allow_deferred: bool) -> io::Result<(IoUring, bool)> {
    if allow_deferred {
        let ring = IoUring::builder()
            .setup_cqsize(entries * 4)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .setup_r_disabled()
            .build(entries);
        match ring {
            Ok(ring) => return Ok((ring, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    let ring = IoUring::builder()
        .setup_cqsize(entries * 4)
        .build(entries)?;
    Ok((ring, false))
}

impl std::fmt::Debug for IoQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoQueue")
            .field("ring_fd", &self.ring.as_raw_fd())
            .field("eventfd", &self.eventfd.as_raw_fd())
            .field("in_flight", &self.in_flight)
            .field("sqes_outstanding", &self.sqes_outstanding)
            .finish_non_exhaustive()
    }
}

// SAFETY: the raw pointers an IoQueue holds (iovecs into caller segments and its own bounce
// buffers) are plain addresses whose validity the submit contract guarantees independently of
// the thread; the ring and eventfd are fds. IoQueue is deliberately not Sync: it is one
// worker's.
unsafe impl Send for IoQueue {}

impl IoQueue {
    /// A queue for up to about `depth` requests in flight (more are accepted; the kernel then
    /// queues them).
    pub fn new(depth: u32) -> io::Result<Self> {
        Self::build(depth, true)
    }

    /// A queue that serves other nodes' requests for this node's replicas: it ignores a
    /// volume's routing and acts on this node's disks alone.
    pub fn for_replica_service(depth: u32) -> io::Result<Self> {
        let mut queue = Self::build(depth, true)?;
        queue.routed = false;
        Ok(queue)
    }

    /// `allow_deferred: false` builds the ring a pre-6.1 kernel would get.
    fn build(depth: u32, allow_deferred: bool) -> io::Result<Self> {
        let entries = depth.clamp(1, 4096).next_power_of_two();
        let (ring, deferred) = build_ring(entries, allow_deferred)?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::Read::CODE, "READ"),
            (opcode::Write::CODE, "WRITE"),
            (opcode::Readv::CODE, "READV"),
            (opcode::Writev::CODE, "WRITEV"),
            (opcode::Fsync::CODE, "FSYNC"),
            (opcode::Fallocate::CODE, "FALLOCATE"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "the kernel's io_uring lacks IORING_OP_{name}; Linux 5.6 or newer is needed"
                    ),
                ));
            }
        }
        let eventfd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        let inbox = Arc::new(Inbox::new(eventfd.try_clone()?));
        Ok(Self {
            ring,
            eventfd,
            requests: Vec::new(),
            free_requests: Vec::new(),
            finished: VecDeque::new(),
            in_flight: 0,
            sqes_outstanding: 0,
            bounce_pool: Vec::new(),
            bounced_bytes: 0,
            cqe_batch: Vec::with_capacity(entries as usize),
            deferred,
            enabled: !deferred,
            inbox,
            remote_batch: Vec::new(),
            remote_outstanding: 0,
            routed: true,
            stop_signal: None,
        })
    }

    /// A deferred-taskrun ring starts disabled; enabling it from the thread that first uses
    /// the queue makes that thread its single issuer, so a queue may be created on one thread
    /// and handed to a worker.
    fn enable(&mut self) -> io::Result<()> {
        if !self.enabled {
            self.ring.submitter().register_enable_rings()?;
            self.enabled = true;
        }
        Ok(())
    }

    /// A routed write whose extents the cluster state cannot record in the activity log right now
    /// (no quorum) waits in [`IoQueue::submit`] until it can — the volume pauses rather than fail
    /// the write — or until `stop` (an fd the owner keeps open, e.g. its stop eventfd) becomes
    /// readable; then it fails. Without this a write fails at once.
    pub fn wait_for_the_cluster_until(&mut self, stop: RawFd) {
        self.stop_signal = Some(stop);
    }

    /// Readable when completions wait; [`IoQueue::reap`] clears it.
    pub fn completion_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Requests submitted and not yet reported by `reap`.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Bytes this queue copied through bounce buffers because the caller's segments were not
    /// aligned for O_DIRECT (or too many for one readv/writev). 0 means every byte went
    /// zero-copy.
    pub fn bounced_bytes(&self) -> u64 {
        self.bounced_bytes
    }

    /// Queues a request. Never blocks on I/O except the rare synchronous slot-table updates (the
    /// first write to an extent, freeing whole extents). A request that completes without I/O
    /// (a read of unallocated extents, an immediate error) is reported by the next `reap`, and
    /// the eventfd is signalled so the worker wakes.
    ///
    /// # Safety
    /// Every segment must stay valid (readable for writes, writable for reads) and untouched by
    /// the caller until `tag` has been reaped.
    pub unsafe fn submit(&mut self, volume: &Arc<LocalVolume>, request: IoRequest<'_>, tag: u64) {
        self.in_flight += 1;
        let index = self.free_requests.pop().unwrap_or_else(|| {
            self.requests.push(Request::default());
            self.requests.len() - 1
        });
        let req = &mut self.requests[index];
        req.tag = tag;
        req.volume = Some(volume.clone());
        // Held while planning, so that no sub-op failing at once can finish the request midway.
        req.pending = 1;
        let mut routing = if self.routed { volume.routing() } else { None };
        let mut recorded = Ok(());
        if routing.is_some() && request.writes() {
            // In the activity log before anything goes out (see `crate::activity`).
            let extents = request.extents(volume.extent_size());
            // While the cluster state cannot record it, the write waits as long as the worker is not stopping.
            let stop = self.stop_signal;
            let keep_trying = || stop.is_some_and(|fd| !is_readable(fd));
            recorded = volume.activity().enter(&extents, &keep_trying);
            if recorded.is_ok() {
                self.requests[index].active_extents = extents;
            }
            // Counted before the routing is read: a rebuild that armed an extent since sees this
            // write under the routing it installed first (see `crate::rebuild`).
            self.requests[index].write_sequence = Some(volume.rebuild().write_started());
            routing = volume.routing();
        }
        let planned = match (request, routing, recorded) {
            (_, _, Err(reason)) => Err(IoError::Io(io::Error::other(format!(
                "cannot record the write in the activity log: {reason}"
            )))),
            (request, None, _) => self.plan_local(index, volume, request),
            (request, Some(routing), _) => self.plan_routed(index, volume, &routing, request),
        };
        let req = &mut self.requests[index];
        if let Err(error) = planned {
            req.fail(error);
        }
        req.pending -= 1;
        if req.pending == 0 {
            self.finish_request(index);
            // The worker learns of completions through the eventfd only; this one had no CQE.
            let _ = self.eventfd.write(1);
        }
    }

    /// Plans a request on this node's disks alone.
    fn plan_local(
        &mut self,
        index: usize,
        volume: &LocalVolume,
        request: IoRequest<'_>,
    ) -> Result<(), IoError> {
        match request {
            IoRequest::Read { offset, segments } => {
                self.plan_rw(index, volume, offset, segments, None)
            }
            IoRequest::Write {
                offset,
                segments,
                write_through,
            } => self.plan_rw(
                index,
                volume,
                offset,
                segments,
                Some(if write_through { libc::RWF_DSYNC } else { 0 }),
            ),
            IoRequest::Flush => self.plan_flush(index, volume),
            IoRequest::Discard { offset, len } => self.plan_zero(index, volume, offset, len, true),
            IoRequest::WriteZeroes {
                offset,
                len,
                may_unmap,
            } => self.plan_zero(index, volume, offset, len, may_unmap),
        }
    }

    /// Plans a request on the replicas `routing` names: writes, discards and write-zeroes go to
    /// every replica of each extent, reads to this node's replica if it has one, else to the
    /// replica with the fewest requests outstanding; a flush to this node's disks and to every
    /// other node holding replicas.
    fn plan_routed(
        &mut self,
        index: usize,
        volume: &LocalVolume,
        routing: &Routing,
        request: IoRequest<'_>,
    ) -> Result<(), IoError> {
        match request {
            IoRequest::Read { offset, segments } => {
                self.plan_routed_rw(index, volume, routing, offset, segments, None)
            }
            IoRequest::Write {
                offset,
                segments,
                write_through,
            } => self.plan_routed_rw(
                index,
                volume,
                routing,
                offset,
                segments,
                Some(write_through),
            ),
            IoRequest::Flush => {
                self.plan_flush(index, volume)?;
                let mut flushed: Vec<NodeId> = Vec::new();
                for run in routing.routes.runs() {
                    for node in run.members() {
                        if node == routing.me || flushed.contains(&node) {
                            continue;
                        }
                        flushed.push(node);
                        let op = self.requests[index].next_op(SubKind::Remote);
                        self.requests[index].ops[op].remote = Some(RemoteOp {
                            node,
                            opcode: Opcode::Flush,
                            extent: run.first,
                            within: 0,
                            length: 0,
                            epoch: run.epoch,
                            durable: false,
                        });
                        self.send_remote(index, op, volume, routing)?;
                    }
                }
                Ok(())
            }
            IoRequest::Discard { offset, len } => {
                self.plan_routed_zero(index, volume, routing, offset, len, true)
            }
            IoRequest::WriteZeroes {
                offset,
                len,
                may_unmap,
            } => self.plan_routed_zero(index, volume, routing, offset, len, may_unmap),
        }
    }

    fn plan_routed_rw(
        &mut self,
        index: usize,
        volume: &LocalVolume,
        routing: &Routing,
        offset: u64,
        segments: &[Segment],
        write_through: Option<bool>,
    ) -> Result<(), IoError> {
        let len = segments_len(volume, offset, segments)?;
        check_range(volume, offset, len)?;
        let extent_size = volume.extent_size();
        let write = write_through.is_some();
        let sequence = self.requests[index].write_sequence.unwrap_or(0);
        // Phase 1: every sub-op, local leases included, so that a full local pool or an extent
        // without replicas fails the request before any of it is sent.
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let extent = pos / extent_size;
            let within = pos % extent_size;
            let piece = (extent_size - within).min(end - pos);
            let run = routing
                .routes
                .lookup(extent)
                .ok_or_else(|| no_replicas(volume, extent))?;
            // Reads come from healthy replicas only; writes go to replicas being built as well.
            let local = if write {
                volume.rebuild().note_write(
                    extent,
                    within,
                    piece,
                    u64::from(volume.block_size()),
                    sequence,
                );
                mark_out(routing, run, extent, within, piece, extent_size);
                run.members().any(|node| node == routing.me)
            } else {
                run.nodes.contains(&routing.me)
            };
            let data_start = pos - offset;
            if local {
                let lease = if write {
                    Some(volume.lookup_or_allocate(extent)?)
                } else {
                    volume.lookup(extent)
                };
                let req = &mut self.requests[index];
                let op = req.next_op(if write { SubKind::Write } else { SubKind::Read });
                let op = &mut req.ops[op];
                op.rw_flags = if write_through == Some(true) {
                    libc::RWF_DSYNC
                } else {
                    0
                };
                op.offset = lease.as_ref().map_or(0, |lease| lease.disk_offset(within));
                op.remaining = piece;
                op.lease = lease;
                op.data_start = data_start;
            }
            let targets: Vec<NodeId> = if write {
                run.members().filter(|&node| node != routing.me).collect()
            } else if local {
                Vec::new()
            } else {
                // The least busy replica that is not known to be down.
                let least = run
                    .nodes
                    .iter()
                    .filter_map(|&node| Some((routing.peers.load(node)?, node)))
                    .min();
                let first = run
                    .nodes
                    .first()
                    .copied()
                    .ok_or_else(|| no_replicas(volume, extent))?;
                vec![least.map_or(first, |(_, node)| node)]
            };
            for node in targets {
                let mut done = 0;
                while done < piece {
                    let chunk = (piece - done).min(u64::from(MAX_PAYLOAD));
                    let req = &mut self.requests[index];
                    let op = req.next_op(SubKind::Remote);
                    let op = &mut req.ops[op];
                    op.data_start = data_start + done;
                    op.remaining = chunk;
                    op.remote = Some(RemoteOp {
                        node,
                        opcode: if write { Opcode::Write } else { Opcode::Read },
                        extent,
                        within: within + done,
                        length: chunk as u32,
                        epoch: run.epoch,
                        durable: write_through == Some(true),
                    });
                    done += chunk;
                }
            }
            pos += piece;
        }
        // Phase 2: give each sub-op its slice of the segments; send or queue it.
        for op_index in 0..self.requests[index].used {
            let op = &mut self.requests[index].ops[op_index];
            take_range(segments, op.data_start, op.remaining, &mut op.iov);
            if op.kind == SubKind::Remote {
                self.send_remote(index, op_index, volume, routing)?;
            } else {
                self.queue_local_rw(index, op_index)?;
            }
        }
        Ok(())
    }

    fn plan_routed_zero(
        &mut self,
        index: usize,
        volume: &LocalVolume,
        routing: &Routing,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<(), IoError> {
        check_range(volume, offset, len)?;
        let sequence = self.requests[index].write_sequence.unwrap_or(0);
        let extent_size = volume.extent_size();
        // Marked before anything goes out, local fallocates included.
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let within = pos % extent_size;
            let piece = (extent_size - within).min(end - pos);
            volume.rebuild().note_write(
                pos / extent_size,
                within,
                piece,
                u64::from(volume.block_size()),
                sequence,
            );
            if let Some(run) = routing.routes.lookup(pos / extent_size) {
                mark_out(routing, run, pos / extent_size, within, piece, extent_size);
            }
            pos += piece;
        }
        // This node's replicas: its map holds only the extents placed here.
        self.plan_zero(index, volume, offset, len, unmap)?;
        let extent_size = volume.extent_size();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let extent = pos / extent_size;
            let within = pos % extent_size;
            let piece = (extent_size - within).min(end - pos);
            let run = routing
                .routes
                .lookup(extent)
                .ok_or_else(|| no_replicas(volume, extent))?;
            for node in run.members().filter(|&n| n != routing.me) {
                let mut done = 0;
                while done < piece {
                    let chunk = (piece - done).min(REMOTE_ZERO_CHUNK);
                    let op = self.requests[index].next_op(SubKind::Remote);
                    self.requests[index].ops[op].remote = Some(RemoteOp {
                        node,
                        opcode: if unmap {
                            Opcode::Discard
                        } else {
                            Opcode::WriteZeroes
                        },
                        extent,
                        within: within + done,
                        length: chunk as u32,
                        epoch: run.epoch,
                        durable: false,
                    });
                    self.send_remote(index, op, volume, routing)?;
                    done += chunk;
                }
            }
            pos += piece;
        }
        Ok(())
    }

    /// Sends a planned remote sub-op; its outcome arrives through the inbox.
    fn send_remote(
        &mut self,
        index: usize,
        op_index: usize,
        volume: &LocalVolume,
        routing: &Routing,
    ) -> Result<(), IoError> {
        let op = &self.requests[index].ops[op_index];
        let Some(remote) = op.remote else {
            return Ok(());
        };
        let header = Header {
            opcode: remote.opcode,
            kind: Kind::Request {
                flags: if remote.durable { FLAG_DURABLE } else { 0 },
            },
            volume: volume.id().into_bytes(),
            extent: remote.extent,
            epoch: remote.epoch,
            offset: remote.within,
            length: remote.length,
            payload: if remote.opcode == Opcode::Write {
                remote.length
            } else {
                0
            },
            sequence: 0,
        };
        let (payload, read_into) = match remote.opcode {
            Opcode::Write => (&op.iov[..], Vec::new()),
            Opcode::Read => (&[][..], op.iov.clone()),
            _ => (&[][..], Vec::new()),
        };
        let sent = routing.peers.send(
            remote.node,
            header,
            payload,
            &self.inbox,
            user_data(index, op_index),
            read_into,
        );
        self.requests[index].pending += 1;
        self.remote_outstanding += 1;
        if let Err(error) = sent {
            // As if the replica had answered with the failure.
            self.remote_failed(index, op_index, error);
        }
        Ok(())
    }

    /// A remote sub-op failed: a read goes to another replica of the extent, a write waits for
    /// the control plane to settle the fault (when the routing has somewhere to hold it);
    /// otherwise the request fails.
    fn remote_failed(&mut self, index: usize, op_index: usize, error: RemoteError) {
        let volume = self.requests[index].volume.clone();
        let routing = volume.as_ref().and_then(|volume| volume.routing());
        let op = &mut self.requests[index].ops[op_index];
        if let (Some(remote), Some(volume), Some(routing)) = (op.remote, &volume, &routing) {
            if remote.opcode == Opcode::Read {
                op.tried.push(remote.node);
                let next = routing.routes.lookup(remote.extent).and_then(|run| {
                    run.nodes
                        .iter()
                        .find(|node| **node != routing.me && !op.tried.contains(node))
                        .map(|node| (*node, run.epoch))
                });
                if let Some((node, epoch)) = next {
                    tracing::debug!(volume = %volume.id(), %error, to = node, "reading from another replica");
                    op.remote = Some(RemoteOp {
                        node,
                        epoch,
                        ..remote
                    });
                    self.requests[index].pending -= 1;
                    self.remote_outstanding -= 1;
                    let _ = self.send_remote(index, op_index, volume, routing);
                    return;
                }
            } else if let Some(faults) = &routing.faults {
                // The node misses this write, whatever becomes of it.
                if let Some(dirty) = &routing.dirty {
                    dirty.mark(
                        remote.node,
                        remote.extent,
                        remote.within,
                        u64::from(remote.length),
                        volume.extent_size(),
                    );
                }
                // Still outstanding: the settlement arrives through the inbox.
                faults.hold(
                    Fault {
                        extent: remote.extent,
                        node: remote.node,
                        epoch: remote.epoch,
                        error,
                    },
                    &self.inbox,
                    user_data(index, op_index),
                );
                return;
            }
        }
        self.remote_outstanding -= 1;
        let req = &mut self.requests[index];
        let volume = req.volume.as_ref().map(|v| v.id()).unwrap_or_default();
        tracing::debug!(%volume, %error, "replica I/O failed");
        req.fail(IoError::Replica(error));
        req.pending -= 1;
        if req.pending == 0 {
            self.finish_request(index);
        }
    }

    /// Pushes the queued SQEs to the kernel in one syscall.
    pub fn commit(&mut self) -> io::Result<()> {
        self.enable()?;
        // The kernel consumes every SQE it is handed unless it is short of resources; a few
        // rounds cover a CQ overflow, and SQEs still left are retried by the next commit or wait.
        for _ in 0..4 {
            if self.ring.submission().is_empty() {
                return Ok(());
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // CQ overflow (EBUSY) or no memory (EAGAIN): consuming CQEs makes room.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {
                    self.process_completions()
                }
                Err(e) => return Err(e),
            }
        }
        if self.ring.submission().is_empty() {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EAGAIN))
        }
    }

    /// Whether a [`IoQueue::reap`] now would report something: finished requests, or completion work
    /// waiting in the kernel. Reads shared memory only (no syscall), for a worker that polls briefly
    /// before it sleeps.
    pub fn completions_ready(&mut self) -> bool {
        !self.finished.is_empty()
            || self.kernel_holds_completions()
            || !self.ring.completion().is_empty()
    }

    /// Whether the kernel holds completion work back: deferred task work to run, or a CQ overflow.
    fn kernel_holds_completions(&mut self) -> bool {
        let sq = self.ring.submission();
        sq.taskrun() || sq.cq_overflow()
    }

    /// Non-blocking: calls `done(tag, result)` once for every finished request (all its
    /// sub-I/Os done; the first error wins).
    pub fn reap(&mut self, mut done: impl FnMut(u64, Result<(), IoError>)) {
        self.collect_deferred();
        self.process_completions();
        self.process_remote();
        if !self.ring.submission().is_empty() {
            // Re-queued short transfers; a failure here shows up as errors on later completions.
            let _ = self.commit();
        }
        while let Some((tag, result)) = self.finished.pop_front() {
            self.in_flight -= 1;
            done(tag, result);
        }
    }

    /// Clears the eventfd and runs the ring's deferred completion work, if any.
    fn collect_deferred(&mut self) {
        // Cleared before looking at the CQ: a completion that lands after the look signals again.
        let _ = self.eventfd.read();
        let kernel_has_work = self.kernel_holds_completions() || !self.ring.submission().is_empty();
        if self.deferred && kernel_has_work {
            // Runs the deferred completion work (and sends queued SQEs) in one syscall.
            if let Err(e) = self.enable().and_then(|()| self.ring.submit())
                && !matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                )
            {
                tracing::error!(error = %e, "cannot collect I/O completions (queue used from a second thread?)");
            }
        }
    }

    /// Moves the outcomes other nodes sent into their requests.
    fn process_remote(&mut self) {
        let mut batch = std::mem::take(&mut self.remote_batch);
        self.inbox.take(&mut batch);
        for (data, outcome) in batch.drain(..) {
            self.complete_remote(
                (data >> 32) as usize,
                (data & 0xffff_ffff) as usize,
                outcome,
            );
        }
        self.remote_batch = batch;
    }

    fn complete_remote(&mut self, index: usize, op_index: usize, outcome: Outcome) {
        if self
            .requests
            .get(index)
            .and_then(|req| req.ops.get(op_index))
            .is_none()
        {
            tracing::error!(
                user_data = user_data(index, op_index),
                "reply for an unknown request; ignored"
            );
            return;
        }
        let error = match outcome {
            Outcome::Reply(Ok(())) | Outcome::Settled(Settlement::Dropped) => None,
            Outcome::Reply(Err(error)) => return self.remote_failed(index, op_index, error),
            Outcome::Settled(Settlement::Retry { epoch }) => {
                let volume = self.requests[index].volume.clone();
                let routing = volume.as_ref().and_then(|volume| volume.routing());
                let op = &mut self.requests[index].ops[op_index];
                if let (Some(remote), Some(volume), Some(routing)) = (op.remote, volume, routing) {
                    op.remote = Some(RemoteOp { epoch, ..remote });
                    self.requests[index].pending -= 1;
                    self.remote_outstanding -= 1;
                    let _ = self.send_remote(index, op_index, &volume, &routing);
                    return;
                }
                Some(RemoteError::Abandoned {
                    reason: "the volume is no longer routed to its replicas".to_owned(),
                })
            }
            Outcome::Settled(Settlement::Fail(reason)) => Some(RemoteError::Abandoned { reason }),
        };
        self.remote_outstanding -= 1;
        let req = &mut self.requests[index];
        if let Some(error) = error {
            req.fail(IoError::Replica(error));
        }
        req.pending -= 1;
        if req.pending == 0 {
            self.finish_request(index);
        }
    }

    /// Blocks until at least one request has finished (returns at once when none is in flight).
    /// Queued SQEs are handed to the kernel first, in the same syscall as the wait, so a loop
    /// of submit/wait/reap needs no separate `commit`.
    pub fn wait(&mut self) -> io::Result<()> {
        self.enable()?;
        loop {
            self.process_completions();
            self.process_remote();
            if !self.finished.is_empty()
                || self.in_flight == 0
                || (self.sqes_outstanding == 0 && self.remote_outstanding == 0)
            {
                // Nothing to wait for, but what was queued must still go out.
                return self.commit();
            }
            if self.remote_outstanding > 0 {
                // Replies from other nodes wake the eventfd, and so does the ring.
                self.commit()?;
                wait_readable(self.eventfd.as_raw_fd(), -1)?;
                self.collect_deferred();
                continue;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        for _ in 0..3 {
            // SAFETY: the entry points at iovecs and buffers owned by a request's sub-op, which
            // stay alive and in place until its CQE is processed (requests are only recycled
            // after all their SQEs completed, and Drop waits for outstanding SQEs).
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                self.sqes_outstanding += 1;
                return Ok(());
            }
            // SQ full: hand the batch so far to the kernel to make room.
            match self.enable().and_then(|()| self.ring.submit()) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::from_raw_os_error(libc::EAGAIN))
    }

    fn push_op(&mut self, index: usize, op: usize) -> Result<(), IoError> {
        let entry = self.requests[index].ops[op]
            .entry(user_data(index, op))
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?;
        self.push(&entry)?;
        self.requests[index].pending += 1;
        Ok(())
    }

    fn plan_rw(
        &mut self,
        index: usize,
        volume: &LocalVolume,
        offset: u64,
        segments: &[Segment],
        write: Option<i32>,
    ) -> Result<(), IoError> {
        let len = segments_len(volume, offset, segments)?;
        check_range(volume, offset, len)?;
        let extent_size = volume.extent_size();
        // Phase 1: one sub-op per extent, with its lease; a write allocates here, so a full
        // pool fails the request before any I/O of it is queued.
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let extent = pos / extent_size;
            let within = pos % extent_size;
            let piece = (extent_size - within).min(end - pos);
            let lease = match write {
                Some(_) => Some(volume.lookup_or_allocate(extent)?),
                None => volume.lookup(extent),
            };
            let req = &mut self.requests[index];
            let op = req.next_op(if write.is_some() {
                SubKind::Write
            } else {
                SubKind::Read
            });
            let op = &mut req.ops[op];
            op.rw_flags = write.unwrap_or(0);
            op.offset = lease.as_ref().map_or(0, |lease| lease.disk_offset(within));
            op.remaining = piece;
            op.lease = lease;
            pos += piece;
        }
        // Phase 2: give each sub-op its slice of the segments and queue it.
        let mut cursor = SegmentCursor {
            segments,
            index: 0,
            offset: 0,
        };
        for op_index in 0..self.requests[index].used {
            let op = &mut self.requests[index].ops[op_index];
            cursor.take(op.remaining, &mut op.iov);
            self.queue_local_rw(index, op_index)?;
        }
        Ok(())
    }

    /// Queues a local read or write whose iovecs are set: straight from the caller's segments
    /// when they suit O_DIRECT, else through a bounce buffer; a read of an unallocated extent
    /// fills them with zeroes at once.
    fn queue_local_rw(&mut self, index: usize, op_index: usize) -> Result<(), IoError> {
        let Self {
            requests,
            bounce_pool,
            bounced_bytes,
            ..
        } = self;
        let op = &mut requests[index].ops[op_index];
        let Some(dio) = op.lease.as_ref().map(|lease| lease.disk.dio) else {
            // Unallocated: zeroes, no I/O.
            for iov in op.iov.drain(..) {
                // SAFETY: the caller guarantees the segments are writable for a read.
                unsafe { std::ptr::write_bytes(iov.iov_base.cast::<u8>(), 0, iov.iov_len) };
            }
            return Ok(());
        };
        let direct = op.iov.len() <= IOV_MAX
            && op.iov.iter().all(|v| {
                (v.iov_base as usize).is_multiple_of(dio.memory as usize)
                    && v.iov_len.is_multiple_of(dio.offset as usize)
            });
        if !direct {
            use_bounce(op, bounce_pool)?;
            *bounced_bytes += op.remaining;
        }
        self.push_op(index, op_index)
    }

    fn plan_flush(&mut self, index: usize, volume: &LocalVolume) -> Result<(), IoError> {
        for disk in volume.data_disks() {
            let req = &mut self.requests[index];
            let op = req.next_op(SubKind::Sync);
            req.ops[op].disk = Some(disk);
            self.push_op(index, op)?;
        }
        Ok(())
    }

    fn plan_zero(
        &mut self,
        index: usize,
        volume: &LocalVolume,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<(), IoError> {
        check_range(volume, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let extent_size = volume.extent_size();
        let size = volume.size();
        let end = offset + len;
        // Extents covered whole; the last extent counts as whole when the range reaches the end
        // of the volume, since its bytes past the end are never addressable.
        let first_whole = offset.div_ceil(extent_size);
        let end_whole = if end >= size {
            extent_count(size, extent_size)
        } else {
            end / extent_size
        };
        let whole = first_whole..end_whole.max(first_whole);
        if unmap && !whole.is_empty() {
            volume.release_extents(whole.clone())?;
        }
        let mut pos = offset;
        while pos < end {
            let extent = pos / extent_size;
            let within = pos % extent_size;
            let piece = (extent_size - within).min(end - pos);
            pos += piece;
            if unmap && whole.contains(&extent) {
                continue;
            }
            let Some(lease) = volume.lookup(extent) else {
                continue;
            };
            let req = &mut self.requests[index];
            let op = req.next_op(SubKind::Fallocate);
            let sub = &mut req.ops[op];
            sub.fallocate_mode = if unmap {
                lease.disk.punch_mode()
            } else {
                ZERO_MODE
            };
            sub.offset = lease.disk_offset(within);
            sub.remaining = piece;
            sub.lease = Some(lease);
            self.push_op(index, op)?;
        }
        Ok(())
    }

    /// Moves every available CQE into its request; finished requests go to `finished`.
    fn process_completions(&mut self) {
        loop {
            let mut batch = std::mem::take(&mut self.cqe_batch);
            batch.clear();
            batch.extend(
                self.ring
                    .completion()
                    .map(|cqe| (cqe.user_data(), cqe.result())),
            );
            if batch.is_empty() {
                self.cqe_batch = batch;
                return;
            }
            for &(data, result) in &batch {
                self.complete((data >> 32) as usize, (data & 0xffff_ffff) as usize, result);
            }
            self.cqe_batch = batch;
        }
    }

    fn complete(&mut self, index: usize, op_index: usize, result: i32) {
        self.sqes_outstanding -= 1;
        let Some(op) = self
            .requests
            .get_mut(index)
            .and_then(|req| req.ops.get_mut(op_index))
        else {
            tracing::error!(
                user_data = user_data(index, op_index),
                "completion for an unknown request; ignored"
            );
            return;
        };
        // Ok(true): the op must go to the kernel again (rest of a short transfer, or a retry).
        let outcome: Result<bool, io::Error> = if result == -libc::EOPNOTSUPP
            && op.kind == SubKind::Fallocate
            && op.fallocate_mode == PUNCH_MODE
        {
            if let Some(disk) = op.target_disk() {
                disk.note_punch_unsupported();
            }
            op.fallocate_mode = ZERO_MODE;
            Ok(true)
        } else if result < 0 {
            Err(io::Error::from_raw_os_error(-result))
        } else {
            match op.kind {
                SubKind::Read | SubKind::Write if result == 0 && op.remaining > 0 => Err(
                    io::Error::new(io::ErrorKind::UnexpectedEof, "transfer stopped short"),
                ),
                SubKind::Read | SubKind::Write => {
                    op.advance((result as u64).min(op.remaining));
                    if op.remaining == 0 && op.kind == SubKind::Read {
                        copy_out(op);
                    }
                    Ok(op.remaining > 0)
                }
                SubKind::Fallocate | SubKind::Sync | SubKind::Remote => Ok(false),
            }
        };
        let outcome = match outcome {
            Ok(true) => {
                match self.requests[index].ops[op_index].entry(user_data(index, op_index)) {
                    // Re-queue the rest; pending stays, as the op is still outstanding.
                    Some(entry) => match self.push(&entry) {
                        Ok(()) => return,
                        Err(e) => Err(e),
                    },
                    None => Err(io::Error::from_raw_os_error(libc::EBADF)),
                }
            }
            other => other,
        };
        let req = &mut self.requests[index];
        if let Err(error) = outcome {
            let op = &req.ops[op_index];
            let disk = op
                .target_disk()
                .map(|d| d.path.display().to_string())
                .unwrap_or_default();
            let volume = req.volume.as_ref().map(|v| v.id()).unwrap_or_default();
            tracing::warn!(volume = %volume, disk = %disk, op = ?op.kind, offset = op.offset, error = %error, "I/O failed");
            req.fail(IoError::Io(error));
        }
        req.pending -= 1;
        if req.pending == 0 {
            self.finish_request(index);
        }
    }

    fn finish_request(&mut self, index: usize) {
        let Self {
            requests,
            bounce_pool,
            finished,
            free_requests,
            ..
        } = self;
        let req = &mut requests[index];
        for op in &mut req.ops[..req.used] {
            // Leases go before the volume: the volume's liveness is what delete_volume checks.
            op.lease = None;
            op.disk = None;
            op.remote = None;
            op.iov.clear();
            op.guest.clear();
            if let Some(buf) = op.bounce.take()
                && bounce_pool.len() < BOUNCE_POOL_BUFFERS
                && buf.len() <= BOUNCE_POOL_MAX_LEN
            {
                bounce_pool.push(buf);
            }
        }
        req.used = 0;
        req.pending = 0;
        if let (Some(sequence), Some(volume)) = (req.write_sequence.take(), &req.volume) {
            volume.rebuild().write_finished(sequence);
        }
        if let Some(volume) = &req.volume
            && !req.active_extents.is_empty()
        {
            volume.activity().leave(&req.active_extents);
            req.active_extents.clear();
        }
        req.volume = None;
        finished.push_back((req.tag, req.error.take().map_or(Ok(()), Err)));
        free_requests.push(index);
    }
}

impl Drop for IoQueue {
    fn drop(&mut self) {
        // Other nodes' reader threads may still write into read buffers: wait for their
        // outcomes (a connection fails its requests within REQUEST_TIMEOUT).
        let deadline = std::time::Instant::now() + crate::remote::REQUEST_TIMEOUT * 3;
        while self.remote_outstanding > 0 {
            if std::time::Instant::now() > deadline {
                tracing::error!(
                    outstanding = self.remote_outstanding,
                    "replica requests unanswered at queue drop; leaking their buffers"
                );
                std::mem::forget(std::mem::take(&mut self.requests));
                return;
            }
            let _ = wait_readable(self.eventfd.as_raw_fd(), 1000);
            self.collect_deferred();
            self.process_completions();
            self.process_remote();
        }
        // The kernel may still read or write buffers of outstanding SQEs: wait for them.
        while self.sqes_outstanding > 0 {
            match self.enable().and_then(|()| self.ring.submit_and_wait(1)) {
                Ok(_) => {}
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => {
                    tracing::error!(error = %e, outstanding = self.sqes_outstanding, "cannot wait for I/O at queue drop; leaking its buffers");
                    std::mem::forget(std::mem::take(&mut self.requests));
                    return;
                }
            }
            self.process_completions();
        }
    }
}

/// Records a write to bytes `within..within + len` of `extent` for the nodes out of its run.
fn mark_out(
    routing: &Routing,
    run: &crate::remote::RouteRun,
    extent: u64,
    within: u64,
    len: u64,
    extent_size: u64,
) {
    if let Some(dirty) = &routing.dirty {
        for &node in &run.out {
            dirty.mark(node, extent, within, len, extent_size);
        }
    }
}

/// Total bytes of a request's segments.
fn segments_len(volume: &LocalVolume, offset: u64, segments: &[Segment]) -> Result<u64, IoError> {
    segments
        .iter()
        .try_fold(0u64, |total, s| total.checked_add(s.len as u64))
        .ok_or(IoError::OutOfRange {
            volume: volume.id(),
            offset,
            len: u64::MAX,
            size: volume.size(),
        })
}

fn no_replicas(volume: &LocalVolume, extent: u64) -> IoError {
    IoError::Io(io::Error::other(format!(
        "volume {}: extent {extent} has no replica set in the routing",
        volume.id()
    )))
}

/// Whether `fd` is readable right now (an error counts as readable: the caller stops waiting).
fn is_readable(fd: RawFd) -> bool {
    poll_readable(fd, 0).unwrap_or(true)
}

/// Blocks until `fd` is readable or `timeout_ms` passed (-1: no limit).
fn wait_readable(fd: RawFd, timeout_ms: i32) -> io::Result<()> {
    poll_readable(fd, timeout_ms).map(drop)
}

/// Waits up to `timeout_ms` (-1: no limit) for `fd` to become readable; whether it is (false on a
/// timeout or an interrupted wait).
fn poll_readable(fd: RawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    if n < 0 {
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
    Ok(n > 0)
}

fn check_range(volume: &LocalVolume, offset: u64, len: u64) -> Result<(), IoError> {
    let size = volume.size();
    let block = u64::from(volume.block_size());
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(IoError::OutOfRange {
            volume: volume.id(),
            offset,
            len,
            size,
        });
    }
    if !offset.is_multiple_of(block) || !len.is_multiple_of(block) {
        return Err(IoError::Misaligned {
            volume: volume.id(),
            offset,
            len,
            block_size: volume.block_size(),
        });
    }
    Ok(())
}

/// Puts an aligned buffer between the kernel and the caller's segments (copied in for a write).
fn use_bounce(op: &mut SubOp, pool: &mut Vec<AlignedBuf>) -> Result<(), IoError> {
    let len =
        usize::try_from(op.remaining).map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
    let mut buf = match pool.iter().position(|b| b.len() >= len) {
        Some(pos) => pool.swap_remove(pos),
        None => AlignedBuf::zeroed(len)?,
    };
    std::mem::swap(&mut op.iov, &mut op.guest);
    if op.kind == SubKind::Write {
        let mut at = 0;
        for iov in &op.guest {
            // SAFETY: the caller guarantees the segments are readable for a write and left
            // alone while the request runs; the bounce buffer is our own allocation.
            let guest =
                unsafe { std::slice::from_raw_parts(iov.iov_base.cast::<u8>(), iov.iov_len) };
            buf.as_mut_slice()[at..at + iov.iov_len].copy_from_slice(guest);
            at += iov.iov_len;
        }
    }
    op.iov.push(libc::iovec {
        iov_base: buf.as_ptr().cast(),
        iov_len: len,
    });
    op.bounce = Some(buf);
    Ok(())
}

/// After a bounced read: copies the data to the caller's segments.
fn copy_out(op: &SubOp) {
    let Some(buf) = &op.bounce else { return };
    let mut at = 0;
    for iov in &op.guest {
        // SAFETY: the caller guarantees the segments are writable for a read and left alone
        // while the request runs; they do not overlap the bounce buffer, our own allocation.
        let guest =
            unsafe { std::slice::from_raw_parts_mut(iov.iov_base.cast::<u8>(), iov.iov_len) };
        guest.copy_from_slice(&buf.as_slice()[at..at + iov.iov_len]);
        at += iov.iov_len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(iov: &libc::iovec) -> usize {
        iov.iov_base as usize
    }

    #[test]
    fn cursor_hands_out_consecutive_ranges_across_segments() {
        let mut a = [0u8; 100];
        let mut b = [0u8; 50];
        let (pa, pb) = (a.as_mut_ptr(), b.as_mut_ptr());
        let segments = [
            Segment { addr: pa, len: 100 },
            Segment { addr: pb, len: 0 },
            Segment { addr: pb, len: 50 },
        ];
        let mut cursor = SegmentCursor {
            segments: &segments,
            index: 0,
            offset: 0,
        };
        let mut out = Vec::new();
        cursor.take(30, &mut out);
        assert_eq!(
            out.iter().map(|v| (addr(v), v.iov_len)).collect::<Vec<_>>(),
            vec![(pa as usize, 30)]
        );
        out.clear();
        cursor.take(100, &mut out);
        assert_eq!(
            out.iter().map(|v| (addr(v), v.iov_len)).collect::<Vec<_>>(),
            vec![(pa as usize + 30, 70), (pb as usize, 30)]
        );
        out.clear();
        // Asking past the end yields what is left, never more.
        cursor.take(100, &mut out);
        assert_eq!(
            out.iter().map(|v| (addr(v), v.iov_len)).collect::<Vec<_>>(),
            vec![(pb as usize + 30, 20)]
        );
    }

    #[test]
    fn short_transfers_resume_where_they_stopped() {
        let mut buf = [0u8; 350];
        let base = buf.as_mut_ptr();
        let mut op = SubOp {
            kind: SubKind::Read,
            offset: 1000,
            remaining: 350,
            iov: vec![
                libc::iovec {
                    iov_base: base.cast(),
                    iov_len: 100,
                },
                libc::iovec {
                    iov_base: base.wrapping_add(100).cast(),
                    iov_len: 200,
                },
                libc::iovec {
                    iov_base: base.wrapping_add(300).cast(),
                    iov_len: 50,
                },
            ],
            ..SubOp::default()
        };
        op.advance(150);
        assert_eq!((op.offset, op.remaining, op.iov_start), (1150, 200, 1));
        assert_eq!(
            (addr(&op.iov[1]), op.iov[1].iov_len),
            (base as usize + 150, 150)
        );
        op.advance(150);
        assert_eq!((op.offset, op.remaining, op.iov_start), (1300, 50, 2));
        assert_eq!(
            (addr(&op.iov[2]), op.iov[2].iov_len),
            (base as usize + 300, 50)
        );
        op.advance(50);
        assert_eq!((op.remaining, op.iov_start), (0, 3));
    }

    /// The plain ring older kernels get (no deferred task work) serves the same requests and
    /// signals its eventfd by itself.
    #[test]
    fn plain_ring_without_deferred_taskrun_works() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Arc::new(crate::LocalPool::new(1 << 20));
        pool.add_disk(&dir.path().join("d0"), Some(8 << 20))
            .unwrap();
        let layout = crate::VolumeLayout {
            id: uuid::Uuid::new_v4(),
            size: 4 << 20,
            block_size: 512,
            extent_size: 1 << 20,
        };
        let volume = pool.open_volume(layout).unwrap();
        let mut queue = IoQueue::build(8, false).unwrap();
        assert!(!queue.deferred);
        let mut data = crate::aligned::AlignedBuf::zeroed(8192).unwrap();
        data.as_mut_slice().fill(0x3c);
        let back = crate::aligned::AlignedBuf::zeroed(8192 + 512).unwrap();
        let requests = [
            (
                Segment {
                    addr: data.as_ptr(),
                    len: 8192,
                },
                true,
            ),
            // Misaligned by 512 bytes past a page: still fine for 512-byte O_DIRECT alignment
            // or bounced, either way the bytes must match.
            (
                Segment {
                    addr: back.as_ptr().wrapping_add(512),
                    len: 8192,
                },
                false,
            ),
        ];
        for (tag, (segment, write)) in requests.into_iter().enumerate() {
            let segments = [segment];
            let offset = (1 << 20) - 4096; // spans two extents
            let request = if write {
                IoRequest::Write {
                    offset,
                    segments: &segments,
                    write_through: true,
                }
            } else {
                IoRequest::Read {
                    offset,
                    segments: &segments,
                }
            };
            // SAFETY: both buffers outlive the request, which is reaped in this iteration.
            unsafe { queue.submit(&volume, request, tag as u64) };
            queue.commit().unwrap();
            let mut pfd = libc::pollfd {
                fd: queue.completion_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1);
            let mut done = Vec::new();
            while done.is_empty() {
                queue.reap(|tag, result| done.push((tag, result.is_ok())));
            }
            assert_eq!(done, vec![(tag as u64, true)]);
        }
        assert!(back.as_slice()[512..].iter().all(|&b| b == 0x3c));
    }

    #[test]
    fn user_data_packs_request_and_op() {
        let data = user_data(123_456, 789);
        assert_eq!(
            ((data >> 32) as usize, (data & 0xffff_ffff) as usize),
            (123_456, 789)
        );
    }
}
