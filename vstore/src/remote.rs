//! The sending side of the data path: a volume served on this node sends each extent's I/O to
//! the extent's replicas on other nodes, in [`vessel_proto::frame`] frames over TCP.
//!
//! - [`Routes`] say where each extent lives (its replica set and epoch, from the Raft state);
//!   [`Routing`] pairs them with this node's id and the [`Peers`], and the control plane installs it on
//!   a [`crate::LocalVolume`] with `set_routing` (and replaces it whenever a replica set changes).
//! - [`Peers`] keeps one connection per peer node, shared by every queue of every volume, opened
//!   on first use and re-opened after a failure (at most every [`RECONNECT_BACKOFF`]).
//! - A connection is pipelined: any worker thread sends a request (header and the guest's buffers,
//!   in one `writev`, no copy) under the connection's send lock, and the connection's reader
//!   thread matches replies by sequence number, reads a read's data straight into the guest's
//!   buffers, checks the CRC, and hands the outcome to the sending queue's `Inbox`, which wakes
//!   the queue's worker through the same eventfd its io_uring completions use.
//!
//! Failure: a connection that breaks, sends anything malformed, or leaves a request unanswered for
//! [`REQUEST_TIMEOUT`] is closed, and every request waiting on it fails with
//! [`RemoteError::Unreachable`]. Each request is completed exactly once: only the reader thread
//! completes requests, and a request registered on a closed connection is refused at once.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use vessel_proto::frame::{self, HEADER_LEN, Header, Kind, Opcode, Status};
use vmm_sys_util::eventfd::EventFd;

/// A node of the cluster, as the control plane numbers them.
pub type NodeId = u64;

/// How long a request to a replica may stay unanswered before its connection is declared dead.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long opening a connection to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// After a failed connection, requests to that peer fail at once for this long before the next
/// attempt, so a dead peer costs each worker one connect timeout, not one per request.
pub const RECONNECT_BACKOFF: Duration = Duration::from_millis(500);
/// How long a ping may take to be answered.
const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the reader thread looks for overdue requests while the socket is quiet.
const READ_POLL: Duration = Duration::from_millis(250);

/// One run of consecutive extents sharing a replica set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRun {
    pub first: u64,
    pub count: u64,
    /// The replica set's epoch: sent with every request, so replicas can fence stale senders.
    pub epoch: u64,
    /// The healthy replicas: written to and read from.
    pub nodes: Vec<NodeId>,
    /// Replicas being rebuilt: written to, never read from.
    pub targets: Vec<NodeId>,
    /// Nodes fenced off from this run that may come back: writes to the run are recorded in
    /// their [`DirtyMaps`], so that they catch up by copying only what changed.
    pub out: Vec<NodeId>,
}

impl RouteRun {
    /// Every node that takes the run's writes.
    pub fn members(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes.iter().chain(&self.targets).copied()
    }
}

/// Where a volume's extents live: runs sorted by first extent, not overlapping.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    runs: Vec<RouteRun>,
}

impl Routes {
    pub fn new(mut runs: Vec<RouteRun>) -> Self {
        runs.sort_by_key(|run| run.first);
        Self { runs }
    }

    /// The run holding `extent`.
    pub fn lookup(&self, extent: u64) -> Option<&RouteRun> {
        let after = self.runs.partition_point(|run| run.first <= extent);
        let run = self.runs.get(after.checked_sub(1)?)?;
        (extent - run.first < run.count).then_some(run)
    }

    pub fn runs(&self) -> &[RouteRun] {
        &self.runs
    }
}

/// What a volume served on this node needs to reach its replicas. Immutable: a change of
/// routes installs a new one.
#[derive(Debug)]
pub struct Routing {
    pub me: NodeId,
    pub routes: Routes,
    pub peers: Arc<Peers>,
    /// Where writes whose replica failed wait for the control plane; `None` fails them at once.
    pub faults: Option<Arc<Faults>>,
    /// What replicas that failed or were fenced off miss.
    pub dirty: Option<Arc<DirtyMaps>>,
}

/// Regions a volume's writes changed while a replica node failed or was out of its replica sets:
/// what that node misses, so that when it returns in time it catches up by copying only those.
/// Kept in the memory of the node the volume is attached on; the cluster state keeps a coarser
/// record (whole extents) that outlives a restart there or the volume moving, and seeds this one
/// when the volume is served again. An extent is cut into 64 regions.
#[derive(Debug, Default)]
pub struct DirtyMaps {
    nodes: Mutex<HashMap<NodeId, NodeDirty>>,
}

/// What one node misses.
#[derive(Debug, Clone)]
pub struct NodeDirty {
    /// When its first write failed.
    pub since: Instant,
    /// First extents of the runs it was fenced off from (its replicas of those are stale only
    /// where marked).
    pub runs: std::collections::BTreeSet<u64>,
    /// Changed regions per extent: bit `i` covers the `i`-th 64th of the extent.
    pub extents: HashMap<u64, u64>,
    /// The node's boot id before it failed: if it differs when the node returns, the node may
    /// have lost unflushed writes, and gets a full copy.
    pub boot_id: Option<BootId>,
}

impl NodeDirty {
    fn new() -> Self {
        Self {
            since: Instant::now(),
            runs: std::collections::BTreeSet::new(),
            extents: HashMap::new(),
            boot_id: None,
        }
    }
}

/// The bits of the regions bytes `within..within + len` of an extent touch.
pub fn region_mask(within: u64, len: u64, extent_size: u64) -> u64 {
    if len == 0 || extent_size == 0 {
        return 0;
    }
    let region = (extent_size / 64).max(1);
    let first = (within / region).min(63);
    let last = ((within + len - 1) / region).min(63);
    let width = last - first + 1;
    let bits = if width >= 64 {
        u64::MAX
    } else {
        (1u64 << width) - 1
    };
    bits << first
}

impl DirtyMaps {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Records that `node` misses a write to bytes `within..within + len` of `extent`.
    pub(crate) fn mark(&self, node: NodeId, extent: u64, within: u64, len: u64, extent_size: u64) {
        let mask = region_mask(within, len, extent_size);
        if mask == 0 {
            return;
        }
        let mut nodes = lock(&self.nodes);
        let dirty = nodes.entry(node).or_insert_with(NodeDirty::new);
        *dirty.extents.entry(extent).or_default() |= mask;
    }

    /// Records that `node` misses writes anywhere in `extent`.
    pub fn mark_extent(&self, node: NodeId, extent: u64) {
        let mut nodes = lock(&self.nodes);
        let dirty = nodes.entry(node).or_insert_with(NodeDirty::new);
        dirty.extents.insert(extent, u64::MAX);
    }

    /// Records that `node` (last seen with `boot_id`) is being fenced off from the runs starting
    /// at `runs`, where it held a complete replica.
    pub fn record_drop(
        &self,
        node: NodeId,
        runs: impl IntoIterator<Item = u64>,
        boot_id: Option<BootId>,
    ) {
        let mut nodes = lock(&self.nodes);
        let dirty = nodes.entry(node).or_insert_with(NodeDirty::new);
        dirty.runs.extend(runs);
        if dirty.boot_id.is_none() {
            dirty.boot_id = boot_id;
        }
    }

    /// What `node` misses, if it is tracked.
    pub fn get(&self, node: NodeId) -> Option<NodeDirty> {
        lock(&self.nodes).get(&node).cloned()
    }

    /// The changed regions of `extent` `node` misses.
    pub fn regions(&self, node: NodeId, extent: u64) -> u64 {
        lock(&self.nodes)
            .get(&node)
            .and_then(|dirty| dirty.extents.get(&extent).copied())
            .unwrap_or(0)
    }

    /// The nodes tracked, with their runs.
    pub fn tracked(&self) -> Vec<(NodeId, NodeDirty)> {
        lock(&self.nodes)
            .iter()
            .map(|(node, dirty)| (*node, dirty.clone()))
            .collect()
    }

    /// `node` caught up on the run starting at `first` (or will get a full copy of it).
    pub fn forget_run(&self, node: NodeId, first: u64, count: u64) {
        let mut nodes = lock(&self.nodes);
        if let Some(dirty) = nodes.get_mut(&node) {
            dirty.runs.remove(&first);
            dirty
                .extents
                .retain(|extent, _| !(first..first + count).contains(extent));
            if dirty.runs.is_empty() {
                nodes.remove(&node);
            }
        }
    }

    /// Stops tracking `node`.
    pub fn forget(&self, node: NodeId) {
        lock(&self.nodes).remove(&node);
    }
}

/// A write (or discard, write-zeroes, flush) that a replica failed: the guest's request waits
/// until the control plane settles it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub extent: u64,
    pub node: NodeId,
    /// The replica-set epoch the write was sent at.
    pub epoch: u64,
    pub error: RemoteError,
}

/// How the control plane settled a [`Fault`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// The node is out of the extent's replica set (a newer epoch fences it off): the write
    /// stands on the replicas that remain.
    Dropped,
    /// Send it to the same node again, at `epoch` (the node is back, or still in a newer set).
    Retry { epoch: u64 },
    /// The write cannot complete (this node no longer holds the volume): the request fails.
    Fail(String),
}

/// A held fault and where its settlement goes.
struct HeldFault {
    fault: Fault,
    inbox: Arc<Inbox>,
    user_data: u64,
}

/// The faults of one volume's writes, waiting to be settled. Shared by every routing the volume
/// gets, so a change of routes does not lose them.
pub struct Faults {
    held: Mutex<Vec<HeldFault>>,
    /// Set by `close`: faults arriving later fail at once with this reason.
    closed: Mutex<Option<String>>,
    wake: Box<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults")
            .field("held", &lock(&self.held).len())
            .finish_non_exhaustive()
    }
}

impl Faults {
    /// `wake` is called whenever a fault arrives (from a worker thread: it must not block).
    pub fn new(wake: impl Fn() + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Self {
            held: Mutex::new(Vec::new()),
            closed: Mutex::new(None),
            wake: Box::new(wake),
        })
    }

    pub(crate) fn hold(&self, fault: Fault, inbox: &Arc<Inbox>, user_data: u64) {
        if let Some(reason) = lock(&self.closed).clone() {
            inbox.deliver(user_data, Outcome::Settled(Settlement::Fail(reason)));
            return;
        }
        lock(&self.held).push(HeldFault {
            fault,
            inbox: Arc::clone(inbox),
            user_data,
        });
        (self.wake)();
    }

    /// Fails every fault held now or arriving later with `reason`: the volume stops being served
    /// here, and its workers must be able to finish.
    pub fn close(&self, reason: &str) {
        *lock(&self.closed) = Some(reason.to_owned());
        self.settle(|_| Some(Settlement::Fail(reason.to_owned())));
    }

    /// The faults waiting to be settled.
    pub fn pending(&self) -> Vec<Fault> {
        lock(&self.held)
            .iter()
            .map(|held| held.fault.clone())
            .collect()
    }

    /// Settles each held fault `decide` has an answer for; returns how many.
    pub fn settle(&self, mut decide: impl FnMut(&Fault) -> Option<Settlement>) -> usize {
        let settled: Vec<(HeldFault, Settlement)> = {
            let mut held = lock(&self.held);
            let mut settled = Vec::new();
            let mut kept = Vec::with_capacity(held.len());
            for fault in held.drain(..) {
                match decide(&fault.fault) {
                    Some(settlement) => settled.push((fault, settlement)),
                    None => kept.push(fault),
                }
            }
            *held = kept;
            settled
        };
        let count = settled.len();
        for (held, settlement) in settled {
            held.inbox
                .deliver(held.user_data, Outcome::Settled(settlement));
        }
        count
    }
}

/// What reaches a queue's inbox for one remote sub-op.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The replica's answer (or the connection's failure).
    Reply(Result<(), RemoteError>),
    /// The control plane's settlement of a held fault.
    Settled(Settlement),
}

/// Why a request to a replica failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteError {
    #[error("replica node {node} is unreachable: {reason}")]
    Unreachable { node: NodeId, reason: String },
    #[error("replica node {node} refused the request: {status:?} (its epoch {epoch})")]
    Refused {
        node: NodeId,
        status: Status,
        epoch: u64,
    },
    /// The control plane gave up on a write this node could not complete.
    #[error("{reason}")]
    Abandoned { reason: String },
}

/// Where a queue's remote outcomes go: the sending queue drains it when its eventfd fires.
#[derive(Debug)]
pub(crate) struct Inbox {
    done: Mutex<Vec<(u64, Outcome)>>,
    signal: EventFd,
}

impl Inbox {
    pub(crate) fn new(signal: EventFd) -> Self {
        Self {
            done: Mutex::new(Vec::new()),
            signal,
        }
    }

    fn deliver(&self, user_data: u64, outcome: Outcome) {
        lock(&self.done).push((user_data, outcome));
        let _ = self.signal.write(1);
    }

    /// Moves the outcomes delivered so far into `out`.
    pub(crate) fn take(&self, out: &mut Vec<(u64, Outcome)>) {
        out.append(&mut lock(&self.done));
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A request sent and not yet answered.
struct Waiter {
    inbox: Arc<Inbox>,
    user_data: u64,
    opcode: Opcode,
    /// Where a read's data goes: the caller's buffers, valid until the outcome is delivered.
    read_into: Vec<libc::iovec>,
    sent: Instant,
}

// SAFETY: the iovecs point at buffers the submitter keeps valid and untouched until the outcome
// is delivered (IoQueue's submit contract); only the reader thread writes through them.
unsafe impl Send for Waiter {}

#[derive(Default)]
struct Waiting {
    /// Set once the connection is closed: why. No request is registered after that.
    closed: Option<String>,
    requests: HashMap<u64, Waiter>,
}

/// What a connection's senders and its reader thread share.
struct LinkShared {
    node: NodeId,
    waiting: Mutex<Waiting>,
    outstanding: AtomicUsize,
}

impl LinkShared {
    /// Closes the connection's books: every waiting request fails with `reason`.
    fn close(&self, reason: &str) {
        let orphans: Vec<Waiter> = {
            let mut waiting = lock(&self.waiting);
            waiting.closed.get_or_insert_with(|| reason.to_owned());
            waiting.requests.drain().map(|(_, waiter)| waiter).collect()
        };
        for waiter in orphans {
            self.fail(waiter, reason);
        }
    }

    fn fail(&self, waiter: Waiter, reason: &str) {
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
        waiter.inbox.deliver(
            waiter.user_data,
            Outcome::Reply(Err(RemoteError::Unreachable {
                node: self.node,
                reason: reason.to_owned(),
            })),
        );
    }

    fn is_closed(&self) -> bool {
        lock(&self.waiting).closed.is_some()
    }

    /// The age of the oldest unanswered request.
    fn oldest(&self) -> Option<Duration> {
        lock(&self.waiting)
            .requests
            .values()
            .map(|waiter| waiter.sent.elapsed())
            .max()
    }
}

/// One connection to a peer.
struct Link {
    writer: Mutex<TcpStream>,
    next_sequence: AtomicU64,
    shared: Arc<LinkShared>,
}

impl Drop for Link {
    fn drop(&mut self) {
        // The reader thread sees the end of the stream and fails whatever still waits.
        let _ = lock(&self.writer).shutdown(Shutdown::Both);
    }
}

impl Link {
    /// Connects and pings; returns the link and the node's boot id.
    fn open(node: NodeId, address: &str) -> io::Result<(Self, BootId)> {
        let stream = connect(address)?;
        let boot_id = ping_stream(&stream)?;
        stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        let reader = stream.try_clone()?;
        reader.set_read_timeout(Some(READ_POLL))?;
        let shared = Arc::new(LinkShared {
            node,
            waiting: Mutex::new(Waiting::default()),
            outstanding: AtomicUsize::new(0),
        });
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name(format!("peer-{node}"))
            .spawn(move || receive(reader, &thread_shared))?;
        tracing::debug!(node, %address, "connected to a replica node");
        let link = Self {
            writer: Mutex::new(stream),
            next_sequence: AtomicU64::new(1),
            shared,
        };
        Ok((link, boot_id))
    }

    /// Sends one request; its outcome reaches `inbox` under `user_data`. An `Err` means the
    /// request was not sent and no outcome will come.
    fn send(
        &self,
        mut header: Header,
        payload: &[libc::iovec],
        inbox: &Arc<Inbox>,
        user_data: u64,
        read_into: Vec<libc::iovec>,
    ) -> Result<(), RemoteError> {
        header.sequence = self.next_sequence.fetch_add(1, Ordering::Relaxed);
        {
            let mut waiting = lock(&self.shared.waiting);
            if let Some(reason) = &waiting.closed {
                return Err(RemoteError::Unreachable {
                    node: self.shared.node,
                    reason: reason.clone(),
                });
            }
            waiting.requests.insert(
                header.sequence,
                Waiter {
                    inbox: Arc::clone(inbox),
                    user_data,
                    opcode: header.opcode,
                    read_into,
                    sent: Instant::now(),
                },
            );
        }
        self.shared.outstanding.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's iovecs are readable for the duration of the call (submit contract).
        let pieces: Vec<&[u8]> = payload
            .iter()
            .map(|iov| unsafe {
                std::slice::from_raw_parts(iov.iov_base.cast::<u8>(), iov.iov_len)
            })
            .collect();
        let bytes = frame::encode_vectored(&header, &pieces);
        let mut iovs = Vec::with_capacity(payload.len() + 1);
        iovs.push(libc::iovec {
            iov_base: bytes.as_ptr().cast_mut().cast(),
            iov_len: bytes.len(),
        });
        iovs.extend_from_slice(payload);
        let writer = lock(&self.writer);
        if let Err(error) = write_all_vectored(&writer, &mut iovs) {
            // Half a frame may be on the wire: the connection is unusable. The reader fails every
            // waiting request, this one included, so its outcome still arrives exactly once.
            tracing::warn!(node = self.shared.node, %error, "cannot send to a replica node; closing the connection");
            let _ = writer.shutdown(Shutdown::Both);
        }
        Ok(())
    }
}

/// A node's kernel boot id (/proc/sys/kernel/random/boot_id), which its replica service sends in
/// ping replies: a node whose boot id changed may have lost writes it had acknowledged but not yet
/// flushed, so it does not catch up by copying only what changed.
pub type BootId = [u8; 16];

fn connect(address: &str) -> io::Result<TcpStream> {
    let address: SocketAddr = address.parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("'{address}' is not IP:PORT"),
        )
    })?;
    let stream = TcpStream::connect_timeout(&address, CONNECT_TIMEOUT)?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Pings over a fresh connection (before anything else is sent on it); returns the boot id.
fn ping_stream(mut stream: &TcpStream) -> io::Result<BootId> {
    use std::io::{Read, Write};
    let header = Header {
        opcode: Opcode::Ping,
        kind: Kind::Request { flags: 0 },
        volume: [0; 16],
        extent: 0,
        epoch: 0,
        offset: 0,
        length: 0,
        payload: 0,
        sequence: 0,
    };
    stream.set_read_timeout(Some(PING_TIMEOUT))?;
    stream.write_all(&frame::encode(&header, &[]))?;
    let mut bytes = [0u8; HEADER_LEN];
    stream.read_exact(&mut bytes)?;
    stream.set_read_timeout(None)?;
    let reply = frame::decode(&bytes)
        .and_then(|reply| frame::verify(&bytes, &[]).map(|()| reply))
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
    match reply.kind {
        Kind::Reply { status: Status::Ok } if reply.opcode == Opcode::Ping => Ok(reply.volume),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected answer to a ping",
        )),
    }
}

/// writev until everything went out (the iovecs are consumed as they go).
fn write_all_vectored(stream: &TcpStream, iovs: &mut [libc::iovec]) -> io::Result<()> {
    let mut start = 0;
    while start < iovs.len() {
        let count = (iovs.len() - start).min(1024);
        // SAFETY: the iovecs describe readable memory (see Link::send).
        let n = unsafe {
            libc::writev(
                stream.as_raw_fd(),
                iovs[start..].as_ptr(),
                i32::try_from(count).unwrap_or(1024),
            )
        };
        if n < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        advance(iovs, &mut start, n as usize);
    }
    Ok(())
}

/// Moves the window `iovs[*start..]` past `n` transferred bytes.
fn advance(iovs: &mut [libc::iovec], start: &mut usize, mut n: usize) {
    while n > 0 && *start < iovs.len() {
        let iov = &mut iovs[*start];
        if n >= iov.iov_len {
            n -= iov.iov_len;
            *start += 1;
        } else {
            iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(n).cast();
            iov.iov_len -= n;
            n = 0;
        }
    }
    while *start < iovs.len() && iovs[*start].iov_len == 0 {
        *start += 1;
    }
}

/// Why the reader stopped.
#[derive(Debug, thiserror::Error)]
enum ReceiveError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the connection closed")]
    Closed,
    #[error("no reply for {0:?}")]
    Overdue(Duration),
    #[error("malformed reply: {0}")]
    Malformed(String),
}

/// The reader thread of one connection: matches replies to waiters until the connection fails.
fn receive(stream: TcpStream, shared: &LinkShared) {
    let mut current: Option<Waiter> = None;
    let error = receive_replies(&stream, shared, &mut current).unwrap_err();
    let reason = error.to_string();
    if !matches!(error, ReceiveError::Closed) || shared.outstanding.load(Ordering::Relaxed) > 0 {
        tracing::warn!(node = shared.node, %reason, "replica connection lost");
    }
    let _ = stream.shutdown(Shutdown::Both);
    if let Some(waiter) = current.take() {
        shared.fail(waiter, &reason);
    }
    shared.close(&reason);
}

fn receive_replies(
    stream: &TcpStream,
    shared: &LinkShared,
    current: &mut Option<Waiter>,
) -> Result<(), ReceiveError> {
    let mut last_check = Instant::now();
    loop {
        let mut bytes = [0u8; HEADER_LEN];
        read_full(
            stream,
            &mut [libc::iovec {
                iov_base: bytes.as_mut_ptr().cast(),
                iov_len: HEADER_LEN,
            }],
            shared,
            true,
        )?;
        let header =
            frame::decode(&bytes).map_err(|error| ReceiveError::Malformed(error.to_string()))?;
        let Kind::Reply { status } = header.kind else {
            return Err(ReceiveError::Malformed(
                "a request frame arrived".to_owned(),
            ));
        };
        let waiter = lock(&shared.waiting).requests.remove(&header.sequence);
        let waiter = current.insert(waiter.ok_or_else(|| {
            ReceiveError::Malformed(format!("reply to unknown request {}", header.sequence))
        })?);
        if waiter.opcode != header.opcode {
            return Err(ReceiveError::Malformed(format!(
                "reply of opcode {:?} to a {:?} request",
                header.opcode, waiter.opcode
            )));
        }
        if header.payload > 0 {
            let expected: usize = waiter.read_into.iter().map(|iov| iov.iov_len).sum();
            if expected != header.payload as usize {
                return Err(ReceiveError::Malformed(format!(
                    "{} bytes of data for a {expected}-byte read",
                    header.payload
                )));
            }
            let mut iovs = waiter.read_into.clone();
            read_full(stream, &mut iovs, shared, false)?;
            // SAFETY: the waiter's buffers stay valid until its outcome is delivered.
            let pieces: Vec<&[u8]> = waiter
                .read_into
                .iter()
                .map(|iov| unsafe {
                    std::slice::from_raw_parts(iov.iov_base.cast::<u8>(), iov.iov_len)
                })
                .collect();
            frame::verify_vectored(&bytes, &pieces)
        } else {
            frame::verify(&bytes, &[])
        }
        .map_err(|error| ReceiveError::Malformed(error.to_string()))?;
        if status == Status::Ok && header.opcode == Opcode::Read && header.payload == 0 {
            let expected: usize = waiter.read_into.iter().map(|iov| iov.iov_len).sum();
            if expected > 0 {
                return Err(ReceiveError::Malformed(
                    "a read reply without data".to_owned(),
                ));
            }
        }
        let waiter = current.take().expect("set above");
        shared.outstanding.fetch_sub(1, Ordering::Relaxed);
        let outcome = if status == Status::Ok {
            Ok(())
        } else {
            Err(RemoteError::Refused {
                node: shared.node,
                status,
                epoch: header.epoch,
            })
        };
        waiter
            .inbox
            .deliver(waiter.user_data, Outcome::Reply(outcome));
        if last_check.elapsed() >= READ_POLL {
            last_check = Instant::now();
            check_overdue(shared)?;
        }
    }
}

fn check_overdue(shared: &LinkShared) -> Result<(), ReceiveError> {
    match shared.oldest() {
        Some(age) if age > REQUEST_TIMEOUT => Err(ReceiveError::Overdue(age)),
        _ => Ok(()),
    }
}

/// Fills `iovs` from the socket, looking for overdue requests whenever it is quiet. `at_frame_start`:
/// a clean end of stream before the first byte is `Closed`, not an error.
fn read_full(
    stream: &TcpStream,
    iovs: &mut [libc::iovec],
    shared: &LinkShared,
    at_frame_start: bool,
) -> Result<(), ReceiveError> {
    let mut start = 0;
    let mut got_any = false;
    while start < iovs.len() {
        let count = (iovs.len() - start).min(1024);
        // SAFETY: the iovecs describe writable memory: our header buffer or a waiter's buffers.
        let n = unsafe {
            libc::readv(
                stream.as_raw_fd(),
                iovs[start..].as_ptr(),
                i32::try_from(count).unwrap_or(1024),
            )
        };
        if n < 0 {
            let error = io::Error::last_os_error();
            match error.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    check_overdue(shared)?;
                    if shared.is_closed() {
                        return Err(ReceiveError::Closed);
                    }
                    continue;
                }
                _ => return Err(error.into()),
            }
        }
        if n == 0 {
            return Err(if at_frame_start && !got_any {
                ReceiveError::Closed
            } else {
                io::Error::from(io::ErrorKind::UnexpectedEof).into()
            });
        }
        got_any = true;
        advance(iovs, &mut start, n as usize);
    }
    Ok(())
}

enum Slot {
    Up(Arc<Link>),
    Down { since: Instant, reason: String },
}

/// The connections to the other nodes, shared by every volume and queue of this node.
#[derive(Default)]
pub struct Peers {
    addresses: RwLock<HashMap<NodeId, String>>,
    links: Mutex<HashMap<NodeId, Slot>>,
    /// The last boot id each node answered a ping with.
    boot_ids: Mutex<HashMap<NodeId, BootId>>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("addresses", &self.addresses)
            .finish_non_exhaustive()
    }
}

impl Peers {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Records where `node` listens; a changed address drops the old connection.
    pub fn set_address(&self, node: NodeId, address: &str) {
        let mut addresses = self
            .addresses
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if addresses.get(&node).map(String::as_str) == Some(address) {
            return;
        }
        addresses.insert(node, address.to_owned());
        drop(addresses);
        lock(&self.links).remove(&node);
    }

    /// Requests sent to `node` and not yet answered; `None` while it is unreachable.
    pub fn load(&self, node: NodeId) -> Option<usize> {
        match lock(&self.links).get(&node) {
            Some(Slot::Up(link)) if !link.shared.is_closed() => {
                Some(link.shared.outstanding.load(Ordering::Relaxed))
            }
            Some(Slot::Up(_)) | None => Some(0),
            Some(Slot::Down { since, .. }) => (since.elapsed() >= RECONNECT_BACKOFF).then_some(0),
        }
    }

    /// Whether `node`'s data service answers now: [`Peers::ping`].
    pub fn reachable(&self, node: NodeId) -> bool {
        self.ping(node).is_some()
    }

    /// Pings `node` over a connection of its own; its boot id if it answers within a connect
    /// timeout plus `PING_TIMEOUT` (a frozen process whose kernel still accepts connections does
    /// not answer).
    pub fn ping(&self, node: NodeId) -> Option<BootId> {
        let address = self
            .addresses
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&node)
            .cloned()?;
        let boot_id = connect(&address)
            .and_then(|stream| ping_stream(&stream))
            .ok()?;
        lock(&self.boot_ids).insert(node, boot_id);
        Some(boot_id)
    }

    /// The boot id `node` last answered a ping with (connections ping when they open).
    pub fn boot_id(&self, node: NodeId) -> Option<BootId> {
        lock(&self.boot_ids).get(&node).copied()
    }

    /// The live connection to `node`, opened if need be.
    fn link(&self, node: NodeId) -> Result<Arc<Link>, RemoteError> {
        let mut links = lock(&self.links);
        match links.get(&node) {
            Some(Slot::Up(link)) if !link.shared.is_closed() => return Ok(Arc::clone(link)),
            Some(Slot::Down { since, reason }) if since.elapsed() < RECONNECT_BACKOFF => {
                return Err(RemoteError::Unreachable {
                    node,
                    reason: reason.clone(),
                });
            }
            _ => {}
        }
        let address = self
            .addresses
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&node)
            .cloned();
        let opened = match address {
            Some(address) => Link::open(node, &address)
                .map_err(|error| format!("cannot connect to {address}: {error}")),
            None => Err("its address is not known".to_owned()),
        };
        match opened {
            Ok((link, boot_id)) => {
                lock(&self.boot_ids).insert(node, boot_id);
                let link = Arc::new(link);
                links.insert(node, Slot::Up(Arc::clone(&link)));
                Ok(link)
            }
            Err(reason) => {
                tracing::warn!(node, %reason, "replica node unreachable");
                links.insert(
                    node,
                    Slot::Down {
                        since: Instant::now(),
                        reason: reason.clone(),
                    },
                );
                Err(RemoteError::Unreachable { node, reason })
            }
        }
    }

    /// Sends one request to `node`; see [`Link::send`].
    pub(crate) fn send(
        &self,
        node: NodeId,
        header: Header,
        payload: &[libc::iovec],
        inbox: &Arc<Inbox>,
        user_data: u64,
        read_into: Vec<libc::iovec>,
    ) -> Result<(), RemoteError> {
        self.link(node)?
            .send(header, payload, inbox, user_data, read_into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(first: u64, count: u64, epoch: u64, nodes: &[NodeId]) -> RouteRun {
        RouteRun {
            first,
            count,
            epoch,
            nodes: nodes.to_vec(),
            targets: Vec::new(),
            out: Vec::new(),
        }
    }

    #[test]
    fn region_masks_cover_the_regions_a_range_touches() {
        let extent = 64 << 20;
        assert_eq!(region_mask(0, 4096, extent), 1);
        assert_eq!(region_mask((1 << 20) - 512, 1024, extent), 0b11);
        assert_eq!(region_mask(63 << 20, 1 << 20, extent), 1 << 63);
        assert_eq!(region_mask(0, extent, extent), u64::MAX);
        assert_eq!(region_mask(5, 0, extent), 0);
        let maps = DirtyMaps::default();
        maps.mark(7, 3, 2 << 20, 4096, extent);
        maps.mark(7, 3, 0, 4096, extent);
        assert_eq!(maps.regions(7, 3), 0b101);
        maps.record_drop(7, [0, 16], None);
        maps.forget_run(7, 0, 16);
        assert_eq!(maps.regions(7, 3), 0, "extent 3 is in the run caught up");
        assert!(maps.get(7).is_some(), "run 16 is still tracked");
        maps.forget_run(7, 16, 16);
        assert!(maps.get(7).is_none());
    }

    #[test]
    fn routes_find_the_run_of_an_extent() {
        let routes = Routes::new(vec![run(4, 2, 7, &[2, 3]), run(0, 4, 1, &[1, 2])]);
        assert_eq!(routes.lookup(0).unwrap().epoch, 1);
        assert_eq!(routes.lookup(3).unwrap().epoch, 1);
        assert_eq!(routes.lookup(4).unwrap().nodes, vec![2, 3]);
        assert_eq!(routes.lookup(5).unwrap().epoch, 7);
        assert!(routes.lookup(6).is_none());
        assert!(Routes::default().lookup(0).is_none());
        let gap = Routes::new(vec![run(0, 1, 1, &[1]), run(3, 1, 1, &[1])]);
        assert!(gap.lookup(1).is_none());
        assert!(gap.lookup(3).is_some());
    }

    #[test]
    fn advance_skips_whole_and_partial_iovecs() {
        let mut buf = [0u8; 30];
        let base = buf.as_mut_ptr();
        let mut iovs = [
            libc::iovec {
                iov_base: base.cast(),
                iov_len: 10,
            },
            libc::iovec {
                iov_base: base.wrapping_add(10).cast(),
                iov_len: 20,
            },
        ];
        let mut start = 0;
        advance(&mut iovs, &mut start, 15);
        assert_eq!(start, 1);
        assert_eq!(iovs[1].iov_len, 15);
        assert_eq!(iovs[1].iov_base as usize, base as usize + 15);
        advance(&mut iovs, &mut start, 15);
        assert_eq!(start, 2);
    }

    #[test]
    fn an_unknown_or_dead_peer_fails_at_once_and_then_backs_off() {
        let peers = Peers::new();
        assert!(matches!(
            peers.link(9),
            Err(RemoteError::Unreachable { node: 9, .. })
        ));
        // Nothing listens on this port (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        peers.set_address(9, &format!("127.0.0.1:{port}"));
        let Err(RemoteError::Unreachable { reason, .. }) = peers.link(9) else {
            panic!("connected to a closed port");
        };
        assert!(reason.contains("cannot connect"), "{reason}");
        assert_eq!(peers.load(9), None, "backing off");
    }
}
