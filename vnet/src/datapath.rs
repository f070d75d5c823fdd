//! The switch's I/O on one node: the frames of its tap ports and of its VXLAN underlay socket,
//! moved through the [`Switch`]'s decisions by one thread, the switching core.
//!
//! The core waits in epoll on every tap queue, the underlay socket and a wake-up eventfd, so an
//! idle switch uses no CPU. After a pass that moved bulk traffic ([`POLL_AFTER_BYTES`] or more) it
//! polls for [`POLL_WINDOW`] before it sleeps again, yielding the CPU between looks: in a stream the
//! next frames come within microseconds, and a wake-up from epoll costs 10–20 µs on a VM, which
//! bounds a single TCP stream. A lone frame (a ping) does not start the poll, so a request/response
//! keeps the CPU free for whoever answers it.
//!
//! For each readable tap queue the core reads up to [`BATCH`] frames, asks the
//! switch where each goes (one read lock per batch), and writes it there: to a tap queue (a
//! virtio-net header, then the frame) or to a VTEP (the VXLAN header, then the frame, in UDP
//! datagrams to the VTEP's address; the kernel adds the outer IP and UDP headers). An ARP request
//! the switch answers gets its reply written back to the port it came from. A frame an egress
//! will not take (its queue is full) is counted as a `tx_failed` drop of that egress.
//!
//! Ports are added and removed through the [`Datapath`] handle from any thread: the switch learns
//! of the change at once (so the caller gets its errors), and the core picks up or lets go of the
//! port's queues at its next wake-up, which the handle triggers.
//!
//! Besides taps, a port may be *virtual* (a vhost-user-net guest): its frames do not pass through
//! the core at all. Whoever has them — the thread serving the guest's transmit queue — hands them
//! to a [`PortSender`], which asks the switch and delivers them on that same thread, to a tap
//! queue, a VTEP or another virtual port; frames to a virtual port go to its [`FrameSink`] (the
//! guest's receive queue), from the core or from another port's sender, and each sender flushes
//! the sinks it pushed to at the end of its batch. So a frame between two guests costs no
//! thread hand-off. A GSO frame for a sink that cannot take one (its guest did not negotiate
//! TSO) is cut into segments first.
//!
//! Where the frames go (each port's tap queues or sink) is shared by the core and the senders
//! behind a read-write lock beside the switch's; both are taken for reading once per batch (by a
//! sender or the core), and for writing only when ports come and go.
//!
//! Offloads: taps are opened with checksum and TCP segmentation offloads (IPv4, IPv6, ECN), so the
//! kernel hands over frames of up to 64 KiB with partial checksums, described by their virtio-net
//! header. Between taps the frame and its header pass as they are: nobody segments or checksums
//! anything. The overlay carries MTU-sized frames, and moves them in bulk both ways:
//! - To a VTEP, a GSO frame is cut into segments in software ([`offload::segment_tcp_headers`]):
//!   only each segment's headers, behind its VXLAN header, are written here; the run goes to the
//!   kernel in one `sendmsg` with UDP GSO ([`crate::underlay::send_segments`]), gathering each
//!   segment from its headers and its payload where it lies in the frame read from the port, and
//!   the kernel makes the datagrams. If the kernel or route refuses UDP GSO, the core says so
//!   once and sends one datagram per call from then on. A frame with only a partial checksum has
//!   it completed and goes as one datagram.
//!   Segments the core cut (every checksum in them computed here) carry Vessel's mark in a
//!   reserved byte of the VXLAN header ([`vxlan::MARK_CHECKSUMS_COMPUTED`]).
//! - From the underlay, the socket has UDP GRO on: one read may return a run of datagrams of one
//!   sender, which the core cuts up again ([`crate::underlay::datagrams`]). Every datagram gets
//!   its own switch decision (learning, counters, isolation, drops). Those the switch sends to a
//!   single port go through a [`Coalescer`]: consecutive TCP segments of a flow are merged into one
//!   64 KiB frame, written to the tap once behind a GSO header, as the kernel's own GRO would
//!   hand it up (a marked datagram's checksums are taken as valid, the others' verified first);
//!   everything else is written as it came behind an all-zero header. Nothing is held
//!   past the end of a batch. A read that cannot be cut up (its segment size is zero or larger
//!   than what was read, or it was truncated) is counted as one `vxlan_too_short` drop.
//!
//! The underlay socket's buffers are enlarged ([`crate::underlay::SOCKET_BUFFER_LEN`]): a run
//! takes 64 KiB of them, and the kernel's default holds only a few.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::gro::{Coalesced, Coalescer};
use crate::offload::{self, VirtioNetHeader};
use crate::stats::{DropReason, TrafficStats};
use crate::switch::{Egress, IngressMemo, PortConfig, Switch, SwitchConfig, SwitchError, Verdict};
use crate::tap::{Offloads, Tap, TapError, VNET_HDR_LEN};
use crate::vxlan::Vni;
use crate::{PortId, underlay, vxlan};

/// Frames (or, from the underlay, runs of coalesced datagrams) the core takes from one queue
/// before it looks at the others.
pub const BATCH: usize = 64;
/// Largest frame on the underlay: a jumbo frame with its 802.1Q tag.
const MAX_FRAME: usize = 9216;
/// Largest frame from a tap: a 64 KiB GSO frame and its Ethernet header.
const MAX_GSO_FRAME: usize = 65_536 + 64;
/// How often aged MAC entries are swept out (for the table-size figures).
const EXPIRE_INTERVAL: Duration = Duration::from_secs(5);

/// Bytes a pass of the core must have moved for it to poll afterwards: bulk traffic, not a ping.
pub const POLL_AFTER_BYTES: usize = 16 << 10;

/// How long the core polls after a bulk pass before it sleeps in epoll again. Measured with
/// `bench-net` on a 2-vCPU VM: 25 µs gained nothing, 100 µs took the overlay down (both nodes'
/// cores then poll on the CPUs the guests need).
pub const POLL_WINDOW: Duration = Duration::from_micros(50);

const TOKEN_WAKE: u64 = 0;
const TOKEN_UNDERLAY: u64 = 1;
const FIRST_PORT_TOKEN: u64 = 2;

/// A node's switch with its I/O running. Dropping it stops the core (tap devices made persistent
/// stay; the others go with their last queue).
#[derive(Debug)]
pub struct Datapath {
    shared: Arc<Shared>,
    core: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    switch: RwLock<Switch>,
    /// Where each port's frames are written.
    egress: RwLock<HashMap<PortId, PortOut>>,
    underlay: UdpSocket,
    /// Whether runs of segments go to the underlay in one send (UDP GSO); cleared for good the
    /// first time the kernel refuses one.
    gso: AtomicBool,
    wake: EventFd,
    changes: Mutex<Vec<Change>>,
    stop: AtomicBool,
}

/// How frames reach a port.
enum PortOut {
    /// A tap's queues.
    Tap(Vec<Arc<File>>),
    /// A virtual port's far side.
    Virtual(Arc<dyn FrameSink>),
}

impl std::fmt::Debug for PortOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortOut::Tap(queues) => write!(f, "tap ({} queues)", queues.len()),
            PortOut::Virtual(_) => f.write_str("virtual"),
        }
    }
}

/// What the core must start or stop reading.
#[derive(Debug)]
enum Change {
    /// A tap port's queues.
    Add(PortId, Vec<Arc<File>>),
    Remove(PortId),
}

/// Where the frames a virtual port receives go (e.g. a vhost-user-net guest's receive queue).
/// Called on the switching core and on other ports' senders: must not block.
pub trait FrameSink: Send + Sync + 'static {
    /// Takes one frame and its virtio-net header (copied; the slices are valid only during the
    /// call); false if it could not (full, closed), which is counted as a `tx_failed` drop.
    fn push(&self, header: &VirtioNetHeader, frame: &[u8]) -> bool;
    /// Whether a GSO frame with `header` may be pushed whole (the port negotiated that kind of
    /// segmentation offload); if not, its segments are pushed instead.
    fn accepts_gso(&self, header: &VirtioNetHeader) -> bool;
    /// End of a batch of pushes from one thread: make what was pushed visible (e.g. publish
    /// used entries and interrupt the guest).
    fn flush(&self) {}
    /// Opens a run of pushes from this thread, for a sink whose pushes take a lock: the run takes
    /// it once. The default pushes one by one. A thread holds at most one run at a time (of any
    /// sink), and [`FrameSink::flush`] is still called at the end of its batch.
    fn run(&self) -> Box<dyn SinkRun + '_> {
        Box::new(OneByOne(self))
    }
}

/// Pushes into one [`FrameSink`] from one thread, holding what each push would take again; see
/// [`FrameSink::run`]. Ends when dropped.
pub trait SinkRun {
    /// [`FrameSink::push`] within the run.
    fn push(&mut self, header: &VirtioNetHeader, frame: &[u8]) -> bool;
}

/// The run of a sink with nothing to hold.
struct OneByOne<'s, S: ?Sized>(&'s S);

impl<S: FrameSink + ?Sized> SinkRun for OneByOne<'_, S> {
    fn push(&mut self, header: &VirtioNetHeader, frame: &[u8]) -> bool {
        self.0.push(header, frame)
    }
}

impl Datapath {
    /// Starts a switch that sends and receives VXLAN on `underlay` (bound by the caller, e.g. to
    /// the node's address and [`vxlan::DEFAULT_UDP_PORT`]).
    pub fn start(underlay: UdpSocket, config: SwitchConfig) -> io::Result<Self> {
        underlay.set_nonblocking(true)?;
        let gso = underlay::gso_supported(&underlay);
        if let Err(error) = underlay::enlarge_buffers(&underlay) {
            tracing::info!(%error, "the underlay socket keeps its buffer sizes");
        }
        if let Err(error) = underlay::enable_gro(&underlay) {
            // Datagrams then come one at a time: slower, not wrong.
            tracing::info!(%error, "the underlay socket does not coalesce received datagrams (UDP_GRO)");
        }
        if !gso {
            tracing::info!(
                "the kernel lacks UDP_SEGMENT: segments go to VTEPs one datagram at a time"
            );
        }
        let shared = Arc::new(Shared {
            switch: RwLock::new(Switch::new(config)),
            egress: RwLock::new(HashMap::new()),
            underlay,
            gso: AtomicBool::new(gso),
            wake: EventFd::new(EFD_NONBLOCK)?,
            changes: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            shared.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_WAKE),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            shared.underlay.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_UNDERLAY),
        )?;
        let core = Core {
            shared: Arc::clone(&shared),
            epoll,
            ports: HashMap::new(),
            tokens: HashMap::new(),
            next_token: FIRST_PORT_TOKEN,
            frame: vec![0; VNET_HDR_LEN + MAX_GSO_FRAME],
            received: vec![0; underlay::RECEIVE_BUFFER_LEN],
            scratch: Scratch::new(),
            coalescer: Coalescer::new(),
        };
        let core = std::thread::Builder::new()
            .name("vnet-core".to_owned())
            .spawn(move || core.run())?;
        Ok(Datapath {
            shared,
            core: Some(core),
        })
    }

    /// The switch, to read its configuration and counters.
    pub fn switch(&self) -> RwLockReadGuard<'_, Switch> {
        self.shared
            .switch
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The switch, to change networks, VTEPs and static entries (forwarding waits meanwhile).
    /// Ports are added and removed with [`Datapath::add_tap`] and [`Datapath::remove_port`].
    pub fn configure(&self) -> RwLockWriteGuard<'_, Switch> {
        self.shared
            .switch
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The underlay socket's address.
    pub fn underlay_addr(&self) -> io::Result<SocketAddr> {
        self.shared.underlay.local_addr()
    }

    /// Plugs a tap device into the switch as port `config`; its queues are served from now on.
    pub fn add_tap(&self, config: PortConfig, tap: Tap) -> Result<(), AddPortError> {
        tap.set_offloads(Offloads::ALL)?;
        let queues: Vec<Arc<File>> = tap.into_queues().into_iter().map(Arc::new).collect();
        for queue in &queues {
            set_nonblocking(queue).map_err(AddPortError::Io)?;
        }
        self.configure().add_port(config)?;
        self.egress()
            .insert(config.id, PortOut::Tap(queues.clone()));
        self.change(Change::Add(config.id, queues));
        Ok(())
    }

    /// Plugs a virtual port into the switch as `config`: frames for it go to `sink`; its own
    /// frames come through [`PortSender`]s of its id (see [`Datapath::sender`]).
    pub fn add_virtual_port(
        &self,
        config: PortConfig,
        sink: Arc<dyn FrameSink>,
    ) -> Result<(), AddPortError> {
        self.configure().add_port(config)?;
        self.egress().insert(config.id, PortOut::Virtual(sink));
        Ok(())
    }

    /// A sender of port `port`'s frames into the switch, for one thread (e.g. one queue of a
    /// vhost-user-net device). It may be made before the port is plugged in; until then, and
    /// after it is unplugged, what it sends is dropped.
    pub fn sender(&self, port: PortId) -> PortSender {
        PortSender {
            shared: Arc::clone(&self.shared),
            port,
            scratch: Scratch::new(),
        }
    }

    /// Unplugs a port; returns its last counters. Its queues are closed by the core.
    pub fn remove_port(&self, id: PortId) -> Result<TrafficStats, SwitchError> {
        let stats = self.configure().remove_port(id)?;
        self.egress().remove(&id);
        self.change(Change::Remove(id));
        Ok(stats)
    }

    fn egress(&self) -> RwLockWriteGuard<'_, HashMap<PortId, PortOut>> {
        self.shared
            .egress
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn change(&self, change: Change) {
        self.shared
            .changes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(change);
        // A full eventfd counter still wakes the core; nothing else can fail here.
        let _ = self.shared.wake.write(1);
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = self.shared.wake.write(1);
        if let Some(core) = self.core.take() {
            let _ = core.join();
        }
    }
}

/// Why a port could not be plugged in.
#[derive(Debug, thiserror::Error)]
pub enum AddPortError {
    #[error(transparent)]
    Switch(#[from] SwitchError),
    #[error("cannot prepare the port's queues: {0}")]
    Io(io::Error),
    #[error(transparent)]
    Tap(#[from] TapError),
}

/// A virtual port's way into the switch: [`PortSender::send`] each frame it transmits, on the
/// sending thread, then [`PortSender::flush`] at the end of the batch. One per thread.
pub struct PortSender {
    shared: Arc<Shared>,
    port: PortId,
    scratch: Scratch,
}

impl std::fmt::Debug for PortSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortSender")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl PortSender {
    /// Switches one frame (with its virtio-net header) the port sent, and delivers it where the
    /// switch decides; drops are counted by the switch. False only if the port is not plugged in.
    pub fn send(&mut self, header: &VirtioNetHeader, frame: &[u8]) -> bool {
        self.send_batch([(*header, frame)]) == 1
    }

    /// [`PortSender::send`] for several frames, in order, taking the switch's locks once; returns
    /// how many were taken (all, or none if the port is not plugged in).
    pub fn send_batch<'f>(
        &mut self,
        frames: impl IntoIterator<Item = (VirtioNetHeader, &'f [u8])>,
    ) -> usize {
        let port = self.port;
        self.shared.forwarding(&mut self.scratch, |forwarder| {
            let mut taken = 0;
            for (header, frame) in frames {
                if !forwarder.forward(port, 0, &header, frame) {
                    return 0;
                }
                taken += 1;
            }
            taken
        })
    }

    /// Makes what this sender delivered to virtual ports visible to them.
    pub fn flush(&mut self) {
        let egress = self
            .shared
            .egress
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        self.scratch.flush(&egress);
    }
}

/// Buffers for forwarding, one set per forwarding thread.
struct Scratch {
    /// Where the switch sends a frame.
    out: Vec<Egress>,
    /// A datagram being built for the underlay, or the headers of a GSO frame's segments.
    outgoing: Vec<u8>,
    /// Where each segment of a GSO frame bound for the underlay lies: its headers in `outgoing`,
    /// its payload in the frame.
    cuts: Vec<(Range<usize>, Range<usize>)>,
    /// Segments of a GSO frame for a virtual port that takes none.
    segments: Vec<u8>,
    /// Virtual ports pushed to since the last flush.
    touched: Vec<PortId>,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            out: Vec::new(),
            outgoing: Vec::with_capacity(
                underlay::MAX_SEGMENTS_LEN + vxlan::HEADER_LEN + MAX_FRAME,
            ),
            cuts: Vec::new(),
            segments: Vec::new(),
            touched: Vec::new(),
        }
    }

    /// Flushes the sinks of the virtual ports pushed to.
    fn flush(&mut self, egress: &HashMap<PortId, PortOut>) {
        for port in self.touched.drain(..) {
            if let Some(PortOut::Virtual(sink)) = egress.get(&port) {
                sink.flush();
            }
        }
    }
}

/// What forwarding frames needs: the switch's decisions, the ports' outputs and the underlay,
/// all read-locked for the time of a frame or a batch, and a forwarding thread's buffers.
struct Forwarder<'a> {
    switch: &'a Switch,
    egress: &'a HashMap<PortId, PortOut>,
    shared: &'a Shared,
    scratch: &'a mut Scratch,
    /// The time of the batch (for MAC learning and aging).
    now: Instant,
    /// The switch's last decision in this batch, for the next frames of the same flow.
    memo: IngressMemo<'a>,
    /// The virtual port being pushed to, held for a run of frames to it (one at a time, so that no
    /// two forwarding threads can wait for each other's).
    run: Option<(PortId, Box<dyn SinkRun + 'a>)>,
}

impl Shared {
    /// Runs `f` with a forwarder over `scratch`, holding the switch's and the egress table's read
    /// locks (and reading the clock) once for its whole batch.
    fn forwarding<R>(&self, scratch: &mut Scratch, f: impl FnOnce(&mut Forwarder<'_>) -> R) -> R {
        let switch = self.switch.read().unwrap_or_else(PoisonError::into_inner);
        let egress = self.egress.read().unwrap_or_else(PoisonError::into_inner);
        f(&mut Forwarder {
            switch: &switch,
            egress: &egress,
            shared: self,
            scratch,
            now: Instant::now(),
            memo: IngressMemo::default(),
            run: None,
        })
    }
}

impl Forwarder<'_> {
    /// Ends the run held and flushes the virtual ports pushed to.
    fn flush(&mut self) {
        self.run = None;
        self.scratch.flush(self.egress);
    }

    /// Forwards `frame` (with its virtio-net `header`) that `port` sent on its queue `queue`,
    /// as the switch decides. False if the switch does not know the port.
    fn forward(
        &mut self,
        port: PortId,
        queue: usize,
        header: &VirtioNetHeader,
        frame: &[u8],
    ) -> bool {
        let (now, switch) = (self.now, self.switch);
        let gso_size = header.is_gso().then_some(header.gso_size);
        // Most frames of a batch are of the flow the switch last decided for: one destination, no list.
        match switch.port_ingress_remembered(&mut self.memo, port, frame, gso_size) {
            Some(Ok(egress)) => {
                if !self.send(egress, header, frame, queue) {
                    switch.delivery_failed(egress);
                }
                return true;
            }
            Some(Err(_)) => return true,
            None => {}
        }
        let mut out = std::mem::take(&mut self.scratch.out);
        out.clear();
        let verdict =
            switch.port_ingress_deciding(&mut self.memo, port, frame, gso_size, now, &mut out);
        match verdict {
            Verdict::Forward => {
                for &egress in &out {
                    if !self.send(egress, header, frame, queue) {
                        self.switch.delivery_failed(egress);
                    }
                }
            }
            Verdict::Reply(reply) => {
                if !self.write_port(port, queue, &VirtioNetHeader::default(), reply.as_bytes()) {
                    self.switch.delivery_failed(Egress::Port(port));
                }
            }
            Verdict::Drop(reason) => {
                self.scratch.out = out;
                return reason != DropReason::UnknownPort;
            }
        }
        self.scratch.out = out;
        true
    }

    /// Sends `frame` with `header` to `egress`; `queue_hint` picks the tap queue (the ingress
    /// queue's index, so a flow stays on one).
    #[inline]
    fn send(
        &mut self,
        egress: Egress,
        header: &VirtioNetHeader,
        frame: &[u8],
        queue_hint: usize,
    ) -> bool {
        match egress {
            Egress::Port(port) => self.write_port(port, queue_hint, header, frame),
            Egress::Vtep { addr, vni } => self.send_to_vtep(addr, vni, header, frame),
        }
    }

    /// Sends `frame` with `header` behind a VXLAN header with `vni` to the VTEP at `addr`.
    fn send_to_vtep(
        &mut self,
        addr: SocketAddr,
        vni: Vni,
        header: &VirtioNetHeader,
        frame: &[u8],
    ) -> bool {
        // Segments cut here have every checksum computed here (IPv4 header and TCP): they
        // are marked so. A single frame is not, even one whose partial checksum is completed
        // here: its IPv4 header checksum is its sender's, unchecked.
        if header.is_gso() {
            return self.send_segments(addr, &vxlan::encode_computed(vni), header, frame);
        }
        let outgoing = &mut self.scratch.outgoing;
        outgoing.clear();
        outgoing.extend_from_slice(&vxlan::encode(vni));
        outgoing.extend_from_slice(frame);
        if header.flags & offload::FLAG_NEEDS_CSUM != 0
            && offload::complete_checksum(header, &mut outgoing[vxlan::HEADER_LEN..]).is_err()
        {
            return false;
        }
        self.shared.underlay.send_to(outgoing, addr).is_ok()
    }

    /// Cuts a GSO frame into segments and sends each, behind `vxlan`, to `addr`: in runs of at
    /// most [`underlay::MAX_SEGMENTS`] that go in one send each (UDP GSO). Only the segments'
    /// headers are written here; their payloads go to the kernel straight from `frame`.
    fn send_segments(
        &mut self,
        addr: SocketAddr,
        vxlan: &[u8; vxlan::HEADER_LEN],
        header: &VirtioNetHeader,
        frame: &[u8],
    ) -> bool {
        let Scratch {
            outgoing: headers,
            cuts,
            ..
        } = &mut self.scratch;
        headers.clear();
        cuts.clear();
        let cut = offload::segment_tcp_headers(header, frame, vxlan, headers, |own, payload| {
            cuts.push((own, payload));
        });
        if cut.is_err() {
            return false;
        }
        // Every datagram but the last is as long as the first.
        let Some(size) = cuts.first().map(|(own, payload)| own.len() + payload.len()) else {
            return false;
        };
        let per_run = underlay::MAX_SEGMENTS
            .min(underlay::MAX_SEGMENTS_LEN / size)
            .max(1);
        let mut datagrams = [[IoSlice::new(&[]); 2]; underlay::MAX_SEGMENTS];
        let mut sent = true;
        for run in cuts.chunks(per_run) {
            for (datagram, (own, payload)) in datagrams.iter_mut().zip(run) {
                *datagram = [
                    IoSlice::new(&headers[own.clone()]),
                    IoSlice::new(&frame[payload.clone()]),
                ];
            }
            sent &= send_run(self.shared, addr, &datagrams[..run.len()], size);
        }
        sent
    }

    /// Hands a frame, behind its virtio-net header, to `port`: written to one of a tap's queues,
    /// or pushed to a virtual port's sink (cut into segments first if it is a GSO frame the sink
    /// cannot take). False if the port would not take it (full, or gone).
    #[inline]
    fn write_port(
        &mut self,
        port: PortId,
        queue_hint: usize,
        header: &VirtioNetHeader,
        frame: &[u8],
    ) -> bool {
        // Frames of a run to the same virtual port skip the lookup: the run was opened from the
        // egress table this forwarder holds read-locked.
        if let Some((open, run)) = &mut self.run
            && *open == port
            && !header.is_gso()
        {
            return run.push(header, frame);
        }
        self.write_port_looked_up(port, queue_hint, header, frame)
    }

    /// [`Forwarder::write_port`] past the run held: the port looked up in the egress table.
    fn write_port_looked_up(
        &mut self,
        port: PortId,
        queue_hint: usize,
        header: &VirtioNetHeader,
        frame: &[u8],
    ) -> bool {
        match self.egress.get(&port) {
            Some(PortOut::Tap(queues)) if !queues.is_empty() => {
                let queue = &queues[queue_hint % queues.len()];
                let header = header.to_tap_bytes();
                let written =
                    (&**queue).write_vectored(&[IoSlice::new(&header), IoSlice::new(frame)]);
                // A tap takes a frame whole or not at all.
                written.is_ok_and(|n| n == VNET_HDR_LEN + frame.len())
            }
            Some(PortOut::Virtual(sink)) => {
                if !self.scratch.touched.contains(&port) {
                    self.scratch.touched.push(port);
                }
                let run = match &mut self.run {
                    Some((open, run)) if *open == port => run,
                    run => {
                        // The run held so far ends before the next one starts.
                        *run = None;
                        &mut run.insert((port, sink.run())).1
                    }
                };
                if !header.is_gso() || sink.accepts_gso(header) {
                    return run.push(header, frame);
                }
                let plain = VirtioNetHeader::default();
                let mut pushed = true;
                offload::segment_tcp(header, frame, &mut self.scratch.segments, |segment| {
                    pushed &= run.push(&plain, segment);
                })
                .is_ok()
                    && pushed
            }
            _ => false,
        }
    }
}

/// The switching core's own state: the tap queues it reads and its buffers.
struct Core {
    shared: Arc<Shared>,
    epoll: Epoll,
    /// Each tap port's queues, with their epoll tokens.
    ports: HashMap<PortId, Vec<(u64, Arc<File>)>>,
    /// Epoll token → port and queue index.
    tokens: HashMap<u64, (PortId, usize)>,
    next_token: u64,
    /// A frame read from a tap: its virtio-net header, then the frame.
    frame: Vec<u8>,
    /// What one read from the underlay gave: a datagram (VXLAN header, then the frame), or a run
    /// of them the kernel coalesced.
    received: Vec<u8>,
    scratch: Scratch,
    /// TCP segments from the underlay, merged per flow before they go to a tap.
    coalescer: Coalescer<PortId>,
}

impl Core {
    /// Serves events until the datapath stops; polls (`epoll_wait` with no timeout, yielding
    /// between looks) for [`POLL_WINDOW`] after each pass that moved bulk traffic.
    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        let mut swept = Instant::now();
        let sleep = i32::try_from(EXPIRE_INTERVAL.as_millis()).unwrap_or(i32::MAX);
        let mut poll_until: Option<Instant> = None;
        loop {
            // A window that closed is forgotten, so a sleeping core reads no clock for it.
            poll_until = poll_until.filter(|until| Instant::now() < *until);
            let polling = poll_until.is_some();
            let timeout = if polling { 0 } else { sleep };
            let ready = match self.epoll.wait(timeout, &mut events) {
                Ok(ready) => ready,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    // Nothing sensible is left to do on a broken epoll: say so and stop.
                    tracing::error!(%error, "the switching core stops: epoll failed");
                    return;
                }
            };
            if self.shared.stop.load(Ordering::Relaxed) {
                return;
            }
            if polling && ready == 0 {
                std::thread::yield_now();
                continue;
            }
            let mut moved = 0;
            for event in &events[..ready] {
                match event.data() {
                    TOKEN_WAKE => {
                        let _ = self.shared.wake.read();
                        self.apply_changes();
                    }
                    TOKEN_UNDERLAY => moved += self.serve_underlay(),
                    token => moved += self.serve_queue(token),
                }
            }
            if moved >= POLL_AFTER_BYTES {
                poll_until = Some(Instant::now() + POLL_WINDOW);
            }
            if swept.elapsed() >= EXPIRE_INTERVAL {
                swept = Instant::now();
                self.shared
                    .switch
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .expire(swept);
            }
        }
    }

    fn apply_changes(&mut self) {
        let changes = std::mem::take(
            &mut *self
                .shared
                .changes
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for change in changes {
            match change {
                Change::Add(port, queues) => {
                    self.drop_port(port);
                    let mut served = Vec::with_capacity(queues.len());
                    for (index, queue) in queues.into_iter().enumerate() {
                        let token = self.next_token;
                        self.next_token += 1;
                        match self.epoll.ctl(
                            ControlOperation::Add,
                            queue.as_raw_fd(),
                            EpollEvent::new(EventSet::IN, token),
                        ) {
                            Ok(()) => {
                                self.tokens.insert(token, (port, index));
                            }
                            Err(error) => {
                                tracing::warn!(%port, queue = index, %error, "a port queue cannot be served");
                            }
                        }
                        served.push((token, queue));
                    }
                    self.ports.insert(port, served);
                }
                Change::Remove(port) => self.drop_port(port),
            }
        }
    }

    fn drop_port(&mut self, port: PortId) {
        for (token, queue) in self.ports.remove(&port).unwrap_or_default() {
            self.tokens.remove(&token);
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                queue.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// Frames from one tap queue, up to a batch; returns the bytes read.
    fn serve_queue(&mut self, token: u64) -> usize {
        let Some(&(port, index)) = self.tokens.get(&token) else {
            return 0;
        };
        let Some(queue) = self
            .ports
            .get(&port)
            .and_then(|queues| queues.get(index))
            .map(|(_, queue)| Arc::clone(queue))
        else {
            return 0;
        };
        let Core {
            shared,
            epoll,
            tokens,
            frame: buffer,
            scratch,
            ..
        } = self;
        let mut moved = 0;
        shared.forwarding(scratch, |forwarder| {
            for _ in 0..BATCH {
                let len = match (&*queue).read(buffer) {
                    Ok(len) => len,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                    Err(error) => {
                        // The device is gone (deleted from under us): stop polling this queue.
                        tracing::warn!(%port, queue = index, %error, "a port queue fails; no longer served");
                        let _ = epoll.ctl(
                            ControlOperation::Delete,
                            queue.as_raw_fd(),
                            EpollEvent::default(),
                        );
                        tokens.remove(&token);
                        break;
                    }
                };
                moved += len;
                let Some(header) = VirtioNetHeader::from_tap(&buffer[..len]) else {
                    continue;
                };
                forwarder.forward(port, index, &header, &buffer[VNET_HDR_LEN..len]);
            }
            // More may be waiting: epoll is level-triggered, so the queue comes up again.
            forwarder.flush();
        });
        moved
    }

    /// Datagrams from the underlay, up to a batch of reads. Each datagram gets its own switch
    /// decision; TCP segments of one flow that go to one port are merged before they are written
    /// (see [`crate::gro`]), and what is held is written before the batch ends.
    fn serve_underlay(&mut self) -> usize {
        let mut moved = 0;
        let Core {
            shared,
            received: buffer,
            coalescer,
            scratch,
            ..
        } = self;
        let shared = &**shared;
        shared.forwarding(scratch, |forwarder| {
            let switch = forwarder.switch;
            let mut out = std::mem::take(&mut forwarder.scratch.out);
            let deliver =
                |forwarder: &mut Forwarder<'_>, port: PortId, coalesced: Coalesced<'_>| {
                    if !forwarder.write_port(port, 0, &coalesced.header, coalesced.frame) {
                        for _ in 0..coalesced.segments {
                            forwarder.switch.delivery_failed(Egress::Port(port));
                        }
                    }
                };
            let mut memo = IngressMemo::default();
            for _ in 0..BATCH {
                let received = match underlay::receive(&shared.underlay, buffer) {
                    Ok(received) => received,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                    // An ICMP error of an earlier send (a VTEP that is not listening): nothing to read.
                    Err(_) => continue,
                };
                moved += received.len;
                let now = Instant::now();
                let read = &buffer[..received.len];
                let datagrams = match underlay::datagrams(read, received.segment_size) {
                    Ok(datagrams) if !received.truncated => datagrams,
                    // Nothing in it can be trusted to be a whole datagram: the switch counts it as a
                    // datagram too short for its VXLAN header, and drops it.
                    _ => {
                        switch.underlay_ingress(received.source, &[], now, &mut out);
                        continue;
                    }
                };
                for datagram in datagrams {
                    if let Verdict::Forward = switch.underlay_ingress_in_run(
                        &mut memo,
                        received.source,
                        datagram,
                        now,
                        &mut out,
                    ) {
                        let inner = &datagram[vxlan::HEADER_LEN..];
                        if let [Egress::Port(port)] = out[..] {
                            let emit = &mut |port: PortId, coalesced: Coalesced<'_>| {
                                deliver(forwarder, port, coalesced)
                            };
                            if vxlan::checksums_computed(datagram) {
                                coalescer.push_computed(port, inner, emit);
                            } else {
                                coalescer.push(port, inner, emit);
                            }
                            continue;
                        }
                        // A flooded frame may belong to a flow held for one of its ports: what is
                        // held goes first, so no flow's frames pass each other.
                        coalescer.flush(&mut |port, coalesced| deliver(forwarder, port, coalesced));
                        for &egress in out.iter() {
                            if let Egress::Port(port) = egress
                                && !forwarder.write_port(
                                    port,
                                    0,
                                    &VirtioNetHeader::default(),
                                    inner,
                                )
                            {
                                switch.delivery_failed(egress);
                            }
                        }
                    }
                }
            }
            coalescer.flush(&mut |port, coalesced| deliver(forwarder, port, coalesced));
            forwarder.flush();
            forwarder.scratch.out = out;
        });
        moved
    }
}

/// Sends `datagrams`, each gathered from its pieces and `size` bytes long but the last (which may
/// be shorter), to `addr`: in one send if UDP GSO is on, else one at a time. A kernel or route
/// that refuses UDP GSO turns it off for good (the run then goes one datagram at a time).
fn send_run(
    shared: &Shared,
    addr: SocketAddr,
    datagrams: &[[IoSlice<'_>; 2]],
    size: usize,
) -> bool {
    let underlay = &shared.underlay;
    if shared.gso.load(Ordering::Relaxed) && datagrams.len() > 1 {
        let pieces = datagrams.as_flattened();
        match underlay::send_segments(underlay, addr, pieces, Some(size as u16)) {
            Ok(()) => return true,
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT)
                ) =>
            {
                if shared.gso.swap(false, Ordering::Relaxed) {
                    tracing::warn!(%error, %addr, "UDP GSO refused on the underlay: segments go one datagram at a time from now on");
                }
            }
            Err(_) => return false,
        }
    }
    // Every datagram is tried, whether or not an earlier one was refused.
    let refused = datagrams
        .iter()
        .filter(|pieces| underlay::send_segments(underlay, addr, &pieces[..], None).is_err())
        .count();
    refused == 0
}

fn set_nonblocking(file: &File) -> io::Result<()> {
    // SAFETY: F_GETFL takes no pointer; the fd is open for the call.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL takes an int by value; the fd is open for the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
