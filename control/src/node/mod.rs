//! A node's runtime: the cluster state, the local disk pool and the devices it serves, kept in step.
//!
//! [`run_node`] is the daemon's whole life: it locks the data directory, opens the Raft-replicated state, brings
//! the local pool and attachments in line with it, serves the admin API (Unix socket, and TCP with `--listen`) and
//! `/metrics`, and on shutdown stops the devices without touching the state, so a restarted daemon serves them again
//! and guests reconnect.
//!
//! Invariant: the cluster state is the truth. A local action that can fail (formatting a disk, starting a device) is
//! done before its command is committed and undone if the commit is refused; a local action that follows a commit
//! (freeing a deleted volume's space) is redone at start-up if the daemon died in between.

mod networks;
mod ops;
mod rebuild;
mod reclaim;
mod replica;
mod routing;
mod startup;
mod switch;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use vstore::{LocalPool, LocalVolume, VolumeId};

pub use ops::{ErrorKind, OpError};
pub use startup::run_node;

use crate::raft::ControlPlane;

/// What the daemon was told at start-up.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub admin_socket: PathBuf,
    /// TCP address of the admin API and peer traffic; `None` runs a self-initialising single-node cluster.
    pub listen: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    /// Used when this node initialises the cluster.
    pub extent_size: u64,
    /// Used when this node initialises the cluster.
    pub overcommit_ratio_milli: u32,
    /// Size of the file disk a self-initialising node creates on first start; 0 for none.
    pub default_disk_size: u64,
    /// The node's name in the cluster; `None` takes the host name.
    pub name: Option<String>,
    /// Failure-domain labels (rack, zone...), recorded when this node initialises or joins a cluster.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Most bytes per second one rebuild driven by this node copies; 0 for no limit.
    pub rebuild_rate: u64,
    /// How long a replica this node was fenced off from stays on its disks before it is freed (it lets the node
    /// catch up by copying only what it missed, for up to ten minutes).
    pub stale_replica_keep: std::time::Duration,
    /// IP:PORT the switch's VXLAN socket binds to; `None`: the `--listen` IP (or 127.0.0.1) and port 4789.
    pub underlay: Option<SocketAddr>,
    /// The switch's MAC table size limit (per network) and aging.
    pub switch: vnet::SwitchConfig,
}

impl NodeConfig {
    /// A node without --listen forms a cluster of its own.
    pub fn standalone(&self) -> bool {
        self.listen.is_none()
    }
}

/// How a volume is served, as the attachment records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachSpec {
    pub socket: String,
    pub queues: u16,
    pub read_only: bool,
    pub socket_mode: u32,
}

/// How a vhost-user-net port is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    pub socket: String,
    pub socket_mode: u32,
    /// Queue pairs.
    pub queues: u16,
    pub mac: [u8; 6],
    /// The network's MTU: the most the guest may set.
    pub mtu: u16,
}

/// The devices a node serves volumes and guest NICs through; the daemon implements it with vhost-user-blk and
/// vhost-user-net. The control plane decides *what* is served; this does the serving.
pub trait DeviceHost: Send + Sync + std::fmt::Debug + 'static {
    /// Starts serving `volume`; the error is a user-facing sentence.
    fn attach(&self, volume: Arc<LocalVolume>, spec: &AttachSpec) -> Result<(), String>;
    /// Stops serving `volume` (nothing if it is not served).
    fn detach(&self, volume: VolumeId);
    /// The volume grew: tell the frontend.
    fn resize(&self, volume: VolumeId) -> Result<(), String>;
    /// Whether a frontend is connected to the volume's device.
    fn connected(&self, volume: VolumeId) -> bool;
    /// The cache mode of a served volume: write-back (true) or write-through.
    fn write_back(&self, volume: VolumeId) -> Option<bool>;
    /// Stops every device (daemon shutdown).
    fn detach_all(&self);
    /// Starts serving port `port` as a vhost-user-net device: frames its guest sends on queue pair N go to
    /// `senders[N]` (one per queue pair); the returned sink takes the frames for the guest. The error is a
    /// user-facing sentence.
    fn start_net(
        &self,
        port: u64,
        spec: &NetSpec,
        senders: Vec<vnet::PortSender>,
    ) -> Result<Arc<dyn vnet::FrameSink>, String> {
        let _ = (port, spec, senders);
        Err("this daemon serves no vhost-user-net devices".to_owned())
    }
    /// Stops serving port `port` (nothing if it is not served).
    fn stop_net(&self, port: u64) {
        let _ = port;
    }
    /// Whether a frontend is connected to port `port`'s vhost-user-net device (false if it is not served).
    fn net_connected(&self, port: u64) -> bool {
        let _ = port;
        false
    }
}

/// Creates the directory a vhost-user socket goes in if it does not exist yet (e.g. `/run/vessel` after a reboot);
/// the error is a user-facing sentence.
pub(crate) fn socket_directory(socket: &str) -> Result<(), String> {
    match std::path::Path::new(socket).parent() {
        Some(parent) if !parent.as_os_str().is_empty() && !parent.is_dir() => {
            std::fs::create_dir_all(parent)
                .map_err(|error| format!("cannot create the directory of socket {socket}: {error}"))
        }
        _ => Ok(()),
    }
}

/// Everything a node's admin API, metrics and start-up share.
pub struct LocalNode {
    config: NodeConfig,
    control: ControlPlane,
    devices: Arc<dyn DeviceHost>,
    /// Set once the cluster is initialised (the pool's extent size is a cluster setting).
    pool: OnceLock<Arc<LocalPool>>,
    /// Volumes open for I/O on this node: the attached ones.
    open: Mutex<HashMap<VolumeId, Arc<LocalVolume>>>,
    /// Problems an operator should see in `cluster status` (e.g. an attachment that could not be restored).
    warnings: Mutex<Vec<String>>,
    /// Disks of this node that could not be opened at start-up; while any is missing no volume is served.
    unavailable_disks: Mutex<Vec<String>>,
    /// Serialises admin writes that pair a local action with a Raft commit.
    writes: tokio::sync::Mutex<()>,
    /// Deleted volumes whose space could not be reclaimed (reported once each).
    reclaim_failures: Mutex<std::collections::HashSet<VolumeId>>,
    /// Connections to the other nodes' replicas, shared by every volume served here.
    peers: Arc<vstore::remote::Peers>,
    /// Writes of the volumes served here that wait for a failed replica to be settled, per volume.
    faults: Mutex<HashMap<VolumeId, Arc<vstore::remote::Faults>>>,
    /// Wakes the fault settler.
    fault_signal: Arc<tokio::sync::Notify>,
    /// Rebuild copies this node runs.
    copies: Mutex<rebuild::Copies>,
    /// For the volumes served here: what failed or fenced-off replicas miss.
    dirty: Mutex<HashMap<VolumeId, Arc<vstore::remote::DirtyMaps>>>,
    /// Replicas this node no longer belongs to (see `reclaim`); shared with the replica directory.
    stale: Arc<Mutex<reclaim::Stale>>,
    /// Held while a local writer reads the replica sets it acts on, and while stale replicas are freed.
    membership: Mutex<()>,
    /// This node's virtual switch, following the networks and ports of the state.
    switch: Mutex<switch::NodeSwitch>,
}

impl std::fmt::Debug for LocalNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalNode")
            .field("node_id", &self.control.node_id())
            .field("config", &self.config)
            .finish()
    }
}

impl LocalNode {
    fn new(config: NodeConfig, control: ControlPlane, devices: Arc<dyn DeviceHost>) -> Self {
        LocalNode {
            config,
            control,
            devices,
            pool: OnceLock::new(),
            open: Mutex::new(HashMap::new()),
            warnings: Mutex::new(Vec::new()),
            unavailable_disks: Mutex::new(Vec::new()),
            writes: tokio::sync::Mutex::new(()),
            reclaim_failures: Mutex::new(std::collections::HashSet::new()),
            peers: vstore::remote::Peers::new(),
            faults: Mutex::new(HashMap::new()),
            fault_signal: Arc::new(tokio::sync::Notify::new()),
            copies: Mutex::new(rebuild::Copies::default()),
            dirty: Mutex::new(HashMap::new()),
            stale: Arc::default(),
            membership: Mutex::new(()),
            switch: Mutex::default(),
        }
    }

    pub fn control(&self) -> &ControlPlane {
        &self.control
    }

    pub fn pool(&self) -> Option<&Arc<LocalPool>> {
        self.pool.get()
    }

    fn open_volume_handle(&self, id: VolumeId) -> Option<Arc<LocalVolume>> {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned()
    }

    pub(crate) fn open_volumes(&self) -> Vec<Arc<LocalVolume>> {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    fn warn(&self, warning: String) {
        tracing::warn!("{warning}");
        self.warnings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(warning);
    }

    pub fn warnings(&self) -> Vec<String> {
        self.warnings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}
