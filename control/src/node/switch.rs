//! This node's virtual switch following the cluster state: the networks and ports of the Raft state that live
//! here become networks and ports of a [`vnet::Datapath`], and the VTEP lists, remote MACs and remote IPs of
//! each network come from the ports other nodes serve.
//!
//! - The switch starts with the node's first port: it binds the underlay socket (config `underlay`, by default
//!   the `--listen` IP and UDP port 4789) and records the bound address in the node's entry of the cluster
//!   state (`SetUnderlay`), which is how the other nodes learn this node's VTEP.
//! - A tap port's device is created (or adopted, if it exists) and made persistent, so that it and whatever the
//!   operator configured on it (a namespace, addresses) outlive a daemon restart; it gets the port's MAC, the
//!   network's MTU and is brought up. A device missing from the daemon's namespace but found in another one with
//!   the port's MAC (the operator moved it into a guest's or container's namespace) is adopted where it is.
//!   Deleting the port removes the device, through a handle kept since it was opened (wherever it is by then).
//! - A vhost-user-net port is served by a device the daemon starts (`DeviceHost::start_net`) on the port's socket:
//!   what its guest sends goes into the port's inbox in the switch, what the switch sends it goes to the device's
//!   receive queues. Deleting the port stops the device.
//! - Reconciling is idempotent and runs after every change of the state (and at start-up): what the switch
//!   holds is compared with what the state says, and only the difference is applied.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, PoisonError};

use vnet::mac_table::Location;
use vnet::switch::{NetworkConfig, PortConfig};
use vnet::{Datapath, Mac, Tap, Vni};

use super::LocalNode;
use crate::state::network::{Port, PortKind};
use crate::state::{ClusterState, Command};

/// The UDP port of the underlay unless the config names another (IANA's VXLAN port).
pub const DEFAULT_VXLAN_PORT: u16 = vnet::vxlan::DEFAULT_UDP_PORT;

/// The switch of this node and what it was told so far.
#[derive(Default)]
pub(super) struct NodeSwitch {
    running: Option<Running>,
    /// Why the switch could not start (reported once).
    start_error: Option<String>,
    /// Ports that could not be plugged in, with why (reported once each).
    failed: HashMap<u64, String>,
}

struct Running {
    datapath: Datapath,
    underlay: SocketAddr,
    networks: HashMap<u64, NetworkConfig>,
    /// Plugged ports.
    ports: HashMap<u64, Plugged>,
    /// Per network: VTEPs, and the remote MACs (with their VTEP) and IPs pushed.
    vteps: HashMap<u64, Vec<SocketAddr>>,
    remote_macs: HashMap<u64, BTreeMap<Mac, SocketAddr>>,
    remote_ips: HashMap<u64, BTreeMap<Ipv4Addr, Mac>>,
}

impl std::fmt::Debug for NodeSwitch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSwitch")
            .field("underlay", &self.running.as_ref().map(|r| r.underlay))
            .field("ports", &self.running.as_ref().map(|r| r.ports.len()))
            .finish()
    }
}

/// How a plugged port is served.
enum Plugged {
    /// By a tap device, through a handle on it that can delete it wherever it has been moved.
    Tap(Tap),
    /// By a vhost-user-net device.
    VhostUser,
}

/// What the state asks of this node's switch.
struct Wanted {
    networks: HashMap<u64, NetworkConfig>,
    ports: Vec<Port>,
    vteps: HashMap<u64, Vec<SocketAddr>>,
    remote_macs: HashMap<u64, BTreeMap<Mac, SocketAddr>>,
    remote_ips: HashMap<u64, BTreeMap<Ipv4Addr, Mac>>,
}

fn underlay_of(state: &ClusterState, node: u64) -> Option<SocketAddr> {
    state.nodes.get(&node)?.underlay.as_deref()?.parse().ok()
}

fn wanted(state: &ClusterState, me: u64) -> Wanted {
    let ports: Vec<Port> = state.ports_on(me).cloned().collect();
    let mut wanted = Wanted {
        networks: HashMap::new(),
        ports,
        vteps: HashMap::new(),
        remote_macs: HashMap::new(),
        remote_ips: HashMap::new(),
    };
    let networks: BTreeSet<u64> = wanted.ports.iter().map(|port| port.network).collect();
    for id in networks {
        let Some(network) = state.networks.get(&id) else {
            continue;
        };
        let Ok(vni) = Vni::new(network.vni) else {
            continue;
        };
        wanted.networks.insert(
            id,
            NetworkConfig {
                id: vnet::NetworkId(id),
                vni,
                mtu: network.mtu,
            },
        );
        let mut vteps = BTreeSet::new();
        let (macs, ips) = (
            wanted.remote_macs.entry(id).or_default(),
            wanted.remote_ips.entry(id).or_default(),
        );
        for port in state.ports_in(id).filter(|port| port.node != me) {
            let Some(vtep) = underlay_of(state, port.node) else {
                // That node's switch has not started yet; it is added when it has.
                continue;
            };
            vteps.insert(vtep);
            let mac = Mac(port.mac.0);
            macs.insert(mac, vtep);
            if let Some(ip) = port.ipv4 {
                ips.insert(ip, mac);
            }
        }
        wanted.vteps.insert(id, vteps.into_iter().collect());
    }
    wanted
}

impl LocalNode {
    /// Brings this node's switch in line with the cluster state (see the module docs). Returns the underlay
    /// address to record in the state when it differs from what the state says.
    pub(super) fn reconcile_switch(&self) -> Option<SocketAddr> {
        let me = self.control.node_id();
        let (wanted, recorded) = self
            .control
            .read(|state| (wanted(state, me), underlay_of(state, me)));
        let mut switch = self.switch.lock().unwrap_or_else(PoisonError::into_inner);
        if switch.running.is_none() {
            if wanted.ports.is_empty() {
                return None;
            }
            match self.start_switch() {
                Ok(running) => switch.running = Some(running),
                Err(error) => {
                    if switch.start_error.replace(error.clone()).as_ref() != Some(&error) {
                        self.warn(error);
                    }
                    return None;
                }
            }
        }
        let NodeSwitch {
            running, failed, ..
        } = &mut *switch;
        let running = running.as_mut()?;
        running.apply(self, wanted, failed);
        (recorded != Some(running.underlay)).then_some(running.underlay)
    }

    fn start_switch(&self) -> Result<Running, String> {
        let bind = self
            .config
            .underlay
            .unwrap_or_else(|| match self.config.listen {
                Some(listen) => SocketAddr::new(listen.ip(), DEFAULT_VXLAN_PORT),
                None => SocketAddr::from(([127, 0, 0, 1], DEFAULT_VXLAN_PORT)),
            });
        let socket = UdpSocket::bind(bind).map_err(|error| {
            format!(
                "cannot bind the VXLAN underlay socket to {bind}: {error}; networks are not served on this node \
                 (set `underlay` in the config to a free IP:PORT and restart vesseld)"
            )
        })?;
        let underlay = socket
            .local_addr()
            .map_err(|error| format!("the underlay socket has no address: {error}"))?;
        let datapath = Datapath::start(socket, self.config.switch)
            .map_err(|error| format!("cannot start the switch: {error}"))?;
        tracing::info!(%underlay, "switch started");
        Ok(Running {
            datapath,
            underlay,
            networks: HashMap::new(),
            ports: HashMap::new(),
            vteps: HashMap::new(),
            remote_macs: HashMap::new(),
            remote_ips: HashMap::new(),
        })
    }

    /// Counters of the ports this node's switch serves.
    pub(crate) fn port_counters(&self) -> BTreeMap<u64, crate::raft::PortCounters> {
        let switch = self.switch.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(running) = switch.running.as_ref() else {
            return BTreeMap::new();
        };
        let datapath = running.datapath.switch();
        running
            .ports
            .iter()
            .filter_map(|(&id, plugged)| {
                let stats = datapath.port_stats(vnet::PortId(id))?;
                let drops = vnet::DropReason::ALL
                    .into_iter()
                    .map(|reason| (reason.label().to_owned(), stats.drops(reason)))
                    .filter(|(_, count)| *count > 0)
                    .collect();
                Some((
                    id,
                    crate::raft::PortCounters {
                        rx_packets: stats.rx_packets,
                        rx_bytes: stats.rx_bytes,
                        tx_packets: stats.tx_packets,
                        tx_bytes: stats.tx_bytes,
                        drops,
                        frontend_connected: matches!(plugged, Plugged::VhostUser)
                            .then(|| self.devices.net_connected(id)),
                    },
                ))
            })
            .collect()
    }

    /// Counters of the networks this node's switch knows, with the size of their MAC tables.
    pub(crate) fn network_stats(&self) -> Vec<(u64, vnet::NetworkStats)> {
        let switch = self.switch.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(running) = switch.running.as_ref() else {
            return Vec::new();
        };
        let datapath = running.datapath.switch();
        running
            .networks
            .keys()
            .filter_map(|&id| Some((id, datapath.network_stats(vnet::NetworkId(id))?)))
            .collect()
    }
}

impl Running {
    fn apply(&mut self, node: &LocalNode, wanted: Wanted, failed: &mut HashMap<u64, String>) {
        let wanted_ports: HashSet<u64> = wanted.ports.iter().map(|port| port.id).collect();
        // Ports that went away first: their networks may go with them.
        for gone in self
            .ports
            .keys()
            .copied()
            .filter(|id| !wanted_ports.contains(id))
            .collect::<Vec<_>>()
        {
            self.unplug(node, gone);
        }
        failed.retain(|id, _| wanted_ports.contains(id));
        for gone in self
            .networks
            .keys()
            .copied()
            .filter(|id| !wanted.networks.contains_key(id))
            .collect::<Vec<_>>()
        {
            if let Err(error) = self
                .datapath
                .configure()
                .remove_network(vnet::NetworkId(gone))
            {
                tracing::warn!(network = gone, %error, "cannot remove a network from the switch");
            }
            self.networks.remove(&gone);
            self.vteps.remove(&gone);
            self.remote_macs.remove(&gone);
            self.remote_ips.remove(&gone);
        }
        for (id, config) in &wanted.networks {
            if self.networks.get(id) == Some(config) {
                continue;
            }
            match self.datapath.configure().add_network(*config) {
                Ok(()) => {
                    self.networks.insert(*id, *config);
                }
                Err(error) => {
                    tracing::warn!(network = id, %error, "cannot add a network to the switch")
                }
            }
        }
        for port in &wanted.ports {
            if self.ports.contains_key(&port.id) || !self.networks.contains_key(&port.network) {
                continue;
            }
            match self.plug(node, port) {
                Ok(plugged) => {
                    failed.remove(&port.id);
                    self.ports.insert(port.id, plugged);
                    tracing::info!(port = port.id, kind = %port.kind, "port plugged into the switch");
                }
                Err(error) => {
                    if failed.insert(port.id, error.clone()).as_ref() != Some(&error) {
                        node.warn(format!("port {} ({}): {error}", port.id, port.kind));
                    }
                }
            }
        }
        self.follow_remote(wanted);
    }

    fn plug(&self, node: &LocalNode, port: &Port) -> Result<Plugged, String> {
        let network = self.networks[&port.network];
        let mac = Mac(port.mac.0);
        let config = PortConfig {
            id: vnet::PortId(port.id),
            network: network.id,
            mac,
            ipv4: port.ipv4,
            allow_any_mac: port.allow_any_mac,
        };
        match &port.kind {
            PortKind::Tap { ifname, queues } => {
                let tap = open_tap(port.id, ifname, usize::from(*queues), mac, network.mtu)?;
                let handle = tap.handle().map_err(|error| error.to_string())?;
                self.datapath
                    .add_tap(config, tap)
                    .map_err(|error| error.to_string())?;
                Ok(Plugged::Tap(handle))
            }
            PortKind::VhostUser {
                socket,
                queues,
                socket_mode,
            } => {
                super::socket_directory(socket)?;
                let senders = (0..*queues)
                    .map(|_| self.datapath.sender(config.id))
                    .collect();
                let spec = super::NetSpec {
                    socket: socket.clone(),
                    socket_mode: *socket_mode,
                    queues: *queues,
                    mac: port.mac.0,
                    mtu: network.mtu,
                };
                let sink = node.devices.start_net(port.id, &spec, senders)?;
                if let Err(error) = self.datapath.add_virtual_port(config, sink) {
                    node.devices.stop_net(port.id);
                    return Err(error.to_string());
                }
                Ok(Plugged::VhostUser)
            }
        }
    }

    /// Takes a port out of the switch; its tap device is deleted, its vhost-user-net device stopped.
    fn unplug(&mut self, node: &LocalNode, id: u64) {
        let Some(plugged) = self.ports.remove(&id) else {
            return;
        };
        if let Plugged::Tap(handle) = &plugged {
            // The device goes when its last queue closes (the switch's, then the handle's), once it is
            // no longer persistent.
            if let Err(error) = handle.set_persistent(false) {
                tracing::warn!(port = id, %error, "the tap device stays");
            }
        }
        if let Err(error) = self.datapath.remove_port(vnet::PortId(id)) {
            tracing::warn!(port = id, %error, "cannot remove a port from the switch");
        }
        if matches!(plugged, Plugged::VhostUser) {
            node.devices.stop_net(id);
        }
        tracing::info!(port = id, "port unplugged from the switch");
    }

    /// VTEP lists, remote MACs and remote IPs, per network, as wanted.
    fn follow_remote(&mut self, wanted: Wanted) {
        let mut switch = self.datapath.configure();
        for (id, vteps) in wanted.vteps {
            if self.vteps.get(&id) != Some(&vteps) {
                match switch.set_vteps(vnet::NetworkId(id), vteps.iter().copied()) {
                    Ok(()) => {
                        self.vteps.insert(id, vteps);
                    }
                    Err(error) => tracing::warn!(network = id, %error, "cannot set the VTEPs"),
                }
            }
        }
        for (id, macs) in wanted.remote_macs {
            let had = self.remote_macs.remove(&id).unwrap_or_default();
            for mac in had.keys().filter(|mac| !macs.contains_key(mac)) {
                let _ = switch.remove_static_mac(vnet::NetworkId(id), *mac);
            }
            for (mac, vtep) in &macs {
                if had.get(mac) != Some(vtep) {
                    let _ = switch.set_static_mac(vnet::NetworkId(id), *mac, Location::Vtep(*vtep));
                }
            }
            self.remote_macs.insert(id, macs);
        }
        for (id, ips) in wanted.remote_ips {
            let had = self.remote_ips.remove(&id).unwrap_or_default();
            for ip in had.keys().filter(|ip| !ips.contains_key(ip)) {
                let _ = switch.remove_remote_ip(vnet::NetworkId(id), *ip);
            }
            for (ip, mac) in &ips {
                if had.get(ip) != Some(mac) {
                    let _ = switch.set_remote_ip(vnet::NetworkId(id), *ip, *mac);
                }
            }
            self.remote_ips.insert(id, ips);
        }
    }
}

/// Keeps this node's switch in step with the cluster state: after every change, and at start.
pub(super) async fn follow_networks(node: Arc<LocalNode>) {
    let mut applied = node.control.subscribe();
    loop {
        {
            let reconciling = Arc::clone(&node);
            let record = tokio::task::spawn_blocking(move || reconciling.reconcile_switch())
                .await
                .ok()
                .flatten();
            if let Some(underlay) = record {
                let me = node.control.node_id();
                let command = Command::SetUnderlay {
                    node: me,
                    underlay: Some(underlay.to_string()),
                };
                if let Err(error) = node.control.write(command).await {
                    tracing::warn!(%error, "cannot record this node's underlay address; trying again");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        if applied.changed().await.is_err() {
            return;
        }
    }
}

/// Opens tap port `port`'s device `ifname` with `queues` queues, persistent, with the port's MAC and
/// the network's MTU, up: in this namespace, creating it if needed, unless it is missing here and
/// a device of that name with the port's MAC is found in another namespace (the operator moved it
/// there, as a container runtime does): then it is adopted there, where its addresses are.
fn open_tap(port: u64, ifname: &str, queues: usize, mac: Mac, mtu: u16) -> Result<Tap, String> {
    let open = || -> Result<Tap, vnet::TapError> {
        let tap = Tap::open(ifname, queues)?;
        tap.set_persistent(true)?;
        tap.set_mac(mac)?;
        tap.set_mtu(mtu)?;
        tap.set_up(true)?;
        Ok(tap)
    };
    let here = vnet::tap::interface_mac(ifname).map_err(|error| error.to_string())?;
    if here.is_none()
        && let Some(netns) = vnet::netns::find_interface(ifname, mac)
    {
        tracing::info!(
            port,
            tap = ifname,
            netns = %netns.path().display(),
            "the tap device was moved to another network namespace; adopting it there"
        );
        return match netns.run(open) {
            Ok(opened) => {
                opened.map_err(|error| format!("{error} (in {})", netns.path().display()))
            }
            Err(error) => Err(format!(
                "cannot enter {} where tap '{ifname}' is: {error}",
                netns.path().display()
            )),
        };
    }
    open().map_err(|error| error.to_string())
}
