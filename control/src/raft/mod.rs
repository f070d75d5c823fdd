//! The Raft-replicated cluster state: openraft over a redb store, and the handle the rest of
//! Vessel uses.
//!
//! [`ControlPlane`] owns one openraft node whose log and state machine live in
//! `DATA_DIR/meta.redb` (`store`) and whose peers are reached over gRPC (`network`). Other
//! crates see only typed [`Command`]s, [`CommandOutcome`]s and read access to [`ClusterState`]:
//! no openraft type crosses this module's boundary.
//!
//! Invariants: a write returns only after its log entry is durable on a quorum of voters and the
//! command is applied and durable in the leader's state machine; `read` on the node a write
//! returned on sees that write; a node's id is fixed for the life of its data directory.
//!
//! Joining: a new node with its own data directory and `--listen` address mounts
//! [`ControlPlane::raft_service`] on its gRPC server and calls [`ControlPlane::join`] with any
//! member's address. The request finds its way to the leader, which adds the node as a learner,
//! answers once it has caught up (log or snapshot), and promotes it to voter while there are fewer
//! than three (`network::MAX_VOTERS`). [`ControlPlane::add_voter`] does the same from the leader's side.

mod network;
mod store;
#[cfg(test)]
mod tests;
mod types;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, Fatal, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use uuid::Uuid;
pub use vessel_proto::raft::raft_server::RaftServer;

use self::network::{ForwardError, ForwardRequest, ForwardResponse, PeerNetwork, propose_locally};
pub use self::network::{
    MAX_MESSAGE_BYTES, NodeReport, PortCounters, RaftPeerService, Reporter, WIRE_VERSION,
};
use self::store::{MetaStore, SharedState, StoreError};
use self::types::{Raft, TypeConfig};
use crate::state::{ClusterState, Command, CommandError, CommandOutcome, Node, NodeId, Settings};

/// File name of the metadata database inside the data directory.
pub const META_FILE: &str = "meta.redb";

/// How long a write keeps looking for a leader (elections, a leader that just failed) before it
/// reports the cluster unavailable.
const LEADER_WAIT: Duration = Duration::from_secs(10);

/// How long a forwarded command may take on the leader.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// How long joining may take: the leader answers once the new node has caught up with the log.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

/// How long `open` waits for a store that is still being closed by its previous user.
const REOPEN_WAIT: Duration = Duration::from_secs(3);

/// How long `shutdown` waits for openraft's tasks to let go of the store.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Pause between attempts while no leader is known.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Why a control-plane operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The state machine refused the command; the message is for the user as is.
    #[error(transparent)]
    Rejected(#[from] CommandError),
    #[error("the cluster is not initialised; run `vessel cluster init` first")]
    NotInitialized,
    #[error("this node is not the Raft leader{}", not_leader_hint(.leader, .address))]
    NotLeader {
        leader: Option<NodeId>,
        address: Option<String>,
    },
    #[error("cluster metadata is unavailable: {0}")]
    Unavailable(String),
    #[error("membership change refused: {0}")]
    Membership(String),
    #[error("metadata store {}: {reason}", .path.display())]
    Storage { path: PathBuf, reason: String },
}

fn unexpected_answer() -> ControlError {
    ControlError::Unavailable(
        "a peer gave an answer that does not fit the request; run the same Vessel release on every node"
            .to_owned(),
    )
}

fn not_leader_hint(leader: &Option<NodeId>, address: &Option<String>) -> String {
    match (leader, address) {
        (Some(leader), Some(address)) => {
            format!("; the leader is node {leader} at {address}, send it there")
        }
        (Some(leader), None) => {
            format!(
                "; the leader is node {leader}, which has no network address to forward to (start it with --listen)"
            )
        }
        (None, _) => "; no leader is known yet, retry shortly".to_owned(),
    }
}

/// A node's role in Raft.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaftRole {
    Learner,
    Follower,
    Candidate,
    Leader,
    Shutdown,
}

impl fmt::Display for RaftRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Learner => "learner",
            Self::Follower => "follower",
            Self::Candidate => "candidate",
            Self::Leader => "leader",
            Self::Shutdown => "shutdown",
        })
    }
}

/// What `vessel cluster status` shows about Raft on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftStatus {
    pub node_id: NodeId,
    pub role: RaftRole,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// Raft address of every member (empty for a node without `--listen`).
    pub addresses: BTreeMap<NodeId, String>,
    pub last_log_index: Option<u64>,
    pub committed_index: Option<u64>,
    pub last_applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
}

/// The handle to this node's replicated cluster state. Cheap to clone.
#[derive(Clone)]
pub struct ControlPlane {
    inner: Arc<Inner>,
}

struct Inner {
    node_id: NodeId,
    advertise_addr: Option<String>,
    store_path: PathBuf,
    raft: Raft,
    shared: Arc<SharedState>,
    /// Dead once openraft's tasks have dropped the log store and state machine.
    database: std::sync::Weak<redb::Database>,
    /// Answers peers' [`NodeReport`] requests.
    reporter: Arc<std::sync::OnceLock<Reporter>>,
}

impl fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlPlane")
            .field("node_id", &self.inner.node_id)
            .field("advertise_addr", &self.inner.advertise_addr)
            .field("store", &self.inner.store_path)
            .finish_non_exhaustive()
    }
}

/// Raft timing and log compaction.
///
/// Timeouts are generous because the control plane runs on shared, sometimes overloaded hosts
/// where a 150 ms election timeout would cause needless elections; a leader failure is detected
/// within 1–2 s. A snapshot is taken every 1024 entries, and 256 entries are kept behind it so a
/// briefly lagging follower catches up from the log rather than a snapshot.
fn raft_config() -> Result<openraft::Config, ControlError> {
    openraft::Config {
        cluster_name: "vessel".to_owned(),
        heartbeat_interval: 200,
        election_timeout_min: 1000,
        election_timeout_max: 2000,
        install_snapshot_timeout: 10_000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(1024),
        max_in_snapshot_log_to_keep: 256,
        purge_batch_size: 256,
        enable_pre_vote: Some(true),
        ..Default::default()
    }
    .validate()
    .map_err(|error| ControlError::Unavailable(format!("invalid Raft configuration: {error}")))
}

impl ControlPlane {
    /// Opens (creating on first use) the cluster state in `data_dir` and starts its Raft node.
    ///
    /// `advertise_addr` (`IP:PORT`) is where peers reach this node's [`Self::raft_service`]; `None`
    /// for a node without `--listen`, which can then only be a single-voter cluster.
    pub async fn open(
        data_dir: &Path,
        advertise_addr: Option<String>,
    ) -> Result<Self, ControlError> {
        let store_path = data_dir.join(META_FILE);
        let storage = |reason: String| ControlError::Storage {
            path: store_path.clone(),
            reason,
        };
        std::fs::create_dir_all(data_dir).map_err(|e| {
            storage(format!(
                "cannot create the data directory {}: {e}",
                data_dir.display()
            ))
        })?;
        let path = store_path.clone();
        let opened = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            // A store that was just shut down (in this process, or a daemon that is still exiting)
            // releases its file lock a moment after its last user is gone: wait that moment out.
            let deadline = Instant::now() + REOPEN_WAIT;
            let store = loop {
                match MetaStore::open(&path) {
                    Err(StoreError::InUse) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    other => break other?,
                }
            };
            let node_id = store.node_id()?;
            let state_machine = store.state_machine()?;
            Ok((store, node_id, state_machine))
        })
        .await
        .map_err(|e| storage(e.to_string()))?;
        let (store, node_id, state_machine) = opened.map_err(|e| storage(e.to_string()))?;
        let shared = state_machine.shared();
        let database = store.watch_close();
        let config = Arc::new(raft_config()?);
        let raft = Raft::new(
            node_id,
            config,
            PeerNetwork::new(node_id),
            store.log_store(),
            state_machine,
        )
        .await
        .map_err(|error| match error {
            Fatal::StorageError(e) => storage(e.to_string()),
            other => ControlError::Unavailable(format!("the Raft node failed to start: {other}")),
        })?;
        tracing::info!(node = node_id, store = %store_path.display(), "control plane opened");
        Ok(Self {
            inner: Arc::new(Inner {
                node_id,
                advertise_addr,
                store_path,
                raft,
                shared,
                database,
                reporter: Arc::default(),
            }),
        })
    }

    /// This data directory's node id.
    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// The address peers reach this node at, as given to [`Self::open`].
    pub fn advertise_addr(&self) -> Option<&str> {
        self.inner.advertise_addr.as_deref()
    }

    /// Whether the cluster state has been initialised (locally applied `InitCluster`).
    pub fn is_initialized(&self) -> bool {
        self.read(ClusterState::is_initialized)
    }

    /// Makes this node the single voter of a new cluster and commits `InitCluster` with a fresh
    /// cluster id, `settings` and `node` (whose id is set to this node's id, and whose address
    /// defaults to the advertised one). `Ok(false)` if the cluster was already initialised.
    pub async fn initialize(
        &self,
        settings: Settings,
        mut node: Node,
    ) -> Result<bool, ControlError> {
        if self.is_initialized() {
            return Ok(false);
        }
        node.id = self.inner.node_id;
        if node.address.is_none() {
            node.address.clone_from(&self.inner.advertise_addr);
        }
        let command = Command::InitCluster {
            cluster_id: Uuid::new_v4(),
            settings,
            node,
        };
        // Validate before touching Raft, so bad settings do not leave an initialised Raft behind.
        ClusterState::default().apply(command.clone())?;
        let address = self.inner.advertise_addr.clone().unwrap_or_default();
        let members = BTreeMap::from([(self.inner.node_id, BasicNode::new(address))]);
        match self.inner.raft.initialize(members).await {
            // NotAllowed: Raft already has a membership (an earlier, interrupted initialize, or
            // this node joined a cluster); InitCluster below settles which.
            Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
            Err(error) => {
                return Err(ControlError::Unavailable(format!(
                    "cannot initialise Raft: {error}"
                )));
            }
        }
        match self.write(command).await {
            Ok(_) => {
                tracing::info!(node = self.inner.node_id, "cluster initialised");
                Ok(true)
            }
            Err(ControlError::Rejected(CommandError::AlreadyInitialized { .. })) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Proposes `command`, forwarding it to the leader when this node is not the leader, and
    /// waits until it is committed and applied. The state machine's verdict comes back:
    /// `Err(ControlError::Rejected(..))` carries the user-facing refusal.
    pub async fn write(&self, command: Command) -> Result<CommandOutcome, ControlError> {
        if let Err(fatal) = &self.inner.raft.metrics().borrow_watched().running_state {
            return Err(ControlError::Unavailable(format!(
                "this node's Raft is not running: {fatal}"
            )));
        }
        if !matches!(command, Command::InitCluster { .. }) && !self.is_initialized() {
            return Err(ControlError::NotInitialized);
        }
        let deadline = Instant::now() + LEADER_WAIT;
        loop {
            let waiting_for = match propose_locally(&self.inner.raft, command.clone()).await {
                ForwardResponse::Applied { verdict, .. } => {
                    return verdict.map_err(ControlError::Rejected);
                }
                ForwardResponse::Failed(reason) => {
                    return Err(ControlError::Unavailable(format!(
                        "{reason}; the command's outcome is unknown, check the cluster state before retrying"
                    )));
                }
                ForwardResponse::Joined { .. }
                | ForwardResponse::Report(_)
                | ForwardResponse::Left
                | ForwardResponse::ReadIndex(_) => {
                    return Err(unexpected_answer());
                }
                ForwardResponse::NotLeader {
                    leader: Some(leader),
                    address: Some(address),
                } if leader != self.inner.node_id => {
                    let request = ForwardRequest::Write(command.clone());
                    match network::forward(&address, &request, FORWARD_TIMEOUT).await {
                        Ok(ForwardResponse::Applied { index, verdict }) => {
                            self.wait_applied(index).await;
                            return verdict.map_err(ControlError::Rejected);
                        }
                        Ok(ForwardResponse::Failed(reason)) => {
                            return Err(ControlError::Unavailable(format!(
                                "the leader (node {leader} at {address}) could not apply the command: {reason}"
                            )));
                        }
                        Ok(ForwardResponse::NotLeader { .. }) => {
                            format!("node {leader} is no longer the leader")
                        }
                        Ok(
                            ForwardResponse::Joined { .. }
                            | ForwardResponse::Report(_)
                            | ForwardResponse::Left
                            | ForwardResponse::ReadIndex(_),
                        ) => {
                            return Err(unexpected_answer());
                        }
                        Err(error @ ForwardError::Lost { .. }) => {
                            return Err(ControlError::Unavailable(error.to_string()));
                        }
                        Err(error @ ForwardError::Connect { .. }) => error.to_string(),
                    }
                }
                ForwardResponse::NotLeader {
                    leader: Some(leader),
                    address: None,
                } if leader != self.inner.node_id => {
                    return Err(ControlError::NotLeader {
                        leader: Some(leader),
                        address: None,
                    });
                }
                ForwardResponse::NotLeader { .. } => {
                    // Asked of the Raft core, not of the metrics, which lag just after initialize.
                    match self.inner.raft.is_initialized().await {
                        Ok(true) => {}
                        Ok(false) => return Err(ControlError::NotInitialized),
                        Err(fatal) => return Err(self.fatal(fatal)),
                    }
                    "no leader is elected".to_owned()
                }
            };
            if Instant::now() >= deadline {
                return Err(ControlError::Unavailable(format!(
                    "no Raft leader took the command within {}s ({waiting_for}); is a majority of voters running?",
                    LEADER_WAIT.as_secs()
                )));
            }
            tracing::debug!(node = self.inner.node_id, %command, waiting_for, "retrying a write");
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// Makes this fresh node a member of the cluster that the node at `seed` (`IP:PORT`) belongs
    /// to: the leader adds it as a learner, waits until it has the log, and promotes it to voter
    /// while the cluster has fewer than three. Returns whether it became a voter, once the cluster
    /// state has arrived here. Safe to repeat: a node that is already a member is answered as one.
    pub async fn join(&self, seed: &str) -> Result<bool, ControlError> {
        let Some(address) = self.inner.advertise_addr.clone() else {
            return Err(ControlError::Membership(
                "this node has no --listen address, so its peers could not reach it; restart vesseld with --listen IP:PORT to join a cluster"
                    .to_owned(),
            ));
        };
        let request = ForwardRequest::Join {
            id: self.inner.node_id,
            address,
        };
        let answer = self
            .ask_leader(&request, seed.to_owned(), JOIN_TIMEOUT)
            .await
            .map_err(|error| match error {
                ControlError::Unavailable(reason) => {
                    ControlError::Unavailable(format!("cannot join through {seed}: {reason}"))
                }
                other => other,
            })?;
        let voter = match answer {
            (ForwardResponse::Joined { voter }, _) => voter,
            (ForwardResponse::Failed(reason), target) => {
                return Err(ControlError::Membership(format!(
                    "{target} could not admit this node: {reason}"
                )));
            }
            _ => return Err(unexpected_answer()),
        };
        // The leader answered once this node had the log; its state machine applies it right after.
        let mut applied = self.subscribe();
        let arrived = tokio::time::timeout(LEADER_WAIT, async {
            while !self.is_initialized() {
                if applied.changed().await.is_err() {
                    return false;
                }
            }
            true
        })
        .await;
        if arrived != Ok(true) {
            return Err(ControlError::Unavailable(format!(
                "joined the cluster through {seed}, but its state has not arrived here within {}s; check `vessel cluster status` on both nodes",
                LEADER_WAIT.as_secs()
            )));
        }
        tracing::info!(node = self.inner.node_id, seed, voter, "joined the cluster");
        Ok(voter)
    }

    /// Takes node `id` out of the Raft membership (voter or learner), promoting a learner first
    /// when the voters would drop below three. Call from another node than `id`.
    pub async fn remove_member(&self, id: NodeId) -> Result<(), ControlError> {
        let status = self.raft_status();
        let first = status
            .leader
            .and_then(|leader| status.addresses.get(&leader).cloned())
            .filter(|address| !address.is_empty())
            .or_else(|| self.inner.advertise_addr.clone())
            .ok_or_else(|| {
                ControlError::Membership(
                    "this node has no --listen address, so it runs a single-node cluster without peers"
                        .to_owned(),
                )
            })?;
        match self
            .ask_leader(&ForwardRequest::Leave { id }, first, JOIN_TIMEOUT)
            .await?
        {
            (ForwardResponse::Left, _) => Ok(()),
            (ForwardResponse::Failed(reason), target) => Err(ControlError::Membership(format!(
                "the leader at {target} could not remove node {id}: {reason}"
            ))),
            _ => Err(unexpected_answer()),
        }
    }

    /// Sends `request` to `first` and on to the leader it names, until some node answers with
    /// something other than "not the leader" (then returned with the address that answered) or
    /// `timeout` passes.
    async fn ask_leader(
        &self,
        request: &ForwardRequest,
        first: String,
        timeout: Duration,
    ) -> Result<(ForwardResponse, String), ControlError> {
        let deadline = Instant::now() + timeout;
        let mut target = first;
        loop {
            let answer = network::forward(&target, request, timeout)
                .await
                .map_err(|error| {
                    let (ForwardError::Connect { reason, .. } | ForwardError::Lost { reason, .. }) =
                        error;
                    ControlError::Unavailable(format!(
                        "cannot reach {target}: {reason}; is vesseld running there with --listen {target}?"
                    ))
                })?;
            match answer {
                ForwardResponse::NotLeader {
                    address: Some(leader),
                    ..
                } if leader != target => {
                    tracing::debug!(node = self.inner.node_id, %leader, "following the leader");
                    target = leader;
                    continue;
                }
                ForwardResponse::NotLeader { .. } => {}
                answer => return Ok((answer, target)),
            }
            if Instant::now() >= deadline {
                return Err(ControlError::Unavailable(format!(
                    "no leader answered through {target} within {}s; is a majority of the voters running?",
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// Waits until this node's state is as fresh as the leader's at the time of the call (a
    /// linearizable follower read): asks the leader for its read index, then waits to apply it.
    /// Decisions that must not act on a stale state (serving a volume) call this first.
    pub async fn sync(&self, timeout: Duration) -> Result<(), ControlError> {
        let deadline = Instant::now() + timeout;
        let mut last_error = "no leader is known yet".to_owned();
        // The leader may be changing (the old one just died): ask whoever leads now, until the deadline.
        let index = loop {
            let status = self.raft_status();
            let asked = match status.leader {
                Some(leader) if leader == self.inner.node_id => {
                    Some(network::read_index(&self.inner.raft).await)
                }
                Some(leader) => match status.addresses.get(&leader) {
                    Some(address) => Some(
                        network::forward(address, &ForwardRequest::ReadIndex, FORWARD_TIMEOUT)
                            .await
                            .unwrap_or_else(|error| ForwardResponse::Failed(error.to_string())),
                    ),
                    None => None,
                },
                None => None,
            };
            match asked {
                Some(ForwardResponse::ReadIndex(index)) => break index,
                Some(ForwardResponse::Failed(reason)) => last_error = reason,
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(ControlError::Unavailable(format!(
                    "cannot tell how current this node's state is: {last_error}"
                )));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        };
        let mut applied = self.subscribe();
        match tokio::time::timeout(timeout, applied.wait_for(|&applied| applied >= index)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ControlError::Unavailable(format!(
                "this node has not caught up with the cluster state (log index {index}) within {}s",
                timeout.as_secs()
            ))),
        }
    }

    /// Waits (bounded) until this node has applied log `index`, so that a write forwarded to the
    /// leader is visible to `read` here when `write` returns.
    async fn wait_applied(&self, index: u64) {
        let mut applied = self.subscribe();
        let caught_up =
            tokio::time::timeout(LEADER_WAIT, applied.wait_for(|&applied| applied >= index)).await;
        if !matches!(caught_up, Ok(Ok(_))) {
            tracing::warn!(
                node = self.inner.node_id,
                index,
                "a forwarded write is not applied locally yet"
            );
        }
    }

    /// Runs `f` on the locally applied state. Never blocks on the network; on a follower the state
    /// may trail the leader by the entries not yet replicated. `f` runs under the lock applies
    /// take: keep it short, and do not call back into this handle from it.
    pub fn read<R>(&self, f: impl FnOnce(&ClusterState) -> R) -> R {
        self.inner.shared.read(|applied| f(&applied.state))
    }

    /// A receiver of the last applied log index: it wakes whenever the applied state changed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.shared.subscribe()
    }

    /// Raft's view from this node.
    pub fn raft_status(&self) -> RaftStatus {
        let metrics = self.inner.raft.metrics();
        let metrics = metrics.borrow_watched();
        let membership = &metrics.membership_config;
        RaftStatus {
            node_id: metrics.id,
            role: match metrics.state {
                ServerState::Learner => RaftRole::Learner,
                ServerState::Follower => RaftRole::Follower,
                ServerState::Candidate => RaftRole::Candidate,
                ServerState::Leader => RaftRole::Leader,
                ServerState::Shutdown => RaftRole::Shutdown,
            },
            leader: metrics.current_leader,
            term: metrics.current_term,
            voters: membership.voter_ids().collect(),
            learners: membership.membership().learner_ids().collect(),
            addresses: membership
                .nodes()
                .map(|(id, node)| (*id, node.addr.clone()))
                .collect(),
            last_log_index: metrics.last_log_index,
            committed_index: metrics.local_committed.as_ref().map(|id| id.index()),
            last_applied_index: metrics.last_applied.as_ref().map(|id| id.index()),
            snapshot_index: metrics.snapshot.as_ref().map(|id| id.index()),
            purged_index: metrics.purged.as_ref().map(|id| id.index()),
        }
    }

    /// Waits until some node is known as leader and returns its id.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId, ControlError> {
        let metrics = self
            .inner
            .raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a leader is known")
            .await
            .map_err(|error| {
                ControlError::Unavailable(format!("no Raft leader within {timeout:?}: {error}"))
            })?;
        metrics
            .current_leader
            .ok_or_else(|| ControlError::Unavailable("no Raft leader".to_owned()))
    }

    /// Adds node `id`, reachable at `address`, as a non-voting learner and waits until it has
    /// caught up with the log. Call on the leader.
    pub async fn add_learner(&self, id: NodeId, address: String) -> Result<(), ControlError> {
        let result = self
            .inner
            .raft
            .add_learner(id, BasicNode::new(address), true)
            .await;
        result
            .map(|_| ())
            .map_err(|error| self.membership_error(error))
    }

    /// Adds node `id`, reachable at `address`, as a voter: first as a learner that catches up,
    /// then promoted. Call on the leader.
    pub async fn add_voter(&self, id: NodeId, address: String) -> Result<(), ControlError> {
        self.add_learner(id, address).await?;
        let change = ChangeMembers::AddVoterIds([id].into());
        let result = self.inner.raft.change_membership(change, false).await;
        result
            .map(|_| ())
            .map_err(|error| self.membership_error(error))?;
        tracing::info!(node = self.inner.node_id, voter = id, "voter added");
        Ok(())
    }

    /// Removes voter `id` from the membership (it stops receiving the log). Call on the leader.
    pub async fn remove_voter(&self, id: NodeId) -> Result<(), ControlError> {
        let change = ChangeMembers::RemoveVoters([id].into());
        let result = self.inner.raft.change_membership(change, false).await;
        result
            .map(|_| ())
            .map_err(|error| self.membership_error(error))
    }

    fn membership_error(
        &self,
        error: RaftError<TypeConfig, ClientWriteError<TypeConfig>>,
    ) -> ControlError {
        match error {
            RaftError::APIError(ClientWriteError::ForwardToLeader(to)) => ControlError::NotLeader {
                leader: to.leader_id,
                address: to
                    .leader_node
                    .map(|node| node.addr)
                    .filter(|addr| !addr.is_empty()),
            },
            RaftError::APIError(other) => ControlError::Membership(other.to_string()),
            RaftError::Fatal(fatal) => self.fatal(fatal),
        }
    }

    fn fatal(&self, fatal: Fatal<TypeConfig>) -> ControlError {
        match fatal {
            Fatal::StorageError(error) => ControlError::Storage {
                path: self.inner.store_path.clone(),
                reason: error.to_string(),
            },
            other => ControlError::Unavailable(format!("the Raft node has stopped: {other}")),
        }
    }

    /// The gRPC service peers send Raft RPCs (and forwarded writes) to. The daemon mounts it on
    /// its `--listen` server next to the admin API.
    pub fn raft_service(&self) -> RaftServer<RaftPeerService> {
        RaftPeerService::new(
            self.inner.node_id,
            self.inner.raft.clone(),
            Arc::clone(&self.inner.reporter),
        )
        .into_server()
    }

    /// Sets what this node answers when a peer asks for its [`NodeReport`] (once; later calls are
    /// ignored). Until then it answers with an empty report.
    pub fn set_reporter(&self, reporter: Reporter) {
        let _ = self.inner.reporter.set(reporter);
    }

    /// Asks the node at `address` for its [`NodeReport`]; `None` if it does not answer within
    /// `timeout` (down, cut off, or too busy to matter).
    pub async fn peer_report(&self, address: &str, timeout: Duration) -> Option<NodeReport> {
        let asked = network::forward(address, &ForwardRequest::Report, timeout);
        match tokio::time::timeout(timeout, asked).await {
            Ok(Ok(ForwardResponse::Report(report))) => Some(report),
            _ => None,
        }
    }

    /// Stops the Raft node and waits (bounded) until its tasks have closed the metadata store, so
    /// the data directory can be opened again at once. Later writes fail with
    /// [`ControlError::Unavailable`]; reads still see the last applied state.
    pub async fn shutdown(&self) -> Result<(), ControlError> {
        self.inner.raft.shutdown().await.map_err(|error| {
            ControlError::Unavailable(format!("the Raft task failed while stopping: {error}"))
        })?;
        let deadline = Instant::now() + CLOSE_WAIT;
        while self.inner.database.strong_count() > 0 {
            if Instant::now() >= deadline {
                tracing::warn!(
                    node = self.inner.node_id,
                    "Raft tasks still hold the metadata store after shutdown"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::info!(node = self.inner.node_id, "control plane stopped");
        Ok(())
    }
}
