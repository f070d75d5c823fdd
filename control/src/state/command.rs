//! Typed commands on the cluster state, their validation, and their outcomes.
//!
//! [`ClusterState::apply`] is the only way the state changes. Each command is checked completely
//! before anything is mutated, so a [`CommandError`] means "nothing happened". Error messages
//! name the object and say what to do; they reach the CLI unchanged, so tests assert on the text.
//! [`Command::rows`] lists the storage rows a command may change, which lets the store persist an
//! apply by rewriting only those rows.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vessel_proto::net::Ipv4Subnet;
use vessel_proto::size::HumanSize;

use super::network::{MAX_PORT_QUEUES, MAX_VNI, NewPort, SocketUser};
use super::{
    Attachment, Candidate, ClusterState, DOMAIN_LABELS, Disk, DiskId, MAX_MTU, MIN_MTU, Network,
    NetworkId, Node, NodeId, NodeState, PlacementRequest, Port, PortId, Settings, Volume, VolumeId,
    domain_count, extent_count, format_ratio, place, valid_block_size,
};

/// Largest volume size accepted (1 EiB), far beyond any pool, so size arithmetic never overflows.
pub const MAX_VOLUME_SIZE: u64 = 1 << 60;

/// Most queues a vhost-user-blk device may be attached with.
pub const MAX_QUEUES: u16 = 64;

/// A change to the cluster state, proposed through Raft and applied on every voter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Gives the cluster its id and settings and records its first node.
    InitCluster {
        cluster_id: Uuid,
        settings: Settings,
        node: Node,
    },
    /// Records a new node.
    AddNode { node: Node },
    /// Changes what is given of a node's address, labels and state; `None` leaves a field as is.
    UpdateNode {
        id: NodeId,
        address: Option<String>,
        labels: Option<BTreeMap<String, String>>,
        state: Option<NodeState>,
    },
    /// Records where a node's switch sends and receives VXLAN (its VTEP), or that it has none.
    SetUnderlay {
        node: NodeId,
        underlay: Option<String>,
    },
    /// Adds a disk to a node's pool.
    AddDisk { disk: Disk },
    /// Removes a disk from the pool, if the remaining pool still covers what is provisioned.
    RemoveDisk { id: DiskId },
    /// Creates a volume and places its extents. `block_size: None` takes the cluster default.
    CreateVolume {
        id: VolumeId,
        name: String,
        size: u64,
        block_size: Option<u32>,
        replicas: u8,
        created_unix: i64,
    },
    /// Grows a volume and places its new extents.
    GrowVolume { id: VolumeId, new_size: u64 },
    /// Deletes a detached volume.
    DeleteVolume { id: VolumeId },
    /// Takes the attachment lease of a volume for one node.
    Attach { attachment: Attachment },
    /// Releases a volume's attachment lease.
    Detach { volume: VolumeId },
    /// Removes a node and its disks; refused while a volume has replicas there or is attached
    /// there, or when the rest of the pool would not cover what is provisioned. `disks` names
    /// exactly the node's disks (the proposer reads them from the state; a mismatch is refused),
    /// so the rows the command changes are known before it applies.
    RemoveNode { id: NodeId, disks: Vec<DiskId> },
    /// Takes a failed replica node out of every replica set of a volume, bumping their epochs so
    /// it is fenced off; proposed by `holder`, the node the volume is attached on, whose writes
    /// to it failed. Refused unless the volume is attached on `holder` (a node that lost its
    /// lease may not change the sets), or when a set would keep fewer than `min_replicas`.
    DropReplica {
        volume: VolumeId,
        node: NodeId,
        holder: NodeId,
    },
    /// Starts rebuilding runs of a volume that lack replicas: each `(first_extent, node)` makes
    /// `node` a rebuild target of the run starting there (it takes the run's writes from the new
    /// epoch on, and `driver` copies the rest to it). `driver` must be the node the volume is
    /// attached on, or any node while it is detached.
    StartRebuild {
        volume: VolumeId,
        driver: NodeId,
        targets: Vec<(u64, NodeId)>,
        started_unix: i64,
    },
    /// Records how far the rebuild of the run starting at `first_extent` got (at `epoch`).
    RebuildProgress {
        volume: VolumeId,
        first_extent: u64,
        epoch: u64,
        copied_extents: u64,
        reported_unix: i64,
    },
    /// The rebuild of the run starting at `first_extent` (at `epoch`) copied everything: its
    /// targets become healthy replicas.
    FinishRebuild {
        volume: VolumeId,
        first_extent: u64,
        epoch: u64,
    },
    /// Moves a volume's attachment lease from `from`, a node that is gone (the proposer checked), to the node
    /// `attachment` names, bumping the epoch of every replica set of the volume so that nothing `from` still sends
    /// is accepted.
    TakeOver {
        attachment: Attachment,
        from: NodeId,
    },
    /// Adds extents to (`active`) or removes them from the activity log of a volume's attachment; only its holder
    /// may.
    Activity {
        volume: VolumeId,
        holder: NodeId,
        extents: Vec<u64>,
        active: bool,
    },
    /// Creates a network; the state gives it the next network id. `mtu: None` takes [`super::DEFAULT_MTU`].
    CreateNetwork {
        name: String,
        vni: u32,
        mtu: Option<u16>,
        subnet: Option<Ipv4Subnet>,
        created_unix: i64,
    },
    /// Deletes a network; refused while it has ports unless `force`, which deletes them with it.
    DeleteNetwork { id: NetworkId, force: bool },
    /// Creates a port; the state gives it the next port id.
    CreatePort { port: NewPort },
    /// Deletes a port.
    DeletePort { id: PortId },
    /// Fences off a replica node whose writes failed, as `DropReplica` does, and starts the record of what it misses
    /// ([`super::Missed`]) on the runs where it held a complete replica, so that it catches up on those alone if it
    /// returns in time. `since_unix` and `boot_id` (the node's kernel boot id as last seen) start the record; a
    /// record the node already has keeps its own.
    DropFailedReplica {
        volume: VolumeId,
        node: NodeId,
        holder: NodeId,
        since_unix: i64,
        boot_id: Option<[u8; 16]>,
    },
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InitCluster {
                cluster_id, node, ..
            } => {
                write!(
                    f,
                    "init cluster {cluster_id} with node '{}' ({})",
                    node.name, node.id
                )
            }
            Self::AddNode { node } => write!(f, "add node '{}' ({})", node.name, node.id),
            Self::UpdateNode { id, .. } => write!(f, "update node {id}"),
            Self::SetUnderlay { node, underlay } => {
                write!(f, "set the underlay of node {node} to {underlay:?}")
            }
            Self::AddDisk { disk } => write!(
                f,
                "add disk {} at {} on node {}",
                disk.id, disk.path, disk.node
            ),
            Self::RemoveDisk { id } => write!(f, "remove disk {id}"),
            Self::CreateVolume { id, name, size, .. } => {
                write!(f, "create volume '{name}' ({id}, {})", HumanSize(*size))
            }
            Self::GrowVolume { id, new_size } => {
                write!(f, "grow volume {id} to {}", HumanSize(*new_size))
            }
            Self::DeleteVolume { id } => write!(f, "delete volume {id}"),
            Self::Attach { attachment } => write!(
                f,
                "attach volume {} on node {} at {}",
                attachment.volume, attachment.node, attachment.socket
            ),
            Self::Detach { volume } => write!(f, "detach volume {volume}"),
            Self::RemoveNode { id, .. } => write!(f, "remove node {id}"),
            Self::DropReplica { volume, node, .. } => {
                write!(f, "drop the replicas of volume {volume} on node {node}")
            }
            Self::DropFailedReplica { volume, node, .. } => write!(
                f,
                "fence off the failed replicas of volume {volume} on node {node}"
            ),
            Self::StartRebuild {
                volume, targets, ..
            } => write!(f, "rebuild {} run(s) of volume {volume}", targets.len()),
            Self::RebuildProgress {
                volume,
                first_extent,
                copied_extents,
                ..
            } => write!(
                f,
                "rebuild of volume {volume} at extent {first_extent}: {copied_extents} extent(s) copied"
            ),
            Self::FinishRebuild {
                volume,
                first_extent,
                ..
            } => write!(
                f,
                "rebuild of volume {volume} at extent {first_extent} done"
            ),
            Self::Activity {
                volume,
                extents,
                active,
                ..
            } => write!(
                f,
                "{} {} extent(s) of volume {volume} {} the activity log",
                if *active { "add" } else { "remove" },
                extents.len(),
                if *active { "to" } else { "from" }
            ),
            Self::TakeOver { attachment, from } => write!(
                f,
                "take volume {} over from node {from} to node {} at {}",
                attachment.volume, attachment.node, attachment.socket
            ),
            Self::CreateNetwork { name, vni, .. } => {
                write!(f, "create network '{name}' (VNI {vni})")
            }
            Self::DeleteNetwork { id, force } => write!(
                f,
                "delete network {id}{}",
                if *force { " with its ports" } else { "" }
            ),
            Self::CreatePort { port } => write!(
                f,
                "create a port ({}, MAC {}) in network {} on node {}",
                port.kind, port.mac, port.network, port.node
            ),
            Self::DeletePort { id } => write!(f, "delete port {id}"),
        }
    }
}

/// A storage row of the state: the unit the store rewrites after an apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Row {
    /// Cluster id and settings.
    Cluster,
    Node(NodeId),
    Disk(DiskId),
    Volume(VolumeId),
    Attachment(VolumeId),
    /// The id counters of networks and ports.
    Counters,
    Network(NetworkId),
    Port(PortId),
    /// What fenced-off replica nodes miss of a volume.
    Missed(VolumeId),
}

impl Command {
    /// The rows this command may change when it succeeds, applied to `state` (the state just before it: ids the
    /// state hands out, and the ports a forced network deletion takes with it, are read from there).
    pub fn rows(&self, state: &ClusterState) -> Vec<Row> {
        match self {
            Self::CreateNetwork { .. } => {
                vec![Row::Counters, Row::Network(state.counters.next_network)]
            }
            Self::DeleteNetwork { id, .. } => std::iter::once(Row::Network(*id))
                .chain(state.ports_in(*id).map(|port| Row::Port(port.id)))
                .collect(),
            Self::CreatePort { .. } => vec![Row::Counters, Row::Port(state.counters.next_port)],
            Self::DeletePort { id } => vec![Row::Port(*id)],
            Self::InitCluster { node, .. } => vec![Row::Cluster, Row::Node(node.id)],
            Self::AddNode { node } => vec![Row::Node(node.id)],
            Self::UpdateNode { id, .. } | Self::SetUnderlay { node: id, .. } => {
                vec![Row::Node(*id)]
            }
            Self::AddDisk { disk } => vec![Row::Disk(disk.id)],
            Self::RemoveDisk { id } => vec![Row::Disk(*id)],
            Self::CreateVolume { id, .. }
            | Self::GrowVolume { id, .. }
            | Self::DropReplica { volume: id, .. }
            | Self::RebuildProgress { volume: id, .. } => {
                vec![Row::Volume(*id)]
            }
            Self::DeleteVolume { id }
            | Self::DropFailedReplica { volume: id, .. }
            | Self::StartRebuild { volume: id, .. }
            | Self::FinishRebuild { volume: id, .. } => {
                vec![Row::Volume(*id), Row::Missed(*id)]
            }
            // Attaching and detaching fence off whoever copies for a rebuild of the volume.
            Self::Attach { attachment } => vec![
                Row::Attachment(attachment.volume),
                Row::Volume(attachment.volume),
            ],
            Self::Detach { volume } => vec![Row::Attachment(*volume), Row::Volume(*volume)],
            Self::Activity { volume, .. } => std::iter::once(Row::Attachment(*volume))
                .chain(
                    state
                        .missed
                        .contains_key(volume)
                        .then_some(Row::Missed(*volume)),
                )
                .collect(),
            Self::TakeOver { attachment, .. } => vec![
                Row::Attachment(attachment.volume),
                Row::Volume(attachment.volume),
            ],
            Self::RemoveNode { id, disks } => std::iter::once(Row::Node(*id))
                .chain(disks.iter().map(|disk| Row::Disk(*disk)))
                .chain(
                    state
                        .missed
                        .iter()
                        .filter(|(_, nodes)| nodes.contains_key(id))
                        .map(|(volume, _)| Row::Missed(*volume)),
                )
                .collect(),
        }
    }
}

/// What an applied command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOutcome {
    ClusterInitialized {
        cluster_id: Uuid,
    },
    NodeAdded {
        id: NodeId,
    },
    NodeUpdated {
        id: NodeId,
    },
    DiskAdded {
        id: DiskId,
    },
    DiskRemoved {
        disk: Disk,
    },
    VolumeCreated {
        id: VolumeId,
    },
    VolumeGrown {
        id: VolumeId,
        old_size: u64,
        new_size: u64,
    },
    VolumeDeleted {
        volume: Box<Volume>,
    },
    Attached {
        volume: VolumeId,
    },
    TakenOver {
        volume: VolumeId,
        from: NodeId,
    },
    ActivityRecorded {
        volume: VolumeId,
    },
    Detached {
        attachment: Attachment,
    },
    NodeRemoved {
        node: Node,
    },
    ReplicaDropped {
        volume: VolumeId,
        node: NodeId,
        /// Replica sets that lost the node.
        sets: u64,
    },
    RebuildStarted {
        volume: VolumeId,
        runs: u64,
    },
    RebuildProgressed {
        volume: VolumeId,
    },
    RebuildFinished {
        volume: VolumeId,
        first_extent: u64,
    },
    NetworkCreated {
        id: NetworkId,
    },
    NetworkDeleted {
        network: Box<Network>,
        /// The ports deleted with it (a forced deletion).
        ports: Vec<Port>,
    },
    PortCreated {
        id: PortId,
    },
    PortDeleted {
        port: Port,
    },
}

/// Why the state machine refused a command. The messages are user-facing and reach the CLI as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    #[error("the cluster is not initialised; run `vessel cluster init` first")]
    NotInitialized,
    #[error("the cluster is already initialised (cluster id {cluster_id})")]
    AlreadyInitialized { cluster_id: Uuid },
    #[error("cluster id must not be the nil UUID; generate a random one")]
    NilClusterId,
    #[error("invalid cluster settings: {reason}")]
    InvalidSettings { reason: String },
    #[error("'{name}' is not a valid {kind} name: {reason}")]
    InvalidName {
        kind: String,
        name: String,
        reason: String,
    },

    #[error("node '{node}' not found")]
    NodeNotFound { node: String },
    #[error("node {id} already exists as '{name}'")]
    NodeExists { id: NodeId, name: String },
    #[error("node name '{name}' is already used by node {id}; choose another name")]
    NodeNameTaken { name: String, id: NodeId },

    #[error("disk '{disk}' not found")]
    DiskNotFound { disk: String },
    #[error("disk {id} already exists at {path} on node '{node}'")]
    DiskExists {
        id: DiskId,
        path: String,
        node: String,
    },
    #[error("node '{node}' already has a disk at {path}")]
    DiskPathTaken { path: String, node: String },
    #[error("disk path '{path}' must be an absolute path")]
    DiskPathNotAbsolute { path: String },
    #[error("disk {path} has no capacity; give it a size")]
    DiskEmpty { path: String },
    #[error(
        "removing disk {path} would leave {provisionable} provisionable ({remaining} of disks × {ratio}), less than \
         the {provisioned} already provisioned; delete volumes or add a disk first",
        provisionable = HumanSize(*provisionable),
        remaining = HumanSize(*remaining),
        ratio = format_ratio(*ratio_milli),
        provisioned = HumanSize(*provisioned)
    )]
    DiskStillNeeded {
        path: String,
        provisionable: u64,
        remaining: u64,
        ratio_milli: u32,
        provisioned: u64,
    },
    #[error(
        "disk {path} is the last disk of node '{node}', which holds replicas of volume(s) {volumes}; delete those \
         volumes or add another disk to the node first"
    )]
    LastDiskHoldsReplicas {
        path: String,
        node: String,
        volumes: String,
    },

    #[error("volume '{volume}' not found")]
    VolumeNotFound { volume: String },
    #[error("volume '{name}' already exists")]
    VolumeExists { name: String },
    #[error("volume id {id} is already used by volume '{name}'")]
    VolumeIdTaken { id: VolumeId, name: String },
    #[error("volume '{name}' cannot have size 0; give a size such as 10G")]
    ZeroSize { name: String },
    #[error(
        "volume '{name}' size {size} exceeds the largest supported volume size {max}",
        size = exact_size(*size),
        max = HumanSize(MAX_VOLUME_SIZE)
    )]
    SizeTooLarge { name: String, size: u64 },
    #[error(
        "size {size} B is not a multiple of the block size {block_size} B; round it up to {rounded}",
        rounded = exact_size(size.div_ceil(u64::from(*block_size)).saturating_mul(u64::from(*block_size)))
    )]
    SizeNotMultiple { size: u64, block_size: u32 },
    #[error("block size {block_size} B is not a power of two between 512 B and 64 KiB")]
    InvalidBlockSize { block_size: u32 },
    #[error("volume '{name}' needs at least 1 replica")]
    ZeroReplicas { name: String },
    #[error("{}", not_enough_nodes(name, *replicas, *available))]
    NotEnoughNodes {
        name: String,
        replicas: u8,
        available: usize,
    },
    #[error(
        "{subject} exceeds the pool's overcommit limit: {provisionable} provisionable ({capacity} of disks × \
         {ratio}), {provisioned} already provisioned; add a disk or raise overcommit_ratio",
        provisionable = HumanSize(*provisionable),
        capacity = HumanSize(*capacity),
        ratio = format_ratio(*ratio_milli),
        provisioned = HumanSize(*provisioned)
    )]
    OverLimit {
        subject: String,
        provisionable: u64,
        capacity: u64,
        ratio_milli: u32,
        provisioned: u64,
    },
    #[error(
        "volume '{name}' is already {size}; give a larger size to grow it",
        size = HumanSize(*size)
    )]
    SameSize { name: String, size: u64 },
    #[error(
        "volume '{name}' is {size}; shrinking it to {new_size} is not supported",
        size = HumanSize(*size),
        new_size = HumanSize(*new_size)
    )]
    Shrink {
        name: String,
        size: u64,
        new_size: u64,
    },

    #[error("volume '{name}' is attached at {socket}; detach it first")]
    VolumeAttached { name: String, socket: String },
    #[error(
        "volume '{name}' is already attached at {socket} on node '{node}'; detach it there first (if that node is \
         gone, attach with --force to take the volume over)"
    )]
    AlreadyAttached {
        name: String,
        socket: String,
        node: String,
    },
    #[error("volume '{name}' is not attached")]
    NotAttached { name: String },
    #[error(
        "vhost-user socket {socket} on node '{node}' is already used by volume '{other}'; choose another path"
    )]
    SocketInUse {
        socket: String,
        node: String,
        other: String,
    },
    #[error("vhost-user socket path '{socket}' must be an absolute path")]
    SocketPathNotAbsolute { socket: String },
    #[error("socket mode {mode:04o} is not a permission mode; use e.g. 0600 or 0660")]
    InvalidSocketMode { mode: u32 },
    #[error("socket mode {mode:04o} would make the socket world-writable; use 0660 or stricter")]
    WorldWritableSocket { mode: u32 },
    #[error("{queues} queues is out of range; use 1 to {MAX_QUEUES}")]
    InvalidQueues { queues: u16 },
    #[error(
        "node '{node}' holds replicas of volume(s) {volumes}; move them off first with `vessel node drain {node}` \
         (or delete those volumes)"
    )]
    NodeHoldsReplicas { node: String, volumes: String },
    #[error("node '{node}' serves volume(s) {volumes}; detach them first")]
    NodeServesVolumes { node: String, volumes: String },
    #[error("node '{node}' changed while it was being removed (its disks); run the removal again")]
    NodeChanged { node: String },
    #[error(
        "removing node '{node}' leaves {remaining} of disks, {provisionable} provisionable at overcommit {ratio}, \
         less than the {provisioned} provisioned; add disks elsewhere or delete volumes first",
        remaining = HumanSize(*remaining),
        provisionable = HumanSize(*provisionable),
        ratio = format_ratio(*ratio_milli),
        provisioned = HumanSize(*provisioned)
    )]
    NodeCapacityNeeded {
        node: String,
        remaining: u64,
        provisionable: u64,
        ratio_milli: u32,
        provisioned: u64,
    },
    #[error(
        "volume '{name}' needs {replicas} replicas in distinct {label}s, but the nodes with disks are in only \
         {available} {label}(s); add disks in another {label} or lower --replicas"
    )]
    NotEnoughDomains {
        name: String,
        replicas: u8,
        label: String,
        available: usize,
    },
    #[error(
        "volume '{name}' is not attached on node {holder} (it is {}); only the attaching node may drop replicas",
        attached.as_deref().unwrap_or("not attached")
    )]
    NotTheHolder {
        name: String,
        holder: NodeId,
        attached: Option<String>,
    },
    #[error("rebuild of volume '{name}' refused: {reason}")]
    RebuildRefused { name: String, reason: String },
    #[error(
        "dropping node {node} from volume '{name}' would leave extent {first_extent} with {remaining} replica(s), \
         fewer than the volume's minimum of {min_replicas}; I/O waits for the replica to return"
    )]
    TooFewReplicas {
        name: String,
        node: NodeId,
        first_extent: u64,
        remaining: usize,
        min_replicas: u8,
    },

    #[error("network '{network}' not found; `vessel net list` shows the networks")]
    NetworkNotFound { network: String },
    #[error("network '{name}' already exists; choose another name")]
    NetworkExists { name: String },
    #[error("VNI {vni} is out of range; use 1 to {MAX_VNI}")]
    InvalidVni { vni: u32 },
    #[error("VNI {vni} is already used by network '{network}'; choose another VNI")]
    VniTaken { vni: u32, network: String },
    #[error(
        "MTU {mtu} is out of range; use {MIN_MTU} to {MAX_MTU} (the underlay's MTU less 50 bytes of VXLAN)"
    )]
    InvalidMtu { mtu: u16 },
    #[error("invalid subnet: {reason}")]
    InvalidSubnet { reason: String },
    #[error(
        "network '{name}' still has {ports} port(s); delete them first (`vessel port list --network {name}`), or \
         delete the network with --force to delete them too"
    )]
    NetworkHasPorts { name: String, ports: usize },
    #[error("port '{port}' not found; `vessel port list` shows the ports")]
    PortNotFound { port: String },
    #[error("{queues} queues is out of range for a port; use 1 to {MAX_PORT_QUEUES}")]
    InvalidPortQueues { queues: u16 },
    #[error("'{ifname}' is not a valid tap device name: {reason}")]
    InvalidIfname { ifname: String, reason: String },
    #[error(
        "tap '{ifname}' on node '{node}' is already port {port} of network '{network}'; choose another name"
    )]
    TapInUse {
        ifname: String,
        node: String,
        port: PortId,
        network: String,
    },
    #[error(
        "vhost-user socket {socket} on node '{node}' is already used by port {port} of network '{network}'; \
         choose another path"
    )]
    SocketUsedByPort {
        socket: String,
        node: String,
        port: PortId,
        network: String,
    },
    #[error(
        "MAC {mac} is a multicast or all-zero address; give a unicast MAC, or none to generate one"
    )]
    InvalidMac { mac: String },
    #[error(
        "MAC {mac} is already used by port {port} of network '{network}'; give another MAC, or none to generate one"
    )]
    MacInUse {
        mac: String,
        network: String,
        port: PortId,
    },
    #[error("{ip} is not a valid port address: {reason}")]
    InvalidIp { ip: Ipv4Addr, reason: String },
    #[error("{ip} is outside network '{network}''s subnet {subnet}; give an address in {subnet}")]
    IpOutsideSubnet {
        ip: Ipv4Addr,
        network: String,
        subnet: Ipv4Subnet,
    },
    #[error(
        "{ip} is the network or broadcast address of network '{network}''s subnet {subnet}; give a host address"
    )]
    IpReserved {
        ip: Ipv4Addr,
        network: String,
        subnet: Ipv4Subnet,
    },
    #[error("{ip} is already used by port {port} of network '{network}'; give another address")]
    IpInUse {
        ip: Ipv4Addr,
        network: String,
        port: PortId,
    },
    #[error("node '{node}' serves port(s) {ports}; delete them first with `vessel port delete`")]
    NodeServesPorts { node: String, ports: String },
}

fn not_enough_nodes(name: &str, replicas: u8, available: usize) -> String {
    if available == 0 {
        return format!(
            "volume '{name}' has nowhere to go: the cluster has no disks yet; add one with `vessel disk add PATH [--size SIZE]`"
        );
    }
    format!(
        "volume '{name}' needs {replicas} replicas but only {available} node(s) with disks can hold them; add disks on \
         more nodes or lower --replicas"
    )
}

impl ClusterState {
    /// Applies `command`: validates it against the state, then mutates the state.
    ///
    /// Deterministic; on `Err` the state is unchanged.
    pub fn apply(&mut self, command: Command) -> Result<CommandOutcome, CommandError> {
        if let Command::InitCluster {
            cluster_id,
            settings,
            node,
        } = command
        {
            return self.init_cluster(cluster_id, settings, node);
        }
        if !self.is_initialized() {
            return Err(CommandError::NotInitialized);
        }
        match command {
            Command::InitCluster { .. } => Err(CommandError::AlreadyInitialized {
                cluster_id: self.cluster_id,
            }),
            Command::AddNode { node } => self.add_node(node),
            Command::UpdateNode {
                id,
                address,
                labels,
                state,
            } => self.update_node(id, address, labels, state),
            Command::SetUnderlay { node, underlay } => {
                let found =
                    self.nodes
                        .get_mut(&node)
                        .ok_or_else(|| CommandError::NodeNotFound {
                            node: node.to_string(),
                        })?;
                found.underlay = underlay;
                Ok(CommandOutcome::NodeUpdated { id: node })
            }
            Command::AddDisk { disk } => self.add_disk(disk),
            Command::RemoveDisk { id } => self.remove_disk(id),
            Command::CreateVolume {
                id,
                name,
                size,
                block_size,
                replicas,
                created_unix,
            } => self.create_volume(id, name, size, block_size, replicas, created_unix),
            Command::GrowVolume { id, new_size } => self.grow_volume(id, new_size),
            Command::DeleteVolume { id } => self.delete_volume(id),
            Command::Attach { attachment } => self.attach(attachment),
            Command::Detach { volume } => self.detach(volume),
            Command::RemoveNode { id, disks } => self.remove_node(id, &disks),
            Command::DropReplica {
                volume,
                node,
                holder,
            } => self.drop_replica(volume, node, holder),
            Command::DropFailedReplica {
                volume,
                node,
                holder,
                since_unix,
                boot_id,
            } => self.drop_failed_replica(volume, node, holder, since_unix, boot_id),
            Command::StartRebuild {
                volume,
                driver,
                targets,
                started_unix,
            } => self.start_rebuild(volume, driver, &targets, started_unix),
            Command::RebuildProgress {
                volume,
                first_extent,
                epoch,
                copied_extents,
                reported_unix,
            } => self.rebuild_progress(volume, first_extent, epoch, copied_extents, reported_unix),
            Command::FinishRebuild {
                volume,
                first_extent,
                epoch,
            } => self.finish_rebuild(volume, first_extent, epoch),
            Command::TakeOver { attachment, from } => self.take_over(attachment, from),
            Command::Activity {
                volume,
                holder,
                extents,
                active,
            } => self.record_activity(volume, holder, &extents, active),
            Command::CreateNetwork {
                name,
                vni,
                mtu,
                subnet,
                created_unix,
            } => self.create_network(name, vni, mtu, subnet, created_unix),
            Command::DeleteNetwork { id, force } => self.delete_network(id, force),
            Command::CreatePort { port } => self.create_port(port),
            Command::DeletePort { id } => self.delete_port(id),
        }
    }

    fn record_activity(
        &mut self,
        id: VolumeId,
        holder: NodeId,
        extents: &[u64],
        active: bool,
    ) -> Result<CommandOutcome, CommandError> {
        let name = self
            .volumes
            .get(&id)
            .map(|v| v.name.clone())
            .ok_or_else(|| CommandError::VolumeNotFound {
                volume: id.to_string(),
            })?;
        let attached = self.attachments.get(&id).map(|a| a.node);
        let Some(attachment) = self.attachments.get_mut(&id).filter(|a| a.node == holder) else {
            return Err(CommandError::NotTheHolder {
                name,
                holder,
                attached: attached.map(|node| format!("attached on node {node}")),
            });
        };
        for extent in extents {
            if active {
                attachment.active.insert(*extent);
            } else {
                attachment.active.remove(extent);
            }
        }
        if active
            && let (Some(records), Some(volume)) = (self.missed.get_mut(&id), self.volumes.get(&id))
        {
            // About to be written: nodes fenced off from the extent's run miss it.
            for extent in extents {
                let Some(first) = volume.placement.run_start(*extent) else {
                    continue;
                };
                for missed in records.values_mut() {
                    if missed.runs.contains(&first) {
                        missed.extents.insert(*extent);
                    }
                }
            }
        }
        Ok(CommandOutcome::ActivityRecorded { volume: id })
    }

    fn take_over(
        &mut self,
        attachment: Attachment,
        from: NodeId,
    ) -> Result<CommandOutcome, CommandError> {
        let id = attachment.volume;
        let name = self
            .volumes
            .get(&id)
            .map(|v| v.name.clone())
            .ok_or_else(|| CommandError::VolumeNotFound {
                volume: id.to_string(),
            })?;
        let previous = self.attachments.get(&id).cloned();
        match &previous {
            Some(current) if current.node == from => {}
            _ => {
                return Err(CommandError::NotTheHolder {
                    name,
                    holder: from,
                    attached: previous
                        .map(|a| format!("attached on node {}", self.node_label(a.node))),
                });
            }
        }
        // Checked like any attachment, as if the old one were gone; the state is unchanged on refusal. The old
        // holder's activity log goes with the lease: its extents are reconciled before the new holder serves them.
        let old = self.attachments.remove(&id).expect("matched above");
        let inherited = Attachment {
            active: old.active.clone(),
            ..attachment
        };
        if let Err(error) = self.attach(inherited) {
            self.attachments.insert(id, old);
            return Err(error);
        }
        let volume = self.volumes.get_mut(&id).expect("checked above");
        volume.placement.fence_all();
        Ok(CommandOutcome::TakenOver { volume: id, from })
    }

    fn start_rebuild(
        &mut self,
        id: VolumeId,
        driver: NodeId,
        targets: &[(u64, NodeId)],
        started_unix: i64,
    ) -> Result<CommandOutcome, CommandError> {
        let candidates = self.placement_candidates();
        let attached = self.attachments.get(&id).map(|a| a.node);
        let volume = self
            .volumes
            .get(&id)
            .ok_or_else(|| CommandError::VolumeNotFound {
                volume: id.to_string(),
            })?;
        let refuse = |reason: String| CommandError::RebuildRefused {
            name: volume.name.clone(),
            reason,
        };
        if attached.is_some_and(|holder| holder != driver) {
            return Err(refuse(format!(
                "it is attached on node {}, which drives its rebuilds",
                self.node_label(attached.unwrap_or_default())
            )));
        }
        let domain_of = |node: NodeId| candidates.iter().find(|c| c.node == node).map(|c| c.domain);
        for (i, &(first, node)) in targets.iter().enumerate() {
            if targets[..i].iter().any(|&(other, _)| other == first) {
                return Err(refuse(format!("run {first} is named twice")));
            }
            let Some(run) = volume
                .placement
                .runs()
                .find(|(start, _)| *start == first)
                .map(|(_, run)| run)
            else {
                return Err(refuse(format!("no run starts at extent {first}")));
            };
            let set = &run.replicas;
            if set.rebuild.is_some() {
                return Err(refuse(format!("run {first} is already being rebuilt")));
            }
            if self.staying(set) >= usize::from(volume.replicas) {
                return Err(refuse(format!("run {first} has all its replicas")));
            }
            if set.nodes.is_empty() {
                return Err(refuse(format!(
                    "run {first} has no healthy replica to copy from"
                )));
            }
            let Some(domain) = domain_of(node) else {
                return Err(refuse(format!(
                    "node {} cannot take replicas (not active, or no disks)",
                    self.node_label(node)
                )));
            };
            if set
                .nodes
                .iter()
                .any(|&member| member == node || domain_of(member) == Some(domain))
            {
                return Err(refuse(format!(
                    "node {} shares a failure domain with a replica of run {first}",
                    self.node_label(node)
                )));
            }
        }
        let volume = self.volumes.get_mut(&id).expect("checked above");
        for &(first, node) in targets {
            let run = volume.placement.run_at_mut(first).expect("checked above");
            run.replicas.rebuild = Some(super::placement::Rebuild {
                targets: vec![node],
                copied_extents: 0,
                started_unix,
                reported_unix: started_unix,
            });
            run.replicas.epoch += 1;
        }
        // A run rebuilt elsewhere no longer waits for the nodes fenced off from it, and a target away for longer
        // than the catch-up window may have freed its old copy: it gets a full one.
        for &(first, node) in targets {
            let too_late = self.missed_run(id, node, first).is_some_and(|missed| {
                started_unix - missed.since_unix >= super::CATCH_UP_WINDOW_SECS
            });
            self.forget_missed_run(id, first, |other| other != node || too_late);
        }
        Ok(CommandOutcome::RebuildStarted {
            volume: id,
            runs: targets.len() as u64,
        })
    }

    /// The rebuild at `first_extent`, if it is still the one started at `epoch`.
    fn rebuild_at(
        &mut self,
        id: VolumeId,
        first_extent: u64,
        epoch: u64,
    ) -> Result<&mut super::ReplicaSet, CommandError> {
        let volume = self
            .volumes
            .get_mut(&id)
            .ok_or_else(|| CommandError::VolumeNotFound {
                volume: id.to_string(),
            })?;
        let name = volume.name.clone();
        match volume.placement.run_at_mut(first_extent) {
            Some(run) if run.replicas.epoch == epoch && run.replicas.rebuild.is_some() => {
                Ok(&mut run.replicas)
            }
            _ => Err(CommandError::RebuildRefused {
                name,
                reason: format!(
                    "the run at extent {first_extent} is no longer being rebuilt at epoch {epoch}"
                ),
            }),
        }
    }

    fn rebuild_progress(
        &mut self,
        id: VolumeId,
        first_extent: u64,
        epoch: u64,
        copied_extents: u64,
        reported_unix: i64,
    ) -> Result<CommandOutcome, CommandError> {
        let set = self.rebuild_at(id, first_extent, epoch)?;
        if let Some(rebuild) = &mut set.rebuild {
            rebuild.copied_extents = rebuild.copied_extents.max(copied_extents);
            rebuild.reported_unix = reported_unix;
        }
        Ok(CommandOutcome::RebuildProgressed { volume: id })
    }

    fn finish_rebuild(
        &mut self,
        id: VolumeId,
        first_extent: u64,
        epoch: u64,
    ) -> Result<CommandOutcome, CommandError> {
        let set = self.rebuild_at(id, first_extent, epoch)?;
        let mut targets = Vec::new();
        if let Some(rebuild) = set.rebuild.take() {
            set.nodes.extend(&rebuild.targets);
            set.nodes.sort_unstable();
            set.nodes.dedup();
            targets = rebuild.targets;
        }
        set.epoch += 1;
        // The targets hold the run in full again.
        self.forget_missed_run(id, first_extent, |node| targets.contains(&node));
        Ok(CommandOutcome::RebuildFinished {
            volume: id,
            first_extent,
        })
    }

    fn drop_replica(
        &mut self,
        id: VolumeId,
        node: NodeId,
        holder: NodeId,
    ) -> Result<CommandOutcome, CommandError> {
        let attached = self.attachments.get(&id).map(|a| a.node);
        let volume = self
            .volumes
            .get_mut(&id)
            .ok_or_else(|| CommandError::VolumeNotFound {
                volume: id.to_string(),
            })?;
        // A detached volume's rebuilds are driven by the leader, which retires drained replicas.
        if attached.is_some_and(|node| node != holder) {
            let name = volume.name.clone();
            return Err(CommandError::NotTheHolder {
                name,
                holder,
                attached: attached.map(|node| format!("attached on node {node}")),
            });
        }
        let sets = volume
            .placement
            .drop_node(node, usize::from(volume.min_replicas))
            .map_err(|short| CommandError::TooFewReplicas {
                name: volume.name.clone(),
                node,
                first_extent: short.first_extent,
                remaining: short.remaining,
                min_replicas: volume.min_replicas,
            })?;
        Ok(CommandOutcome::ReplicaDropped {
            volume: id,
            node,
            sets,
        })
    }

    fn drop_failed_replica(
        &mut self,
        id: VolumeId,
        node: NodeId,
        holder: NodeId,
        since_unix: i64,
        boot_id: Option<[u8; 16]>,
    ) -> Result<CommandOutcome, CommandError> {
        let held = self.runs_held(id, node);
        let outcome = self.drop_replica(id, node, holder)?;
        if held.is_empty() {
            return Ok(outcome);
        }
        // Failed writes and writes in flight are in the activity log: the node may miss any of its extents.
        let active = self
            .attachments
            .get(&id)
            .map(|attachment| attachment.active.clone())
            .unwrap_or_default();
        let missed = self
            .missed
            .entry(id)
            .or_default()
            .entry(node)
            .or_insert_with(|| super::Missed {
                since_unix,
                boot_id,
                ..super::Missed::default()
            });
        for (first, count) in held {
            missed.runs.insert(first);
            missed
                .extents
                .extend(active.range(first..first.saturating_add(count)));
        }
        Ok(outcome)
    }

    /// Forgets that the nodes `which` accepts may catch up on the run of `id` starting at `first`.
    fn forget_missed_run(&mut self, id: VolumeId, first: u64, which: impl Fn(NodeId) -> bool) {
        let count = self
            .volumes
            .get(&id)
            .and_then(|volume| volume.placement.runs().find(|(start, _)| *start == first))
            .map_or(1, |(_, run)| run.count);
        let Some(records) = self.missed.get_mut(&id) else {
            return;
        };
        for (node, missed) in records.iter_mut() {
            if which(*node) {
                missed.forget_run(first, count);
            }
        }
        records.retain(|_, missed| !missed.runs.is_empty());
        if records.is_empty() {
            self.missed.remove(&id);
        }
    }

    fn init_cluster(
        &mut self,
        cluster_id: Uuid,
        settings: Settings,
        node: Node,
    ) -> Result<CommandOutcome, CommandError> {
        if self.is_initialized() {
            return Err(CommandError::AlreadyInitialized {
                cluster_id: self.cluster_id,
            });
        }
        if cluster_id.is_nil() {
            return Err(CommandError::NilClusterId);
        }
        settings.validate()?;
        validate_name("node", &node.name)?;
        self.cluster_id = cluster_id;
        self.settings = settings;
        self.nodes.insert(node.id, node);
        Ok(CommandOutcome::ClusterInitialized { cluster_id })
    }

    fn add_node(&mut self, node: Node) -> Result<CommandOutcome, CommandError> {
        validate_name("node", &node.name)?;
        if let Some(existing) = self.nodes.get(&node.id) {
            return Err(CommandError::NodeExists {
                id: node.id,
                name: existing.name.clone(),
            });
        }
        if let Some(existing) = self.nodes.values().find(|n| n.name == node.name) {
            return Err(CommandError::NodeNameTaken {
                name: node.name,
                id: existing.id,
            });
        }
        let id = node.id;
        self.nodes.insert(id, node);
        Ok(CommandOutcome::NodeAdded { id })
    }

    fn update_node(
        &mut self,
        id: NodeId,
        address: Option<String>,
        labels: Option<BTreeMap<String, String>>,
        state: Option<NodeState>,
    ) -> Result<CommandOutcome, CommandError> {
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or_else(|| CommandError::NodeNotFound {
                node: id.to_string(),
            })?;
        if let Some(address) = address {
            node.address = Some(address);
        }
        if let Some(labels) = labels {
            node.labels = labels;
        }
        if let Some(state) = state {
            node.state = state;
        }
        Ok(CommandOutcome::NodeUpdated { id })
    }

    fn add_disk(&mut self, disk: Disk) -> Result<CommandOutcome, CommandError> {
        if !self.nodes.contains_key(&disk.node) {
            return Err(CommandError::NodeNotFound {
                node: disk.node.to_string(),
            });
        }
        if let Some(existing) = self.disks.get(&disk.id) {
            return Err(CommandError::DiskExists {
                id: disk.id,
                path: existing.path.clone(),
                node: self.node_label(existing.node),
            });
        }
        if !disk.path.starts_with('/') {
            return Err(CommandError::DiskPathNotAbsolute { path: disk.path });
        }
        if self.disks_on(disk.node).any(|d| d.path == disk.path) {
            return Err(CommandError::DiskPathTaken {
                path: disk.path,
                node: self.node_label(disk.node),
            });
        }
        if disk.capacity == 0 {
            return Err(CommandError::DiskEmpty { path: disk.path });
        }
        let id = disk.id;
        self.disks.insert(id, disk);
        Ok(CommandOutcome::DiskAdded { id })
    }

    fn remove_node(
        &mut self,
        id: NodeId,
        disks: &[DiskId],
    ) -> Result<CommandOutcome, CommandError> {
        if !self.nodes.contains_key(&id) {
            return Err(CommandError::NodeNotFound {
                node: id.to_string(),
            });
        }
        let node = self.node_label(id);
        let mut served: Vec<String> = self
            .attachments_on(id)
            .filter_map(|a| self.volumes.get(&a.volume))
            .map(|v| format!("'{}'", v.name))
            .collect();
        served.sort_unstable();
        if !served.is_empty() {
            return Err(CommandError::NodeServesVolumes {
                node,
                volumes: served.join(", "),
            });
        }
        let ports: Vec<String> = self.ports_on(id).map(|port| port.id.to_string()).collect();
        if !ports.is_empty() {
            return Err(CommandError::NodeServesPorts {
                node,
                ports: ports.join(", "),
            });
        }
        let mut held: Vec<String> = self
            .volumes_on(id)
            .map(|v| format!("'{}'", v.name))
            .collect();
        held.sort_unstable();
        if !held.is_empty() {
            return Err(CommandError::NodeHoldsReplicas {
                node,
                volumes: held.join(", "),
            });
        }
        let mut named: Vec<DiskId> = disks.to_vec();
        named.sort_unstable();
        let mut actual: Vec<DiskId> = self.disks_on(id).map(|disk| disk.id).collect();
        actual.sort_unstable();
        if named != actual {
            return Err(CommandError::NodeChanged { node });
        }
        let node_capacity: u128 = self
            .disks_on(id)
            .map(|disk| u128::from(disk.capacity))
            .sum();
        let remaining = self.capacity_raw() - node_capacity;
        let provisionable = self.provisionable_raw(remaining);
        let provisioned = self.provisioned_raw();
        if provisionable < provisioned {
            return Err(CommandError::NodeCapacityNeeded {
                node,
                remaining: super::saturate(remaining),
                provisionable: super::saturate(provisionable),
                ratio_milli: self.settings.overcommit_ratio_milli,
                provisioned: super::saturate(provisioned),
            });
        }
        for disk in disks {
            self.disks.remove(disk);
        }
        let node = self
            .nodes
            .remove(&id)
            .ok_or_else(|| CommandError::NodeNotFound {
                node: id.to_string(),
            })?;
        for records in self.missed.values_mut() {
            records.remove(&id);
        }
        self.missed.retain(|_, records| !records.is_empty());
        Ok(CommandOutcome::NodeRemoved { node })
    }

    fn remove_disk(&mut self, id: DiskId) -> Result<CommandOutcome, CommandError> {
        let disk = self
            .disks
            .get(&id)
            .ok_or_else(|| CommandError::DiskNotFound {
                disk: id.to_string(),
            })?;
        let last_of_node = self.disks_on(disk.node).count() == 1;
        if last_of_node {
            let volumes: Vec<String> = self
                .volumes_on(disk.node)
                .map(|v| format!("'{}'", v.name))
                .collect();
            if !volumes.is_empty() {
                return Err(CommandError::LastDiskHoldsReplicas {
                    path: disk.path.clone(),
                    node: self.node_label(disk.node),
                    volumes: volumes.join(", "),
                });
            }
        }
        let remaining = self.capacity_raw() - u128::from(disk.capacity);
        let provisionable = self.provisionable_raw(remaining);
        let provisioned = self.provisioned_raw();
        if provisionable < provisioned {
            return Err(CommandError::DiskStillNeeded {
                path: disk.path.clone(),
                provisionable: super::saturate(provisionable),
                remaining: super::saturate(remaining),
                ratio_milli: self.settings.overcommit_ratio_milli,
                provisioned: super::saturate(provisioned),
            });
        }
        let disk = self
            .disks
            .remove(&id)
            .ok_or_else(|| CommandError::DiskNotFound {
                disk: id.to_string(),
            })?;
        Ok(CommandOutcome::DiskRemoved { disk })
    }

    fn create_volume(
        &mut self,
        id: VolumeId,
        name: String,
        size: u64,
        block_size: Option<u32>,
        replicas: u8,
        created_unix: i64,
    ) -> Result<CommandOutcome, CommandError> {
        validate_name("volume", &name)?;
        if self.volume_names.contains_key(&name) {
            return Err(CommandError::VolumeExists { name });
        }
        if let Some(existing) = self.volumes.get(&id) {
            return Err(CommandError::VolumeIdTaken {
                id,
                name: existing.name.clone(),
            });
        }
        let block_size = block_size.unwrap_or(self.settings.default_block_size);
        if !valid_block_size(block_size) {
            return Err(CommandError::InvalidBlockSize { block_size });
        }
        if size == 0 {
            return Err(CommandError::ZeroSize { name });
        }
        if size > MAX_VOLUME_SIZE {
            return Err(CommandError::SizeTooLarge { name, size });
        }
        if !size.is_multiple_of(u64::from(block_size)) {
            return Err(CommandError::SizeNotMultiple { size, block_size });
        }
        if replicas == 0 {
            return Err(CommandError::ZeroReplicas { name });
        }
        let candidates = self.placement_candidates();
        self.check_domains(&name, replicas, &candidates)?;
        let added = u128::from(size) * u128::from(replicas);
        let subject = if replicas == 1 {
            format!("volume '{name}' ({})", HumanSize(size))
        } else {
            format!(
                "volume '{name}' ({} × {replicas} replicas)",
                HumanSize(size)
            )
        };
        self.check_overcommit(added, subject)?;

        let extent_size = self.settings.extent_size;
        let mut volume = Volume {
            id,
            name,
            size,
            block_size,
            extent_size,
            replicas,
            min_replicas: replicas / 2 + 1,
            placement: super::Placement::default(),
            created_unix,
        };
        place(
            &mut volume.placement,
            &candidates,
            PlacementRequest {
                first_extent: 0,
                end_extent: extent_count(size, extent_size),
                extent_size,
                volume_size: size,
                replicas,
            },
        );
        self.volume_names.insert(volume.name.clone(), id);
        self.volumes.insert(id, volume);
        Ok(CommandOutcome::VolumeCreated { id })
    }

    fn grow_volume(&mut self, id: VolumeId, new_size: u64) -> Result<CommandOutcome, CommandError> {
        let volume = self
            .volumes
            .get(&id)
            .ok_or_else(|| CommandError::VolumeNotFound {
                volume: id.to_string(),
            })?;
        let name = volume.name.clone();
        let old_size = volume.size;
        if new_size == old_size {
            return Err(CommandError::SameSize {
                name,
                size: old_size,
            });
        }
        if new_size < old_size {
            return Err(CommandError::Shrink {
                name,
                size: old_size,
                new_size,
            });
        }
        if new_size > MAX_VOLUME_SIZE {
            return Err(CommandError::SizeTooLarge {
                name,
                size: new_size,
            });
        }
        if !new_size.is_multiple_of(u64::from(volume.block_size)) {
            return Err(CommandError::SizeNotMultiple {
                size: new_size,
                block_size: volume.block_size,
            });
        }
        let replicas = volume.replicas;
        let extent_size = volume.extent_size;
        let first_new = volume.placement.extent_count();
        let end = extent_count(new_size, extent_size);
        let candidates = self.placement_candidates();
        if end > first_new {
            self.check_domains(&name, replicas, &candidates)?;
        }
        let added = u128::from(new_size - old_size) * u128::from(replicas);
        let subject = format!(
            "growing volume '{name}' from {} to {} (+{}{})",
            HumanSize(old_size),
            HumanSize(new_size),
            HumanSize(new_size - old_size),
            if replicas == 1 {
                String::new()
            } else {
                format!(" × {replicas} replicas")
            }
        );
        self.check_overcommit(added, subject)?;

        let volume = self
            .volumes
            .get_mut(&id)
            .ok_or(CommandError::VolumeNotFound { volume: name })?;
        place(
            &mut volume.placement,
            &candidates,
            PlacementRequest {
                first_extent: first_new,
                end_extent: end,
                extent_size,
                volume_size: new_size,
                replicas,
            },
        );
        volume.size = new_size;
        Ok(CommandOutcome::VolumeGrown {
            id,
            old_size,
            new_size,
        })
    }

    fn delete_volume(&mut self, id: VolumeId) -> Result<CommandOutcome, CommandError> {
        let volume = self
            .volumes
            .get(&id)
            .ok_or_else(|| CommandError::VolumeNotFound {
                volume: id.to_string(),
            })?;
        if let Some(attachment) = self.attachments.get(&id) {
            return Err(CommandError::VolumeAttached {
                name: volume.name.clone(),
                socket: attachment.socket.clone(),
            });
        }
        let volume = self
            .volumes
            .remove(&id)
            .ok_or_else(|| CommandError::VolumeNotFound {
                volume: id.to_string(),
            })?;
        self.volume_names.remove(&volume.name);
        self.missed.remove(&id);
        Ok(CommandOutcome::VolumeDeleted {
            volume: Box::new(volume),
        })
    }

    fn attach(&mut self, attachment: Attachment) -> Result<CommandOutcome, CommandError> {
        let volume =
            self.volumes
                .get(&attachment.volume)
                .ok_or_else(|| CommandError::VolumeNotFound {
                    volume: attachment.volume.to_string(),
                })?;
        if !self.nodes.contains_key(&attachment.node) {
            return Err(CommandError::NodeNotFound {
                node: attachment.node.to_string(),
            });
        }
        if let Some(existing) = self.attachments.get(&attachment.volume) {
            return Err(CommandError::AlreadyAttached {
                name: volume.name.clone(),
                socket: existing.socket.clone(),
                node: self.node_label(existing.node),
            });
        }
        if !(1..=MAX_QUEUES).contains(&attachment.queues) {
            return Err(CommandError::InvalidQueues {
                queues: attachment.queues,
            });
        }
        super::network::check_socket(&attachment.socket, attachment.socket_mode)?;
        match self.socket_user(attachment.node, &attachment.socket) {
            None => {}
            Some(SocketUser::Volume(other)) => {
                return Err(CommandError::SocketInUse {
                    socket: attachment.socket,
                    node: self.node_label(attachment.node),
                    other,
                });
            }
            Some(SocketUser::Port { id, network }) => {
                return Err(CommandError::SocketUsedByPort {
                    socket: attachment.socket,
                    node: self.node_label(attachment.node),
                    port: id,
                    network,
                });
            }
        }
        let volume = attachment.volume;
        self.attachments.insert(volume, attachment);
        if let Some(described) = self.volumes.get_mut(&volume) {
            described.placement.fence_rebuilds();
        }
        Ok(CommandOutcome::Attached { volume })
    }

    fn detach(&mut self, volume: VolumeId) -> Result<CommandOutcome, CommandError> {
        let name = self
            .volumes
            .get(&volume)
            .map(|v| v.name.clone())
            .ok_or_else(|| CommandError::VolumeNotFound {
                volume: volume.to_string(),
            })?;
        let attachment = self
            .attachments
            .remove(&volume)
            .ok_or(CommandError::NotAttached { name })?;
        if let Some(described) = self.volumes.get_mut(&volume) {
            described.placement.fence_rebuilds();
        }
        Ok(CommandOutcome::Detached { attachment })
    }

    /// Nodes that may become a rebuild target of the run of `volume` starting at extent `first`: active, with
    /// disks, outside the failure domains of the run's replicas; most free capacity first.
    pub fn rebuild_candidates(&self, volume: &Volume, first: u64) -> Vec<NodeId> {
        let Some(set) = volume.replica_set(first) else {
            return Vec::new();
        };
        let candidates = self.placement_candidates();
        let domain_of = |node: NodeId| candidates.iter().find(|c| c.node == node).map(|c| c.domain);
        let taken: Vec<Option<u64>> = set.members().map(domain_of).collect();
        let mut eligible: Vec<&Candidate> = candidates
            .iter()
            .filter(|c| !set.receives(c.node) && !taken.contains(&Some(c.domain)))
            .collect();
        eligible.sort_by_key(|c| (std::cmp::Reverse(c.free), c.node));
        eligible.into_iter().map(|c| c.node).collect()
    }

    /// Active nodes with disks, each with its free capacity and failure domain (see
    /// [`DOMAIN_LABELS`]).
    fn placement_candidates(&self) -> Vec<Candidate> {
        let share = self.provisioned_by_node();
        let nodes: Vec<(&Node, i128)> = self
            .nodes
            .values()
            .filter(|node| node.state == NodeState::Active)
            .filter_map(|node| {
                let capacity: u128 = self
                    .disks_on(node.id)
                    .map(|disk| u128::from(disk.capacity))
                    .sum();
                if capacity == 0 {
                    return None;
                }
                let used = share.get(&node.id).copied().unwrap_or(0);
                let free = i128::try_from(capacity).unwrap_or(i128::MAX) - i128::from(used);
                Some((node, free))
            })
            .collect();
        let domain_label = self.failure_domain_label();
        // Label values numbered in sorted order: the same state gives the same numbers everywhere.
        let values: Vec<&String> = match domain_label {
            Some(label) => {
                let mut values: Vec<&String> = nodes
                    .iter()
                    .filter_map(|(node, _)| node.labels.get(label))
                    .collect();
                values.sort_unstable();
                values.dedup();
                values
            }
            None => Vec::new(),
        };
        nodes
            .into_iter()
            .map(|(node, free)| Candidate {
                node: node.id,
                free,
                domain: domain_label
                    .and_then(|label| node.labels.get(label))
                    .and_then(|value| values.binary_search(&value).ok())
                    .map_or(node.id, |index| index as u64),
            })
            .collect()
    }

    /// The label replicas are spread over: the coarsest of [`DOMAIN_LABELS`] that every active
    /// node with disks carries; `None` when nodes are the failure domain.
    pub fn failure_domain_label(&self) -> Option<&'static str> {
        let mut nodes = self
            .nodes
            .values()
            .filter(|node| node.state == NodeState::Active)
            .filter(|node| self.disks_on(node.id).any(|disk| disk.capacity > 0))
            .peekable();
        nodes.peek()?;
        let nodes: Vec<&Node> = nodes.collect();
        DOMAIN_LABELS
            .into_iter()
            .find(|label| nodes.iter().all(|node| node.labels.contains_key(*label)))
    }

    /// Refuses a placement of `replicas` copies when the candidates span fewer failure domains.
    fn check_domains(
        &self,
        name: &str,
        replicas: u8,
        candidates: &[Candidate],
    ) -> Result<(), CommandError> {
        let domains = domain_count(candidates);
        if domains >= usize::from(replicas) {
            return Ok(());
        }
        match self.failure_domain_label() {
            None => Err(CommandError::NotEnoughNodes {
                name: name.to_owned(),
                replicas,
                available: domains,
            }),
            Some(label) => Err(CommandError::NotEnoughDomains {
                name: name.to_owned(),
                replicas,
                label: label.to_owned(),
                available: domains,
            }),
        }
    }

    fn check_overcommit(&self, added: u128, subject: String) -> Result<(), CommandError> {
        let capacity = self.capacity_raw();
        let provisionable = self.provisionable_raw(capacity);
        let provisioned = self.provisioned_raw();
        if provisioned + added > provisionable {
            return Err(CommandError::OverLimit {
                subject,
                provisionable: super::saturate(provisionable),
                capacity: super::saturate(capacity),
                ratio_milli: self.settings.overcommit_ratio_milli,
                provisioned: super::saturate(provisioned),
            });
        }
        Ok(())
    }
}

/// A size in binary units when that is exact (`1 KiB`), otherwise in bytes, for messages that tell
/// users which size to type.
fn exact_size(bytes: u64) -> String {
    let human = HumanSize(bytes).to_string();
    if human.contains('.') {
        format!("{bytes} B")
    } else {
        human
    }
}

/// Names of nodes and volumes: 1 to 63 characters of `A-Z a-z 0-9 . _ -`, starting with a letter or
/// digit, and not a UUID (which would be ambiguous with ids on the command line).
pub(super) fn validate_name(kind: &str, name: &str) -> Result<(), CommandError> {
    let refuse = |reason: &str| {
        Err(CommandError::InvalidName {
            kind: kind.to_owned(),
            name: name.to_owned(),
            reason: reason.to_owned(),
        })
    };
    if name.is_empty() {
        return refuse("it is empty");
    }
    if name.len() > 63 {
        return refuse("it is longer than 63 characters");
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return refuse("it must start with a letter or digit");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return refuse("use only letters, digits, '.', '_' and '-'");
    }
    if Uuid::parse_str(name).is_ok() {
        return refuse("it looks like an id");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ReplicaSet;

    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

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

    fn disk(n: u128, node: NodeId, path: &str, capacity: u64) -> Disk {
        Disk {
            id: Uuid::from_u128(n),
            node,
            path: path.to_owned(),
            capacity,
            block_device: false,
        }
    }

    fn vid(n: u128) -> VolumeId {
        Uuid::from_u128(0xA000 + n)
    }

    /// A cluster of one node "n1" with an 8 GiB disk.
    fn cluster() -> ClusterState {
        let mut state = ClusterState::default();
        state
            .apply(Command::InitCluster {
                cluster_id: Uuid::from_u128(1),
                settings: Settings::default(),
                node: node(1, "n1"),
            })
            .unwrap();
        state
            .apply(Command::AddDisk {
                disk: disk(1, 1, "/pool/d1", 8 * GIB),
            })
            .unwrap();
        state
    }

    fn create(name: &str, n: u128, size: u64) -> Command {
        Command::CreateVolume {
            id: vid(n),
            name: name.to_owned(),
            size,
            block_size: None,
            replicas: 1,
            created_unix: 1_700_000_000,
        }
    }

    fn attachment(volume: VolumeId, socket: &str) -> Attachment {
        Attachment {
            volume,
            node: 1,
            socket: socket.to_owned(),
            queues: 2,
            read_only: false,
            socket_mode: 0o600,
            attached_unix: 1_700_000_100,
            active: Default::default(),
        }
    }

    fn tap_port(network: NetworkId, node: NodeId, ifname: &str, mac: u8) -> NewPort {
        NewPort {
            network,
            node,
            kind: crate::state::PortKind::Tap {
                ifname: ifname.to_owned(),
                queues: 1,
            },
            mac: vessel_proto::net::MacAddress([0x02, 0, 0, 0, 0, mac]),
            ipv4: None,
            allow_any_mac: false,
            created_unix: 3,
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

    #[test]
    fn replicas_spread_over_racks_when_every_node_has_one() {
        let mut state = cluster();
        let labelled = |id: NodeId, rack: Option<&str>| {
            let mut node = node(id, &format!("n{id}"));
            if let Some(rack) = rack {
                node.labels.insert("rack".to_owned(), rack.to_owned());
            }
            node
        };
        state
            .apply(Command::UpdateNode {
                id: 1,
                address: None,
                labels: Some(BTreeMap::from([("rack".to_owned(), "r1".to_owned())])),
                state: None,
            })
            .unwrap();
        for (id, rack) in [(2, "r1"), (3, "r2")] {
            state
                .apply(Command::AddNode {
                    node: labelled(id, Some(rack)),
                })
                .unwrap();
            state
                .apply(Command::AddDisk {
                    disk: disk(u128::from(id), id, "/pool/d1", 8 * GIB),
                })
                .unwrap();
        }
        assert_eq!(state.failure_domain_label(), Some("rack"));
        let with_replicas = |n: u128, replicas: u8| Command::CreateVolume {
            id: vid(n),
            name: format!("db{n}"),
            size: 4 * GIB,
            block_size: None,
            replicas,
            created_unix: 0,
        };
        assert_eq!(
            refused(&mut state, with_replicas(1, 3)),
            "volume 'db1' needs 3 replicas in distinct racks, but the nodes with disks are in only 2 rack(s); add \
             disks in another rack or lower --replicas"
        );
        state.apply(with_replicas(1, 2)).unwrap();
        let volume = state.volumes.get(&vid(1)).unwrap();
        for (_, run) in volume.placement.runs() {
            assert!(
                run.replicas.nodes.contains(&3),
                "one copy in rack r2: {:?}",
                run.replicas.nodes
            );
        }

        // A node without a rack label: racks no longer describe the cluster, nodes are the domains.
        state
            .apply(Command::AddNode {
                node: labelled(4, None),
            })
            .unwrap();
        state
            .apply(Command::AddDisk {
                disk: disk(4, 4, "/pool/d1", 8 * GIB),
            })
            .unwrap();
        assert_eq!(state.failure_domain_label(), None);
        state.apply(with_replicas(2, 3)).unwrap();
    }

    #[test]
    fn remove_node_takes_its_disks_and_refuses_while_it_holds_data() {
        let mut state = cluster();
        state
            .apply(Command::AddNode {
                node: node(2, "n2"),
            })
            .unwrap();
        state
            .apply(Command::AddDisk {
                disk: disk(2, 2, "/pool/d1", 8 * GIB),
            })
            .unwrap();
        // 16 GiB × 2.0 provisionable; 12 GiB placed on the freest node first, then spread.
        state.apply(create("db", 1, 12 * GIB)).unwrap();
        let remove = |state: &ClusterState, id: NodeId| Command::RemoveNode {
            id,
            disks: state.disks_on(id).map(|disk| disk.id).collect(),
        };
        let removal = remove(&state, 2);
        assert!(
            refused(&mut state, removal).starts_with("node 'n2' holds replicas of volume(s) 'db'")
        );
        assert_eq!(
            refused(
                &mut state,
                Command::RemoveNode {
                    id: 9,
                    disks: vec![]
                }
            ),
            "node '9' not found"
        );
        state.apply(Command::DeleteVolume { id: vid(1) }).unwrap();
        assert_eq!(
            refused(
                &mut state,
                Command::RemoveNode {
                    id: 2,
                    disks: vec![]
                }
            ),
            "node 'n2' changed while it was being removed (its disks); run the removal again"
        );
        let removal = remove(&state, 2);
        state.apply(removal).unwrap();
        assert!(!state.nodes.contains_key(&2));
        assert_eq!(state.disks_on(2).count(), 0);
        assert_eq!(state.disks.len(), 1);
    }

    #[test]
    fn init_cluster_once() {
        let mut state = ClusterState::default();
        assert!(!state.is_initialized());
        assert_eq!(
            refused(&mut state, create("db1", 1, GIB)),
            "the cluster is not initialised; run `vessel cluster init` first"
        );
        assert_eq!(
            refused(
                &mut state,
                Command::InitCluster {
                    cluster_id: Uuid::nil(),
                    settings: Settings::default(),
                    node: node(1, "n1")
                }
            ),
            "cluster id must not be the nil UUID; generate a random one"
        );
        assert_eq!(
            refused(
                &mut state,
                Command::InitCluster {
                    cluster_id: Uuid::from_u128(1),
                    settings: Settings {
                        extent_size: 100,
                        ..Settings::default()
                    },
                    node: node(1, "n1")
                }
            ),
            "invalid cluster settings: extent size 100 B is not a power of two between 1 MiB and 4 GiB"
        );
        let outcome = state
            .apply(Command::InitCluster {
                cluster_id: Uuid::from_u128(1),
                settings: Settings::default(),
                node: node(1, "n1"),
            })
            .unwrap();
        assert_eq!(
            outcome,
            CommandOutcome::ClusterInitialized {
                cluster_id: Uuid::from_u128(1)
            }
        );
        assert!(state.is_initialized());
        assert_eq!(state.nodes[&1].name, "n1");
        assert_eq!(
            refused(
                &mut state,
                Command::InitCluster {
                    cluster_id: Uuid::from_u128(2),
                    settings: Settings::default(),
                    node: node(2, "n2")
                }
            ),
            "the cluster is already initialised (cluster id 00000000-0000-0000-0000-000000000001)"
        );
    }

    #[test]
    fn add_and_update_nodes() {
        let mut state = cluster();
        assert_eq!(
            state
                .apply(Command::AddNode {
                    node: node(2, "n2")
                })
                .unwrap(),
            CommandOutcome::NodeAdded { id: 2 }
        );
        assert_eq!(
            refused(
                &mut state,
                Command::AddNode {
                    node: node(2, "other")
                }
            ),
            "node 2 already exists as 'n2'"
        );
        assert_eq!(
            refused(
                &mut state,
                Command::AddNode {
                    node: node(3, "n2")
                }
            ),
            "node name 'n2' is already used by node 2; choose another name"
        );
        assert_eq!(
            refused(
                &mut state,
                Command::AddNode {
                    node: node(3, "bad name")
                }
            ),
            "'bad name' is not a valid node name: use only letters, digits, '.', '_' and '-'"
        );
        let labels = BTreeMap::from([("rack".to_owned(), "r1".to_owned())]);
        state
            .apply(Command::UpdateNode {
                id: 2,
                address: Some("10.0.0.2:7000".to_owned()),
                labels: Some(labels.clone()),
                state: Some(NodeState::Draining),
            })
            .unwrap();
        let n2 = &state.nodes[&2];
        assert_eq!(n2.address.as_deref(), Some("10.0.0.2:7000"));
        assert_eq!(n2.labels, labels);
        assert_eq!(n2.state, NodeState::Draining);
        // Fields given as None stay.
        state
            .apply(Command::UpdateNode {
                id: 2,
                address: None,
                labels: None,
                state: None,
            })
            .unwrap();
        assert_eq!(state.nodes[&2].address.as_deref(), Some("10.0.0.2:7000"));
        assert_eq!(
            refused(
                &mut state,
                Command::UpdateNode {
                    id: 9,
                    address: None,
                    labels: None,
                    state: None
                }
            ),
            "node '9' not found"
        );
    }

    #[test]
    fn add_disk_validation() {
        let mut state = cluster();
        assert_eq!(
            refused(
                &mut state,
                Command::AddDisk {
                    disk: disk(1, 1, "/pool/other", GIB)
                }
            ),
            "disk 00000000-0000-0000-0000-000000000001 already exists at /pool/d1 on node 'n1'"
        );
        assert_eq!(
            refused(
                &mut state,
                Command::AddDisk {
                    disk: disk(2, 1, "/pool/d1", GIB)
                }
            ),
            "node 'n1' already has a disk at /pool/d1"
        );
        assert_eq!(
            refused(
                &mut state,
                Command::AddDisk {
                    disk: disk(2, 7, "/pool/d2", GIB)
                }
            ),
            "node '7' not found"
        );
        assert_eq!(
            refused(
                &mut state,
                Command::AddDisk {
                    disk: disk(2, 1, "/pool/d2", 0)
                }
            ),
            "disk /pool/d2 has no capacity; give it a size"
        );
        assert_eq!(
            refused(
                &mut state,
                Command::AddDisk {
                    disk: disk(2, 1, "pool/d2", GIB)
                }
            ),
            "disk path 'pool/d2' must be an absolute path"
        );
        state
            .apply(Command::AddDisk {
                disk: disk(2, 1, "/pool/d2", 4 * GIB),
            })
            .unwrap();
        // The same path on another node is a different disk.
        state
            .apply(Command::AddNode {
                node: node(2, "n2"),
            })
            .unwrap();
        state
            .apply(Command::AddDisk {
                disk: disk(3, 2, "/pool/d1", GIB),
            })
            .unwrap();
        assert_eq!(state.capacity_bytes(), 13 * GIB);
        assert_eq!(state.disks_on(1).count(), 2);
        assert_eq!(state.disks_on(2).count(), 1);
    }

    #[test]
    fn remove_disk_keeps_what_is_provisioned_covered() {
        let mut state = cluster();
        state
            .apply(Command::AddDisk {
                disk: disk(2, 1, "/pool/d2", 4 * GIB),
            })
            .unwrap();
        // 12 GiB × 2.0 = 24 GiB provisionable; provision 20 GiB.
        state.apply(create("big", 1, 20 * GIB)).unwrap();
        assert_eq!(
            refused(
                &mut state,
                Command::RemoveDisk {
                    id: Uuid::from_u128(1)
                }
            ),
            "removing disk /pool/d1 would leave 8 GiB provisionable (4 GiB of disks × 2.0), less than the 20 GiB \
             already provisioned; delete volumes or add a disk first"
        );
        assert_eq!(
            refused(
                &mut state,
                Command::RemoveDisk {
                    id: Uuid::from_u128(9)
                }
            ),
            "disk '00000000-0000-0000-0000-000000000009' not found"
        );
        state.apply(Command::DeleteVolume { id: vid(1) }).unwrap();
        state.apply(create("small", 2, 4 * GIB)).unwrap();
        let outcome = state
            .apply(Command::RemoveDisk {
                id: Uuid::from_u128(2),
            })
            .unwrap();
        assert!(matches!(outcome, CommandOutcome::DiskRemoved { disk } if disk.path == "/pool/d2"));
        // The node's last disk cannot go while it holds replicas.
        assert_eq!(
            refused(
                &mut state,
                Command::RemoveDisk {
                    id: Uuid::from_u128(1)
                }
            ),
            "disk /pool/d1 is the last disk of node 'n1', which holds replicas of volume(s) 'small'; delete those \
             volumes or add another disk to the node first"
        );
        state.apply(Command::DeleteVolume { id: vid(2) }).unwrap();
        state
            .apply(Command::RemoveDisk {
                id: Uuid::from_u128(1),
            })
            .unwrap();
        assert_eq!(state.capacity_bytes(), 0);
    }

    #[test]
    fn create_volume_validation_messages() {
        let mut state = cluster();
        state.apply(create("db1", 1, 4 * GIB)).unwrap();
        assert_eq!(
            refused(&mut state, create("db1", 2, GIB)),
            "volume 'db1' already exists"
        );
        assert_eq!(
            refused(&mut state, create("db2", 1, GIB)),
            format!("volume id {} is already used by volume 'db1'", vid(1))
        );
        assert_eq!(
            refused(&mut state, create("db2", 2, 0)),
            "volume 'db2' cannot have size 0; give a size such as 10G"
        );
        assert_eq!(
            refused(&mut state, create("db2", 2, 1000)),
            "size 1000 B is not a multiple of the block size 512 B; round it up to 1 KiB"
        );
        assert_eq!(
            refused(&mut state, create("db2", 2, MAX_VOLUME_SIZE + 512)),
            "volume 'db2' size 1152921504606847488 B exceeds the largest supported volume size 1024 PiB"
        );
        let with_block = |block_size| Command::CreateVolume {
            id: vid(2),
            name: "db2".to_owned(),
            size: GIB,
            block_size: Some(block_size),
            replicas: 1,
            created_unix: 0,
        };
        assert_eq!(
            refused(&mut state, with_block(1000)),
            "block size 1000 B is not a power of two between 512 B and 64 KiB"
        );
        assert_eq!(
            refused(&mut state, with_block(256)),
            "block size 256 B is not a power of two between 512 B and 64 KiB"
        );
        assert_eq!(
            refused(&mut state, with_block(131_072)),
            "block size 131072 B is not a power of two between 512 B and 64 KiB"
        );
        let with_replicas = |replicas| Command::CreateVolume {
            id: vid(2),
            name: "db2".to_owned(),
            size: GIB,
            block_size: None,
            replicas,
            created_unix: 0,
        };
        assert_eq!(
            refused(&mut state, with_replicas(0)),
            "volume 'db2' needs at least 1 replica"
        );
        assert_eq!(
            refused(&mut state, with_replicas(3)),
            "volume 'db2' needs 3 replicas but only 1 node(s) with disks can hold them; add disks on more nodes or \
             lower --replicas"
        );
        assert_eq!(
            refused(&mut state, create("", 2, GIB)),
            "'' is not a valid volume name: it is empty"
        );
        assert_eq!(
            refused(&mut state, create("-x", 2, GIB)),
            "'-x' is not a valid volume name: it must start with a letter or digit"
        );
        assert_eq!(
            refused(&mut state, create("a/b", 2, GIB)),
            "'a/b' is not a valid volume name: use only letters, digits, '.', '_' and '-'"
        );
        let uuid_name = vid(7).to_string();
        assert_eq!(
            refused(&mut state, create(&uuid_name, 2, GIB)),
            format!("'{uuid_name}' is not a valid volume name: it looks like an id")
        );
        assert_eq!(
            refused(&mut state, create(&"x".repeat(64), 2, GIB)),
            format!(
                "'{}' is not a valid volume name: it is longer than 63 characters",
                "x".repeat(64)
            )
        );
        // A block size given explicitly sets the multiple.
        let command = Command::CreateVolume {
            id: vid(3),
            name: "b4k".to_owned(),
            size: 6 * KIB,
            block_size: Some(4096),
            replicas: 1,
            created_unix: 0,
        };
        assert_eq!(
            refused(&mut state, command),
            "size 6144 B is not a multiple of the block size 4096 B; round it up to 8 KiB"
        );
    }

    #[test]
    fn create_volume_refuses_beyond_the_overcommit_limit() {
        let mut state = cluster();
        state.apply(create("small", 1, 4 * GIB)).unwrap();
        assert_eq!(
            refused(&mut state, create("big", 2, 20 * GIB)),
            "volume 'big' (20 GiB) exceeds the pool's overcommit limit: 16 GiB provisionable (8 GiB of disks × \
             2.0), 4 GiB already provisioned; add a disk or raise overcommit_ratio"
        );
        // Exactly at the limit is fine.
        state.apply(create("rest", 2, 12 * GIB)).unwrap();
        assert_eq!(state.provisioned_bytes(), 16 * GIB);
        assert_eq!(state.provisionable_bytes(), 16 * GIB);
        assert_eq!(
            refused(&mut state, create("one-more", 3, 512)),
            "volume 'one-more' (512 B) exceeds the pool's overcommit limit: 16 GiB provisionable (8 GiB of disks × \
             2.0), 16 GiB already provisioned; add a disk or raise overcommit_ratio"
        );
    }

    #[test]
    fn create_volume_places_every_extent_and_records_defaults() {
        let mut state = cluster();
        let outcome = state.apply(create("db1", 1, 10 * GIB + 512)).unwrap();
        assert_eq!(outcome, CommandOutcome::VolumeCreated { id: vid(1) });
        let volume = state.volume_by_name_or_id("db1").unwrap().clone();
        assert_eq!(volume.block_size, 512);
        assert_eq!(volume.extent_size, 64 * MIB);
        assert_eq!(volume.extent_count(), 161);
        assert_eq!(volume.min_replicas, 1);
        assert_eq!(volume.created_unix, 1_700_000_000);
        assert_eq!(volume.placement.run_count(), 1);
        assert_eq!(volume.replica_set(160), Some(&ReplicaSet::new(vec![1])));
        assert_eq!(volume.replica_set(161), None);
        assert_eq!(
            state
                .volume_by_name_or_id(&vid(1).to_string())
                .map(|v| &v.name),
            Some(&volume.name)
        );
        assert!(state.volume_by_name_or_id("nope").is_none());
        assert_eq!(state.volume_names.get("db1"), Some(&vid(1)));
    }

    /// Nodes 1-3 with a disk each, and volume 'r3' (id 1) with three replicas.
    fn three_nodes_with_r3() -> ClusterState {
        let mut state = cluster();
        for id in 2..=3 {
            state
                .apply(Command::AddNode {
                    node: node(id, &format!("n{id}")),
                })
                .unwrap();
            state
                .apply(Command::AddDisk {
                    disk: disk(u128::from(id), id, "/pool/d1", 8 * GIB),
                })
                .unwrap();
        }
        state
            .apply(Command::CreateVolume {
                id: vid(1),
                name: "r3".to_owned(),
                size: GIB,
                block_size: None,
                replicas: 3,
                created_unix: 0,
            })
            .unwrap();
        state
    }

    #[test]
    fn a_failed_replica_is_dropped_by_the_holder_down_to_min_replicas() {
        let mut state = three_nodes_with_r3();
        let drop = |node, holder| Command::DropReplica {
            volume: vid(1),
            node,
            holder,
        };
        state
            .apply(Command::Attach {
                attachment: attachment(vid(1), "/run/r3.sock"),
            })
            .unwrap();
        assert!(
            refused(&mut state, drop(2, 3))
                .contains("is not attached on node 3 (it is attached on node 1)")
        );
        let before = state.volumes[&vid(1)].placement.clone();
        assert_eq!(
            state.apply(drop(2, 1)).unwrap(),
            CommandOutcome::ReplicaDropped {
                volume: vid(1),
                node: 2,
                sets: before.run_count() as u64,
            }
        );
        for ((_, old), (_, new)) in before.runs().zip(state.volumes[&vid(1)].placement.runs()) {
            assert_eq!(new.replicas.epoch, old.replicas.epoch + 1);
            assert!(!new.replicas.contains(2) && new.replicas.nodes.len() == 2);
        }
        // Two of three is the minimum: losing another would risk the data.
        assert_eq!(
            refused(&mut state, drop(3, 1)),
            "dropping node 3 from volume 'r3' would leave extent 0 with 1 replica(s), fewer than the volume's \
             minimum of 2; I/O waits for the replica to return"
        );
        // A node holding nothing any more: nothing changes, and that is no error.
        assert_eq!(
            state.apply(drop(2, 1)).unwrap(),
            CommandOutcome::ReplicaDropped {
                volume: vid(1),
                node: 2,
                sets: 0,
            }
        );
    }

    #[test]
    fn a_fenced_off_node_has_what_it_misses_recorded_until_it_caught_up() {
        let mut state = three_nodes_with_r3();
        state
            .apply(Command::Attach {
                attachment: attachment(vid(1), "/run/r3.sock"),
            })
            .unwrap();
        let activity = |extents: Vec<u64>, active| Command::Activity {
            volume: vid(1),
            holder: 1,
            extents,
            active,
        };
        state.apply(activity(vec![2], true)).unwrap();
        assert!(
            !activity(vec![5], true)
                .rows(&state)
                .contains(&Row::Missed(vid(1)))
        );
        let fence = |since_unix| Command::DropFailedReplica {
            volume: vid(1),
            node: 3,
            holder: 1,
            since_unix,
            boot_id: Some([3; 16]),
        };
        assert!(
            refused(
                &mut state,
                Command::DropFailedReplica {
                    volume: vid(1),
                    node: 3,
                    holder: 2,
                    since_unix: 1000,
                    boot_id: None,
                }
            )
            .contains("only the attaching node may drop replicas"),
            "only the holder fences off"
        );
        assert!(state.missed.is_empty(), "a refused drop records nothing");
        state.apply(fence(1000)).unwrap();
        let first = state.volumes[&vid(1)].placement.run_start(5).unwrap();
        let missed = |state: &ClusterState| state.missed_run(vid(1), 3, first).cloned();
        let recorded = missed(&state).expect("node 3 misses the run");
        assert_eq!(
            (recorded.since_unix, recorded.boot_id),
            (1000, Some([3; 16]))
        );
        assert!(
            recorded.extents.contains(&2),
            "the extent in the log (its write may have failed on node 3)"
        );
        // Extents entering the log from now on are missed too; leaving it forgets nothing.
        assert!(
            activity(vec![5], true)
                .rows(&state)
                .contains(&Row::Missed(vid(1)))
        );
        state.apply(activity(vec![5], true)).unwrap();
        state.apply(activity(vec![2, 5], false)).unwrap();
        let extents: Vec<u64> = missed(&state).unwrap().extents.into_iter().collect();
        assert_eq!(extents, [2, 5]);

        // Node 3 is made the run's rebuild target at `started_unix`; the copy finishes.
        let rebuild = |state: &mut ClusterState, started_unix| {
            state
                .apply(Command::StartRebuild {
                    volume: vid(1),
                    driver: 1,
                    targets: vec![(first, 3)],
                    started_unix,
                })
                .unwrap();
            let kept = missed(state).is_some();
            let epoch = state.volumes[&vid(1)].replica_set(first).unwrap().epoch;
            state
                .apply(Command::FinishRebuild {
                    volume: vid(1),
                    first_extent: first,
                    epoch,
                })
                .unwrap();
            kept
        };
        let window = crate::state::CATCH_UP_WINDOW_SECS;
        // Back in time: it catches up, keeping its record until the copy is done.
        assert!(rebuild(&mut state, 1000 + window - 1));
        assert!(state.missed.is_empty(), "caught up: {:?}", state.missed);

        // Fenced off again and back too late: the rebuild copies everything, the record is gone at its start.
        state.apply(fence(5000)).unwrap();
        assert!(
            missed(&state).unwrap().extents.is_empty(),
            "nothing in the log this time"
        );
        assert!(!rebuild(&mut state, 5000 + window));

        // Deleting the volume takes its records with it.
        state.apply(fence(6000)).unwrap();
        assert!(!state.missed.is_empty());
        state.apply(Command::Detach { volume: vid(1) }).unwrap();
        state.apply(Command::DeleteVolume { id: vid(1) }).unwrap();
        assert!(state.missed.is_empty());
    }

    #[test]
    fn a_rebuild_adds_a_target_that_becomes_a_replica_when_copied() {
        let mut state = three_nodes_with_r3();
        state
            .apply(Command::Attach {
                attachment: attachment(vid(1), "/run/r3.sock"),
            })
            .unwrap();
        state
            .apply(Command::DropReplica {
                volume: vid(1),
                node: 3,
                holder: 1,
            })
            .unwrap();
        let epoch = |state: &ClusterState| state.volumes[&vid(1)].replica_set(0).unwrap().epoch;
        let start = |driver, node| Command::StartRebuild {
            volume: vid(1),
            driver,
            targets: vec![(0, node)],
            started_unix: 100,
        };
        assert!(
            refused(&mut state, start(2, 3))
                .contains("attached on node n1, which drives its rebuilds")
        );
        assert!(refused(&mut state, start(1, 2)).contains("shares a failure domain"));
        assert!(refused(&mut state, start(1, 9)).contains("cannot take replicas"));
        let before = epoch(&state);
        state.apply(start(1, 3)).unwrap();
        let set = state.volumes[&vid(1)].replica_set(0).unwrap().clone();
        assert_eq!(set.epoch, before + 1);
        assert_eq!(set.nodes, [1, 2]);
        assert_eq!(set.targets(), [3]);
        assert!(set.receives(3) && !set.contains(3));
        assert!(refused(&mut state, start(1, 3)).contains("already being rebuilt"));
        // The target counts for capacity and keeps its node from being removed.
        assert!(state.provisioned_by_node()[&3] > 0);
        assert_eq!(state.volumes_on(3).count(), 1);

        let progress = |epoch| Command::RebuildProgress {
            volume: vid(1),
            first_extent: 0,
            epoch,
            copied_extents: 5,
            reported_unix: 110,
        };
        assert!(refused(&mut state, progress(before)).contains("no longer being rebuilt at epoch"));
        state.apply(progress(before + 1)).unwrap();
        // Handing the volume over fences the copier off: its epoch is gone.
        state.apply(Command::Detach { volume: vid(1) }).unwrap();
        let finish = |epoch| Command::FinishRebuild {
            volume: vid(1),
            first_extent: 0,
            epoch,
        };
        assert!(refused(&mut state, finish(before + 1)).contains("no longer being rebuilt"));
        let fenced = epoch(&state);
        assert_eq!(fenced, before + 2);
        let set = state.volumes[&vid(1)].replica_set(0).unwrap();
        assert_eq!(
            set.rebuild.as_ref().unwrap().copied_extents,
            5,
            "progress survives"
        );
        state.apply(finish(fenced)).unwrap();
        let set = state.volumes[&vid(1)].replica_set(0).unwrap();
        assert_eq!(
            (set.nodes.as_slice(), set.rebuild.is_none(), set.epoch),
            ([1, 2, 3].as_slice(), true, fenced + 1)
        );
    }

    #[test]
    fn a_volume_is_taken_over_only_from_its_holder_and_every_set_is_fenced() {
        let mut state = cluster();
        state
            .apply(Command::AddNode {
                node: node(2, "n2"),
            })
            .unwrap();
        state.apply(create("db1", 1, GIB)).unwrap();
        state
            .apply(Command::Attach {
                attachment: attachment(vid(1), "/run/db1.sock"),
            })
            .unwrap();
        let before = state.volumes[&vid(1)].replica_set(0).unwrap().epoch;
        let elsewhere = Attachment {
            node: 2,
            socket: "/run/n2.sock".to_owned(),
            ..attachment(vid(1), "/run/db1.sock")
        };
        assert!(
            refused(
                &mut state,
                Command::TakeOver {
                    attachment: elsewhere.clone(),
                    from: 2,
                }
            )
            .contains("is not attached on node 2 (it is attached on node n1)")
        );
        assert_eq!(
            state
                .apply(Command::TakeOver {
                    attachment: elsewhere,
                    from: 1,
                })
                .unwrap(),
            CommandOutcome::TakenOver {
                volume: vid(1),
                from: 1,
            }
        );
        assert_eq!(state.attachments[&vid(1)].node, 2);
        assert_eq!(
            state.volumes[&vid(1)].replica_set(0).unwrap().epoch,
            before + 1,
            "the old holder is fenced off"
        );
    }

    #[test]
    fn replicated_volumes_span_distinct_nodes_by_free_space() {
        let mut state = cluster();
        for (id, name, capacity) in [
            (2, "n2", 100 * GIB),
            (3, "n3", 50 * GIB),
            (4, "n4", 20 * GIB),
        ] {
            state
                .apply(Command::AddNode {
                    node: node(id, name),
                })
                .unwrap();
            state
                .apply(Command::AddDisk {
                    disk: disk(u128::from(id), id, "/pool/d1", capacity),
                })
                .unwrap();
        }
        let command = Command::CreateVolume {
            id: vid(1),
            name: "r3".to_owned(),
            size: GIB,
            block_size: None,
            replicas: 3,
            created_unix: 0,
        };
        let mut copy = state.clone();
        state.apply(command.clone()).unwrap();
        copy.apply(command).unwrap();
        assert_eq!(state, copy, "placement must be deterministic");
        let volume = &state.volumes[&vid(1)];
        assert_eq!(volume.min_replicas, 2);
        assert_eq!(volume.placement.run_count(), 1);
        assert_eq!(volume.replica_set(0).unwrap().nodes, vec![2, 3, 4]);
        assert_eq!(state.provisioned_bytes(), 3 * GIB);
        assert_eq!(
            state.provisioned_by_node(),
            BTreeMap::from([(2, GIB), (3, GIB), (4, GIB)])
        );
        assert_eq!(state.volumes_on(1).count(), 0);
        assert_eq!(state.volumes_on(2).count(), 1);

        // A draining node takes no new replicas.
        state
            .apply(Command::UpdateNode {
                id: 2,
                address: None,
                labels: None,
                state: Some(NodeState::Draining),
            })
            .unwrap();
        let command = Command::CreateVolume {
            id: vid(2),
            name: "r3b".to_owned(),
            size: GIB,
            block_size: None,
            replicas: 3,
            created_unix: 0,
        };
        state.apply(command).unwrap();
        assert_eq!(
            state.volumes[&vid(2)].replica_set(0).unwrap().nodes,
            vec![1, 3, 4]
        );
        let message = refused(
            &mut state,
            Command::CreateVolume {
                id: vid(3),
                name: "r4".to_owned(),
                size: GIB,
                block_size: None,
                replicas: 4,
                created_unix: 0,
            },
        );
        assert_eq!(
            message,
            "volume 'r4' needs 4 replicas but only 3 node(s) with disks can hold them; add disks on more nodes or \
             lower --replicas"
        );
        let over = refused(
            &mut state,
            Command::CreateVolume {
                id: vid(3),
                name: "huge".to_owned(),
                size: 200 * GIB,
                block_size: None,
                replicas: 3,
                created_unix: 0,
            },
        );
        assert_eq!(
            over,
            "volume 'huge' (200 GiB × 3 replicas) exceeds the pool's overcommit limit: 356 GiB provisionable (178 \
             GiB of disks × 2.0), 6 GiB already provisioned; add a disk or raise overcommit_ratio"
        );
    }

    #[test]
    fn grow_volume_validation_and_placement() {
        let mut state = cluster();
        state.apply(create("db1", 1, 2 * GIB)).unwrap();
        assert_eq!(
            refused(
                &mut state,
                Command::GrowVolume {
                    id: vid(1),
                    new_size: 2 * GIB
                }
            ),
            "volume 'db1' is already 2 GiB; give a larger size to grow it"
        );
        assert_eq!(
            refused(
                &mut state,
                Command::GrowVolume {
                    id: vid(1),
                    new_size: GIB
                }
            ),
            "volume 'db1' is 2 GiB; shrinking it to 1 GiB is not supported"
        );
        assert_eq!(
            refused(
                &mut state,
                Command::GrowVolume {
                    id: vid(1),
                    new_size: 2 * GIB + 100
                }
            ),
            "size 2147483748 B is not a multiple of the block size 512 B; round it up to 2147484160 B"
        );
        assert_eq!(
            refused(
                &mut state,
                Command::GrowVolume {
                    id: vid(1),
                    new_size: 17 * GIB
                }
            ),
            "growing volume 'db1' from 2 GiB to 17 GiB (+15 GiB) exceeds the pool's overcommit limit: 16 GiB \
             provisionable (8 GiB of disks × 2.0), 2 GiB already provisioned; add a disk or raise overcommit_ratio"
        );
        assert_eq!(
            refused(
                &mut state,
                Command::GrowVolume {
                    id: vid(9),
                    new_size: 4 * GIB
                }
            ),
            format!("volume '{}' not found", vid(9))
        );
        let outcome = state
            .apply(Command::GrowVolume {
                id: vid(1),
                new_size: 16 * GIB,
            })
            .unwrap();
        assert_eq!(
            outcome,
            CommandOutcome::VolumeGrown {
                id: vid(1),
                old_size: 2 * GIB,
                new_size: 16 * GIB
            }
        );
        let volume = &state.volumes[&vid(1)];
        assert_eq!(volume.size, 16 * GIB);
        assert_eq!(volume.placement.extent_count(), 256);
        assert_eq!(
            volume.placement.run_count(),
            1,
            "grown extents on the same node merge into the run"
        );
        assert_eq!(volume.replica_set(255), Some(&ReplicaSet::new(vec![1])));
    }

    #[test]
    fn growing_a_partial_last_extent_places_only_new_extents() {
        let mut state = cluster();
        state.apply(create("odd", 1, 100 * MIB)).unwrap();
        assert_eq!(state.volumes[&vid(1)].placement.extent_count(), 2);
        state
            .apply(Command::GrowVolume {
                id: vid(1),
                new_size: 128 * MIB,
            })
            .unwrap();
        assert_eq!(state.volumes[&vid(1)].placement.extent_count(), 2);
        state
            .apply(Command::GrowVolume {
                id: vid(1),
                new_size: 129 * MIB,
            })
            .unwrap();
        assert_eq!(state.volumes[&vid(1)].placement.extent_count(), 3);
        assert_eq!(state.volumes[&vid(1)].extent_count(), 3);
    }

    #[test]
    fn delete_volume_refuses_while_attached_and_frees_the_name() {
        let mut state = cluster();
        state.apply(create("db1", 1, GIB)).unwrap();
        state
            .apply(Command::Attach {
                attachment: attachment(vid(1), "/run/x.sock"),
            })
            .unwrap();
        assert_eq!(
            refused(&mut state, Command::DeleteVolume { id: vid(1) }),
            "volume 'db1' is attached at /run/x.sock; detach it first"
        );
        state.apply(Command::Detach { volume: vid(1) }).unwrap();
        let outcome = state.apply(Command::DeleteVolume { id: vid(1) }).unwrap();
        assert!(
            matches!(outcome, CommandOutcome::VolumeDeleted { volume } if volume.name == "db1")
        );
        assert!(state.volume_names.is_empty());
        assert_eq!(state.provisioned_bytes(), 0);
        assert_eq!(
            refused(&mut state, Command::DeleteVolume { id: vid(1) }),
            format!("volume '{}' not found", vid(1))
        );
        // The name can be reused.
        state.apply(create("db1", 2, GIB)).unwrap();
    }

    #[test]
    fn attach_and_detach_validation() {
        let mut state = cluster();
        state.apply(create("db1", 1, GIB)).unwrap();
        state.apply(create("db2", 2, GIB)).unwrap();
        let mut bad = attachment(vid(1), "/run/x.sock");
        bad.queues = 0;
        assert_eq!(
            refused(
                &mut state,
                Command::Attach {
                    attachment: bad.clone()
                }
            ),
            "0 queues is out of range; use 1 to 64"
        );
        bad.queues = 65;
        assert_eq!(
            refused(&mut state, Command::Attach { attachment: bad }),
            "65 queues is out of range; use 1 to 64"
        );
        let mut bad = attachment(vid(1), "/run/x.sock");
        bad.socket_mode = 0o666;
        assert_eq!(
            refused(
                &mut state,
                Command::Attach {
                    attachment: bad.clone()
                }
            ),
            "socket mode 0666 would make the socket world-writable; use 0660 or stricter"
        );
        bad.socket_mode = 0o4600;
        assert_eq!(
            refused(&mut state, Command::Attach { attachment: bad }),
            "socket mode 4600 is not a permission mode; use e.g. 0600 or 0660"
        );
        assert_eq!(
            refused(
                &mut state,
                Command::Attach {
                    attachment: attachment(vid(1), "x.sock")
                }
            ),
            "vhost-user socket path 'x.sock' must be an absolute path"
        );
        let mut bad = attachment(vid(1), "/run/x.sock");
        bad.node = 5;
        assert_eq!(
            refused(&mut state, Command::Attach { attachment: bad }),
            "node '5' not found"
        );
        assert_eq!(
            refused(
                &mut state,
                Command::Attach {
                    attachment: attachment(vid(9), "/run/x.sock")
                }
            ),
            format!("volume '{}' not found", vid(9))
        );

        assert_eq!(
            state
                .apply(Command::Attach {
                    attachment: attachment(vid(1), "/run/x.sock")
                })
                .unwrap(),
            CommandOutcome::Attached { volume: vid(1) }
        );
        assert_eq!(
            refused(
                &mut state,
                Command::Attach {
                    attachment: attachment(vid(1), "/run/y.sock")
                }
            ),
            "volume 'db1' is already attached at /run/x.sock on node 'n1'; detach it there first (if that node is \
             gone, attach with --force to take the volume over)"
        );
        assert_eq!(
            refused(
                &mut state,
                Command::Attach {
                    attachment: attachment(vid(2), "/run/x.sock")
                }
            ),
            "vhost-user socket /run/x.sock on node 'n1' is already used by volume 'db1'; choose another path"
        );
        assert_eq!(state.attachments_on(1).count(), 1);
        assert_eq!(state.attachments_on(2).count(), 0);

        let outcome = state.apply(Command::Detach { volume: vid(1) }).unwrap();
        assert_eq!(
            outcome,
            CommandOutcome::Detached {
                attachment: attachment(vid(1), "/run/x.sock")
            }
        );
        assert_eq!(
            refused(&mut state, Command::Detach { volume: vid(1) }),
            "volume 'db1' is not attached"
        );
        assert_eq!(
            refused(&mut state, Command::Detach { volume: vid(9) }),
            format!("volume '{}' not found", vid(9))
        );
    }

    #[test]
    fn lookups_by_name_or_id() {
        let mut state = cluster();
        state.apply(create("db1", 1, GIB)).unwrap();
        assert_eq!(state.node_by_name_or_id("n1").map(|n| n.id), Some(1));
        assert_eq!(state.node_by_name_or_id("1").map(|n| n.id), Some(1));
        assert!(state.node_by_name_or_id("n9").is_none());
        assert_eq!(
            state.disk_by_path_or_id("/pool/d1").map(|d| d.id),
            Some(Uuid::from_u128(1))
        );
        assert_eq!(
            state
                .disk_by_path_or_id(&Uuid::from_u128(1).to_string())
                .map(|d| d.path.as_str()),
            Some("/pool/d1")
        );
        // A path shared by two nodes is ambiguous.
        state
            .apply(Command::AddNode {
                node: node(2, "n2"),
            })
            .unwrap();
        state
            .apply(Command::AddDisk {
                disk: disk(2, 2, "/pool/d1", GIB),
            })
            .unwrap();
        assert!(state.disk_by_path_or_id("/pool/d1").is_none());
    }

    #[test]
    fn rows_name_everything_a_command_changes() {
        // Apply a mixed sequence; after each command, the rows it names must be the only ones whose
        // value changed.
        let mut state = ClusterState::default();
        let commands = vec![
            Command::InitCluster {
                cluster_id: Uuid::from_u128(1),
                settings: Settings::default(),
                node: node(1, "n1"),
            },
            Command::AddNode {
                node: node(2, "n2"),
            },
            Command::UpdateNode {
                id: 2,
                address: Some("a:1".to_owned()),
                labels: None,
                state: None,
            },
            Command::AddDisk {
                disk: disk(1, 1, "/d1", 8 * GIB),
            },
            Command::AddDisk {
                disk: disk(2, 2, "/d1", 8 * GIB),
            },
            create("db1", 1, GIB),
            Command::GrowVolume {
                id: vid(1),
                new_size: 2 * GIB,
            },
            Command::Attach {
                attachment: attachment(vid(1), "/run/a.sock"),
            },
            Command::Detach { volume: vid(1) },
            Command::DeleteVolume { id: vid(1) },
            Command::RemoveDisk {
                id: Uuid::from_u128(2),
            },
            Command::CreateNetwork {
                name: "blue".to_owned(),
                vni: 100,
                mtu: None,
                subnet: None,
                created_unix: 1,
            },
            Command::CreateNetwork {
                name: "red".to_owned(),
                vni: 200,
                mtu: Some(1400),
                subnet: None,
                created_unix: 2,
            },
            Command::CreatePort {
                port: tap_port(1, 1, "tap1", 1),
            },
            Command::CreatePort {
                port: tap_port(1, 2, "tap2", 2),
            },
            Command::CreatePort {
                port: tap_port(2, 1, "tap3", 3),
            },
            Command::DeletePort { id: 3 },
            Command::DeleteNetwork { id: 1, force: true },
            Command::DeleteNetwork {
                id: 2,
                force: false,
            },
        ];
        for command in commands {
            let before = state.clone();
            let rows = command.rows(&before);
            state
                .apply(command.clone())
                .unwrap_or_else(|e| panic!("{command}: {e}"));
            let mut changed = Vec::new();
            if before.cluster_id != state.cluster_id || before.settings != state.settings {
                changed.push(Row::Cluster);
            }
            for id in before.nodes.keys().chain(state.nodes.keys()) {
                if before.nodes.get(id) != state.nodes.get(id) {
                    changed.push(Row::Node(*id));
                }
            }
            for id in before.disks.keys().chain(state.disks.keys()) {
                if before.disks.get(id) != state.disks.get(id) {
                    changed.push(Row::Disk(*id));
                }
            }
            for id in before.volumes.keys().chain(state.volumes.keys()) {
                if before.volumes.get(id) != state.volumes.get(id) {
                    changed.push(Row::Volume(*id));
                }
            }
            for id in before.attachments.keys().chain(state.attachments.keys()) {
                if before.attachments.get(id) != state.attachments.get(id) {
                    changed.push(Row::Attachment(*id));
                }
            }
            if before.counters != state.counters {
                changed.push(Row::Counters);
            }
            for id in before.networks.keys().chain(state.networks.keys()) {
                if before.networks.get(id) != state.networks.get(id) {
                    changed.push(Row::Network(*id));
                }
            }
            for id in before.ports.keys().chain(state.ports.keys()) {
                if before.ports.get(id) != state.ports.get(id) {
                    changed.push(Row::Port(*id));
                }
            }
            changed.sort();
            changed.dedup();
            for row in &changed {
                assert!(
                    rows.contains(row),
                    "{command} changed {row:?} but names only {rows:?}"
                );
            }
            assert!(!changed.is_empty(), "{command} changed nothing");
        }
    }
}
