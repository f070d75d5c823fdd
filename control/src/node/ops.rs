//! The admin operations of a node: each resolves names, checks, does its local part and commits its command.
//!
//! They take and return the admin API's messages; [`crate::api`] only adapts them to gRPC. Every refusal is an
//! [`OpError`] whose message names the object and says what to do.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use uuid::Uuid;
use vessel_proto::admin;
use vstore::{LocalPool, LocalVolume, StoreError, VolumeLayout};

use super::{AttachSpec, LocalNode};
use crate::raft::{ControlError, NodeReport};
use crate::state::{
    Attachment, ClusterState, Command, CommandError, CommandOutcome, Disk, MAX_QUEUES, NodeId,
    NodeState, Volume,
};

/// How long `node list` and `disk list` wait for a node to report its disks' use before calling it unreachable.
const REPORT_TIMEOUT: Duration = Duration::from_secs(1);

/// The class of a refusal; the API maps it to a gRPC code and the CLI to an exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
    Internal,
}

/// A refused or failed admin operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    pub kind: ErrorKind,
    pub message: String,
}

impl OpError {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        OpError {
            kind,
            message: message.into(),
        }
    }
}

impl From<CommandError> for OpError {
    fn from(error: CommandError) -> Self {
        use CommandError as E;
        let kind = match &error {
            E::NodeNotFound { .. }
            | E::DiskNotFound { .. }
            | E::VolumeNotFound { .. }
            | E::NetworkNotFound { .. }
            | E::PortNotFound { .. } => ErrorKind::NotFound,
            E::AlreadyInitialized { .. }
            | E::NodeExists { .. }
            | E::NodeNameTaken { .. }
            | E::DiskExists { .. }
            | E::DiskPathTaken { .. }
            | E::VolumeExists { .. }
            | E::VolumeIdTaken { .. }
            | E::SocketInUse { .. }
            | E::NetworkExists { .. }
            | E::VniTaken { .. }
            | E::TapInUse { .. }
            | E::SocketUsedByPort { .. }
            | E::MacInUse { .. }
            | E::IpInUse { .. } => ErrorKind::AlreadyExists,
            E::NilClusterId
            | E::InvalidSettings { .. }
            | E::InvalidName { .. }
            | E::DiskPathNotAbsolute { .. }
            | E::DiskEmpty { .. }
            | E::ZeroSize { .. }
            | E::SizeTooLarge { .. }
            | E::SizeNotMultiple { .. }
            | E::InvalidBlockSize { .. }
            | E::ZeroReplicas { .. }
            | E::SameSize { .. }
            | E::Shrink { .. }
            | E::SocketPathNotAbsolute { .. }
            | E::InvalidSocketMode { .. }
            | E::WorldWritableSocket { .. }
            | E::InvalidQueues { .. }
            | E::InvalidVni { .. }
            | E::InvalidMtu { .. }
            | E::InvalidSubnet { .. }
            | E::InvalidPortQueues { .. }
            | E::InvalidIfname { .. }
            | E::InvalidMac { .. }
            | E::InvalidIp { .. }
            | E::IpOutsideSubnet { .. }
            | E::IpReserved { .. } => ErrorKind::InvalidArgument,
            E::NotInitialized
            | E::DiskStillNeeded { .. }
            | E::LastDiskHoldsReplicas { .. }
            | E::VolumeAttached { .. }
            | E::AlreadyAttached { .. }
            | E::NotAttached { .. }
            | E::NodeHoldsReplicas { .. }
            | E::NodeServesVolumes { .. }
            | E::NodeChanged { .. }
            | E::NodeCapacityNeeded { .. }
            | E::NotTheHolder { .. }
            | E::RebuildRefused { .. }
            | E::TooFewReplicas { .. }
            | E::NetworkHasPorts { .. }
            | E::NodeServesPorts { .. } => ErrorKind::FailedPrecondition,
            E::NotEnoughNodes { .. } | E::NotEnoughDomains { .. } | E::OverLimit { .. } => {
                ErrorKind::ResourceExhausted
            }
        };
        OpError::new(kind, error.to_string())
    }
}

impl From<ControlError> for OpError {
    fn from(error: ControlError) -> Self {
        match error {
            ControlError::Rejected(refusal) => refusal.into(),
            ControlError::NotInitialized => OpError::new(
                ErrorKind::FailedPrecondition,
                "the cluster is not initialised; run `vessel cluster init` first",
            ),
            other => OpError::new(
                ErrorKind::Unavailable,
                format!("the cluster cannot commit right now: {other}"),
            ),
        }
    }
}

fn store_error(error: StoreError) -> OpError {
    let kind = match &error {
        StoreError::DiskNotFound { .. } => ErrorKind::NotFound,
        StoreError::DiskAlreadyInPool { .. } => ErrorKind::AlreadyExists,
        StoreError::DiskBusy { .. }
        | StoreError::DiskHasExtents { .. }
        | StoreError::DiskLocked { .. }
        | StoreError::VolumeBusy { .. }
        | StoreError::ForeignData { .. } => ErrorKind::FailedPrecondition,
        StoreError::DiskFileMissing { .. }
        | StoreError::NotADisk { .. }
        | StoreError::SizeOnBlockDevice { .. }
        | StoreError::SizeMismatch { .. }
        | StoreError::DiskTooSmall { .. }
        | StoreError::DirectIoUnsupported { .. }
        | StoreError::DiskAlignmentUnsupported { .. }
        | StoreError::BlockSizeUnsupported { .. } => ErrorKind::InvalidArgument,
        _ => ErrorKind::Internal,
    };
    OpError::new(kind, error.to_string())
}

/// How long an admin operation waits for this node's state to catch up with the leader's.
pub(super) const SYNC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The nodes fenced off from the run of `volume` at `first` that may still catch up.
fn away_from(
    state: &crate::state::ClusterState,
    volume: crate::state::VolumeId,
    first: u64,
    count: u64,
) -> Vec<admin::AwayReplica> {
    state
        .away_from_run(volume, first)
        .map(|(node, missed)| admin::AwayReplica {
            node,
            node_name: state.node_label(node),
            since_unix: missed.since_unix,
            catch_up_until_unix: missed.since_unix + crate::state::CATCH_UP_WINDOW_SECS,
            changed_extents: missed.extents.range(first..first + count).count() as u64,
        })
        .collect()
}

pub(super) fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|elapsed| i64::try_from(elapsed.as_secs()).ok())
        .unwrap_or_default()
}

pub(super) fn layout(volume: &Volume) -> VolumeLayout {
    VolumeLayout {
        id: volume.id,
        size: volume.size,
        block_size: volume.block_size,
        extent_size: volume.extent_size,
    }
}

/// Checks `command` against a copy of the state: the verdict the commit would give, without committing.
fn dry_run(state: &ClusterState, command: Command) -> Result<(), OpError> {
    state
        .clone()
        .apply(command)
        .map(drop)
        .map_err(OpError::from)
}

impl LocalNode {
    fn require_pool(&self) -> Result<&Arc<LocalPool>, OpError> {
        self.pool().ok_or_else(|| {
            OpError::new(
                ErrorKind::FailedPrecondition,
                "the cluster is not initialised; run `vessel cluster init` first",
            )
        })
    }

    pub(super) async fn commit(&self, command: Command) -> Result<CommandOutcome, OpError> {
        tracing::debug!(%command, "committing");
        Ok(self.control.write(command).await?)
    }

    fn resolve_volume(&self, key: &str) -> Result<Volume, OpError> {
        self.control
            .read(|state| state.volume_by_name_or_id(key).cloned())
            .ok_or_else(|| {
                OpError::new(
                    ErrorKind::NotFound,
                    format!("volume '{key}' not found; `vessel volume list` shows the volumes"),
                )
            })
    }

    // ---- cluster and nodes ----

    pub async fn cluster_init(&self) -> Result<admin::ClusterInitReply, OpError> {
        let _guard = self.writes.lock().await;
        let initialized_now = self.initialize_cluster().await?;
        Ok(admin::ClusterInitReply {
            initialized_now,
            status: Some(self.cluster_status()),
        })
    }

    pub fn cluster_status(&self) -> admin::ClusterStatusReply {
        let raft = self.control.raft_status();
        let allocated = self
            .pool()
            .map_or(0, |pool| pool.disks().iter().map(|disk| disk.used).sum());
        let mut reply = self.control.read(|state| admin::ClusterStatusReply {
            state: if state.is_initialized() {
                "running"
            } else {
                "waiting"
            }
            .to_owned(),
            cluster_id: if state.is_initialized() {
                state.cluster_id.to_string()
            } else {
                String::new()
            },
            node_id: self.control.node_id(),
            leader_id: raft.leader,
            term: raft.term,
            voters: raft.voters.clone(),
            nodes: u32::try_from(state.nodes.len()).unwrap_or(u32::MAX),
            volumes: u32::try_from(state.volumes.len()).unwrap_or(u32::MAX),
            capacity_bytes: state.capacity_bytes(),
            provisioned_bytes: state.provisioned_bytes(),
            allocated_bytes: allocated,
            overcommit_ratio: f64::from(state.settings.overcommit_ratio_milli) / 1000.0,
            extent_size: state.settings.extent_size,
            warnings: Vec::new(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            last_applied: raft.last_applied_index.unwrap_or(0),
            failure_domain: state.failure_domain_label().unwrap_or("node").to_owned(),
        });
        if reply.state == "waiting" {
            reply.warnings.push(
                "this node is not a cluster member yet: run `vessel cluster init` to start a new cluster here, \
                 or `vessel node join SEED_ADDR` to join the cluster of the node at SEED_ADDR"
                    .to_owned(),
            );
        }
        reply.warnings.extend(self.warnings());
        reply
    }

    pub async fn node_join(
        &self,
        request: admin::NodeJoinRequest,
    ) -> Result<admin::NodeJoinReply, OpError> {
        let seed = request.seed.trim();
        if seed.parse::<std::net::SocketAddr>().is_err() {
            return Err(OpError::new(
                ErrorKind::InvalidArgument,
                format!("seed address '{seed}' is not IP:PORT (a member's --listen address)"),
            ));
        }
        let _guard = self.writes.lock().await;
        let joined = self.join_cluster(seed).await?;
        let voter = joined.unwrap_or_else(|| {
            self.control
                .raft_status()
                .voters
                .contains(&self.control.node_id())
        });
        Ok(admin::NodeJoinReply {
            joined_now: joined.is_some(),
            voter,
            status: Some(self.cluster_status()),
        })
    }

    /// What every node reports of itself (asked over the network, in parallel); `None` for a node that did not
    /// answer in time or has no address.
    pub(super) async fn reports(&self) -> HashMap<NodeId, Option<NodeReport>> {
        let me = self.control.node_id();
        let peers: Vec<(NodeId, Option<String>)> = self.control.read(|state| {
            state
                .nodes
                .values()
                .filter(|node| node.id != me)
                .map(|node| (node.id, node.address.clone()))
                .collect()
        });
        let asked = peers.into_iter().map(|(id, address)| async move {
            let report = match address {
                Some(address) => self.control.peer_report(&address, REPORT_TIMEOUT).await,
                None => None,
            };
            (id, report)
        });
        let mut reports: HashMap<_, _> =
            futures::future::join_all(asked).await.into_iter().collect();
        reports.insert(me, Some(self.local_report()));
        reports
    }

    /// This node's disks' use, as peers ask for it.
    pub(crate) fn local_report(&self) -> NodeReport {
        NodeReport {
            disk_used: self
                .pool()
                .map(|pool| {
                    pool.disks()
                        .iter()
                        .map(|disk| (disk.id, disk.used))
                        .collect()
                })
                .unwrap_or_default(),
            ports: self.port_counters(),
        }
    }

    pub async fn node_remove(&self, request: &admin::NodeRef) -> Result<admin::Node, OpError> {
        let _guard = self.writes.lock().await;
        let key = request.node.trim();
        let (node, command, check) = self.control.read(|state| {
            let node = state
                .nodes
                .values()
                .find(|node| node.name == key || node.id.to_string() == key)
                .cloned()
                .ok_or_else(|| {
                    OpError::new(
                        ErrorKind::NotFound,
                        format!("node '{key}' not found; `vessel node list` shows the nodes"),
                    )
                })?;
            let command = Command::RemoveNode {
                id: node.id,
                disks: state.disks_on(node.id).map(|disk| disk.id).collect(),
            };
            // The state machine's own verdict, before Raft's membership changes.
            let check = dry_run(state, command.clone());
            Ok::<_, OpError>((node, command, check))
        })?;
        check?;
        if node.id == self.control.node_id() {
            return Err(OpError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "node '{}' is the node this request was sent to; send `vessel node remove` to another member",
                    node.name
                ),
            ));
        }
        self.control
            .remove_member(node.id)
            .await
            .map_err(|error| match error {
                ControlError::Unavailable(reason) => OpError::new(ErrorKind::Unavailable, reason),
                ControlError::Membership(reason) => {
                    OpError::new(ErrorKind::FailedPrecondition, reason)
                }
                other => other.into(),
            })?;
        self.commit(command).await?;
        tracing::info!(node = node.id, name = %node.name, "node removed from the cluster");
        Ok(admin::Node {
            id: node.id,
            name: node.name,
            address: node.address.unwrap_or_default(),
            state: "removed".to_owned(),
            labels: node.labels.into_iter().collect(),
            ..admin::Node::default()
        })
    }

    pub async fn node_drain(&self, request: &admin::NodeRef) -> Result<admin::Node, OpError> {
        let _guard = self.writes.lock().await;
        let key = request.node.trim();
        let node = self
            .control
            .read(|state| state.node_by_name_or_id(key).cloned())
            .ok_or_else(|| {
                OpError::new(
                    ErrorKind::NotFound,
                    format!("node '{key}' not found; `vessel node list` shows the nodes"),
                )
            })?;
        self.commit(Command::UpdateNode {
            id: node.id,
            address: None,
            labels: None,
            state: Some(NodeState::Draining),
        })
        .await?;
        let holding = self.control.read(|state| state.volumes_on(node.id).count());
        tracing::info!(node = node.id, name = %node.name, volumes = holding, "node draining");
        Ok(admin::Node {
            id: node.id,
            name: node.name,
            address: node.address.unwrap_or_default(),
            state: NodeState::Draining.to_string(),
            labels: node.labels.into_iter().collect(),
            ..admin::Node::default()
        })
    }

    pub async fn node_list(&self) -> admin::NodeListReply {
        let reports = self.reports().await;
        let raft = self.control.raft_status();
        let leader = raft.leader;
        self.control.read(|state| admin::NodeListReply {
            nodes: state
                .nodes
                .values()
                .map(|node| admin::Node {
                    id: node.id,
                    name: node.name.clone(),
                    address: node.address.clone().unwrap_or_default(),
                    state: node.state.to_string(),
                    labels: node.labels.clone().into_iter().collect(),
                    disks: u32::try_from(state.disks_on(node.id).count()).unwrap_or(u32::MAX),
                    capacity_bytes: state.node_capacity_bytes(node.id),
                    // Space is allocated by each node alone: it reports its own use.
                    used_bytes: reports
                        .get(&node.id)
                        .and_then(Option::as_ref)
                        .map_or(0, |report| report.disk_used.values().sum()),
                    reachable: reports.get(&node.id).is_some_and(Option::is_some),
                    leader: leader == Some(node.id),
                    role: if raft.voters.contains(&node.id) {
                        "voter"
                    } else if raft.learners.contains(&node.id) {
                        "learner"
                    } else {
                        ""
                    }
                    .to_owned(),
                })
                .collect(),
        })
    }

    // ---- disks ----

    pub async fn disk_add(&self, request: admin::DiskAddRequest) -> Result<admin::Disk, OpError> {
        let _guard = self.writes.lock().await;
        let pool = self.require_pool()?;
        let path = Path::new(&request.path);
        if !path.is_absolute() {
            return Err(CommandError::DiskPathNotAbsolute { path: request.path }.into());
        }
        let me = self.control.node_id();
        if let Some(existing) = self.control.read(|state| {
            state
                .disks_on(me)
                .find(|disk| disk.path == request.path)
                .cloned()
        }) {
            return Err(OpError::new(
                ErrorKind::AlreadyExists,
                format!(
                    "disk {} is already in the pool (id {})",
                    existing.path, existing.id
                ),
            ));
        }
        let info = pool
            .add_disk(path, request.size_bytes)
            .map_err(store_error)?;
        let disk = Disk {
            id: info.id,
            node: me,
            path: request.path.clone(),
            capacity: info.capacity,
            block_device: info.block_device,
        };
        if let Err(error) = self.commit(Command::AddDisk { disk: disk.clone() }).await {
            if let Err(undo) = pool.remove_disk(info.id) {
                tracing::error!(disk = %info.id, %undo, "could not take a refused disk out of the local pool");
            }
            return Err(error);
        }
        tracing::info!(disk = %disk.id, path = %disk.path, capacity = disk.capacity, "disk added");
        Ok(self.disk_view(&disk))
    }

    pub async fn disk_list(&self) -> admin::DiskListReply {
        let reports = self.reports().await;
        let disks = self
            .control
            .read(|state| state.disks.values().cloned().collect::<Vec<_>>());
        admin::DiskListReply {
            disks: disks
                .iter()
                .map(|disk| {
                    let mut view = self.disk_view(disk);
                    if let Some(Some(report)) = reports.get(&disk.node) {
                        view.used_bytes = report.disk_used.get(&disk.id).copied().unwrap_or(0);
                    }
                    view
                })
                .collect(),
        }
    }

    pub async fn disk_remove(
        &self,
        request: admin::DiskRemoveRequest,
    ) -> Result<admin::Disk, OpError> {
        let _guard = self.writes.lock().await;
        let pool = self.require_pool()?;
        let key = request.disk.trim();
        let disk = self.control.read(|state| {
            if let Some(disk) = state.disk_by_path_or_id(key) {
                return Ok(disk.clone());
            }
            let mut prefixed = state
                .disks
                .values()
                .filter(|disk| !key.is_empty() && disk.id.to_string().starts_with(key));
            match (prefixed.next(), prefixed.next()) {
                (Some(disk), None) => Ok(disk.clone()),
                (Some(_), Some(_)) => Err(OpError::new(
                    ErrorKind::InvalidArgument,
                    format!("'{key}' matches several disks; give more of the id"),
                )),
                _ => Err(OpError::new(
                    ErrorKind::NotFound,
                    format!("disk '{key}' not found; `vessel disk list` shows the disks"),
                )),
            }
        })?;
        if disk.node != self.control.node_id() {
            return Err(OpError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "disk {} belongs to node {}; remove it through that node",
                    disk.path, disk.node
                ),
            ));
        }
        self.control
            .read(|state| dry_run(state, Command::RemoveDisk { id: disk.id }))?;
        let info = pool.remove_disk(disk.id).map_err(store_error)?;
        if let Err(error) = self.commit(Command::RemoveDisk { id: disk.id }).await {
            if let Err(undo) = pool.open_disk(&info.path) {
                tracing::error!(disk = %disk.id, %undo, "could not put a disk back into the local pool");
            }
            return Err(error);
        }
        tracing::info!(disk = %disk.id, path = %disk.path, "disk removed");
        let mut view = self.disk_view(&disk);
        view.used_bytes = info.used;
        Ok(view)
    }

    fn disk_view(&self, disk: &Disk) -> admin::Disk {
        let local = self
            .pool()
            .and_then(|pool| pool.disks().into_iter().find(|info| info.id == disk.id));
        admin::Disk {
            id: disk.id.to_string(),
            node_id: disk.node,
            path: disk.path.clone(),
            capacity_bytes: disk.capacity,
            used_bytes: local.map_or(0, |info| info.used),
            extent_size: self.pool().map_or(0, |pool| pool.extent_size()),
            block_device: disk.block_device,
        }
    }

    // ---- volumes ----

    pub async fn volume_create(
        &self,
        request: admin::VolumeCreateRequest,
    ) -> Result<admin::Volume, OpError> {
        let _guard = self.writes.lock().await;
        let pool = self.require_pool()?;
        let block_size = (request.block_size != 0).then_some(request.block_size);
        let effective = block_size
            .unwrap_or_else(|| self.control.read(|state| state.settings.default_block_size));
        if effective > 4096 {
            return Err(OpError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "block size {effective} B is larger than a guest page; use 512, 1024, 2048 or 4096"
                ),
            ));
        }
        let smallest = pool.min_block_size();
        if effective < smallest {
            return Err(OpError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "block size {effective} B is smaller than this node's disks can write directly ({smallest} B); use --block-size {smallest}"
                ),
            ));
        }
        let replicas = u8::try_from(request.replicas.max(1)).map_err(|_| {
            OpError::new(
                ErrorKind::InvalidArgument,
                format!("{} replicas is too many", request.replicas),
            )
        })?;
        let id = Uuid::new_v4();
        let command = Command::CreateVolume {
            id,
            name: request.name.clone(),
            size: request.size_bytes,
            block_size,
            replicas,
            created_unix: now_unix(),
        };
        self.commit(command).await?;
        tracing::info!(volume = %request.name, %id, size = request.size_bytes, "volume created");
        self.volume_view(&self.resolve_volume(&id.to_string())?, false)
    }

    pub fn volume_list(&self) -> admin::VolumeListReply {
        // In name order, as people scan a list.
        let volumes = self.control.read(|state| {
            state
                .volume_names
                .values()
                .filter_map(|id| state.volumes.get(id))
                .cloned()
                .collect::<Vec<_>>()
        });
        let allocated = self.allocated_extents();
        admin::VolumeListReply {
            volumes: volumes
                .iter()
                .map(|volume| self.volume_view_with(volume, &allocated, false))
                .collect(),
        }
    }

    pub fn volume_show(&self, request: &admin::VolumeRef) -> Result<admin::Volume, OpError> {
        self.volume_view(&self.resolve_volume(&request.volume)?, true)
    }

    pub async fn volume_grow(
        &self,
        request: admin::VolumeGrowRequest,
    ) -> Result<admin::Volume, OpError> {
        let _guard = self.writes.lock().await;
        let volume = self.resolve_volume(&request.volume)?;
        self.commit(Command::GrowVolume {
            id: volume.id,
            new_size: request.size_bytes,
        })
        .await?;
        tracing::info!(volume = %volume.name, id = %volume.id, from = volume.size, to = request.size_bytes, "volume grown");
        if let Some(open) = self.open_volume_handle(volume.id) {
            // The new extents' replica sets first, so the guest's first I/O there finds them.
            self.refresh_routing();
            open.grow(request.size_bytes).map_err(store_error)?;
            // The new size is served either way; a frontend that cannot be told sees it when it re-reads the config.
            if let Err(error) = self.devices.resize(volume.id) {
                tracing::warn!(volume = %volume.name, id = %volume.id, %error, "the frontend was not told of the new size");
            }
        }
        self.volume_view(&self.resolve_volume(&volume.id.to_string())?, false)
    }

    pub async fn volume_delete(
        &self,
        request: &admin::VolumeRef,
    ) -> Result<admin::VolumeDeleteReply, OpError> {
        let _guard = self.writes.lock().await;
        let pool = self.require_pool()?;
        let volume = self.resolve_volume(&request.volume)?;
        // Counted before: once the deletion is applied, the reclaimer may free the space before this call does.
        let allocated_here = pool
            .volumes_on_disk()
            .into_iter()
            .find(|(id, _)| *id == volume.id)
            .map_or(0, |(_, extents)| extents);
        self.commit(Command::DeleteVolume { id: volume.id }).await?;
        let freed = match pool.delete_volume(volume.id) {
            Ok(_) => allocated_here.saturating_mul(volume.extent_size),
            Err(error) => {
                // The volume is gone from the cluster; its space is reclaimed at the next start.
                self.warn(format!(
                    "volume '{}' was deleted but its space is not freed yet: {error}",
                    volume.name
                ));
                0
            }
        };
        tracing::info!(volume = %volume.name, id = %volume.id, freed, "volume deleted");
        Ok(admin::VolumeDeleteReply {
            id: volume.id.to_string(),
            name: volume.name,
            freed_bytes: freed,
        })
    }

    pub async fn volume_attach(
        &self,
        request: admin::VolumeAttachRequest,
    ) -> Result<admin::Volume, OpError> {
        let _guard = self.writes.lock().await;
        let pool = self.require_pool()?;
        let volume = self.resolve_volume(&request.volume)?;
        let queues = u16::try_from(request.queues.max(1)).unwrap_or(u16::MAX);
        let attachment = Attachment {
            volume: volume.id,
            node: self.control.node_id(),
            socket: request.vhost_user_socket.clone(),
            queues,
            read_only: request.read_only,
            socket_mode: if request.socket_mode == 0 {
                0o600
            } else {
                request.socket_mode
            },
            attached_unix: now_unix(),
            active: std::collections::BTreeSet::new(),
        };
        if queues > MAX_QUEUES {
            return Err(CommandError::InvalidQueues { queues }.into());
        }
        // Judged on the state as it is now, not as this node last heard of it (a detach sent to another node a
        // moment ago, a take-over while this node was away).
        self.control.sync(SYNC_TIMEOUT).await?;
        let holder = self.control.read(|state| {
            state
                .attachments
                .get(&volume.id)
                .map(|a| a.node)
                .filter(|node| *node != self.control.node_id())
        });
        let command = match holder {
            Some(from) if request.force => {
                self.check_gone(from).await?;
                Command::TakeOver {
                    attachment: attachment.clone(),
                    from,
                }
            }
            _ => Command::Attach {
                attachment: attachment.clone(),
            },
        };
        self.control.read(|state| dry_run(state, command.clone()))?;
        if let Command::TakeOver { from, .. } = command {
            // The lease first (fencing the old holder), then its unfinished writes are reconciled, then we serve.
            self.commit(command).await?;
            let name = self.control.read(|state| state.node_label(from));
            tracing::warn!(volume = %volume.name, from = %name, "volume taken over from a node that is gone; it is fenced off");
            let (volume, attachment) = self
                .control
                .read(|state| {
                    Some((
                        state.volumes.get(&volume.id)?.clone(),
                        state.attachments.get(&volume.id)?.clone(),
                    ))
                })
                .ok_or_else(|| OpError::new(ErrorKind::Internal, "the volume vanished"))?;
            self.reconcile(&volume, &attachment).await?;
            self.serve(pool, &volume, &attachment).map_err(|error| {
                OpError::new(
                    error.kind,
                    format!(
                        "volume '{}' was taken over, but cannot be served here: {}; fix that and restart vesseld, \
                         or detach it",
                        volume.name, error.message
                    ),
                )
            })?;
        } else {
            self.serve(pool, &volume, &attachment)?;
            if let Err(error) = self.commit(command).await {
                self.unserve(&volume);
                return Err(error);
            }
        }
        tracing::info!(volume = %volume.name, id = %volume.id, socket = %request.vhost_user_socket, queues, "volume attached");
        self.volume_view(&volume, false)
    }

    /// Refuses to take a volume over from `holder` while its data service answers.
    async fn check_gone(&self, holder: NodeId) -> Result<(), OpError> {
        self.control.read(|state| self.learn_addresses(state));
        let peers = Arc::clone(&self.peers);
        let alive = tokio::task::spawn_blocking(move || peers.reachable(holder))
            .await
            .unwrap_or(true);
        if alive {
            let name = self.control.read(|state| state.node_label(holder));
            return Err(OpError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "node '{name}' holds the volume and is alive (its data service answers); detach the volume there, \
                     or stop that node before taking the volume over with --force"
                ),
            ));
        }
        Ok(())
    }

    pub async fn volume_detach(
        &self,
        request: &admin::VolumeRef,
    ) -> Result<admin::Volume, OpError> {
        let _guard = self.writes.lock().await;
        let volume = self.resolve_volume(&request.volume)?;
        let holder = self.control.read(|state| {
            state
                .attachments
                .get(&volume.id)
                .map(|attachment| attachment.node)
        });
        if holder.is_some_and(|node| node != self.control.node_id()) {
            return Err(OpError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "volume '{}' is attached on another node; detach it there",
                    volume.name
                ),
            ));
        }
        self.commit(Command::Detach { volume: volume.id }).await?;
        self.unserve(&volume);
        tracing::info!(volume = %volume.name, id = %volume.id, "volume detached");
        self.volume_view(&volume, false)
    }

    /// Opens the volume and starts its device. Refused while a disk of this node is missing: the volume's extents
    /// on it would read back as zeroes.
    pub(super) fn serve(
        &self,
        pool: &Arc<LocalPool>,
        volume: &Volume,
        attachment: &Attachment,
    ) -> Result<(), OpError> {
        let missing = self
            .unavailable_disks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if !missing.is_empty() {
            return Err(OpError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "disk(s) {} of this node could not be opened, and volume '{}' may have extents there; \
                     fix the disk and restart vesseld",
                    missing.join(", "),
                    volume.name
                ),
            ));
        }
        let open: Arc<LocalVolume> = pool.open_volume(layout(volume)).map_err(store_error)?;
        // Extents placed on other nodes are reached through their replicas. Stale replicas are not freed meanwhile
        // (see `reclaim`).
        {
            let _gate = self
                .membership
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.control
                .read(|state| self.install_routing(state, volume, &open));
        }
        super::socket_directory(&attachment.socket)
            .map_err(|message| OpError::new(ErrorKind::InvalidArgument, message))?;
        let spec = AttachSpec {
            socket: attachment.socket.clone(),
            queues: attachment.queues,
            read_only: attachment.read_only,
            socket_mode: attachment.socket_mode,
        };
        self.devices
            .attach(Arc::clone(&open), &spec)
            .map_err(|error| {
                OpError::new(
                    ErrorKind::FailedPrecondition,
                    format!("cannot serve volume '{}': {error}", volume.name),
                )
            })?;
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(volume.id, open);
        Ok(())
    }

    pub(super) fn unserve(&self, volume: &Volume) {
        self.close_faults(
            volume.id,
            &format!(
                "volume '{}' was detached while writes waited for a replica",
                volume.name
            ),
        );
        self.devices.detach(volume.id);
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&volume.id);
    }

    fn allocated_extents(&self) -> std::collections::HashMap<vstore::VolumeId, u64> {
        self.pool()
            .map(|pool| pool.volumes_on_disk().into_iter().collect())
            .unwrap_or_default()
    }

    fn volume_view(&self, volume: &Volume, with_stats: bool) -> Result<admin::Volume, OpError> {
        Ok(self.volume_view_with(volume, &self.allocated_extents(), with_stats))
    }

    fn volume_view_with(
        &self,
        volume: &Volume,
        allocated: &std::collections::HashMap<vstore::VolumeId, u64>,
        with_stats: bool,
    ) -> admin::Volume {
        let extents_allocated = allocated.get(&volume.id).copied().unwrap_or(0);
        let attachment = self
            .control
            .read(|state| state.attachments.get(&volume.id).cloned());
        let open = self.open_volume_handle(volume.id);
        admin::Volume {
            id: volume.id.to_string(),
            name: volume.name.clone(),
            size_bytes: volume.size,
            block_size: volume.block_size,
            extent_size: volume.extent_size,
            replicas: u32::from(volume.replicas),
            extents: volume.extent_count(),
            extents_allocated,
            allocated_bytes: extents_allocated.saturating_mul(volume.extent_size),
            created_unix: volume.created_unix,
            attachment: attachment.map(|attachment| admin::Attachment {
                active_extents: attachment.active.iter().copied().collect(),
                node_id: attachment.node,
                vhost_user_socket: attachment.socket,
                queues: u32::from(attachment.queues),
                read_only: attachment.read_only,
                connected: self.devices.connected(volume.id),
                write_back: if self.devices.connected(volume.id) {
                    self.devices.write_back(volume.id)
                } else {
                    None
                },
            }),
            stats: if with_stats {
                open.as_deref().map(stats_view)
            } else {
                None
            },
            placement: if with_stats {
                self.control.read(|state| {
                    volume
                        .placement
                        .runs()
                        .map(|(first, run)| admin::ExtentRun {
                            first_extent: first,
                            count: run.count,
                            epoch: run.replicas.epoch,
                            nodes: run.replicas.nodes.clone(),
                            node_names: run
                                .replicas
                                .nodes
                                .iter()
                                .map(|node| state.node_label(*node))
                                .collect(),
                            rebuild_targets: run.replicas.targets().to_vec(),
                            rebuild_target_names: run
                                .replicas
                                .targets()
                                .iter()
                                .map(|node| state.node_label(*node))
                                .collect(),
                            rebuilt_extents: run
                                .replicas
                                .rebuild
                                .as_ref()
                                .map_or(0, |r| r.copied_extents),
                            rebuild_started_unix: run
                                .replicas
                                .rebuild
                                .as_ref()
                                .map_or(0, |r| r.started_unix),
                            rebuild_reported_unix: run
                                .replicas
                                .rebuild
                                .as_ref()
                                .map_or(0, |r| r.reported_unix),
                            away: away_from(state, volume.id, first, run.count),
                        })
                        .collect()
                })
            } else {
                Vec::new()
            },
        }
    }
}

fn stats_view(volume: &LocalVolume) -> admin::VolumeStats {
    let stats = volume.stats().snapshot();
    admin::VolumeStats {
        reads: stats.reads,
        writes: stats.writes,
        flushes: stats.flushes,
        discards: stats.discards,
        write_zeroes: stats.write_zeroes,
        read_bytes: stats.read_bytes,
        write_bytes: stats.write_bytes,
        errors: stats.errors,
        no_space_errors: stats.no_space_errors,
        bucket_bounds_us: vstore::LATENCY_BUCKETS_US.to_vec(),
        bucket_counts: stats.latency.counts.clone(),
        latency_sum_us: stats.latency.sum_us,
    }
}
