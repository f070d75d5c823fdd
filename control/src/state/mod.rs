//! What the cluster knows: nodes, disks, volumes with their extent placement, attachments, and overlay
//! networks with their ports ([`network`]).
//!
//! [`ClusterState`] is the Raft state machine's value. It changes only through
//! [`ClusterState::apply`] with a typed [`Command`], which validates first and mutates second, so a
//! refused command leaves the state untouched. Apply is deterministic: timestamps and generated
//! ids travel inside the command from the proposer, never from the clock or an RNG here. Every
//! type is serde-serializable; stored and sent forms are postcard behind a format version byte
//! (see [`crate::raft`]). Postcard is positional: new enum variants may be appended, but any
//! other change to these types (a field added, removed or reordered) needs a new format version
//! and a decoder for the old one.
//!
//! This module hands on pure queries (`volume_by_name_or_id`, `provisioned_bytes`, ...) for the
//! admin API and the daemon; it knows nothing of openraft.

mod command;
pub mod network;
mod placement;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use command::{Command, CommandError, CommandOutcome, MAX_QUEUES, MAX_VOLUME_SIZE, Row};
pub use network::{
    DEFAULT_MTU, IdCounters, MAX_MTU, MAX_PORT_QUEUES, MAX_VNI, MIN_MTU, Network, NetworkId,
    NewPort, Port, PortId, PortKind, PortMatch,
};
pub use placement::{
    Candidate, DOMAIN_LABELS, MAX_RUNS_PER_PLACEMENT, MIN_RUN_EXTENTS, Placement, PlacementRequest,
    PlacementRun, ReplicaSet, domain_count, place, run_bytes,
};

/// A node's id: a random u64 generated once per data directory (see [`crate::raft::ControlPlane::node_id`]).
pub type NodeId = u64;
/// A disk's id and a volume's id: the block store's own (both UUIDs).
pub use vstore::{DiskId, VolumeId};

/// Cluster-wide settings, fixed at `cluster init` (later issues may add a command to change them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// Size of one extent in bytes: the unit of placement and replication. A power of two between
    /// 1 MiB and 4 GiB; default 64 MiB. Volumes keep the extent size they were created with.
    pub extent_size: u64,
    /// How far provisioned volume bytes may exceed the disks' capacity, in thousandths
    /// (2000 = 2.0, the default). Between 1000 and 100000.
    pub overcommit_ratio_milli: u32,
    /// Block size of volumes created without one; a power of two in 512..=65536, default 512.
    pub default_block_size: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            extent_size: 64 << 20,
            overcommit_ratio_milli: 2000,
            default_block_size: 512,
        }
    }
}

impl Settings {
    /// Smallest accepted extent size.
    pub const MIN_EXTENT_SIZE: u64 = 1 << 20;
    /// Largest accepted extent size.
    pub const MAX_EXTENT_SIZE: u64 = 4 << 30;

    /// Checks the settings, saying what is wrong in terms a user can act on.
    pub fn validate(&self) -> Result<(), CommandError> {
        let invalid = |reason: String| Err(CommandError::InvalidSettings { reason });
        if !self.extent_size.is_power_of_two()
            || !(Self::MIN_EXTENT_SIZE..=Self::MAX_EXTENT_SIZE).contains(&self.extent_size)
        {
            return invalid(format!(
                "extent size {} is not a power of two between {} and {}",
                vessel_proto::size::HumanSize(self.extent_size),
                vessel_proto::size::HumanSize(Self::MIN_EXTENT_SIZE),
                vessel_proto::size::HumanSize(Self::MAX_EXTENT_SIZE)
            ));
        }
        if !(1000..=100_000).contains(&self.overcommit_ratio_milli) {
            return invalid(format!(
                "overcommit ratio {} is outside 1.0..=100.0",
                format_ratio(self.overcommit_ratio_milli)
            ));
        }
        if !valid_block_size(self.default_block_size) {
            return invalid(format!(
                "default block size {} B is not a power of two between 512 B and 64 KiB",
                self.default_block_size
            ));
        }
        Ok(())
    }
}

/// Whether `block_size` is a power of two in 512..=65536.
pub fn valid_block_size(block_size: u32) -> bool {
    block_size.is_power_of_two() && (512..=65536).contains(&block_size)
}

/// A ratio in thousandths as users read it: 2000 → `2.0`, 1500 → `1.5`, 1250 → `1.25`.
pub fn format_ratio(milli: u32) -> String {
    let whole = milli / 1000;
    let fraction = milli % 1000;
    if fraction == 0 {
        return format!("{whole}.0");
    }
    let digits = format!("{fraction:03}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

/// Whether a node takes new replicas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Serving and eligible for new replicas.
    #[default]
    Active,
    /// Serving existing replicas but receiving no new ones (`vessel node drain`).
    Draining,
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Active => "active",
            Self::Draining => "draining",
        })
    }
}

/// A member of the cluster: a host running `vesseld`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    pub name: String,
    /// The `--listen` address peers and the CLI reach it at; `None` for a socket-only node.
    pub address: Option<String>,
    /// Free-form labels (rack, zone, ...), for placement by failure domain in a later issue.
    pub labels: BTreeMap<String, String>,
    pub state: NodeState,
    /// Where the node's switch sends and receives VXLAN (IP:PORT), once it serves a port.
    pub underlay: Option<String>,
}

/// A disk of a node's pool: a file or a block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub id: DiskId,
    pub node: NodeId,
    pub path: String,
    /// Usable bytes.
    pub capacity: u64,
    pub block_device: bool,
}

/// A replicated, thin-provisioned logical volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub id: VolumeId,
    pub name: String,
    /// Size in bytes; a multiple of `block_size`.
    pub size: u64,
    pub block_size: u32,
    /// Extent size this volume was created with.
    pub extent_size: u64,
    /// Copies of every extent.
    pub replicas: u8,
    /// Copies that must stay healthy for writes to continue (a majority of `replicas`).
    pub min_replicas: u8,
    /// Replica set of every extent.
    pub placement: Placement,
    /// Creation time, seconds since the Unix epoch, as stamped by the proposer.
    pub created_unix: i64,
}

impl Volume {
    /// Number of extents covering `size` (the last one may be partial).
    pub fn extent_count(&self) -> u64 {
        extent_count(self.size, self.extent_size)
    }

    /// The replica set of `extent`, or `None` past the end of the volume.
    pub fn replica_set(&self, extent: u64) -> Option<&ReplicaSet> {
        if extent >= self.extent_count() {
            return None;
        }
        self.placement.replica_set(extent)
    }

    /// Raw bytes the volume provisions across its replicas.
    pub fn provisioned_bytes(&self) -> u128 {
        u128::from(self.size) * u128::from(self.replicas)
    }
}

/// Number of `extent_size` extents covering `size` bytes.
pub fn extent_count(size: u64, extent_size: u64) -> u64 {
    if extent_size == 0 {
        0
    } else {
        size.div_ceil(extent_size)
    }
}

/// A volume served as a vhost-user-blk device on one node: the lease (at most one per volume).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub volume: VolumeId,
    pub node: NodeId,
    /// Absolute path of the vhost-user socket Vessel listens on.
    pub socket: String,
    pub queues: u16,
    pub read_only: bool,
    /// Permission bits of the socket; never world-writable.
    pub socket_mode: u32,
    /// When the attachment was made, seconds since the Unix epoch, as stamped by the proposer.
    pub attached_unix: i64,
    /// The activity log: extents the holder may have writes in flight on (recorded before they go out). After the
    /// holder crashed, these are reconciled among their replicas before the volume is served again.
    pub active: std::collections::BTreeSet<u64>,
}

/// The replicated cluster metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// `Uuid::nil()` until `InitCluster` is applied.
    pub cluster_id: Uuid,
    pub settings: Settings,
    pub nodes: BTreeMap<NodeId, Node>,
    pub disks: BTreeMap<DiskId, Disk>,
    pub volumes: BTreeMap<VolumeId, Volume>,
    /// Index of `volumes` by name; always consistent with it.
    pub volume_names: BTreeMap<String, VolumeId>,
    pub attachments: BTreeMap<VolumeId, Attachment>,
    pub networks: BTreeMap<NetworkId, Network>,
    pub ports: BTreeMap<PortId, Port>,
    /// The next network and port ids.
    pub counters: IdCounters,
    /// What replica nodes fenced off from a volume's runs miss, by volume. Not part of the positional encoding of
    /// this struct (it came after the format was fixed): the store keeps it in a table of its own and snapshots
    /// append it (see [`crate::raft`]).
    #[serde(skip)]
    pub missed: BTreeMap<VolumeId, BTreeMap<NodeId, Missed>>,
}

/// How long a replica node fenced off from a run may stay away and still catch up by copying only what it missed
/// (DESIGN.md: a replica out longer than 10 minutes is replaced). Nodes keep a stale replica for longer than this
/// before they free it (`NodeConfig::stale_replica_keep`).
pub const CATCH_UP_WINDOW_SECS: i64 = 600;

/// What a replica node fenced off from some runs of a volume misses while it is away, kept in the cluster state so
/// that it outlives a restart of the node that drives the volume's rebuilds, and the volume changing hands: when the
/// node returns in time it catches up by copying these extents only, not its whole replicas.
///
/// It is a superset of what changed, at extent granularity: every extent of those runs that was in the attachment's
/// activity log when the node was dropped (its failed writes among them), and every one that entered the log since
/// — a write goes out only once its extent is in the log. The holder also keeps a finer record in memory (64
/// regions per extent, `vstore::remote::DirtyMaps`) and uses it while it lasts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Missed {
    /// First extents of the runs the node held a complete replica of when it was fenced off.
    pub runs: std::collections::BTreeSet<u64>,
    /// Extents of those runs that may have been written since.
    pub extents: std::collections::BTreeSet<u64>,
    /// When the node was first fenced off, seconds since the Unix epoch, as stamped by the proposer.
    pub since_unix: i64,
    /// The node's kernel boot id when it was fenced off, if known: a node that rebooted meanwhile may have lost
    /// writes it acknowledged before, and gets full copies.
    pub boot_id: Option<[u8; 16]>,
}

impl Missed {
    /// Forgets the run starting at `first` (`count` extents long).
    pub fn forget_run(&mut self, first: u64, count: u64) {
        self.runs.remove(&first);
        self.extents
            .retain(|extent| !(first..first.saturating_add(count)).contains(extent));
    }
}

impl ClusterState {
    /// Whether `InitCluster` has been applied.
    pub fn is_initialized(&self) -> bool {
        !self.cluster_id.is_nil()
    }

    /// Looks a volume up by name, then by id (the text of a UUID).
    pub fn volume_by_name_or_id(&self, key: &str) -> Option<&Volume> {
        if let Some(id) = self.volume_names.get(key) {
            return self.volumes.get(id);
        }
        Uuid::parse_str(key)
            .ok()
            .and_then(|id| self.volumes.get(&id))
    }

    /// Looks a node up by name, then by id (decimal).
    pub fn node_by_name_or_id(&self, key: &str) -> Option<&Node> {
        self.nodes
            .values()
            .find(|node| node.name == key)
            .or_else(|| {
                key.parse::<NodeId>()
                    .ok()
                    .and_then(|id| self.nodes.get(&id))
            })
    }

    /// Looks a disk up by id (text of a UUID), then by path when the path is unique in the cluster.
    pub fn disk_by_path_or_id(&self, key: &str) -> Option<&Disk> {
        if let Some(disk) = Uuid::parse_str(key).ok().and_then(|id| self.disks.get(&id)) {
            return Some(disk);
        }
        let mut matches = self.disks.values().filter(|disk| disk.path == key);
        let first = matches.next()?;
        matches.next().is_none().then_some(first)
    }

    /// Raw bytes provisioned by all volumes (size × replicas), saturating at `u64::MAX`.
    pub fn provisioned_bytes(&self) -> u64 {
        saturate(self.provisioned_raw())
    }

    /// Total capacity of all disks, saturating at `u64::MAX`.
    pub fn capacity_bytes(&self) -> u64 {
        saturate(self.capacity_raw())
    }

    /// How many raw bytes volumes may provision: capacity × overcommit ratio.
    pub fn provisionable_bytes(&self) -> u64 {
        saturate(self.provisionable_raw(self.capacity_raw()))
    }

    /// The runs of `volume` (first extent, extent count) where `node` holds a complete replica.
    pub fn runs_held(&self, volume: VolumeId, node: NodeId) -> Vec<(u64, u64)> {
        self.volumes
            .get(&volume)
            .map_or_else(Vec::new, |described| {
                described
                    .placement
                    .runs()
                    .filter(|(_, run)| run.replicas.contains(node))
                    .map(|(first, run)| (first, run.count))
                    .collect()
            })
    }

    /// What `node` misses of the run of `volume` starting at `first`, if it was fenced off from it and may still
    /// catch up.
    pub fn missed_run(&self, volume: VolumeId, node: NodeId, first: u64) -> Option<&Missed> {
        self.missed
            .get(&volume)?
            .get(&node)
            .filter(|missed| missed.runs.contains(&first))
    }

    /// The nodes fenced off from the run of `volume` starting at `first` that may still catch up, with what they
    /// miss.
    pub fn away_from_run(
        &self,
        volume: VolumeId,
        first: u64,
    ) -> impl Iterator<Item = (NodeId, &Missed)> + '_ {
        self.missed
            .get(&volume)
            .into_iter()
            .flatten()
            .filter(move |(_, missed)| missed.runs.contains(&first))
            .map(|(node, missed)| (*node, missed))
    }

    /// Whether `node` is being drained (its replicas move elsewhere).
    pub fn is_draining(&self, node: NodeId) -> bool {
        self.nodes
            .get(&node)
            .is_some_and(|n| n.state == NodeState::Draining)
    }

    /// Healthy replicas of `set` on nodes that are not being drained: what counts towards a run's strength.
    pub fn staying(&self, set: &ReplicaSet) -> usize {
        set.nodes
            .iter()
            .filter(|node| !self.is_draining(**node))
            .count()
    }

    /// Attachments served by `node`.
    pub fn attachments_on(&self, node: NodeId) -> impl Iterator<Item = &Attachment> {
        self.attachments
            .values()
            .filter(move |attachment| attachment.node == node)
    }

    /// Disks of `node`.
    pub fn disks_on(&self, node: NodeId) -> impl Iterator<Item = &Disk> {
        self.disks.values().filter(move |disk| disk.node == node)
    }

    /// Volumes with at least one replica on `node`.
    pub fn volumes_on(&self, node: NodeId) -> impl Iterator<Item = &Volume> {
        self.volumes.values().filter(move |volume| {
            volume
                .placement
                .runs()
                .any(|(_, run)| run.replicas.receives(node))
        })
    }

    /// Capacity of `node`'s disks.
    pub fn node_capacity_bytes(&self, node: NodeId) -> u64 {
        saturate(
            self.disks_on(node)
                .map(|disk| u128::from(disk.capacity))
                .sum(),
        )
    }

    /// Bytes of volume replicas placed on each node.
    pub fn provisioned_by_node(&self) -> BTreeMap<NodeId, u64> {
        let mut share = BTreeMap::<NodeId, u64>::new();
        for volume in self.volumes.values() {
            for (first, run) in volume.placement.runs() {
                let bytes = run_bytes(first, run.count, volume.extent_size, volume.size);
                for node in run.replicas.members() {
                    let entry = share.entry(node).or_default();
                    *entry = entry.saturating_add(bytes);
                }
            }
        }
        share
    }

    /// A node as users name it: its name, or its id when unknown.
    pub fn node_label(&self, node: NodeId) -> String {
        self.nodes
            .get(&node)
            .map_or_else(|| node.to_string(), |n| n.name.clone())
    }

    fn provisioned_raw(&self) -> u128 {
        self.volumes.values().map(Volume::provisioned_bytes).sum()
    }

    fn capacity_raw(&self) -> u128 {
        self.disks
            .values()
            .map(|disk| u128::from(disk.capacity))
            .sum()
    }

    fn provisionable_raw(&self, capacity: u128) -> u128 {
        capacity * u128::from(self.settings.overcommit_ratio_milli) / 1000
    }
}

fn saturate(value: u128) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_read_as_decimals() {
        assert_eq!(format_ratio(2000), "2.0");
        assert_eq!(format_ratio(1500), "1.5");
        assert_eq!(format_ratio(1250), "1.25");
        assert_eq!(format_ratio(1005), "1.005");
        assert_eq!(format_ratio(100_000), "100.0");
    }

    #[test]
    fn default_settings_are_valid_and_bad_ones_say_why() {
        assert_eq!(Settings::default().validate(), Ok(()));
        let bad = Settings {
            extent_size: 3 << 20,
            ..Settings::default()
        };
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "invalid cluster settings: extent size 3 MiB is not a power of two between 1 MiB and 4 GiB"
        );
        let bad = Settings {
            overcommit_ratio_milli: 500,
            ..Settings::default()
        };
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "invalid cluster settings: overcommit ratio 0.5 is outside 1.0..=100.0"
        );
        let bad = Settings {
            default_block_size: 1000,
            ..Settings::default()
        };
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "invalid cluster settings: default block size 1000 B is not a power of two between 512 B and 64 KiB"
        );
    }

    #[test]
    fn block_sizes_are_powers_of_two_in_range() {
        for ok in [512, 1024, 4096, 65536] {
            assert!(valid_block_size(ok), "{ok}");
        }
        for bad in [0, 256, 1000, 131_072, u32::MAX] {
            assert!(!valid_block_size(bad), "{bad}");
        }
    }
}
