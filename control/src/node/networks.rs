//! The admin operations on overlay networks and their ports: resolve names, fill in defaults, commit.
//!
//! They change the cluster state only; each node's switch follows the ports the state puts on it
//! ([`crate::state::ClusterState::ports_on`]). A port is created on the node the request is sent to. Every rule
//! (unique names, VNIs, MACs, IPs, socket paths and tap names) is the state machine's; the checks here only turn
//! the API's strings into typed values and say what was wrong with them.

use std::net::Ipv4Addr;
use std::sync::Arc;

use uuid::Uuid;
use vessel_proto::admin;
use vessel_proto::net::{Ipv4Subnet, MacAddress};

use super::LocalNode;
use super::ops::{ErrorKind, OpError, now_unix};
use crate::state::{
    ClusterState, Command, CommandError, CommandOutcome, MAX_MTU, MAX_PORT_QUEUES, MIN_MTU,
    Network, NetworkId, NewPort, Port, PortId, PortKind, PortMatch,
};

/// Mode of a vhost-user port's socket when the request gives none.
const DEFAULT_SOCKET_MODE: u32 = 0o600;

impl LocalNode {
    fn resolve_network(&self, key: &str) -> Result<Network, OpError> {
        self.control
            .read(|state| state.network_by_name_or_id(key).cloned())
            .ok_or_else(|| {
                CommandError::NetworkNotFound {
                    network: key.to_owned(),
                }
                .into()
            })
    }

    fn resolve_port(&self, key: &str) -> Result<Port, OpError> {
        let key = key.trim();
        self.control.read(|state| match state.find_port(key) {
            PortMatch::Found(port) => Ok(port.clone()),
            PortMatch::NotFound => Err(CommandError::PortNotFound {
                port: key.to_owned(),
            }
            .into()),
            PortMatch::Ambiguous(ids) => {
                let candidates: Vec<String> = ids
                    .iter()
                    .filter_map(|id| state.ports.get(id))
                    .map(|port| format!("{} on node '{}'", port.id, state.node_label(port.node)))
                    .collect();
                Err(OpError::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "port '{key}' is ambiguous: ports {} use it; give the port id",
                        candidates.join(", ")
                    ),
                ))
            }
        })
    }

    pub async fn network_create(
        &self,
        request: admin::NetworkCreateRequest,
    ) -> Result<admin::Network, OpError> {
        let _guard = self.writes.lock().await;
        let subnet = match request.subnet.trim() {
            "" => None,
            text => Some(text.parse::<Ipv4Subnet>().map_err(|error| {
                OpError::from(CommandError::InvalidSubnet {
                    reason: error.to_string(),
                })
            })?),
        };
        let mtu = match request.mtu {
            0 => None,
            mtu => Some(u16::try_from(mtu).map_err(|_| {
                OpError::new(
                    ErrorKind::InvalidArgument,
                    format!("MTU {mtu} is out of range; use {MIN_MTU} to {MAX_MTU}"),
                )
            })?),
        };
        let outcome = self
            .commit(Command::CreateNetwork {
                name: request.name.clone(),
                vni: request.vni,
                mtu,
                subnet,
                created_unix: now_unix(),
            })
            .await?;
        let CommandOutcome::NetworkCreated { id } = outcome else {
            return Err(unexpected(&outcome));
        };
        tracing::info!(network = %request.name, id, vni = request.vni, "network created");
        self.network_view(id, false)
    }

    pub fn network_list(&self) -> admin::NetworkListReply {
        let mut networks: Vec<admin::Network> = self.control.read(|state| {
            state
                .networks
                .values()
                .map(|network| network_view(state, network, false))
                .collect()
        });
        networks.sort_by(|a, b| a.name.cmp(&b.name));
        admin::NetworkListReply { networks }
    }

    pub fn network_show(&self, request: &admin::NetworkRef) -> Result<admin::Network, OpError> {
        let network = self.resolve_network(request.network.trim())?;
        self.network_view(network.id, true)
    }

    pub async fn network_delete(
        self: &Arc<Self>,
        request: &admin::NetworkDeleteRequest,
    ) -> Result<admin::NetworkDeleteReply, OpError> {
        let _guard = self.writes.lock().await;
        let network = self.resolve_network(request.network.trim())?;
        // Viewed before: once deleted, the ports' network and the nodes' names may be gone from the state.
        let views: Vec<admin::Port> = self.control.read(|state| {
            state
                .ports_in(network.id)
                .map(|port| port_view(state, port))
                .collect()
        });
        let outcome = self
            .commit(Command::DeleteNetwork {
                id: network.id,
                force: request.force,
            })
            .await?;
        let CommandOutcome::NetworkDeleted { ports, .. } = outcome else {
            return Err(unexpected(&outcome));
        };
        let deleted_ports: Vec<admin::Port> = views
            .into_iter()
            .filter(|view| ports.iter().any(|port| port.id == view.id))
            .collect();
        self.switch_follows_now().await;
        tracing::info!(network = %network.name, id = network.id, ports = deleted_ports.len(), "network deleted");
        Ok(admin::NetworkDeleteReply {
            id: network.id,
            name: network.name,
            deleted_ports,
        })
    }

    pub async fn port_create(
        self: &Arc<Self>,
        request: admin::PortCreateRequest,
    ) -> Result<admin::Port, OpError> {
        let _guard = self.writes.lock().await;
        let network = self.resolve_network(request.network.trim())?;
        let queues = match request.queues {
            0 => 1,
            queues => u16::try_from(queues).map_err(|_| {
                OpError::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "{queues} queues is out of range for a port; use 1 to {MAX_PORT_QUEUES}"
                    ),
                )
            })?,
        };
        let kind = match (request.vhost_user_socket.as_str(), request.tap.as_str()) {
            (socket, "") if !socket.is_empty() => PortKind::VhostUser {
                socket: socket.to_owned(),
                queues,
                socket_mode: if request.socket_mode == 0 {
                    DEFAULT_SOCKET_MODE
                } else {
                    request.socket_mode
                },
            },
            ("", ifname) if !ifname.is_empty() => PortKind::Tap {
                ifname: ifname.to_owned(),
                queues,
            },
            _ => {
                return Err(OpError::new(
                    ErrorKind::InvalidArgument,
                    "a port is either a vhost-user socket or a tap device: give exactly one of \
                     --vhost-user PATH and --tap IFNAME",
                ));
            }
        };
        if let PortKind::VhostUser { socket, .. } = &kind
            && socket.starts_with('/')
        {
            // This node serves the port: a socket directory it cannot make is the caller's to fix, now.
            super::socket_directory(socket)
                .map_err(|message| OpError::new(ErrorKind::InvalidArgument, message))?;
        }
        let ipv4 = match request.ip.trim() {
            "" => None,
            text => Some(text.parse::<Ipv4Addr>().map_err(|_| {
                OpError::new(
                    ErrorKind::InvalidArgument,
                    format!("'{text}' is not an IPv4 address; write it as a.b.c.d, e.g. 10.0.0.5"),
                )
            })?),
        };
        let mac = match request.mac.trim() {
            "" => self.control.read(|state| unused_mac(state, network.id)),
            text => text
                .parse::<MacAddress>()
                .map_err(|error| OpError::new(ErrorKind::InvalidArgument, error.to_string()))?,
        };
        let outcome = self
            .commit(Command::CreatePort {
                port: NewPort {
                    network: network.id,
                    node: self.control.node_id(),
                    kind,
                    mac,
                    ipv4,
                    allow_any_mac: request.allow_any_mac,
                    created_unix: now_unix(),
                },
            })
            .await?;
        let CommandOutcome::PortCreated { id } = outcome else {
            return Err(unexpected(&outcome));
        };
        self.switch_follows_now().await;
        tracing::info!(port = id, network = %network.name, %mac, "port created");
        self.port_view(id)
    }

    pub async fn port_list(
        &self,
        request: &admin::PortListRequest,
    ) -> Result<admin::PortListReply, OpError> {
        let network = match request.network.trim() {
            "" => None,
            key => Some(self.resolve_network(key)?.id),
        };
        let ports = self.control.read(|state| {
            state
                .ports
                .values()
                .filter(|port| network.is_none_or(|id| port.network == id))
                .map(|port| port_view(state, port))
                .collect()
        });
        Ok(admin::PortListReply {
            ports: self.with_counters(ports).await,
        })
    }

    pub async fn port_show(&self, request: &admin::PortRef) -> Result<admin::Port, OpError> {
        let port = self.resolve_port(&request.port)?;
        let view = self.port_view(port.id)?;
        Ok(self.with_counters(vec![view]).await.remove(0))
    }

    /// The ports' traffic counters, asked of the nodes that serve them (this one from its own switch).
    async fn with_counters(&self, mut ports: Vec<admin::Port>) -> Vec<admin::Port> {
        let me = self.control.node_id();
        let mut counters: std::collections::HashMap<PortId, crate::raft::PortCounters> =
            self.port_counters().into_iter().collect();
        if ports.iter().any(|port| port.node_id != me) {
            for report in self.reports().await.into_values().flatten() {
                counters.extend(report.ports);
            }
        }
        for port in &mut ports {
            port.counters = counters.remove(&port.id).map(|c| admin::PortCounters {
                rx_packets: c.rx_packets,
                rx_bytes: c.rx_bytes,
                tx_packets: c.tx_packets,
                tx_bytes: c.tx_bytes,
                drops: c.drops.into_iter().collect(),
                frontend_connected: c.frontend_connected,
            });
        }
        ports
    }

    pub async fn port_delete(
        self: &Arc<Self>,
        request: &admin::PortRef,
    ) -> Result<admin::Port, OpError> {
        let _guard = self.writes.lock().await;
        let port = self.resolve_port(&request.port)?;
        let view = self.port_view(port.id)?;
        self.commit(Command::DeletePort { id: port.id }).await?;
        self.switch_follows_now().await;
        tracing::info!(port = port.id, network = %view.network, "port deleted");
        Ok(view)
    }

    /// Brings this node's switch in line with the state just committed before the caller hears back, as
    /// `ovs-vsctl` waits for the switch: a port created here is plugged, and one deleted here is gone (its socket
    /// free for another device, its tap removed). `follow_networks` does the same after every change, only
    /// later; it also records the underlay address, which this leaves to it. Reconciling makes system calls
    /// (devices, sockets, threads joined), so it runs on a blocking thread, not on the runtime's.
    async fn switch_follows_now(self: &Arc<Self>) {
        let node = Arc::clone(self);
        let _ = tokio::task::spawn_blocking(move || node.reconcile_switch()).await;
    }

    fn network_view(&self, id: NetworkId, with_ports: bool) -> Result<admin::Network, OpError> {
        self.control.read(|state| {
            state
                .networks
                .get(&id)
                .map(|network| network_view(state, network, with_ports))
                .ok_or_else(|| {
                    CommandError::NetworkNotFound {
                        network: id.to_string(),
                    }
                    .into()
                })
        })
    }

    fn port_view(&self, id: PortId) -> Result<admin::Port, OpError> {
        self.control.read(|state| {
            state
                .ports
                .get(&id)
                .map(|port| port_view(state, port))
                .ok_or_else(|| {
                    CommandError::PortNotFound {
                        port: id.to_string(),
                    }
                    .into()
                })
        })
    }
}

/// A random locally administered unicast MAC that no port of `network` has yet. The state machine checks again
/// at commit: a port created elsewhere meanwhile with the same MAC makes this one fail, never collide.
fn unused_mac(state: &ClusterState, network: NetworkId) -> MacAddress {
    loop {
        let random = Uuid::new_v4();
        let bytes = random.as_bytes();
        let mac =
            MacAddress::local_unicast([bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5]]);
        if !mac.is_zero() && state.ports_in(network).all(|port| port.mac != mac) {
            return mac;
        }
    }
}

fn unexpected(outcome: &CommandOutcome) -> OpError {
    OpError::new(
        ErrorKind::Internal,
        format!("the state machine answered with an unexpected outcome: {outcome:?}"),
    )
}

fn network_view(state: &ClusterState, network: &Network, with_ports: bool) -> admin::Network {
    let nodes: Vec<u64> = state.network_nodes(network.id).into_iter().collect();
    admin::Network {
        id: network.id,
        name: network.name.clone(),
        vni: network.vni,
        mtu: u32::from(network.mtu),
        subnet: network
            .subnet
            .map(|subnet| subnet.to_string())
            .unwrap_or_default(),
        created_unix: network.created_unix,
        port_count: u32::try_from(state.ports_in(network.id).count()).unwrap_or(u32::MAX),
        node_names: nodes.iter().map(|node| state.node_label(*node)).collect(),
        node_ids: nodes,
        ports: if with_ports {
            state
                .ports_in(network.id)
                .map(|port| port_view(state, port))
                .collect()
        } else {
            Vec::new()
        },
    }
}

fn port_view(state: &ClusterState, port: &Port) -> admin::Port {
    let (socket, tap, socket_mode) = match &port.kind {
        PortKind::VhostUser {
            socket,
            socket_mode,
            ..
        } => (socket.clone(), String::new(), *socket_mode),
        PortKind::Tap { ifname, .. } => (String::new(), ifname.clone(), 0),
    };
    admin::Port {
        id: port.id,
        network_id: port.network,
        network: state.network_label(port.network),
        node_id: port.node,
        node: state.node_label(port.node),
        kind: port.kind.label().to_owned(),
        vhost_user_socket: socket,
        tap,
        queues: u32::from(port.kind.queues()),
        mac: port.mac.to_string(),
        ip: port.ipv4.map(|ip| ip.to_string()).unwrap_or_default(),
        allow_any_mac: port.allow_any_mac,
        created_unix: port.created_unix,
        socket_mode,
        counters: None,
    }
}
