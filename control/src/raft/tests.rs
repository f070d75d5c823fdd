//! Whole-node tests of [`ControlPlane`]: a single voter's life across restarts, snapshots and log
//! purging under real openraft, and a three-voter cluster over gRPC on 127.0.0.1.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use uuid::Uuid;

use super::*;
use crate::state::{Attachment, Disk, NodeState};

const GIB: u64 = 1 << 30;
const PATIENCE: Duration = Duration::from_secs(30);

fn node(name: &str, address: Option<String>) -> Node {
    Node {
        id: 0,
        name: name.to_owned(),
        address,
        labels: BTreeMap::new(),
        state: NodeState::Active,
        underlay: None,
    }
}

fn disk(n: u128, node: NodeId) -> Command {
    Command::AddDisk {
        disk: Disk {
            id: Uuid::from_u128(n),
            node,
            path: "/pool/d1".to_owned(),
            capacity: 8 * GIB,
            block_device: false,
        },
    }
}

fn create(n: u128, name: &str, replicas: u8) -> Command {
    Command::CreateVolume {
        id: Uuid::from_u128(0xA000 + n),
        name: name.to_owned(),
        size: GIB,
        block_size: None,
        replicas,
        created_unix: 1_700_000_000,
    }
}

async fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_voter_initialises_writes_and_survives_restart() {
    let dir = TempDir::new().unwrap();
    let cp = ControlPlane::open(dir.path(), None).await.unwrap();
    assert!(!cp.is_initialized());
    assert!(matches!(
        cp.write(disk(1, cp.node_id())).await,
        Err(ControlError::NotInitialized)
    ));

    // Bad settings are refused before Raft is touched, with the state machine's message.
    let bad = Settings {
        overcommit_ratio_milli: 10,
        ..Settings::default()
    };
    let error = cp.initialize(bad, node("n1", None)).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "invalid cluster settings: overcommit ratio 0.01 is outside 1.0..=100.0"
    );
    assert!(cp.raft_status().voters.is_empty());

    assert!(
        cp.initialize(Settings::default(), node("n1", None))
            .await
            .unwrap()
    );
    assert!(cp.is_initialized());
    assert!(
        !cp.initialize(Settings::default(), node("n1", None))
            .await
            .unwrap(),
        "second initialise is a no-op"
    );
    let id = cp.node_id();
    let status = cp.raft_status();
    assert_eq!(status.role, RaftRole::Leader);
    assert_eq!(status.leader, Some(id));
    assert_eq!(status.voters, vec![id]);
    assert_eq!(cp.read(|s| s.nodes[&id].name.clone()), "n1");

    let mut applied = cp.subscribe();
    applied.mark_unchanged();
    cp.write(disk(1, id)).await.unwrap();
    assert!(applied.has_changed().unwrap(), "subscribers wake on apply");
    let outcome = cp.write(create(1, "db1", 1)).await.unwrap();
    assert_eq!(
        outcome,
        CommandOutcome::VolumeCreated {
            id: Uuid::from_u128(0xA001)
        }
    );
    let refused = cp.write(create(2, "db1", 1)).await.unwrap_err();
    assert!(matches!(
        refused,
        ControlError::Rejected(CommandError::VolumeExists { .. })
    ));
    assert_eq!(refused.to_string(), "volume 'db1' already exists");
    let attachment = Attachment {
        volume: Uuid::from_u128(0xA001),
        node: id,
        socket: "/run/db1.sock".to_owned(),
        queues: 2,
        read_only: false,
        socket_mode: 0o660,
        attached_unix: 1_700_000_001,
        active: Default::default(),
    };
    cp.write(Command::Attach { attachment }).await.unwrap();
    let before = cp.read(ClusterState::clone);
    let index = *cp.subscribe().borrow();
    eventually("metrics to show the last apply", || {
        (cp.raft_status().last_applied_index == Some(index)).then_some(())
    })
    .await;

    cp.shutdown().await.unwrap();
    let after_shutdown = cp.write(create(3, "late", 1)).await.unwrap_err();
    assert!(
        matches!(after_shutdown, ControlError::Unavailable(_)),
        "{after_shutdown}"
    );
    drop(cp);

    let cp = ControlPlane::open(dir.path(), None).await.unwrap();
    assert_eq!(
        cp.node_id(),
        id,
        "the node id belongs to the data directory"
    );
    assert_eq!(
        cp.read(ClusterState::clone),
        before,
        "the applied state reloads before any election"
    );
    assert_eq!(
        cp.wait_for_leader(PATIENCE).await.unwrap(),
        id,
        "a restarted single voter leads again"
    );
    cp.write(create(3, "db2", 1)).await.unwrap();
    assert_eq!(
        cp.read(|s| s.volume_names.keys().cloned().collect::<Vec<_>>()),
        vec!["db1", "db2"]
    );
    cp.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_purged_logs_survive_restart() {
    let dir = TempDir::new().unwrap();
    let cp = ControlPlane::open(dir.path(), None).await.unwrap();
    cp.initialize(Settings::default(), node("n1", None))
        .await
        .unwrap();
    let id = cp.node_id();
    cp.write(Command::AddDisk {
        disk: Disk {
            id: Uuid::from_u128(1),
            node: id,
            path: "/pool/big".to_owned(),
            capacity: 64 * GIB,
            block_device: false,
        },
    })
    .await
    .unwrap();
    for n in 0..20 {
        cp.write(create(n, &format!("v{n}"), 1)).await.unwrap();
    }
    for n in 0..5 {
        cp.write(Command::DeleteVolume {
            id: Uuid::from_u128(0xA000 + n),
        })
        .await
        .unwrap();
    }
    let applied = *cp.subscribe().borrow();
    cp.inner.raft.trigger().snapshot().await.unwrap();
    eventually("the snapshot", || {
        (cp.raft_status().snapshot_index == Some(applied)).then_some(())
    })
    .await;
    cp.inner.raft.trigger().purge_log(applied).await.unwrap();
    eventually("the purge", || {
        (cp.raft_status().purged_index == Some(applied)).then_some(())
    })
    .await;
    let before = cp.read(ClusterState::clone);
    assert_eq!(before.volumes.len(), 15);
    cp.shutdown().await.unwrap();
    drop(cp);

    let cp = ControlPlane::open(dir.path(), None).await.unwrap();
    assert_eq!(cp.read(ClusterState::clone), before);
    cp.wait_for_leader(PATIENCE).await.unwrap();
    let status = cp.raft_status();
    assert_eq!(status.purged_index, Some(applied));
    assert_eq!(status.snapshot_index, Some(applied));
    cp.write(create(99, "after", 1)).await.unwrap();
    assert_eq!(cp.read(|s| s.volumes.len()), 16);
    cp.shutdown().await.unwrap();
}

/// One node of an in-process cluster: a control plane and the gRPC server peers reach it at.
struct Member {
    cp: ControlPlane,
    addr: String,
    stop: oneshot::Sender<()>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Member {
    async fn start(dir: &Path, addr: &str) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cp = ControlPlane::open(dir, Some(addr.clone())).await.unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let service = cp.raft_service();
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    stopped.await.ok();
                })
                .await
        });
        Self {
            cp,
            addr,
            stop,
            server,
        }
    }

    async fn kill(self) {
        self.cp.shutdown().await.unwrap();
        self.stop.send(()).ok();
        self.server.await.unwrap().unwrap();
    }

    async fn caught_up_to(&self, index: u64) {
        let mut applied = self.cp.subscribe();
        tokio::time::timeout(PATIENCE, applied.wait_for(|&applied| applied >= index))
            .await
            .unwrap_or_else(|_| panic!("node {} did not apply index {index}", self.cp.node_id()))
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_voters_replicate_forward_and_survive_the_leaders_loss() {
    let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new().unwrap()).collect();
    let mut members = Vec::new();
    for dir in &dirs {
        members.push(Member::start(dir.path(), "127.0.0.1:0").await);
    }
    let ids: Vec<NodeId> = members.iter().map(|m| m.cp.node_id()).collect();
    let first = &members[0].cp;
    assert!(
        first
            .initialize(Settings::default(), node("n1", None))
            .await
            .unwrap()
    );
    for (i, member) in members.iter().enumerate().skip(1) {
        let joining = node(&format!("n{}", i + 1), Some(member.addr.clone()));
        first
            .write(Command::AddNode {
                node: Node {
                    id: ids[i],
                    ..joining
                },
            })
            .await
            .unwrap();
        first.add_voter(ids[i], member.addr.clone()).await.unwrap();
    }
    for (i, id) in ids.iter().enumerate() {
        first.write(disk(i as u128 + 1, *id)).await.unwrap();
    }
    let status = first.raft_status();
    let mut voters = ids.clone();
    voters.sort_unstable();
    assert_eq!(status.voters, voters);
    assert_eq!(status.leader, Some(ids[0]));
    assert_eq!(status.addresses[&ids[1]], members[1].addr);

    // A command on the leader reaches every voter; replicas go to three distinct nodes.
    first.write(create(1, "r3", 3)).await.unwrap();
    // The applied-index watch, not the metrics (which trail): it moves before a write returns.
    let index = *first.subscribe().borrow();
    for member in &members {
        member.caught_up_to(index).await;
    }
    let leader_state = first.read(ClusterState::clone);
    assert_eq!(
        leader_state.volumes[&Uuid::from_u128(0xA001)]
            .replica_set(0)
            .unwrap()
            .nodes,
        voters
    );
    for member in &members[1..] {
        assert_eq!(member.cp.read(ClusterState::clone), leader_state);
        // The role comes from the metrics, which trail the promotion to voter a little.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while member.cp.raft_status().role != RaftRole::Follower
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(member.cp.raft_status().role, RaftRole::Follower);
    }

    // A write on a follower is forwarded to the leader and visible locally when it returns;
    // refusals come back with the state machine's text.
    members[1]
        .cp
        .write(create(2, "via-follower", 1))
        .await
        .unwrap();
    assert!(
        members[1]
            .cp
            .read(|s| s.volume_by_name_or_id("via-follower").is_some())
    );
    let refused = members[2].cp.write(create(3, "r3", 1)).await.unwrap_err();
    assert_eq!(refused.to_string(), "volume 'r3' already exists");

    // The leader goes away; the survivors elect one of themselves and keep accepting writes.
    let mut members = members.into_iter();
    let old_leader = members.next().unwrap();
    let old_addr = old_leader.addr.clone();
    old_leader.kill().await;
    let survivors: Vec<Member> = members.collect();
    let new_leader = eventually("a new leader", || {
        survivors
            .iter()
            .map(|m| m.cp.raft_status())
            .find(|s| s.role == RaftRole::Leader && s.leader == Some(s.node_id))
            .map(|s| s.node_id)
    })
    .await;
    assert_ne!(new_leader, ids[0]);
    for (i, member) in survivors.iter().enumerate() {
        member
            .cp
            .write(create(10 + i as u128, &format!("after-{i}"), 1))
            .await
            .unwrap();
    }
    let index = survivors
        .iter()
        .map(|m| *m.cp.subscribe().borrow())
        .max()
        .unwrap();
    for member in &survivors {
        member.caught_up_to(index).await;
    }
    let state = survivors[0].cp.read(ClusterState::clone);
    assert_eq!(survivors[1].cp.read(ClusterState::clone), state);
    assert_eq!(state.volumes.len(), 4);

    // The old leader restarts on its data directory and address, and catches up as a follower.
    let returned = Member::start(dirs[0].path(), &old_addr).await;
    assert_eq!(returned.cp.node_id(), ids[0]);
    returned.caught_up_to(index).await;
    assert_eq!(returned.cp.read(ClusterState::clone), state);
    let status = eventually("the old leader to follow", || {
        let status = returned.cp.raft_status();
        (status.leader == Some(new_leader)).then_some(status)
    })
    .await;
    assert_ne!(status.role, RaftRole::Leader);

    returned.kill().await;
    for member in survivors {
        member.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_peer_messages_fail_the_rpc_not_the_node() {
    use vessel_proto::raft::RaftMessage;
    use vessel_proto::raft::raft_client::RaftClient;

    let dir = TempDir::new().unwrap();
    let member = Member::start(dir.path(), "127.0.0.1:0").await;
    member
        .cp
        .initialize(Settings::default(), node("n1", None))
        .await
        .unwrap();
    let mut client = RaftClient::connect(format!("http://{}", member.addr))
        .await
        .unwrap();
    let garbage = || RaftMessage {
        version: WIRE_VERSION,
        payload: vec![0xff, 0x00, 0x13],
    };
    let statuses = [
        client.vote(garbage()).await.unwrap_err(),
        client.pre_vote(garbage()).await.unwrap_err(),
        client.append_entries(garbage()).await.unwrap_err(),
        client.install_snapshot(garbage()).await.unwrap_err(),
        client.forward(garbage()).await.unwrap_err(),
        client
            .forward(RaftMessage {
                version: 99,
                payload: Vec::new(),
            })
            .await
            .unwrap_err(),
    ];
    for status in &statuses {
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    }
    assert!(
        statuses[5]
            .message()
            .starts_with("raft message version 99 is not supported"),
        "{:?}",
        statuses[5]
    );
    // The node is still the leader and still takes writes.
    assert_eq!(member.cp.raft_status().role, RaftRole::Leader);
    member.cp.write(disk(1, member.cp.node_id())).await.unwrap();
    member.kill().await;
}

#[test]
fn control_errors_say_what_to_do() {
    let not_leader = ControlError::NotLeader {
        leader: Some(7),
        address: Some("10.0.0.7:7000".to_owned()),
    };
    assert_eq!(
        not_leader.to_string(),
        "this node is not the Raft leader; the leader is node 7 at 10.0.0.7:7000, send it there"
    );
    let no_address = ControlError::NotLeader {
        leader: Some(7),
        address: None,
    };
    assert_eq!(
        no_address.to_string(),
        "this node is not the Raft leader; the leader is node 7, which has no network address to forward to \
         (start it with --listen)"
    );
    let unknown = ControlError::NotLeader {
        leader: None,
        address: None,
    };
    assert_eq!(
        unknown.to_string(),
        "this node is not the Raft leader; no leader is known yet, retry shortly"
    );
    let rejected = ControlError::from(CommandError::VolumeExists {
        name: "db1".to_owned(),
    });
    assert_eq!(
        rejected.to_string(),
        "volume 'db1' already exists",
        "refusals reach the CLI unchanged"
    );
    assert_eq!(
        ControlError::NotInitialized.to_string(),
        "the cluster is not initialised; run `vessel cluster init` first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_in_use_is_refused_clearly() {
    let dir = TempDir::new().unwrap();
    let cp = ControlPlane::open(dir.path(), None).await.unwrap();
    let error = ControlPlane::open(dir.path(), None).await.unwrap_err();
    let expected = format!(
        "metadata store {}: the database is in use by another process",
        dir.path().join(META_FILE).display()
    );
    assert!(error.to_string().starts_with(&expected), "{error}");
    cp.shutdown().await.unwrap();
}
