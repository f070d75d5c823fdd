//! Overlay networks and their ports: what each node's virtual switch is to serve.
//!
//! A [`Network`] is an isolated L2 segment with a VNI, an MTU and optionally an IPv4 subnet. A [`Port`] is a
//! guest NIC (a vhost-user-net socket) or a tap device in one network, served by the switch of one node (the node
//! the create request was sent to). Ids of both come from counters in the state ([`IdCounters`]) and are never
//! reused, so a data plane that keys on them never mistakes a new object for a deleted one.
//!
//! Invariants the commands keep, so every node's switch can rely on them: names and VNIs are unique among
//! networks; MACs and IPs are unique within a network; a socket path or tap name is used once per node (socket
//! paths also count volume attachments); every port's network and node exist. The data plane reads the state
//! through [`ClusterState::ports_on`] and [`ClusterState::network_nodes`].

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use vessel_proto::net::{Ipv4Subnet, MacAddress};

use super::command::{CommandError, CommandOutcome, validate_name};
use super::{ClusterState, NodeId};

/// A network's id: assigned by the state, never reused (the switch's `vnet::NetworkId` carries the same number).
pub type NetworkId = u64;
/// A port's id: assigned by the state, never reused (the switch's `vnet::PortId` carries the same number).
pub type PortId = u64;

/// Smallest network MTU (the IPv4 minimum); matches the switch's `vnet::switch::MIN_MTU`.
pub const MIN_MTU: u16 = 68;
/// Largest network MTU: a 9000-byte jumbo underlay less the 50 bytes of VXLAN; matches `vnet::switch::MAX_MTU`.
pub const MAX_MTU: u16 = 8950;
/// MTU of a network created without one: a 1500-byte underlay less VXLAN; matches `vnet::switch::DEFAULT_MTU`.
pub const DEFAULT_MTU: u16 = 1450;
/// Largest VNI: VXLAN carries 24 bits (RFC 7348). VNI 0 is not used.
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// Most queue pairs a port may have.
pub const MAX_PORT_QUEUES: u16 = 16;
/// Longest tap device name: Linux's IFNAMSIZ (16) less the terminating NUL.
pub const MAX_IFNAME_LEN: usize = 15;

/// The next ids to hand out. Starting at 1 keeps 0 free to mean "none" in the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdCounters {
    pub next_network: NetworkId,
    pub next_port: PortId,
}

impl Default for IdCounters {
    fn default() -> Self {
        Self {
            next_network: 1,
            next_port: 1,
        }
    }
}

/// An isolated L2 segment spanning the nodes that have ports in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub id: NetworkId,
    pub name: String,
    /// VXLAN network identifier, 1..=[`MAX_VNI`], unique in the cluster.
    pub vni: u32,
    /// Largest L3 packet, [`MIN_MTU`]..=[`MAX_MTU`].
    pub mtu: u16,
    pub subnet: Option<Ipv4Subnet>,
    /// Creation time, seconds since the Unix epoch, as stamped by the proposer.
    pub created_unix: i64,
}

/// What carries a port's frames on its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PortKind {
    /// A guest NIC: Vessel listens on `socket` as the vhost-user-net backend.
    VhostUser {
        /// Absolute path of the socket.
        socket: String,
        /// Queue pairs, 1..=[`MAX_PORT_QUEUES`].
        queues: u16,
        /// Permission bits of the socket file; never world-writable.
        socket_mode: u32,
    },
    /// A tap device, created or adopted by name.
    Tap {
        ifname: String,
        /// Queues (IFF_MULTI_QUEUE), 1..=[`MAX_PORT_QUEUES`].
        queues: u16,
    },
}

impl PortKind {
    /// "vhost-user" or "tap", as the CLI spells the option.
    pub fn label(&self) -> &'static str {
        match self {
            Self::VhostUser { .. } => "vhost-user",
            Self::Tap { .. } => "tap",
        }
    }

    pub fn queues(&self) -> u16 {
        match self {
            Self::VhostUser { queues, .. } | Self::Tap { queues, .. } => *queues,
        }
    }

    /// The socket path or the tap name: what names the port on its node.
    pub fn endpoint(&self) -> &str {
        match self {
            Self::VhostUser { socket, .. } => socket,
            Self::Tap { ifname, .. } => ifname,
        }
    }
}

impl fmt::Display for PortKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::VhostUser { socket, .. } => write!(f, "vhost-user socket {socket}"),
            Self::Tap { ifname, .. } => write!(f, "tap {ifname}"),
        }
    }
}

/// A port of a network, served by one node's switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    pub id: PortId,
    pub network: NetworkId,
    pub node: NodeId,
    pub kind: PortKind,
    /// A unicast MAC, unique in the network: frames to it are never flooded.
    pub mac: MacAddress,
    /// Unique in the network, inside its subnet when it has one: ARP for it is answered by the switch.
    pub ipv4: Option<Ipv4Addr>,
    /// Port security off: the port may send from any MAC and claim any IP.
    pub allow_any_mac: bool,
    /// Creation time, seconds since the Unix epoch, as stamped by the proposer.
    pub created_unix: i64,
}

/// The port a user named, as [`ClusterState::find_port`] resolves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortMatch<'a> {
    Found(&'a Port),
    NotFound,
    /// A socket path or tap name used on several nodes: the ids of the candidates.
    Ambiguous(Vec<PortId>),
}

/// Whether `ifname` is a name Linux accepts for a network device, and why not.
pub fn check_ifname(ifname: &str) -> Result<(), &'static str> {
    if ifname.is_empty() {
        return Err("it is empty");
    }
    if ifname.len() > MAX_IFNAME_LEN {
        return Err("it is longer than 15 bytes (IFNAMSIZ)");
    }
    if ifname == "." || ifname == ".." {
        return Err("'.' and '..' are not device names");
    }
    if ifname
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err("it must not contain '/', ':', whitespace or control characters");
    }
    Ok(())
}

impl ClusterState {
    /// Looks a network up by name, then by id (decimal).
    pub fn network_by_name_or_id(&self, key: &str) -> Option<&Network> {
        self.networks
            .values()
            .find(|network| network.name == key)
            .or_else(|| {
                key.parse::<NetworkId>()
                    .ok()
                    .and_then(|id| self.networks.get(&id))
            })
    }

    /// Looks a port up by what users type: a decimal number is its id; a path (starting with '/') is a
    /// vhost-user socket; anything else is a tap name. A socket or tap name is unique per node, so the same one on
    /// two nodes is [`PortMatch::Ambiguous`].
    pub fn find_port(&self, key: &str) -> PortMatch<'_> {
        if !key.is_empty() && key.bytes().all(|b| b.is_ascii_digit()) {
            return key
                .parse::<PortId>()
                .ok()
                .and_then(|id| self.ports.get(&id))
                .map_or(PortMatch::NotFound, PortMatch::Found);
        }
        let by_socket = key.starts_with('/');
        let matches: Vec<&Port> = self
            .ports
            .values()
            .filter(|port| match &port.kind {
                PortKind::VhostUser { socket, .. } => by_socket && socket == key,
                PortKind::Tap { ifname, .. } => !by_socket && ifname == key,
            })
            .collect();
        match matches.as_slice() {
            [] => PortMatch::NotFound,
            [port] => PortMatch::Found(port),
            many => PortMatch::Ambiguous(many.iter().map(|port| port.id).collect()),
        }
    }

    /// The ports `node`'s switch serves, in id order.
    pub fn ports_on(&self, node: NodeId) -> impl Iterator<Item = &Port> {
        self.ports.values().filter(move |port| port.node == node)
    }

    /// The ports of `network`, in id order.
    pub fn ports_in(&self, network: NetworkId) -> impl Iterator<Item = &Port> {
        self.ports
            .values()
            .filter(move |port| port.network == network)
    }

    /// The nodes with at least one port in `network`: the VTEPs its broadcast and unknown frames are replicated
    /// to, and whose switches must know the network.
    pub fn network_nodes(&self, network: NetworkId) -> BTreeSet<NodeId> {
        self.ports_in(network).map(|port| port.node).collect()
    }

    /// A network as users name it: its name, or its id when unknown.
    pub fn network_label(&self, network: NetworkId) -> String {
        self.networks
            .get(&network)
            .map_or_else(|| network.to_string(), |n| n.name.clone())
    }

    /// What uses the vhost-user socket `socket` on `node`, if anything: a port or a volume attachment.
    pub(super) fn socket_user(&self, node: NodeId, socket: &str) -> Option<SocketUser> {
        if let Some(port) = self.ports_on(node).find(
            |port| matches!(&port.kind, PortKind::VhostUser { socket: used, .. } if used == socket),
        ) {
            return Some(SocketUser::Port {
                id: port.id,
                network: self.network_label(port.network),
            });
        }
        self.attachments_on(node)
            .find(|attachment| attachment.socket == socket)
            .map(|attachment| {
                SocketUser::Volume(
                    self.volumes
                        .get(&attachment.volume)
                        .map_or_else(|| attachment.volume.to_string(), |v| v.name.clone()),
                )
            })
    }

    pub(super) fn create_network(
        &mut self,
        name: String,
        vni: u32,
        mtu: Option<u16>,
        subnet: Option<Ipv4Subnet>,
        created_unix: i64,
    ) -> Result<CommandOutcome, CommandError> {
        validate_name("network", &name)?;
        if name.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CommandError::InvalidName {
                kind: "network".to_owned(),
                name,
                reason: "it looks like an id (all digits)".to_owned(),
            });
        }
        if self.networks.values().any(|network| network.name == name) {
            return Err(CommandError::NetworkExists { name });
        }
        if !(1..=MAX_VNI).contains(&vni) {
            return Err(CommandError::InvalidVni { vni });
        }
        if let Some(other) = self.networks.values().find(|network| network.vni == vni) {
            return Err(CommandError::VniTaken {
                vni,
                network: other.name.clone(),
            });
        }
        let mtu = mtu.unwrap_or(DEFAULT_MTU);
        if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
            return Err(CommandError::InvalidMtu { mtu });
        }
        if let Some(subnet) = &subnet {
            subnet
                .check()
                .map_err(|error| CommandError::InvalidSubnet {
                    reason: error.to_string(),
                })?;
        }
        let id = self.counters.next_network;
        self.counters.next_network += 1;
        self.networks.insert(
            id,
            Network {
                id,
                name,
                vni,
                mtu,
                subnet,
                created_unix,
            },
        );
        Ok(CommandOutcome::NetworkCreated { id })
    }

    pub(super) fn delete_network(
        &mut self,
        id: NetworkId,
        force: bool,
    ) -> Result<CommandOutcome, CommandError> {
        let network = self
            .networks
            .get(&id)
            .ok_or_else(|| CommandError::NetworkNotFound {
                network: id.to_string(),
            })?;
        let ports: Vec<PortId> = self.ports_in(id).map(|port| port.id).collect();
        if !ports.is_empty() && !force {
            return Err(CommandError::NetworkHasPorts {
                name: network.name.clone(),
                ports: ports.len(),
            });
        }
        let ports = ports
            .iter()
            .filter_map(|port| self.ports.remove(port))
            .collect();
        let network = self
            .networks
            .remove(&id)
            .ok_or_else(|| CommandError::NetworkNotFound {
                network: id.to_string(),
            })?;
        Ok(CommandOutcome::NetworkDeleted {
            network: Box::new(network),
            ports,
        })
    }

    pub(super) fn create_port(&mut self, port: NewPort) -> Result<CommandOutcome, CommandError> {
        let network =
            self.networks
                .get(&port.network)
                .ok_or_else(|| CommandError::NetworkNotFound {
                    network: port.network.to_string(),
                })?;
        if !self.nodes.contains_key(&port.node) {
            return Err(CommandError::NodeNotFound {
                node: port.node.to_string(),
            });
        }
        let queues = port.kind.queues();
        if !(1..=MAX_PORT_QUEUES).contains(&queues) {
            return Err(CommandError::InvalidPortQueues { queues });
        }
        match &port.kind {
            PortKind::VhostUser {
                socket,
                socket_mode,
                ..
            } => {
                check_socket(socket, *socket_mode)?;
                match self.socket_user(port.node, socket) {
                    None => {}
                    Some(SocketUser::Volume(volume)) => {
                        return Err(CommandError::SocketInUse {
                            socket: socket.clone(),
                            node: self.node_label(port.node),
                            other: volume,
                        });
                    }
                    Some(SocketUser::Port { id, network }) => {
                        return Err(CommandError::SocketUsedByPort {
                            socket: socket.clone(),
                            node: self.node_label(port.node),
                            port: id,
                            network,
                        });
                    }
                }
            }
            PortKind::Tap { ifname, .. } => {
                check_ifname(ifname).map_err(|reason| CommandError::InvalidIfname {
                    ifname: ifname.clone(),
                    reason: reason.to_owned(),
                })?;
                if let Some(other) = self.ports_on(port.node).find(
                    |other| matches!(&other.kind, PortKind::Tap { ifname: used, .. } if used == ifname),
                ) {
                    return Err(CommandError::TapInUse {
                        ifname: ifname.clone(),
                        node: self.node_label(port.node),
                        port: other.id,
                        network: self.network_label(other.network),
                    });
                }
            }
        }
        if port.mac.is_multicast() || port.mac.is_zero() {
            return Err(CommandError::InvalidMac {
                mac: port.mac.to_string(),
            });
        }
        if let Some(other) = self
            .ports_in(network.id)
            .find(|other| other.mac == port.mac)
        {
            return Err(CommandError::MacInUse {
                mac: port.mac.to_string(),
                network: network.name.clone(),
                port: other.id,
            });
        }
        if let Some(ip) = port.ipv4 {
            self.check_port_ip(network, ip)?;
        }
        let id = self.counters.next_port;
        self.counters.next_port += 1;
        self.ports.insert(
            id,
            Port {
                id,
                network: port.network,
                node: port.node,
                kind: port.kind,
                mac: port.mac,
                ipv4: port.ipv4,
                allow_any_mac: port.allow_any_mac,
                created_unix: port.created_unix,
            },
        );
        Ok(CommandOutcome::PortCreated { id })
    }

    fn check_port_ip(&self, network: &Network, ip: Ipv4Addr) -> Result<(), CommandError> {
        let invalid = |reason: &str| {
            Err(CommandError::InvalidIp {
                ip,
                reason: reason.to_owned(),
            })
        };
        if ip.is_unspecified() {
            return invalid("0.0.0.0 is not a host address");
        }
        if ip.is_multicast() || ip.is_broadcast() {
            return invalid("it is a multicast or broadcast address");
        }
        if let Some(subnet) = network.subnet {
            if !subnet.contains(ip) {
                return Err(CommandError::IpOutsideSubnet {
                    ip,
                    network: network.name.clone(),
                    subnet,
                });
            }
            if subnet.reserves_ends() && (ip == subnet.network() || ip == subnet.broadcast()) {
                return Err(CommandError::IpReserved {
                    ip,
                    network: network.name.clone(),
                    subnet,
                });
            }
        }
        if let Some(other) = self
            .ports_in(network.id)
            .find(|other| other.ipv4 == Some(ip))
        {
            return Err(CommandError::IpInUse {
                ip,
                network: network.name.clone(),
                port: other.id,
            });
        }
        Ok(())
    }

    pub(super) fn delete_port(&mut self, id: PortId) -> Result<CommandOutcome, CommandError> {
        let port = self
            .ports
            .remove(&id)
            .ok_or_else(|| CommandError::PortNotFound {
                port: id.to_string(),
            })?;
        Ok(CommandOutcome::PortDeleted { port })
    }
}

/// A port as the proposer asks for it; the state gives it its id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewPort {
    pub network: NetworkId,
    pub node: NodeId,
    pub kind: PortKind,
    /// Given by the user, or generated by the proposer (random, locally administered, unicast).
    pub mac: MacAddress,
    pub ipv4: Option<Ipv4Addr>,
    pub allow_any_mac: bool,
    pub created_unix: i64,
}

/// What already listens on a vhost-user socket path of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum SocketUser {
    Port {
        id: PortId,
        network: String,
    },
    /// The name of the attached volume.
    Volume(String),
}

/// The checks every vhost-user socket gets, for volumes and ports alike: absolute, and a mode that is a
/// permission mode and not world-writable.
pub(super) fn check_socket(socket: &str, mode: u32) -> Result<(), CommandError> {
    if !socket.starts_with('/') || socket.contains('\0') {
        return Err(CommandError::SocketPathNotAbsolute {
            socket: socket.to_owned(),
        });
    }
    if mode & !0o777 != 0 {
        return Err(CommandError::InvalidSocketMode { mode });
    }
    if mode & 0o002 != 0 {
        return Err(CommandError::WorldWritableSocket { mode });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use uuid::Uuid;

    use super::*;
    use crate::state::{Attachment, Command, Disk, Node, NodeState, Settings};

    fn node(id: NodeId, name: &str) -> Node {
        Node {
            id,
            name: name.to_owned(),
            address: None,
            labels: BTreeMap::new(),
            state: NodeState::Active,
            underlay: None,
        }
    }

    /// Nodes "n1" (1) and "n2" (2); networks "blue" (1, VNI 100, 10.0.0.0/24) and "red" (2, VNI 200, no subnet).
    fn cluster() -> ClusterState {
        let mut state = ClusterState::default();
        let commands = [
            Command::InitCluster {
                cluster_id: Uuid::from_u128(1),
                settings: Settings::default(),
                node: node(1, "n1"),
            },
            Command::AddNode {
                node: node(2, "n2"),
            },
            network("blue", 100, Some("10.0.0.0/24")),
            network("red", 200, None),
        ];
        for command in commands {
            state.apply(command).unwrap();
        }
        state
    }

    fn network(name: &str, vni: u32, subnet: Option<&str>) -> Command {
        Command::CreateNetwork {
            name: name.to_owned(),
            vni,
            mtu: None,
            subnet: subnet.map(|text| text.parse().unwrap()),
            created_unix: 1_700_000_000,
        }
    }

    fn tap(network: NetworkId, node: NodeId, ifname: &str, mac: u8) -> NewPort {
        NewPort {
            network,
            node,
            kind: PortKind::Tap {
                ifname: ifname.to_owned(),
                queues: 1,
            },
            mac: MacAddress([0x02, 0, 0, 0, 0, mac]),
            ipv4: None,
            allow_any_mac: false,
            created_unix: 1_700_000_001,
        }
    }

    fn vhost(network: NetworkId, node: NodeId, socket: &str, mac: u8) -> NewPort {
        NewPort {
            kind: PortKind::VhostUser {
                socket: socket.to_owned(),
                queues: 2,
                socket_mode: 0o660,
            },
            ..tap(network, node, "", mac)
        }
    }

    fn with_ip(port: NewPort, ip: &str) -> NewPort {
        NewPort {
            ipv4: Some(ip.parse().unwrap()),
            ..port
        }
    }

    fn create(state: &mut ClusterState, port: NewPort) -> PortId {
        match state.apply(Command::CreatePort { port }) {
            Ok(CommandOutcome::PortCreated { id }) => id,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn refused(state: &mut ClusterState, command: Command) -> String {
        let before = state.clone();
        let error = state.apply(command).expect_err("command should be refused");
        assert_eq!(
            *state, before,
            "a refused command must leave the state unchanged"
        );
        error.to_string()
    }

    fn refused_port(state: &mut ClusterState, port: NewPort) -> String {
        refused(state, Command::CreatePort { port })
    }

    #[test]
    fn networks_get_counter_ids_that_are_never_reused_and_default_mtu() {
        let mut state = cluster();
        let blue = state.network_by_name_or_id("blue").unwrap();
        assert_eq!((blue.id, blue.vni, blue.mtu), (1, 100, DEFAULT_MTU));
        assert_eq!(blue.subnet.unwrap().to_string(), "10.0.0.0/24");
        assert_eq!(state.network_by_name_or_id("2").unwrap().name, "red");
        assert!(state.network_by_name_or_id("3").is_none());
        state
            .apply(Command::DeleteNetwork {
                id: 2,
                force: false,
            })
            .unwrap();
        let outcome = state.apply(network("green", 300, None)).unwrap();
        assert_eq!(outcome, CommandOutcome::NetworkCreated { id: 3 });
        assert_eq!(state.counters.next_network, 4);
        // The name and VNI of a deleted network are free again.
        assert_eq!(
            state.apply(network("red", 200, None)).unwrap(),
            CommandOutcome::NetworkCreated { id: 4 }
        );
    }

    #[test]
    fn create_network_validation_messages() {
        let mut state = cluster();
        assert_eq!(
            refused(&mut state, network("blue", 101, None)),
            "network 'blue' already exists; choose another name"
        );
        assert_eq!(
            refused(&mut state, network("green", 100, None)),
            "VNI 100 is already used by network 'blue'; choose another VNI"
        );
        for vni in [0, MAX_VNI + 1, u32::MAX] {
            assert_eq!(
                refused(&mut state, network("green", vni, None)),
                format!("VNI {vni} is out of range; use 1 to 16777215")
            );
        }
        assert_eq!(
            refused(&mut state, network("bad name", 5, None)),
            "'bad name' is not a valid network name: use only letters, digits, '.', '_' and '-'"
        );
        assert_eq!(
            refused(&mut state, network("42", 5, None)),
            "'42' is not a valid network name: it looks like an id (all digits)"
        );
        for mtu in [0, MIN_MTU - 1, MAX_MTU + 1, u16::MAX] {
            let command = Command::CreateNetwork {
                name: "green".to_owned(),
                vni: 5,
                mtu: Some(mtu),
                subnet: None,
                created_unix: 0,
            };
            assert_eq!(
                refused(&mut state, command),
                format!(
                    "MTU {mtu} is out of range; use 68 to 8950 (the underlay's MTU less 50 bytes of VXLAN)"
                )
            );
        }
        for mtu in [MIN_MTU, MAX_MTU] {
            let command = Command::CreateNetwork {
                name: format!("mtu{mtu}"),
                vni: u32::from(mtu),
                mtu: Some(mtu),
                subnet: None,
                created_unix: 0,
            };
            state.apply(command).unwrap();
        }
        let unchecked = |address: [u8; 4], prefix: u8| Command::CreateNetwork {
            name: "green".to_owned(),
            vni: 5,
            mtu: None,
            subnet: Some(Ipv4Subnet {
                address: Ipv4Addr::from(address),
                prefix,
            }),
            created_unix: 0,
        };
        assert_eq!(
            refused(&mut state, unchecked([10, 0, 0, 1], 24)),
            "invalid subnet: 10.0.0.1/24 has host bits set; the network address for /24 is 10.0.0.0"
        );
        assert_eq!(
            refused(&mut state, unchecked([10, 0, 0, 0], 33)),
            "invalid subnet: prefix length 33 is out of range; use 0 to 32"
        );
        state.apply(unchecked([0, 0, 0, 0], 0)).unwrap();
    }

    #[test]
    fn delete_network_refuses_while_ports_remain_unless_forced() {
        let mut state = cluster();
        create(&mut state, tap(1, 1, "tap1", 1));
        create(&mut state, tap(1, 2, "tap2", 2));
        let red = create(&mut state, tap(2, 1, "tap3", 3));
        assert_eq!(
            refused(
                &mut state,
                Command::DeleteNetwork {
                    id: 1,
                    force: false
                }
            ),
            "network 'blue' still has 2 port(s); delete them first (`vessel port list --network blue`), or delete \
             the network with --force to delete them too"
        );
        assert_eq!(
            refused(&mut state, Command::DeleteNetwork { id: 9, force: true }),
            "network '9' not found; `vessel net list` shows the networks"
        );
        let outcome = state
            .apply(Command::DeleteNetwork { id: 1, force: true })
            .unwrap();
        let CommandOutcome::NetworkDeleted { network, ports } = outcome else {
            panic!("unexpected outcome");
        };
        assert_eq!(network.name, "blue");
        assert_eq!(ports.iter().map(|p| p.id).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(state.ports.keys().copied().collect::<Vec<_>>(), [red]);
        assert!(state.network_by_name_or_id("blue").is_none());
    }

    #[test]
    fn ports_get_counter_ids_and_are_deleted_by_id() {
        let mut state = cluster();
        assert_eq!(create(&mut state, tap(1, 1, "tap1", 1)), 1);
        assert_eq!(create(&mut state, vhost(2, 2, "/run/vm1.sock", 1)), 2);
        let port = &state.ports[&2];
        assert_eq!(
            (
                port.network,
                port.node,
                port.kind.queues(),
                port.kind.label()
            ),
            (2, 2, 2, "vhost-user")
        );
        state.apply(Command::DeletePort { id: 2 }).unwrap();
        assert_eq!(
            refused(&mut state, Command::DeletePort { id: 2 }),
            "port '2' not found; `vessel port list` shows the ports"
        );
        assert_eq!(create(&mut state, vhost(2, 2, "/run/vm1.sock", 1)), 3);
    }

    #[test]
    fn port_needs_an_existing_network_and_node_and_sane_queues() {
        let mut state = cluster();
        assert_eq!(
            refused_port(&mut state, tap(7, 1, "tap1", 1)),
            "network '7' not found; `vessel net list` shows the networks"
        );
        assert_eq!(
            refused_port(&mut state, tap(1, 9, "tap1", 1)),
            "node '9' not found"
        );
        for queues in [0, MAX_PORT_QUEUES + 1] {
            let port = NewPort {
                kind: PortKind::Tap {
                    ifname: "tap1".to_owned(),
                    queues,
                },
                ..tap(1, 1, "", 1)
            };
            assert_eq!(
                refused_port(&mut state, port),
                format!("{queues} queues is out of range for a port; use 1 to 16")
            );
        }
    }

    #[test]
    fn vhost_user_sockets_are_absolute_private_and_unique_per_node() {
        let mut state = cluster();
        assert_eq!(
            refused_port(&mut state, vhost(1, 1, "vm1.sock", 1)),
            "vhost-user socket path 'vm1.sock' must be an absolute path"
        );
        let open = NewPort {
            kind: PortKind::VhostUser {
                socket: "/run/vm1.sock".to_owned(),
                queues: 1,
                socket_mode: 0o666,
            },
            ..tap(1, 1, "", 1)
        };
        assert_eq!(
            refused_port(&mut state, open),
            "socket mode 0666 would make the socket world-writable; use 0660 or stricter"
        );
        create(&mut state, vhost(1, 1, "/run/vm1.sock", 1));
        // Taken on that node, in any network; free on another node.
        assert_eq!(
            refused_port(&mut state, vhost(2, 1, "/run/vm1.sock", 2)),
            "vhost-user socket /run/vm1.sock on node 'n1' is already used by port 1 of network 'blue'; choose \
             another path"
        );
        create(&mut state, vhost(1, 2, "/run/vm1.sock", 2));
    }

    #[test]
    fn volume_attachments_and_ports_never_share_a_socket() {
        let mut state = cluster();
        let volume = Uuid::from_u128(7);
        state
            .apply(Command::AddDisk {
                disk: Disk {
                    id: Uuid::from_u128(1),
                    node: 1,
                    path: "/pool/d1".to_owned(),
                    capacity: 8 << 30,
                    block_device: false,
                },
            })
            .unwrap();
        state
            .apply(Command::CreateVolume {
                id: volume,
                name: "db1".to_owned(),
                size: 1 << 30,
                block_size: None,
                replicas: 1,
                created_unix: 0,
            })
            .unwrap();
        let attach = |socket: &str| Command::Attach {
            attachment: Attachment {
                volume,
                node: 1,
                socket: socket.to_owned(),
                queues: 1,
                read_only: false,
                socket_mode: 0o600,
                attached_unix: 0,
                active: Default::default(),
            },
        };
        create(&mut state, vhost(1, 1, "/run/vm1.sock", 1));
        assert_eq!(
            refused(&mut state, attach("/run/vm1.sock")),
            "vhost-user socket /run/vm1.sock on node 'n1' is already used by port 1 of network 'blue'; choose \
             another path"
        );
        state.apply(attach("/run/db1.sock")).unwrap();
        assert_eq!(
            refused_port(&mut state, vhost(1, 1, "/run/db1.sock", 2)),
            "vhost-user socket /run/db1.sock on node 'n1' is already used by volume 'db1'; choose another path"
        );
    }

    #[test]
    fn tap_names_follow_linux_rules_and_are_unique_per_node() {
        let mut state = cluster();
        let cases = [
            ("", "it is empty"),
            ("tap-with-16bytes", "it is longer than 15 bytes (IFNAMSIZ)"),
            (".", "'.' and '..' are not device names"),
            ("..", "'.' and '..' are not device names"),
            (
                "tap/1",
                "it must not contain '/', ':', whitespace or control characters",
            ),
            (
                "tap 1",
                "it must not contain '/', ':', whitespace or control characters",
            ),
            (
                "tap:1",
                "it must not contain '/', ':', whitespace or control characters",
            ),
        ];
        for (ifname, reason) in cases {
            assert_eq!(
                refused_port(&mut state, tap(1, 1, ifname, 1)),
                format!("'{ifname}' is not a valid tap device name: {reason}")
            );
        }
        create(&mut state, tap(1, 1, "tap-15-bytes-ok", 1));
        create(&mut state, tap(1, 1, "tap1", 2));
        assert_eq!(
            refused_port(&mut state, tap(2, 1, "tap1", 3)),
            "tap 'tap1' on node 'n1' is already port 2 of network 'blue'; choose another name"
        );
        create(&mut state, tap(1, 2, "tap1", 3));
    }

    #[test]
    fn macs_are_unicast_and_unique_in_their_network() {
        let mut state = cluster();
        for mac in [[0x03, 0, 0, 0, 0, 1], [0xff; 6], [0; 6]] {
            let port = NewPort {
                mac: MacAddress(mac),
                ..tap(1, 1, "tap1", 1)
            };
            assert_eq!(
                refused_port(&mut state, port),
                format!(
                    "MAC {} is a multicast or all-zero address; give a unicast MAC, or none to generate one",
                    MacAddress(mac)
                )
            );
        }
        create(&mut state, tap(1, 1, "tap1", 1));
        assert_eq!(
            refused_port(&mut state, tap(1, 2, "tap2", 1)),
            "MAC 02:00:00:00:00:01 is already used by port 1 of network 'blue'; give another MAC, or none to \
             generate one"
        );
        // The same MAC in another network is another station.
        create(&mut state, tap(2, 2, "tap2", 1));
    }

    #[test]
    fn ips_are_host_addresses_of_the_subnet_and_unique_in_their_network() {
        let mut state = cluster();
        assert_eq!(
            refused_port(&mut state, with_ip(tap(1, 1, "tap1", 1), "10.0.1.5")),
            "10.0.1.5 is outside network 'blue''s subnet 10.0.0.0/24; give an address in 10.0.0.0/24"
        );
        for reserved in ["10.0.0.0", "10.0.0.255"] {
            assert_eq!(
                refused_port(&mut state, with_ip(tap(1, 1, "tap1", 1), reserved)),
                format!(
                    "{reserved} is the network or broadcast address of network 'blue''s subnet 10.0.0.0/24; give \
                     a host address"
                )
            );
        }
        assert_eq!(
            refused_port(&mut state, with_ip(tap(2, 1, "tap1", 1), "0.0.0.0")),
            "0.0.0.0 is not a valid port address: 0.0.0.0 is not a host address"
        );
        assert_eq!(
            refused_port(&mut state, with_ip(tap(2, 1, "tap1", 1), "224.0.0.1")),
            "224.0.0.1 is not a valid port address: it is a multicast or broadcast address"
        );
        create(&mut state, with_ip(tap(1, 1, "tap1", 1), "10.0.0.5"));
        assert_eq!(state.ports[&1].ipv4, Some(Ipv4Addr::new(10, 0, 0, 5)));
        assert_eq!(
            refused_port(&mut state, with_ip(tap(1, 2, "tap2", 2), "10.0.0.5")),
            "10.0.0.5 is already used by port 1 of network 'blue'; give another address"
        );
        // Another network may reuse it; a network without a subnet takes any host address.
        create(&mut state, with_ip(tap(2, 2, "tap2", 2), "10.0.0.5"));
        create(&mut state, with_ip(tap(2, 2, "tap3", 3), "192.0.2.1"));
        // A /31 has no network or broadcast address (RFC 3021).
        state
            .apply(network("p2p", 300, Some("10.9.0.0/31")))
            .unwrap();
        create(&mut state, with_ip(tap(3, 1, "tap4", 4), "10.9.0.0"));
        create(&mut state, with_ip(tap(3, 1, "tap5", 5), "10.9.0.1"));
    }

    #[test]
    fn a_node_with_ports_is_not_removed() {
        let mut state = cluster();
        create(&mut state, tap(1, 2, "tap1", 1));
        create(&mut state, tap(2, 2, "tap2", 2));
        assert_eq!(
            refused(
                &mut state,
                Command::RemoveNode {
                    id: 2,
                    disks: vec![]
                }
            ),
            "node 'n2' serves port(s) 1, 2; delete them first with `vessel port delete`"
        );
        state
            .apply(Command::DeleteNetwork { id: 1, force: true })
            .unwrap();
        state.apply(Command::DeletePort { id: 2 }).unwrap();
        state
            .apply(Command::RemoveNode {
                id: 2,
                disks: vec![],
            })
            .unwrap();
    }

    #[test]
    fn queries_for_the_data_plane_and_the_cli() {
        let mut state = cluster();
        let a = create(&mut state, tap(1, 1, "tap1", 1));
        let b = create(&mut state, vhost(1, 2, "/run/vm.sock", 2));
        let c = create(&mut state, vhost(2, 1, "/run/vm.sock", 3));
        let d = create(&mut state, tap(2, 2, "tap1", 4));
        let ids = |ports: Vec<&Port>| ports.iter().map(|p| p.id).collect::<Vec<_>>();
        assert_eq!(ids(state.ports_on(1).collect()), [a, c]);
        assert_eq!(ids(state.ports_on(2).collect()), [b, d]);
        assert_eq!(ids(state.ports_in(2).collect()), [c, d]);
        assert_eq!(
            state.network_nodes(1).into_iter().collect::<Vec<_>>(),
            [1, 2]
        );
        create(&mut state, tap(2, 1, "tap9", 9));
        assert_eq!(
            state.network_nodes(2).into_iter().collect::<Vec<_>>(),
            [1, 2]
        );
        assert!(state.network_nodes(7).is_empty());

        assert_eq!(
            state.find_port(&b.to_string()),
            PortMatch::Found(&state.ports[&b])
        );
        assert_eq!(state.find_port("tap9"), PortMatch::Found(&state.ports[&5]));
        assert_eq!(
            state.find_port("/run/vm.sock"),
            PortMatch::Ambiguous(vec![b, c])
        );
        assert_eq!(state.find_port("tap1"), PortMatch::Ambiguous(vec![a, d]));
        assert_eq!(state.find_port("99"), PortMatch::NotFound);
        assert_eq!(state.find_port("/run/none.sock"), PortMatch::NotFound);
        assert_eq!(state.find_port(""), PortMatch::NotFound);
        // A tap name is never taken for a socket path, nor the reverse.
        state.apply(Command::DeletePort { id: a }).unwrap();
        assert_eq!(state.find_port("tap1"), PortMatch::Found(&state.ports[&d]));
    }
}
