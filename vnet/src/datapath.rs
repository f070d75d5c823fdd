//! The switch's I/O on one node: the frames of its tap ports and of its VXLAN underlay socket,
//! moved through the [`Switch`]'s decisions by one thread, the switching core.
//!
//! The core waits in epoll on every tap queue, the underlay socket and a wake-up eventfd, so an
//! idle switch uses no CPU. For each readable tap queue it reads up to [`BATCH`] frames, asks the
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
//! Besides taps, a port may be *virtual*: frames from it arrive in a [`PortInbox`] that another
//! thread fills (a vhost-user-net queue worker with what its guest transmits) and wakes the core
//! through; frames to it go to its [`FrameSink`] (that worker's receive queue). The core treats
//! an inbox like a tap queue. A GSO frame for a sink that cannot take one (its guest did not
//! negotiate TSO) is cut into segments first.
//!
//! Offloads: taps are opened with checksum and TCP segmentation offloads (IPv4, IPv6, ECN), so the
//! kernel hands over frames of up to 64 KiB with partial checksums, described by their virtio-net
//! header. Between taps the frame and its header pass as they are: nobody segments or checksums
//! anything. The overlay carries MTU-sized frames, and moves them in bulk both ways:
//! - To a VTEP, a GSO frame is cut into segments in software ([`offload::segment_tcp_into`]),
//!   each laid behind its VXLAN header back to back in one buffer, and the run goes to the kernel
//!   in one `sendmsg` with UDP GSO ([`crate::underlay::send_segments`]), which makes the
//!   datagrams. If the kernel or route refuses UDP GSO, the core says so once and sends one
//!   datagram per call from then on. A frame with only a partial checksum has it completed and
//!   goes as one datagram.
//! - From the underlay, the socket has UDP GRO on: one read may return a run of datagrams of one
//!   sender, which the core cuts up again ([`crate::underlay::datagrams`]). Every datagram gets
//!   its own switch decision (learning, counters, isolation, drops). Those the switch sends to a
//!   single port go through a [`Coalescer`]: consecutive TCP segments of a flow are merged into one
//!   64 KiB frame, written to the tap once behind a GSO header, as the kernel's own GRO would
//!   hand it up; everything else is written as it came behind an all-zero header. Nothing is held
//!   past the end of a batch. A read that cannot be cut up (its segment size is zero or larger
//!   than what was read, or it was truncated) is counted as one `vxlan_too_short` drop.
//!
//! The underlay socket's buffers are enlarged ([`crate::underlay::SOCKET_BUFFER_LEN`]): a run
//! takes 64 KiB of them, and the kernel's default holds only a few.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::gro::{Coalesced, Coalescer};
use crate::offload::{self, VirtioNetHeader};
use crate::stats::TrafficStats;
use crate::switch::{Egress, PortConfig, Switch, SwitchConfig, SwitchError, Verdict};
use crate::tap::{Offloads, Tap, TapError, VNET_HDR_LEN};
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
    underlay: UdpSocket,
    wake: EventFd,
    changes: Mutex<Vec<Change>>,
    stop: AtomicBool,
}

enum Change {
    Add(PortId, Vec<File>),
    AddVirtual(PortId, Arc<PortInbox>, Arc<dyn FrameSink>),
    Remove(PortId),
}

impl std::fmt::Debug for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Add(port, queues) => write!(f, "add tap port {port} ({} queues)", queues.len()),
            Change::AddVirtual(port, ..) => write!(f, "add virtual port {port}"),
            Change::Remove(port) => write!(f, "remove port {port}"),
        }
    }
}

/// Where the frames a virtual port receives go (e.g. a vhost-user-net guest's receive queue).
/// Called on the switching core: must not block.
pub trait FrameSink: Send + Sync + 'static {
    /// Takes one frame and its virtio-net header (copied; the slices are valid only during the
    /// call); false if it could not (full, closed), which is counted as a `tx_failed` drop.
    fn push(&self, header: &VirtioNetHeader, frame: &[u8]) -> bool;
    /// Whether a GSO frame with `header` may be pushed whole (the port negotiated that kind of
    /// segmentation offload); if not, the core pushes its segments.
    fn accepts_gso(&self, header: &VirtioNetHeader) -> bool;
}

/// Frames a virtual port sends into the switch, waiting for the core. Bounded: a full inbox
/// refuses more (the pusher counts the drop).
#[derive(Debug)]
pub struct PortInbox {
    frames: Mutex<std::collections::VecDeque<(VirtioNetHeader, Vec<u8>)>>,
    capacity: usize,
    wake: EventFd,
}

impl PortInbox {
    /// An inbox holding at most `capacity` frames.
    pub fn new(capacity: usize) -> io::Result<Self> {
        Ok(PortInbox {
            frames: Mutex::new(std::collections::VecDeque::with_capacity(
                capacity.min(4096),
            )),
            capacity: capacity.max(1),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Queues a frame (copied); false if the inbox is full or the frame larger than a GSO frame
    /// can be. Call [`PortInbox::wake`] after a batch.
    pub fn push(&self, header: &VirtioNetHeader, frame: &[u8]) -> bool {
        if frame.len() > MAX_GSO_FRAME {
            return false;
        }
        let mut frames = self.frames.lock().unwrap_or_else(PoisonError::into_inner);
        if frames.len() >= self.capacity {
            return false;
        }
        frames.push_back((*header, frame.to_vec()));
        true
    }

    /// Tells the core that frames wait.
    pub fn wake(&self) {
        // A full counter still leaves the core a wake-up pending.
        let _ = self.wake.write(1);
    }

    /// Up to `max` frames, oldest first; the core is woken again if more remain.
    fn take(&self, max: usize) -> Vec<(VirtioNetHeader, Vec<u8>)> {
        let _ = self.wake.read();
        let mut frames = self.frames.lock().unwrap_or_else(PoisonError::into_inner);
        let count = frames.len().min(max);
        let taken: Vec<_> = frames.drain(..count).collect();
        if !frames.is_empty() {
            let _ = self.wake.write(1);
        }
        taken
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
            underlay,
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
            outgoing: Vec::with_capacity(
                underlay::MAX_SEGMENTS_LEN + vxlan::HEADER_LEN + MAX_FRAME,
            ),
            gso,
            coalescer: Coalescer::new(),
            out: Vec::new(),
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
        tap.set_offloads(Offloads {
            csum: true,
            tso4: true,
            tso6: true,
            tso_ecn: true,
        })?;
        let queues = tap.into_queues();
        for queue in &queues {
            set_nonblocking(queue).map_err(AddPortError::Io)?;
        }
        self.configure().add_port(config)?;
        self.change(Change::Add(config.id, queues));
        Ok(())
    }

    /// Plugs a virtual port into the switch as `config`: its frames come from `inbox` (which
    /// wakes the core), frames for it go to `sink`.
    pub fn add_virtual_port(
        &self,
        config: PortConfig,
        inbox: Arc<PortInbox>,
        sink: Arc<dyn FrameSink>,
    ) -> Result<(), AddPortError> {
        self.configure().add_port(config)?;
        self.change(Change::AddVirtual(config.id, inbox, sink));
        Ok(())
    }

    /// Unplugs a port; returns its last counters. Its queues are closed by the core.
    pub fn remove_port(&self, id: PortId) -> Result<TrafficStats, SwitchError> {
        let stats = self.configure().remove_port(id)?;
        self.change(Change::Remove(id));
        Ok(stats)
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

/// How the core reaches a port.
enum PortIo {
    /// A tap's queues, each with its epoll token.
    Tap(Vec<(u64, File)>),
    /// A virtual port: its inbox (with its epoll token) and its sink.
    Virtual {
        token: u64,
        inbox: Arc<PortInbox>,
        sink: Arc<dyn FrameSink>,
    },
}

/// The queue index [`Core::tokens`] gives a virtual port's inbox.
const INBOX: usize = usize::MAX;

/// The switching core's own state: the port queues it serves and its buffers.
struct Core {
    shared: Arc<Shared>,
    epoll: Epoll,
    ports: HashMap<PortId, PortIo>,
    /// Epoll token → port and queue index ([`INBOX`] for a virtual port's inbox).
    tokens: HashMap<u64, (PortId, usize)>,
    next_token: u64,
    /// A frame read from a tap: its virtio-net header, then the frame.
    frame: Vec<u8>,
    /// What one read from the underlay gave: a datagram (VXLAN header, then the frame), or a run
    /// of them the kernel coalesced.
    received: Vec<u8>,
    /// Datagrams being built for the underlay: one, or a run of segments sent at once.
    outgoing: Vec<u8>,
    /// Whether runs of segments go to the underlay in one send (UDP GSO); cleared for good the
    /// first time the kernel refuses one.
    gso: bool,
    /// TCP segments from the underlay, merged per flow before they go to a tap.
    coalescer: Coalescer<PortId>,
    out: Vec<Egress>,
}

impl Core {
    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        let mut swept = Instant::now();
        let timeout = i32::try_from(EXPIRE_INTERVAL.as_millis()).unwrap_or(i32::MAX);
        loop {
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
            for event in &events[..ready] {
                match event.data() {
                    TOKEN_WAKE => {
                        let _ = self.shared.wake.read();
                        self.apply_changes();
                    }
                    TOKEN_UNDERLAY => self.serve_underlay(),
                    token => self.serve_queue(token),
                }
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
                    self.ports.insert(port, PortIo::Tap(served));
                }
                Change::AddVirtual(port, inbox, sink) => {
                    self.drop_port(port);
                    let token = self.next_token;
                    self.next_token += 1;
                    match self.epoll.ctl(
                        ControlOperation::Add,
                        inbox.wake.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, token),
                    ) {
                        Ok(()) => {
                            self.tokens.insert(token, (port, INBOX));
                        }
                        Err(error) => {
                            tracing::warn!(%port, %error, "a virtual port's inbox cannot be served");
                        }
                    }
                    self.ports
                        .insert(port, PortIo::Virtual { token, inbox, sink });
                }
                Change::Remove(port) => self.drop_port(port),
            }
        }
    }

    fn drop_port(&mut self, port: PortId) {
        match self.ports.remove(&port) {
            Some(PortIo::Tap(queues)) => {
                for (token, queue) in queues {
                    self.tokens.remove(&token);
                    let _ = self.epoll.ctl(
                        ControlOperation::Delete,
                        queue.as_raw_fd(),
                        EpollEvent::default(),
                    );
                }
            }
            Some(PortIo::Virtual { token, inbox, .. }) => {
                self.tokens.remove(&token);
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    inbox.wake.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            None => {}
        }
    }

    /// Frames from one tap queue or virtual port inbox, up to a batch.
    fn serve_queue(&mut self, token: u64) {
        let Some(&(port, index)) = self.tokens.get(&token) else {
            return;
        };
        let shared = Arc::clone(&self.shared);
        let switch = shared.switch.read().unwrap_or_else(PoisonError::into_inner);
        if index == INBOX {
            let Some(PortIo::Virtual { inbox, .. }) = self.ports.get(&port) else {
                return;
            };
            for (header, frame) in inbox.take(BATCH) {
                let len = VNET_HDR_LEN + frame.len();
                if len > self.frame.len() {
                    continue;
                }
                self.frame[..VNET_HDR_LEN].copy_from_slice(&header.to_bytes());
                self.frame[VNET_HDR_LEN..len].copy_from_slice(&frame);
                self.forward(&switch, port, 0, len);
            }
            return;
        }
        for _ in 0..BATCH {
            let Some(PortIo::Tap(queues)) = self.ports.get(&port) else {
                return;
            };
            let Some(queue) = queues.get(index) else {
                return;
            };
            let len = match (&queue.1).read(&mut self.frame) {
                Ok(len) => len,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    // The device is gone (deleted from under us): stop polling this queue.
                    tracing::warn!(%port, queue = index, %error, "a port queue fails; no longer served");
                    let _ = self.epoll.ctl(
                        ControlOperation::Delete,
                        queue.1.as_raw_fd(),
                        EpollEvent::default(),
                    );
                    self.tokens.remove(&token);
                    return;
                }
            };
            self.forward(&switch, port, index, len);
        }
        // More may be waiting: epoll is level-triggered, so the queue comes up again.
    }

    /// Forwards the frame in `self.frame[..len]` (a virtio-net header, then the frame) that
    /// `port` sent on queue `index`, as the switch decides.
    fn forward(&mut self, switch: &Switch, port: PortId, index: usize, len: usize) {
        let Some(header) = VirtioNetHeader::parse(&self.frame[..len]) else {
            return;
        };
        let frame = &self.frame[VNET_HDR_LEN..len];
        let now = Instant::now();
        let verdict = if header.is_gso() {
            switch.port_ingress_gso(port, frame, header.gso_size, now, &mut self.out)
        } else {
            switch.port_ingress(port, frame, now, &mut self.out)
        };
        match verdict {
            Verdict::Forward => {
                let mut tx = Tx {
                    ports: &self.ports,
                    underlay: &self.shared.underlay,
                    outgoing: &mut self.outgoing,
                    gso: &mut self.gso,
                };
                for &egress in &self.out {
                    if !tx.send(egress, &header, &self.frame[..len], index) {
                        switch.delivery_failed(egress);
                    }
                }
            }
            Verdict::Reply(reply) => {
                if !write_port(
                    &self.ports,
                    port,
                    index,
                    &[0; VNET_HDR_LEN],
                    reply.as_bytes(),
                ) {
                    switch.delivery_failed(Egress::Port(port));
                }
            }
            Verdict::Drop(_) => {}
        }
    }

    /// Datagrams from the underlay, up to a batch of reads. Each datagram gets its own switch
    /// decision; TCP segments of one flow that go to one port are merged before they are written
    /// (see [`crate::gro`]), and what is held is written before the batch ends.
    fn serve_underlay(&mut self) {
        let Core {
            shared,
            ports,
            received: buffer,
            coalescer,
            out,
            ..
        } = self;
        let switch = shared.switch.read().unwrap_or_else(PoisonError::into_inner);
        let mut deliver = |port: PortId, coalesced: Coalesced<'_>| {
            let header = coalesced.header.to_bytes();
            if !write_port(ports, port, 0, &header, coalesced.frame) {
                for _ in 0..coalesced.segments {
                    switch.delivery_failed(Egress::Port(port));
                }
            }
        };
        for _ in 0..BATCH {
            let received = match underlay::receive(&shared.underlay, buffer) {
                Ok(received) => received,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                // An ICMP error of an earlier send (a VTEP that is not listening): nothing to read.
                Err(_) => continue,
            };
            let now = Instant::now();
            let read = &buffer[..received.len];
            let datagrams = match underlay::datagrams(read, received.segment_size) {
                Ok(datagrams) if !received.truncated => datagrams,
                // Nothing in it can be trusted to be a whole datagram: the switch counts it as a
                // datagram too short for its VXLAN header, and drops it.
                _ => {
                    switch.underlay_ingress(received.source, &[], now, out);
                    continue;
                }
            };
            for datagram in datagrams {
                if let Verdict::Forward =
                    switch.underlay_ingress(received.source, datagram, now, out)
                {
                    let inner = &datagram[vxlan::HEADER_LEN..];
                    if let [Egress::Port(port)] = out[..] {
                        coalescer.push(port, inner, &mut deliver);
                        continue;
                    }
                    // A flooded frame may belong to a flow held for one of its ports: what is
                    // held goes first, so no flow's frames pass each other.
                    coalescer.flush(&mut deliver);
                    for &egress in out.iter() {
                        if let Egress::Port(port) = egress
                            && !write_port(ports, port, 0, &[0; VNET_HDR_LEN], inner)
                        {
                            switch.delivery_failed(egress);
                        }
                    }
                }
            }
        }
        coalescer.flush(&mut deliver);
    }
}

/// What sending a frame from a tap needs.
struct Tx<'a> {
    ports: &'a HashMap<PortId, PortIo>,
    underlay: &'a UdpSocket,
    outgoing: &'a mut Vec<u8>,
    gso: &'a mut bool,
}

impl Tx<'_> {
    /// Sends `read` (a virtio-net header, then the frame, as read from a tap) to `egress`;
    /// `queue_hint` picks the tap queue (the ingress queue's index, so a flow stays on one).
    fn send(
        &mut self,
        egress: Egress,
        header: &VirtioNetHeader,
        read: &[u8],
        queue_hint: usize,
    ) -> bool {
        let (header_bytes, frame) = read.split_at(VNET_HDR_LEN);
        match egress {
            Egress::Port(port) => write_port(self.ports, port, queue_hint, header_bytes, frame),
            Egress::Vtep { addr, vni } => {
                let vxlan = vxlan::encode(vni);
                if header.is_gso() {
                    return self.send_segments(addr, &vxlan, header, frame);
                }
                self.outgoing.clear();
                self.outgoing.extend_from_slice(&vxlan);
                self.outgoing.extend_from_slice(frame);
                if header.flags & offload::FLAG_NEEDS_CSUM != 0
                    && offload::complete_checksum(header, &mut self.outgoing[vxlan::HEADER_LEN..])
                        .is_err()
                {
                    return false;
                }
                self.underlay.send_to(self.outgoing, addr).is_ok()
            }
        }
    }

    /// Cuts a GSO frame into segments and sends each, behind `vxlan`, to `addr`: laid back to
    /// back in runs of at most [`underlay::MAX_SEGMENTS`] that go in one send each (UDP GSO).
    fn send_segments(
        &mut self,
        addr: SocketAddr,
        vxlan: &[u8; vxlan::HEADER_LEN],
        header: &VirtioNetHeader,
        frame: &[u8],
    ) -> bool {
        let Tx {
            underlay,
            outgoing,
            gso,
            ..
        } = self;
        outgoing.clear();
        let (mut size, mut count, mut sent) = (0, 0, true);
        let cut = offload::segment_tcp_into(header, frame, vxlan, outgoing, |run| {
            count += 1;
            if count == 1 {
                // The first datagram is full-sized, unless it is the only one.
                size = run.len();
            }
            if count == underlay::MAX_SEGMENTS || run.len() + size > underlay::MAX_SEGMENTS_LEN {
                sent &= send_run(underlay, addr, run, size, gso);
                run.clear();
                count = 0;
            }
        });
        if !outgoing.is_empty() {
            sent &= send_run(underlay, addr, outgoing, size, gso);
        }
        cut.is_ok() && sent
    }
}

/// Sends `run`, datagrams of `size` bytes back to back (the last may be shorter), to `addr`: in
/// one send if `gso` allows, else one at a time. A kernel or route that refuses UDP GSO clears
/// `gso` for good (the run then goes one datagram at a time).
fn send_run(
    underlay: &UdpSocket,
    addr: SocketAddr,
    run: &[u8],
    size: usize,
    gso: &mut bool,
) -> bool {
    if *gso && run.len() > size {
        match underlay::send_segments(underlay, addr, run, size as u16) {
            Ok(()) => return true,
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT)
                ) =>
            {
                tracing::warn!(%error, %addr, "UDP GSO refused on the underlay: segments go one datagram at a time from now on");
                *gso = false;
            }
            Err(_) => return false,
        }
    }
    // Every datagram is tried, whether or not an earlier one was refused.
    let refused = run
        .chunks(size.max(1))
        .filter(|datagram| underlay.send_to(datagram, addr).is_err())
        .count();
    refused == 0
}

/// Hands a frame, behind its virtio-net header, to `port`: written to one of a tap's queues, or
/// pushed to a virtual port's sink (cut into segments first if it is a GSO frame the sink cannot
/// take). False if the port would not take it (full, or gone).
fn write_port(
    ports: &HashMap<PortId, PortIo>,
    port: PortId,
    queue_hint: usize,
    header: &[u8],
    frame: &[u8],
) -> bool {
    match ports.get(&port) {
        Some(PortIo::Tap(queues)) if !queues.is_empty() => {
            let (_, queue) = &queues[queue_hint % queues.len()];
            let written = (&*queue).write_vectored(&[IoSlice::new(header), IoSlice::new(frame)]);
            // A tap takes a frame whole or not at all.
            written.is_ok_and(|n| n == VNET_HDR_LEN + frame.len())
        }
        Some(PortIo::Virtual { sink, .. }) => {
            let Some(header) = VirtioNetHeader::parse(header) else {
                return false;
            };
            if !header.is_gso() || sink.accepts_gso(&header) {
                return sink.push(&header, frame);
            }
            let plain = VirtioNetHeader::default();
            let mut scratch = Vec::new();
            let mut pushed = true;
            offload::segment_tcp(&header, frame, &mut scratch, |segment| {
                pushed &= sink.push(&plain, segment);
            })
            .is_ok()
                && pushed
        }
        _ => false,
    }
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
