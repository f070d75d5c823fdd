//! Raft traffic between voters over gRPC (`vessel_proto::raft`), both directions.
//!
//! Client side: [`PeerNetwork`] hands openraft one [`PeerClient`] per target; clients to the same
//! address share one lazily connected HTTP/2 channel. Server side: [`RaftPeerService`] decodes the
//! request, hands it to the local Raft node and encodes the reply. [`forward`] sends a command
//! proposed on a follower to the leader (the `Forward` RPC), or a new node's request to be admitted
//! into the membership ([`ForwardRequest::Join`]).
//!
//! Every payload is postcard behind `RaftMessage.version` ([`WIRE_VERSION`]); a peer refuses
//! versions it does not know. A malformed message from a peer fails that RPC with
//! `INVALID_ARGUMENT`, never the daemon. Transport security (mTLS) is added here, in one place,
//! by a later issue.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::errors::{
    ClientWriteError, ForwardToLeader, NetworkError, RPCError, RaftError, ReplicationClosed,
    StreamingError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, ChangeMembers, OptionalSend, RaftNetworkV2};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};
use vessel_proto::raft::RaftMessage;
use vessel_proto::raft::raft_client::RaftClient;
use vessel_proto::raft::raft_server::{Raft as RaftRpc, RaftServer};

use super::types::{Raft, Snapshot, SnapshotMeta, TypeConfig, Vote};
use crate::state::{Command, CommandError, CommandOutcome, NodeId};

/// Version of the payload encoding in `RaftMessage.version`.
pub const WIRE_VERSION: u32 = 1;

/// Largest Raft message accepted or sent: room for a snapshot of a large cluster state.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// How long establishing a connection to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a Raft message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(
        "raft message version {found} is not supported (this node speaks version {WIRE_VERSION}); run the same Vessel release on every node"
    )]
    UnknownVersion { found: u32 },
    #[error("malformed raft message: {0}")]
    Malformed(#[from] postcard::Error),
}

fn encode_message<T: Serialize>(value: &T) -> Result<RaftMessage, postcard::Error> {
    Ok(RaftMessage {
        version: WIRE_VERSION,
        payload: postcard::to_allocvec(value)?,
    })
}

fn decode_message<T: DeserializeOwned>(message: &RaftMessage) -> Result<T, WireError> {
    if message.version != WIRE_VERSION {
        return Err(WireError::UnknownVersion {
            found: message.version,
        });
    }
    Ok(postcard::from_bytes(&message.payload)?)
}

fn endpoint(addr: &str) -> Result<Endpoint, String> {
    if addr.is_empty() {
        return Err("the node has no network address (it was started without --listen)".to_owned());
    }
    Endpoint::from_shared(format!("http://{addr}"))
        .map(|endpoint| endpoint.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true))
        .map_err(|error| format!("'{addr}' is not a usable address: {error}"))
}

fn client(channel: Channel) -> RaftClient<Channel> {
    RaftClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// A whole snapshot, as sent in one `InstallSnapshot` message.
#[derive(Debug, Serialize, Deserialize)]
struct InstallSnapshotRequest {
    vote: Vote,
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// The openraft network factory: one [`PeerClient`] per target, channels shared per address.
#[derive(Debug, Clone)]
pub struct PeerNetwork {
    node_id: NodeId,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl PeerNetwork {
    pub fn new(node_id: NodeId) -> Self {
        Self {
            node_id,
            channels: Arc::default(),
        }
    }

    fn channel(&self, addr: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let channel = endpoint(addr)?.connect_lazy();
        channels.insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            from: self.node_id,
            target,
            addr: node.addr.clone(),
            client: self.channel(&node.addr).map(client),
        }
    }
}

/// The RPCs a [`PeerClient`] sends.
#[derive(Debug, Clone, Copy)]
enum Rpc {
    Vote,
    PreVote,
    AppendEntries,
    InstallSnapshot,
}

impl Rpc {
    fn kind(self) -> RPCTypes {
        match self {
            Self::Vote | Self::PreVote => RPCTypes::Vote,
            Self::AppendEntries => RPCTypes::AppendEntries,
            Self::InstallSnapshot => RPCTypes::InstallSnapshot,
        }
    }
}

/// Sends Raft RPCs to one peer.
#[derive(Debug)]
pub struct PeerClient {
    from: NodeId,
    target: NodeId,
    addr: String,
    /// `Err` when the peer's address is unusable; every RPC then fails as unreachable.
    client: Result<RaftClient<Channel>, String>,
}

impl PeerClient {
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        rpc: Rpc,
        request: &Req,
        ttl: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let mut client = match &self.client {
            Ok(client) => client.clone(),
            Err(reason) => {
                return Err(RPCError::Unreachable(Unreachable::from_string(format!(
                    "node {}: {reason}",
                    self.target
                ))));
            }
        };
        let message = encode_message(request)
            .map_err(|error| RPCError::Network(NetworkError::new(&error)))?;
        let mut request = Request::new(message);
        request.set_timeout(ttl);
        let call = async move {
            match rpc {
                Rpc::Vote => client.vote(request).await,
                Rpc::PreVote => client.pre_vote(request).await,
                Rpc::AppendEntries => client.append_entries(request).await,
                Rpc::InstallSnapshot => client.install_snapshot(request).await,
            }
        };
        let timeout = || Timeout {
            action: rpc.kind(),
            id: self.from,
            target: self.target,
            timeout: ttl,
        };
        let response = match tokio::time::timeout(ttl, call).await {
            Err(_) => return Err(RPCError::Timeout(timeout())),
            Ok(Err(status)) if status.code() == Code::DeadlineExceeded => {
                return Err(RPCError::Timeout(timeout()));
            }
            Ok(Err(status)) => {
                let reason = format!(
                    "node {} at {}: {}",
                    self.target,
                    self.addr,
                    status.message()
                );
                return Err(match status.code() {
                    // Connection refused or the peer's Raft is stopped: back off before retrying.
                    Code::Unavailable => RPCError::Unreachable(Unreachable::from_string(reason)),
                    _ => RPCError::Network(NetworkError::from_string(reason)),
                });
            }
            Ok(Ok(response)) => response.into_inner(),
        };
        decode_message(&response).map_err(|error| RPCError::Network(NetworkError::new(&error)))
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(Rpc::AppendEntries, &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(Rpc::Vote, &rpc, option.hard_ttl()).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(Rpc::PreVote, &rpc, option.hard_ttl()).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let request = InstallSnapshotRequest {
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot,
        };
        tokio::select! {
            result = self.call(Rpc::InstallSnapshot, &request, option.hard_ttl()) => result.map_err(StreamingError::from),
            closed = cancel => Err(StreamingError::Closed(closed)),
        }
    }
}

/// How many voters the leader admits; nodes that join after them are learners. Three voters keep
/// the cluster writable through the loss of any one.
pub const MAX_VOTERS: usize = 3;

/// A request sent to the leader by another node.
#[derive(Debug, Serialize, Deserialize)]
pub enum ForwardRequest {
    /// A command proposed on a follower.
    Write(Command),
    /// A new node, reachable for Raft at `address`, asks to become a member: a voter while there
    /// are fewer than [`MAX_VOTERS`], else a learner. Answered once it has caught up with the log.
    Join { id: NodeId, address: String },
    /// Take node `id` out of the membership (see [`RaftPeerService::release`]).
    Leave { id: NodeId },
    /// Any node asks any other for what only that node knows (its disks' use); answered by every
    /// node, leader or not.
    Report,
    /// The leader confirms its leadership with a quorum and answers with the log index a node must
    /// have applied to read the state as of now (a follower read).
    ReadIndex,
}

/// What a node knows of itself alone: space is allocated by each node without a Raft commit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// Bytes allocated on each of its open disks.
    pub disk_used: BTreeMap<uuid::Uuid, u64>,
    /// Counters of the ports its switch serves: rx packets and bytes, tx packets and bytes, drops by reason.
    pub ports: BTreeMap<u64, PortCounters>,
}

/// One port's traffic, as its node's switch counts it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub drops: BTreeMap<String, u64>,
    /// For a vhost-user port: whether a frontend (the VM) is connected to its socket.
    #[serde(default)]
    pub frontend_connected: Option<bool>,
}

/// Produces this node's [`NodeReport`]; set by the node runtime once its pool exists.
pub type Reporter = Arc<dyn Fn() -> NodeReport + Send + Sync>;

/// The leader's answer to a [`ForwardRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum ForwardResponse {
    /// The command was committed and applied at log `index`; `verdict` is the state machine's.
    Applied {
        index: u64,
        verdict: Result<CommandOutcome, CommandError>,
    },
    /// The receiver is not the leader (any more); nothing was proposed.
    NotLeader {
        leader: Option<NodeId>,
        address: Option<String>,
    },
    /// The receiver could not tell whether the command was applied.
    Failed(String),
    /// The joining node is a member now, with the log caught up.
    Joined { voter: bool },
    /// The answer to [`ForwardRequest::Report`].
    Report(NodeReport),
    /// The node named in [`ForwardRequest::Leave`] is out of the membership.
    Left,
    /// The answer to [`ForwardRequest::ReadIndex`].
    ReadIndex(u64),
}

/// Why [`forward`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No connection could be made: the command was certainly not sent.
    #[error("cannot reach the leader at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    /// The request went out but no answer came back: the command may or may not have been applied.
    #[error(
        "lost the connection to the leader at {addr} while it handled the command ({reason}); its outcome is unknown, check the cluster state before retrying"
    )]
    Lost { addr: String, reason: String },
}

/// Sends `request` to the node at `addr` and returns its answer.
pub async fn forward(
    addr: &str,
    request: &ForwardRequest,
    timeout: Duration,
) -> Result<ForwardResponse, ForwardError> {
    let connect_error = |reason: String| ForwardError::Connect {
        addr: addr.to_owned(),
        reason,
    };
    let lost = |reason: String| ForwardError::Lost {
        addr: addr.to_owned(),
        reason,
    };
    let channel = endpoint(addr)
        .map_err(connect_error)?
        .connect()
        .await
        .map_err(|e| connect_error(e.to_string()))?;
    let message = encode_message(request)
        .map_err(|e| connect_error(format!("cannot encode the command: {e}")))?;
    let mut request = Request::new(message);
    request.set_timeout(timeout);
    let response = match tokio::time::timeout(timeout, client(channel).forward(request)).await {
        Err(_) => return Err(lost(format!("no answer within {timeout:?}"))),
        Ok(Err(status)) => return Err(lost(status.message().to_owned())),
        Ok(Ok(response)) => response.into_inner(),
    };
    decode_message(&response).map_err(|e| lost(e.to_string()))
}

/// Proposes `command` on this node, which must be the leader; never forwards further.
pub async fn propose_locally(raft: &Raft, command: Command) -> ForwardResponse {
    match raft.client_write(command).await {
        Ok(response) => match response.data.0 {
            Some(verdict) => ForwardResponse::Applied {
                index: response.log_id.index(),
                verdict,
            },
            None => ForwardResponse::Failed(
                "the leader applied the command as a non-command entry".to_owned(),
            ),
        },
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(to))) => redirect(to),
        Err(error) => ForwardResponse::Failed(error.to_string()),
    }
}

/// A snapshot of the membership for [`RaftPeerService::admit`] and [`RaftPeerService::release`].
struct MembershipView {
    leader: Option<NodeId>,
    leader_address: Option<String>,
    voters: Vec<NodeId>,
    learners: Vec<NodeId>,
}

/// The gRPC service peers send Raft RPCs to; mount it with [`RaftPeerService::into_server`].
#[derive(Clone)]
pub struct RaftPeerService {
    node_id: NodeId,
    raft: Raft,
    /// Admits one joining node at a time: openraft refuses overlapping membership changes.
    joins: Arc<tokio::sync::Mutex<()>>,
    reporter: Arc<OnceLock<Reporter>>,
}

impl std::fmt::Debug for RaftPeerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftPeerService")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl RaftPeerService {
    pub(crate) fn new(node_id: NodeId, raft: Raft, reporter: Arc<OnceLock<Reporter>>) -> Self {
        Self {
            node_id,
            raft,
            joins: Arc::default(),
            reporter,
        }
    }

    /// The leader and the members as this node's Raft sees them now.
    fn membership_view(&self) -> MembershipView {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow_watched();
        let membership = metrics.membership_config.membership();
        MembershipView {
            leader: metrics.current_leader,
            leader_address: metrics
                .current_leader
                .and_then(|leader| membership.get_node(&leader))
                .map(|node| node.addr.clone())
                .filter(|addr| !addr.is_empty()),
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
        }
    }

    /// Takes node `id` out of the membership. A voter whose removal would leave fewer than
    /// [`MAX_VOTERS`] voters is first replaced by a learner, when there is one; the last voter is
    /// never removed. Idempotent.
    async fn release(&self, id: NodeId) -> ForwardResponse {
        let _one_at_a_time = self.joins.lock().await;
        let MembershipView {
            leader,
            leader_address,
            voters,
            learners,
        } = self.membership_view();
        if leader != Some(self.node_id) {
            return ForwardResponse::NotLeader {
                leader,
                address: leader_address,
            };
        }
        if voters.contains(&id) {
            if voters.len() == 1 {
                return ForwardResponse::Failed(
                    "it is the cluster's only Raft voter; the cluster cannot go on without it"
                        .to_owned(),
                );
            }
            if voters.len() <= MAX_VOTERS
                && let Some(&stand_in) = learners.iter().min()
            {
                let change = ChangeMembers::AddVoterIds([stand_in].into());
                if let Err(error) = self.raft.change_membership(change, false).await {
                    return membership_failure(error);
                }
                tracing::info!(
                    node = self.node_id,
                    voter = stand_in,
                    replaces = id,
                    "learner promoted to voter"
                );
            }
            let change = ChangeMembers::RemoveVoters([id].into());
            if let Err(error) = self.raft.change_membership(change, false).await {
                return membership_failure(error);
            }
        } else if learners.contains(&id) {
            let change = ChangeMembers::RemoveNodes([id].into());
            if let Err(error) = self.raft.change_membership(change, false).await {
                return membership_failure(error);
            }
        }
        tracing::info!(
            node = self.node_id,
            removed = id,
            "node left the membership"
        );
        ForwardResponse::Left
    }

    /// Admits node `id` (see [`ForwardRequest::Join`]); idempotent, so a node that lost the answer
    /// may ask again.
    async fn admit(&self, id: NodeId, address: String) -> ForwardResponse {
        let _one_at_a_time = self.joins.lock().await;
        let MembershipView {
            leader,
            leader_address,
            voters,
            ..
        } = self.membership_view();
        if voters.is_empty() {
            return ForwardResponse::Failed(
                "that node is not a cluster member itself; run `vessel cluster init` on the first node, then join \
                 through it"
                    .to_owned(),
            );
        }
        if leader != Some(self.node_id) {
            return ForwardResponse::NotLeader {
                leader,
                address: leader_address,
            };
        }
        if voters.contains(&id) {
            return ForwardResponse::Joined { voter: true };
        }
        tracing::info!(node = self.node_id, joining = id, %address, "admitting a node; it catches up as a learner first");
        // Blocking: returns once the learner has the log, so the new node sees the cluster state when
        // it gets the answer.
        if let Err(error) = self
            .raft
            .add_learner(id, BasicNode::new(address), true)
            .await
        {
            return membership_failure(error);
        }
        if voters.len() >= MAX_VOTERS {
            tracing::info!(
                node = self.node_id,
                learner = id,
                "node joined as a learner"
            );
            return ForwardResponse::Joined { voter: false };
        }
        let change = ChangeMembers::AddVoterIds([id].into());
        if let Err(error) = self.raft.change_membership(change, false).await {
            return membership_failure(error);
        }
        tracing::info!(node = self.node_id, voter = id, "node joined as a voter");
        ForwardResponse::Joined { voter: true }
    }

    /// The tonic server for this service, with message limits sized for snapshots.
    pub fn into_server(self) -> RaftServer<Self> {
        RaftServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn stopped(&self, error: impl std::fmt::Display) -> Status {
        Status::unavailable(format!(
            "raft on node {} is not serving: {error}",
            self.node_id
        ))
    }
}

fn decode_request<T: DeserializeOwned>(request: Request<RaftMessage>) -> Result<T, Status> {
    decode_message(&request.into_inner())
        .map_err(|error| Status::invalid_argument(error.to_string()))
}

fn reply<T: Serialize>(value: &T) -> Result<Response<RaftMessage>, Status> {
    encode_message(value)
        .map(Response::new)
        .map_err(|error| Status::internal(format!("cannot encode the raft reply: {error}")))
}

#[tonic::async_trait]
impl RaftRpc for RaftPeerService {
    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc: VoteRequest<TypeConfig> = decode_request(request)?;
        let response = self.raft.vote(rpc).await.map_err(|e| self.stopped(e))?;
        reply(&response)
    }

    async fn pre_vote(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: VoteRequest<TypeConfig> = decode_request(request)?;
        let response = self.raft.pre_vote(rpc).await.map_err(|e| self.stopped(e))?;
        reply(&response)
    }

    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode_request(request)?;
        let response = self
            .raft
            .append_entries(rpc)
            .await
            .map_err(|e| self.stopped(e))?;
        reply(&response)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let InstallSnapshotRequest { vote, meta, data } = decode_request(request)?;
        let snapshot = Snapshot {
            meta,
            snapshot: data,
        };
        let response = self
            .raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(|e| self.stopped(e))?;
        reply(&response)
    }

    async fn forward(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        match decode_request(request)? {
            ForwardRequest::Write(command) => {
                tracing::debug!(node = self.node_id, %command, "proposing a forwarded command");
                reply(&propose_locally(&self.raft, command).await)
            }
            ForwardRequest::Join { id, address } => reply(&self.admit(id, address).await),
            ForwardRequest::Leave { id } => reply(&self.release(id).await),
            ForwardRequest::Report => reply(&ForwardResponse::Report(
                self.reporter
                    .get()
                    .map(|report| report())
                    .unwrap_or_default(),
            )),
            ForwardRequest::ReadIndex => reply(&read_index(&self.raft).await),
        }
    }
}

fn membership_failure(
    error: RaftError<TypeConfig, ClientWriteError<TypeConfig>>,
) -> ForwardResponse {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(to)) => redirect(to),
        other => ForwardResponse::Failed(format!("the membership change failed: {other}")),
    }
}

/// This node's read index if it is the leader (see [`ForwardRequest::ReadIndex`]).
pub async fn read_index(raft: &Raft) -> ForwardResponse {
    match raft
        .ensure_linearizable(openraft::ReadPolicy::ReadIndex)
        .await
    {
        Ok(read) => ForwardResponse::ReadIndex(read.log_id().index()),
        Err(RaftError::APIError(openraft::error::LinearizableReadError::ForwardToLeader(to))) => {
            redirect(to)
        }
        Err(other) => ForwardResponse::Failed(format!("cannot confirm the leadership: {other}")),
    }
}

/// Where openraft says the leader is, as an answer to the asking node.
fn redirect(to: ForwardToLeader<TypeConfig>) -> ForwardResponse {
    ForwardResponse::NotLeader {
        leader: to.leader_id,
        address: to
            .leader_node
            .map(|node| node.addr)
            .filter(|addr| !addr.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_their_version_and_refuse_others() {
        let message = encode_message(&ForwardRequest::Write(Command::DeleteVolume {
            id: uuid::Uuid::from_u128(5),
        }))
        .unwrap();
        assert_eq!(message.version, WIRE_VERSION);
        let ForwardRequest::Write(command) = decode_message(&message).unwrap() else {
            panic!("decoded a different request");
        };
        assert_eq!(
            command,
            Command::DeleteVolume {
                id: uuid::Uuid::from_u128(5)
            }
        );

        let future = RaftMessage {
            version: 2,
            payload: message.payload.clone(),
        };
        assert_eq!(
            decode_message::<ForwardRequest>(&future)
                .unwrap_err()
                .to_string(),
            "raft message version 2 is not supported (this node speaks version 1); run the same Vessel release on \
             every node"
        );
        let garbage = RaftMessage {
            version: WIRE_VERSION,
            payload: vec![0xff; 3],
        };
        assert!(matches!(
            decode_message::<ForwardRequest>(&garbage),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn unusable_addresses_are_reported_not_panicked_on() {
        assert!(endpoint("").unwrap_err().contains("no network address"));
        assert!(
            endpoint("not an address")
                .unwrap_err()
                .contains("'not an address' is not a usable address")
        );
        assert!(endpoint("127.0.0.1:7000").is_ok());
    }

    #[tokio::test]
    async fn forwarding_to_a_closed_port_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let request = ForwardRequest::Write(Command::DeleteVolume {
            id: uuid::Uuid::from_u128(1),
        });
        let error = forward(&addr, &request, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(matches!(error, ForwardError::Connect { .. }), "{error}");
        assert!(
            error
                .to_string()
                .starts_with(&format!("cannot reach the leader at {addr}")),
            "{error}"
        );
    }
}
