//! The switch of one node: its networks, local ports and remote VTEPs, and the forwarding
//! decision for each frame.
//!
//! The switch does no I/O. A worker hands it a frame that arrived from a local port
//! ([`Switch::port_ingress`]) or a datagram from the underlay socket ([`Switch::underlay_ingress`]) and
//! gets back a [`Verdict`] and, for [`Verdict::Forward`], the list of [`Egress`] the frame goes to,
//! in a `Vec` the worker owns and reuses. Sending is the worker's job.
//!
//! Invariants:
//! - A frame never leaves its network. A port belongs to exactly one network; each network has its
//!   own port list, VTEP list, MAC table and IP knowledge; a frame from the underlay is matched to
//!   a network by its VNI and accepted only from a VTEP of that network; an [`Egress::Vtep`] carries
//!   the VNI of the frame's network.
//! - A frame never goes back where it came from: not out of its ingress port, and a frame from the
//!   underlay never back to the underlay (split horizon: every node floods to every VTEP itself).
//! - Port security: a port sends only from its own MAC and claims only its own IP in ARP, unless it
//!   allows any MAC. So what the switch learns from ports (and answers in ARP) cannot be poisoned.
//!
//! Sharing across threads: forwarding takes `&self`; configuration takes `&mut self`. Keep the
//! switch in an `Arc<RwLock<Switch>>`: each worker (a vhost-user-net queue pair, a tap queue, the
//! underlay socket) takes the read lock once per batch of frames, and the control plane takes the
//! write lock for a change, which then waits for the batches in flight. Per frame, the switch
//! takes one lock, the mutex of the network's MAC table (to learn the source and look up the
//! destination together), and bumps relaxed atomic counters; it allocates nothing once the
//! caller's `Vec` has grown to the largest flood.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::arp::{self, ArpReply, REPLY_FRAME_LEN};
use crate::frame::{self, ETHERTYPE_ARP};
use crate::mac_table::{self, Location, MacTable};
use crate::stats::{DropReason, NetworkStats, TrafficCounters, TrafficStats};
use crate::vxlan::{self, Vni};
use crate::{Mac, NetworkId, PortId};

/// Smallest network MTU: the IPv4 minimum.
pub const MIN_MTU: u16 = 68;
/// Largest network MTU: a 9000-byte jumbo underlay less the VXLAN overhead.
pub const MAX_MTU: u16 = 9000 - vxlan::IPV4_OVERHEAD;
/// A network's MTU unless configured: a 1500-byte underlay less the VXLAN overhead.
pub const DEFAULT_MTU: u16 = 1500 - vxlan::IPV4_OVERHEAD;

/// Settings of the whole switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwitchConfig {
    /// Learned MAC entries per network (see [`mac_table`] for what happens when full).
    pub mac_limit: usize,
    /// How long a learned MAC lives without traffic from it.
    pub mac_aging: Duration,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        SwitchConfig {
            mac_limit: mac_table::DEFAULT_LIMIT,
            mac_aging: mac_table::DEFAULT_AGING,
        }
    }
}

/// A network as the control plane describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    pub id: NetworkId,
    pub vni: Vni,
    /// Largest payload (L3 packet) of a frame, [`MIN_MTU`]..=[`MAX_MTU`].
    pub mtu: u16,
}

/// A local port (guest NIC or tap device) as the control plane describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortConfig {
    pub id: PortId,
    pub network: NetworkId,
    /// The port's own MAC: frames to it are never flooded.
    pub mac: Mac,
    /// The port's IPv4 address, if known: ARP for it is answered by the switch, and the port may
    /// claim no other in ARP.
    pub ipv4: Option<Ipv4Addr>,
    /// Turns port security off: the port may send from any MAC and claim any IP (a nested bridge
    /// or router in the guest). Its other MACs are learned like remote ones.
    pub allow_any_mac: bool,
}

/// Where a forwarded frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Egress {
    /// Out of this local port, as it is.
    Port(PortId),
    /// To this VTEP, behind the VXLAN header of `vni` ([`vxlan::encode`]).
    Vtep { addr: SocketAddr, vni: Vni },
}

/// What to do with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send the frame to each [`Egress`] listed (none: nowhere to go). For a datagram from the
    /// underlay, the frame is the inner one: `&datagram[vxlan::HEADER_LEN..]`.
    Forward,
    /// The frame was an ARP request the switch answers: send this reply back out of the ingress
    /// port, and the request nowhere.
    Reply(ArpReply),
    /// The frame goes nowhere; the drop was counted (except [`DropReason::UnknownPort`], which
    /// has no port to be counted on).
    Drop(DropReason),
}

/// A configuration change the switch refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SwitchError {
    #[error("network {0} already exists on this switch")]
    NetworkExists(NetworkId),
    #[error("VNI {vni} is already used by network {network}")]
    VniInUse { vni: Vni, network: NetworkId },
    #[error("network {0} is not on this switch")]
    NoSuchNetwork(NetworkId),
    #[error("network {network} still has {ports} port(s); delete them first")]
    NetworkHasPorts { network: NetworkId, ports: usize },
    #[error("MTU {0} is out of range: it must be {MIN_MTU} to {MAX_MTU}")]
    MtuOutOfRange(u16),
    #[error("port {0} already exists on this switch")]
    PortExists(PortId),
    #[error("port {0} is not on this switch")]
    NoSuchPort(PortId),
    #[error("{mac} is not a unicast MAC; a port or MAC entry needs one")]
    NotUnicast { mac: Mac },
    #[error("MAC {mac} is already used by port {port} in network {network}")]
    MacInUse {
        mac: Mac,
        port: PortId,
        network: NetworkId,
    },
    #[error("IP {ip} is already used in network {network}")]
    IpInUse { ip: Ipv4Addr, network: NetworkId },
    #[error("port {port} is not in network {network}")]
    PortNotInNetwork { port: PortId, network: NetworkId },
}

/// Who an IP belongs to, for the ARP responder.
#[derive(Clone, Copy, Debug)]
struct IpOwner {
    mac: Mac,
    /// `None`: a port on another node, pushed by the control plane.
    local: Option<PortId>,
}

#[derive(Debug)]
struct Network {
    config: NetworkConfig,
    /// Local ports with their counters, to flood without a lookup per port.
    ports: Vec<(PortId, Arc<TrafficCounters>)>,
    /// Head-end replication list: the VTEPs of the other nodes with ports in this network.
    vteps: Vec<SocketAddr>,
    ips: HashMap<Ipv4Addr, IpOwner>,
    macs: Mutex<MacTable>,
}

impl Network {
    fn macs(&self) -> MutexGuard<'_, MacTable> {
        // A panic elsewhere while holding the lock leaves the table usable: every update of it is
        // a single map operation.
        self.macs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn vtep_of(&self, source: SocketAddr) -> Option<SocketAddr> {
        let ip = source.ip().to_canonical();
        self.vteps
            .iter()
            .copied()
            .find(|vtep| vtep.ip().to_canonical() == ip)
    }
}

#[derive(Debug)]
struct Port {
    config: PortConfig,
    counters: Arc<TrafficCounters>,
}

/// The bytes a frame is recognised by in an [`IngressMemo`]: a datagram from the underlay by its
/// VXLAN header (the VNI) and the inner frame's destination and source MAC addresses, a port's
/// frame by its MAC addresses (the rest zero).
const MEMO_KEY_LEN: usize = vxlan::HEADER_LEN + 12;

/// The last decision the switch made in a batch of frames from one place, if it can be reused for
/// the next frames of the same flow: a forward to a single destination
/// ([`Switch::underlay_ingress_in_run`], [`Switch::port_ingress_in_run`]). A memo lives for one
/// batch, under one hold of the switch: what it remembers is at most a batch old. The frames it
/// forwards are counted when it forgets them or is dropped, not one by one (an atomic add per frame
/// is a full barrier on x86, and stalls on the writes into the guest before it).
#[derive(Debug, Default)]
pub struct IngressMemo<'s> {
    last: Option<Remembered<'s>>,
}

impl<'s> IngressMemo<'s> {
    /// Remembers `decision` (counting what the last one forwarded).
    fn remember(&mut self, decision: Option<Remembered<'s>>) {
        self.forget();
        self.last = decision;
    }

    /// Counts what the remembered decision forwarded and forgets it.
    fn forget(&mut self) {
        if let Some(last) = self.last.take() {
            let Uncounted { received, sent } = last.uncounted;
            last.ingress.received_many(received.0, received.1);
            last.sent.sent_many(sent.0, sent.1);
        }
    }
}

impl Drop for IngressMemo<'_> {
    fn drop(&mut self) {
        self.forget();
    }
}

/// What a remembered decision forwarded and has not counted yet.
#[derive(Debug, Default, Clone, Copy)]
struct Uncounted {
    /// Frames and bytes for the ingress counters.
    received: (u64, u64),
    /// Frames and bytes for the egress counters.
    sent: (u64, u64),
}

impl Uncounted {
    fn add(total: &mut (u64, u64), bytes: usize) {
        total.0 += 1;
        total.1 += bytes as u64;
    }
}

/// Where the remembered frames came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MemoFrom {
    Vtep(SocketAddr),
    /// A port, and the frames' GSO segment size if they were GSO frames.
    Port(PortId, Option<u16>),
}

#[derive(Debug)]
struct Remembered<'s> {
    from: MemoFrom,
    key: [u8; MEMO_KEY_LEN],
    /// What the frames must fit.
    mtu: u16,
    /// The ingress port's counters (frames from the underlay count on the underlay's).
    ingress: &'s TrafficCounters,
    egress: Egress,
    /// Where what is sent counts, and the bytes it adds to each frame (a VXLAN header).
    sent: &'s TrafficCounters,
    sent_extra: usize,
    uncounted: Uncounted,
}

impl Remembered<'_> {
    fn matches(&self, from: MemoFrom, key: Option<&[u8]>) -> bool {
        self.from == from && key == Some(&self.key[..])
    }

    /// [`Remembered::matches`] for a port's frame, compared in place: a key built on the stack and read back at
    /// once stalls on store forwarding, and that waits for every store before it — here the previous frames'
    /// writes into guest memory, still waiting for cache lines the guest's CPU holds.
    fn matches_port_frame(&self, from: MemoFrom, frame: &[u8]) -> bool {
        self.from == from && frame.get(..12) == Some(&self.key[vxlan::HEADER_LEN..])
    }
}

/// A port frame's memo key: its MAC addresses behind zeroes.
fn port_memo_key(frame: &[u8]) -> Option<[u8; MEMO_KEY_LEN]> {
    let macs = frame.first_chunk::<12>()?;
    let mut key = [0; MEMO_KEY_LEN];
    key[vxlan::HEADER_LEN..].copy_from_slice(macs);
    Some(key)
}

/// The virtual switch of one node.
#[derive(Debug)]
pub struct Switch {
    config: SwitchConfig,
    networks: HashMap<NetworkId, Network>,
    vnis: HashMap<Vni, NetworkId>,
    ports: HashMap<PortId, Port>,
    underlay: TrafficCounters,
}

impl Switch {
    pub fn new(config: SwitchConfig) -> Self {
        Switch {
            config,
            networks: HashMap::new(),
            vnis: HashMap::new(),
            ports: HashMap::new(),
            underlay: TrafficCounters::default(),
        }
    }

    // ---- configuration, from the control plane ----

    pub fn add_network(&mut self, config: NetworkConfig) -> Result<(), SwitchError> {
        if self.networks.contains_key(&config.id) {
            return Err(SwitchError::NetworkExists(config.id));
        }
        if let Some(&network) = self.vnis.get(&config.vni) {
            return Err(SwitchError::VniInUse {
                vni: config.vni,
                network,
            });
        }
        if !(MIN_MTU..=MAX_MTU).contains(&config.mtu) {
            return Err(SwitchError::MtuOutOfRange(config.mtu));
        }
        self.vnis.insert(config.vni, config.id);
        let macs = MacTable::new(self.config.mac_limit, self.config.mac_aging);
        self.networks.insert(
            config.id,
            Network {
                config,
                ports: Vec::new(),
                vteps: Vec::new(),
                ips: HashMap::new(),
                macs: Mutex::new(macs),
            },
        );
        Ok(())
    }

    /// Removes a network that has no local ports left.
    pub fn remove_network(&mut self, id: NetworkId) -> Result<(), SwitchError> {
        let network = self.network(id)?;
        if !network.ports.is_empty() {
            return Err(SwitchError::NetworkHasPorts {
                network: id,
                ports: network.ports.len(),
            });
        }
        let vni = network.config.vni;
        self.networks.remove(&id);
        self.vnis.remove(&vni);
        Ok(())
    }

    pub fn add_port(&mut self, config: PortConfig) -> Result<(), SwitchError> {
        if self.ports.contains_key(&config.id) {
            return Err(SwitchError::PortExists(config.id));
        }
        if !config.mac.is_unicast() {
            return Err(SwitchError::NotUnicast { mac: config.mac });
        }
        let network = self.network(config.network)?;
        if let Some((port, _)) = network
            .ports
            .iter()
            .find(|(port, _)| self.ports[port].config.mac == config.mac)
        {
            return Err(SwitchError::MacInUse {
                mac: config.mac,
                port: *port,
                network: config.network,
            });
        }
        if let Some(ip) = config.ipv4
            && network.ips.contains_key(&ip)
        {
            return Err(SwitchError::IpInUse {
                ip,
                network: config.network,
            });
        }
        let counters = Arc::new(TrafficCounters::default());
        let network = self.network_mut(config.network)?;
        network.ports.push((config.id, Arc::clone(&counters)));
        network
            .macs()
            .set_static(config.mac, Location::Port(config.id));
        if let Some(ip) = config.ipv4 {
            network.ips.insert(
                ip,
                IpOwner {
                    mac: config.mac,
                    local: Some(config.id),
                },
            );
        }
        self.ports.insert(config.id, Port { config, counters });
        Ok(())
    }

    /// Removes a port with everything the switch knew through it; returns its last counters.
    pub fn remove_port(&mut self, id: PortId) -> Result<TrafficStats, SwitchError> {
        let port = self.ports.remove(&id).ok_or(SwitchError::NoSuchPort(id))?;
        let network = self.network_mut(port.config.network)?;
        network.ports.retain(|(other, _)| *other != id);
        network.ips.retain(|_, owner| owner.local != Some(id));
        network.macs().forget(Location::Port(id), true);
        Ok(port.counters.snapshot())
    }

    /// Sets the VTEPs (underlay address and VXLAN UDP port) of the other nodes with ports in
    /// `network`: BUM frames from local ports are replicated to each, and VXLAN from any other
    /// source is refused for this network. Learned MACs behind a VTEP that left are forgotten.
    pub fn set_vteps(
        &mut self,
        network: NetworkId,
        vteps: impl IntoIterator<Item = SocketAddr>,
    ) -> Result<(), SwitchError> {
        let network = self.network_mut(network)?;
        let mut vteps: Vec<SocketAddr> = vteps.into_iter().collect();
        vteps.sort_unstable();
        vteps.dedup();
        let mut macs = network.macs.lock().unwrap_or_else(PoisonError::into_inner);
        for gone in network.vteps.iter().filter(|vtep| !vteps.contains(vtep)) {
            macs.forget(Location::Vtep(*gone), false);
        }
        drop(macs);
        network.vteps = vteps;
        Ok(())
    }

    /// Pins `mac` in `network` to a VTEP or a local port of that network (control-plane
    /// knowledge: learning never overrides it, aging never removes it).
    pub fn set_static_mac(
        &mut self,
        network: NetworkId,
        mac: Mac,
        location: Location,
    ) -> Result<(), SwitchError> {
        if !mac.is_unicast() {
            return Err(SwitchError::NotUnicast { mac });
        }
        if let Location::Port(port) = location
            && self
                .ports
                .get(&port)
                .is_none_or(|p| p.config.network != network)
        {
            return Err(SwitchError::PortNotInNetwork { port, network });
        }
        self.network(network)?.macs().set_static(mac, location);
        Ok(())
    }

    /// Removes a static entry; returns whether there was one.
    pub fn remove_static_mac(&mut self, network: NetworkId, mac: Mac) -> Result<bool, SwitchError> {
        Ok(self.network(network)?.macs().remove_static(mac))
    }

    /// Tells the ARP responder that `ip` in `network` is at `mac` (a port on another node).
    pub fn set_remote_ip(
        &mut self,
        network: NetworkId,
        ip: Ipv4Addr,
        mac: Mac,
    ) -> Result<(), SwitchError> {
        if !mac.is_unicast() {
            return Err(SwitchError::NotUnicast { mac });
        }
        let network = self.network_mut(network)?;
        if network
            .ips
            .get(&ip)
            .is_some_and(|owner| owner.local.is_some())
        {
            return Err(SwitchError::IpInUse {
                ip,
                network: network.config.id,
            });
        }
        network.ips.insert(ip, IpOwner { mac, local: None });
        Ok(())
    }

    /// Forgets a remote IP; returns whether it was known.
    pub fn remove_remote_ip(
        &mut self,
        network: NetworkId,
        ip: Ipv4Addr,
    ) -> Result<bool, SwitchError> {
        let network = self.network_mut(network)?;
        if network
            .ips
            .get(&ip)
            .is_some_and(|owner| owner.local.is_none())
        {
            network.ips.remove(&ip);
            return Ok(true);
        }
        Ok(false)
    }

    // ---- forwarding, from the workers ----

    /// Decides where a frame from local port `port` goes; `out` is cleared and filled.
    pub fn port_ingress(
        &self,
        port: PortId,
        frame: &[u8],
        now: Instant,
        out: &mut Vec<Egress>,
    ) -> Verdict {
        self.port_ingress_in_run(&mut IngressMemo::default(), port, frame, None, now, out)
    }

    /// [`Switch::port_ingress`] for a segmentation-offload (GSO) frame: one of up to 64 KiB that
    /// stands for segments of at most `gso_size` payload bytes each, which is what must fit the
    /// network's MTU. Whoever cannot take it whole gets it cut ([`crate::offload`]).
    pub fn port_ingress_gso(
        &self,
        port: PortId,
        frame: &[u8],
        gso_size: u16,
        now: Instant,
        out: &mut Vec<Egress>,
    ) -> Verdict {
        self.port_ingress_in_run(
            &mut IngressMemo::default(),
            port,
            frame,
            Some(gso_size),
            now,
            out,
        )
    }

    /// The memo's part of [`Switch::port_ingress_in_run`], for a caller that wants the common case without an
    /// egress list: the single destination of a frame of the flow `memo` remembers (counted there), the reason
    /// such a frame is dropped (counted), or `None` if the switch must decide
    /// ([`Switch::port_ingress_deciding`]: another flow, or an ARP frame).
    pub fn port_ingress_remembered(
        &self,
        memo: &mut IngressMemo<'_>,
        port: PortId,
        frame: &[u8],
        gso_size: Option<u16>,
    ) -> Option<Result<Egress, DropReason>> {
        let last = memo.last.as_mut()?;
        if !last.matches_port_frame(MemoFrom::Port(port, gso_size), frame) {
            return None;
        }
        match frame::parse(frame, last.mtu) {
            Err(error) => {
                last.ingress.received(frame.len());
                last.ingress.dropped(error.into());
                Some(Err(error.into()))
            }
            Ok(header) if header.ethertype != ETHERTYPE_ARP => {
                Uncounted::add(&mut last.uncounted.received, frame.len());
                Uncounted::add(&mut last.uncounted.sent, last.sent_extra + frame.len());
                Some(Ok(last.egress))
            }
            Ok(_) => None,
        }
    }

    /// [`Switch::port_ingress`] (or, with `gso_size`, [`Switch::port_ingress_gso`]) for one of a
    /// batch of frames a port sent: a frame with the same MAC addresses (and GSO size) as the last
    /// one `memo` saw forwarded to a single destination goes there too, without the network, port
    /// security or the MAC table being looked at again; it is still checked (length, MTU, an ARP
    /// frame always takes the whole way) and counted.
    pub fn port_ingress_in_run<'s>(
        &'s self,
        memo: &mut IngressMemo<'s>,
        port: PortId,
        frame: &[u8],
        gso_size: Option<u16>,
        now: Instant,
        out: &mut Vec<Egress>,
    ) -> Verdict {
        out.clear();
        match self.port_ingress_remembered(memo, port, frame, gso_size) {
            Some(Ok(egress)) => {
                out.push(egress);
                Verdict::Forward
            }
            Some(Err(reason)) => Verdict::Drop(reason),
            None => self.port_ingress_deciding(memo, port, frame, gso_size, now, out),
        }
    }

    /// [`Switch::port_ingress_in_run`] for a frame [`Switch::port_ingress_remembered`] left to the switch: decided
    /// the whole way, and remembered in `memo` if it goes to a single destination. `out` must be empty.
    pub fn port_ingress_deciding<'s>(
        &'s self,
        memo: &mut IngressMemo<'s>,
        port: PortId,
        frame: &[u8],
        gso_size: Option<u16>,
        now: Instant,
        out: &mut Vec<Egress>,
    ) -> Verdict {
        memo.forget();
        let from = MemoFrom::Port(port, gso_size);
        let key = port_memo_key(frame);
        // A worker may still hold a frame of a port the control plane has just removed.
        let Some((ingress, network)) = self
            .ports
            .get(&port)
            .and_then(|ingress| Some((ingress, self.networks.get(&ingress.config.network)?)))
        else {
            return Verdict::Drop(DropReason::UnknownPort);
        };
        let counters = &ingress.counters;
        counters.received(frame.len());
        let drop = |reason| {
            counters.dropped(reason);
            Verdict::Drop(reason)
        };
        // A GSO frame's segments must fit the MTU; the frame itself only the 64 KiB of IP.
        let mtu = match gso_size {
            Some(size) if size == 0 || size > network.config.mtu => {
                return drop(DropReason::Oversized);
            }
            Some(_) => u16::MAX,
            None => network.config.mtu,
        };
        let header = match frame::parse(frame, mtu) {
            Ok(header) => header,
            Err(error) => return drop(error.into()),
        };
        if !header.src.is_unicast() {
            return drop(DropReason::InvalidSourceMac);
        }
        let secured = !ingress.config.allow_any_mac;
        if secured && header.src != ingress.config.mac {
            return drop(DropReason::SpoofedMac);
        }
        let mut reply = None;
        if header.ethertype == ETHERTYPE_ARP {
            let arp = match arp::parse(&frame[header.len..]) {
                Ok(arp) => arp,
                Err(error) => return drop(error.into()),
            };
            let claims_own_ip = match ingress.config.ipv4 {
                Some(ip) => arp.sender_ip == ip || arp.sender_ip.is_unspecified(),
                None => true,
            };
            if secured && (arp.sender_mac != ingress.config.mac || !claims_own_ip) {
                return drop(DropReason::SpoofedArp);
            }
            if arp.is_request && !arp.is_announcement() {
                reply = network
                    .ips
                    .get(&arp.target_ip)
                    .filter(|owner| owner.mac != arp.sender_mac)
                    .map(|owner| ArpReply::new(&header, &arp, owner.mac));
            }
        }

        let destination = {
            let mut macs = network.macs();
            macs.learn(header.src, Location::Port(port), now);
            if reply.is_some() || header.dst.is_multicast() {
                None
            } else {
                macs.lookup(header.dst, now)
            }
        };
        if let Some(reply) = reply {
            counters.sent(REPLY_FRAME_LEN);
            return Verdict::Reply(reply);
        }
        match destination {
            Some(Location::Port(to)) if to == port => drop(DropReason::SameSide),
            Some(Location::Port(to)) => {
                if let Some(egress) = self.ports.get(&to) {
                    egress.counters.sent(frame.len());
                    out.push(Egress::Port(to));
                    memo.remember(key.map(|key| Remembered {
                        from,
                        key,
                        mtu,
                        ingress: counters,
                        egress: Egress::Port(to),
                        sent: &egress.counters,
                        sent_extra: 0,
                        uncounted: Uncounted::default(),
                    }));
                }
                Verdict::Forward
            }
            Some(Location::Vtep(addr)) => {
                self.underlay.sent(vxlan::HEADER_LEN + frame.len());
                let egress = Egress::Vtep {
                    addr,
                    vni: network.config.vni,
                };
                out.push(egress);
                memo.remember(key.map(|key| Remembered {
                    from,
                    key,
                    mtu,
                    ingress: counters,
                    egress,
                    sent: &self.underlay,
                    sent_extra: vxlan::HEADER_LEN,
                    uncounted: Uncounted::default(),
                }));
                Verdict::Forward
            }
            None => {
                self.flood(network, Some(port), frame.len(), out);
                Verdict::Forward
            }
        }
    }

    /// Decides where the inner frame of a VXLAN datagram from `source` goes; `out` is cleared and
    /// filled (with local ports only).
    pub fn underlay_ingress(
        &self,
        source: SocketAddr,
        datagram: &[u8],
        now: Instant,
        out: &mut Vec<Egress>,
    ) -> Verdict {
        self.underlay_ingress_in_run(&mut IngressMemo::default(), source, datagram, now, out)
    }

    /// [`Switch::underlay_ingress`] for one of a run of datagrams: a datagram with the same sender,
    /// VXLAN header and inner MAC addresses as the last one `memo` saw forwarded to a single port
    /// goes there too, without looking the network, the VTEP or the MAC table up again (its frame
    /// is still checked, and everything counted).
    pub fn underlay_ingress_in_run<'s>(
        &'s self,
        memo: &mut IngressMemo<'s>,
        source: SocketAddr,
        datagram: &[u8],
        now: Instant,
        out: &mut Vec<Egress>,
    ) -> Verdict {
        out.clear();
        self.underlay.received(datagram.len());
        let drop = |reason| {
            self.underlay.dropped(reason);
            Verdict::Drop(reason)
        };
        if let Some(last) = &mut memo.last
            && last.matches(MemoFrom::Vtep(source), datagram.get(..MEMO_KEY_LEN))
        {
            let inner = &datagram[vxlan::HEADER_LEN..];
            if let Err(error) = frame::parse(inner, last.mtu) {
                return drop(error.into());
            }
            // The underlay counted the datagram on arrival, above.
            Uncounted::add(&mut last.uncounted.sent, last.sent_extra + inner.len());
            out.push(last.egress);
            return Verdict::Forward;
        }
        memo.forget();
        let (vni, inner) = match vxlan::decode(datagram) {
            Ok(decoded) => decoded,
            Err(error) => return drop(error.into()),
        };
        let Some(network) = self.vnis.get(&vni).and_then(|id| self.networks.get(id)) else {
            return drop(DropReason::UnknownVni);
        };
        let Some(vtep) = network.vtep_of(source) else {
            return drop(DropReason::UnknownVtep);
        };
        let header = match frame::parse(inner, network.config.mtu) {
            Ok(header) => header,
            Err(error) => return drop(error.into()),
        };
        if !header.src.is_unicast() {
            return drop(DropReason::InvalidSourceMac);
        }
        let destination = {
            let mut macs = network.macs();
            macs.learn(header.src, Location::Vtep(vtep), now);
            if header.dst.is_multicast() {
                None
            } else {
                macs.lookup(header.dst, now)
            }
        };
        match destination {
            Some(Location::Port(to)) => {
                if let Some(egress) = self.ports.get(&to) {
                    egress.counters.sent(inner.len());
                    out.push(Egress::Port(to));
                    if let Some(key) = datagram.first_chunk::<MEMO_KEY_LEN>() {
                        memo.remember(Some(Remembered {
                            from: MemoFrom::Vtep(source),
                            key: *key,
                            mtu: network.config.mtu,
                            ingress: &self.underlay,
                            egress: Egress::Port(to),
                            sent: &egress.counters,
                            sent_extra: 0,
                            uncounted: Uncounted::default(),
                        }));
                    }
                }
                Verdict::Forward
            }
            // Split horizon: the sending node reached every VTEP it had to.
            Some(Location::Vtep(_)) => drop(DropReason::SameSide),
            None => {
                self.flood(network, None, inner.len(), out);
                Verdict::Forward
            }
        }
    }

    /// Every local port of `network` but `ingress`; every VTEP too if the frame came from a
    /// local port.
    fn flood(&self, network: &Network, ingress: Option<PortId>, len: usize, out: &mut Vec<Egress>) {
        for (port, counters) in &network.ports {
            if Some(*port) != ingress {
                counters.sent(len);
                out.push(Egress::Port(*port));
            }
        }
        if ingress.is_some() {
            for &addr in &network.vteps {
                self.underlay.sent(vxlan::HEADER_LEN + len);
                out.push(Egress::Vtep {
                    addr,
                    vni: network.config.vni,
                });
            }
        }
    }

    /// Counts a frame the worker could not hand to `egress` (its queue was full, the socket
    /// refused it) as a [`DropReason::TxFailed`] drop of that port or of the underlay.
    pub fn delivery_failed(&self, egress: Egress) {
        match egress {
            Egress::Port(port) => {
                if let Some(port) = self.ports.get(&port) {
                    port.counters.dropped(DropReason::TxFailed);
                }
            }
            Egress::Vtep { .. } => self.underlay.dropped(DropReason::TxFailed),
        }
    }

    /// Sweeps aged MAC entries out of every network's table. Optional for correctness (aged
    /// entries are ignored anyway), but keeps the MAC table size metric true: call it every few
    /// seconds from a timer.
    pub fn expire(&self, now: Instant) {
        for network in self.networks.values() {
            network.macs().expire(now);
        }
    }

    // ---- what the switch knows ----

    pub fn network_config(&self, id: NetworkId) -> Option<&NetworkConfig> {
        self.networks.get(&id).map(|network| &network.config)
    }

    pub fn port_config(&self, id: PortId) -> Option<&PortConfig> {
        self.ports.get(&id).map(|port| &port.config)
    }

    /// The VTEP flood list of a network.
    pub fn vteps(&self, id: NetworkId) -> Option<&[SocketAddr]> {
        self.networks.get(&id).map(|network| &network.vteps[..])
    }

    /// Where frames to `mac` in `network` go now, if known.
    pub fn lookup_mac(&self, network: NetworkId, mac: Mac, now: Instant) -> Option<Location> {
        self.networks.get(&network)?.macs().lookup(mac, now)
    }

    pub fn port_stats(&self, id: PortId) -> Option<TrafficStats> {
        self.ports.get(&id).map(|port| port.counters.snapshot())
    }

    pub fn network_stats(&self, id: NetworkId) -> Option<NetworkStats> {
        let network = self.networks.get(&id)?;
        let macs = network.macs();
        Some(NetworkStats {
            mac_entries: macs.len(),
            learned_entries: macs.learned_len(),
            learning_refused: macs.refused(),
            mac_moves: macs.moves(),
        })
    }

    /// Counters of the VXLAN underlay (drops of datagrams that matched no network or VTEP, or
    /// whose inner frame was refused, are counted here).
    pub fn underlay_stats(&self) -> TrafficStats {
        self.underlay.snapshot()
    }

    fn network(&self, id: NetworkId) -> Result<&Network, SwitchError> {
        self.networks.get(&id).ok_or(SwitchError::NoSuchNetwork(id))
    }

    fn network_mut(&mut self, id: NetworkId) -> Result<&mut Network, SwitchError> {
        self.networks
            .get_mut(&id)
            .ok_or(SwitchError::NoSuchNetwork(id))
    }
}

#[cfg(test)]
mod tests;
