//! Cluster lifecycle with real daemons on loopback addresses: `cluster init` on the first node, `node join` on the
//! others (the first three vote, later ones learn), writes accepted on every node and forwarded to the leader, and a
//! cluster that keeps committing when its leader is killed.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use blkio::ReqFlags;
use vessel_tests::blk_client::{BlkClient, complete};
use vessel_tests::daemon::{Daemon, DaemonOptions, test_dir};
use vessel_tests::local_cluster::{eventually, free_addr, listening};

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Asserts the exit code and a one-line error containing `message`.
fn assert_fails(output: &Output, code: i32, message: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "stderr: {stderr}");
    assert!(
        stderr.contains(message),
        "expected {message:?} in {stderr:?}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
}

fn volume_names(daemon: &Daemon) -> Vec<String> {
    let list = daemon.vessel_json(&["volume", "list"]).unwrap();
    list["volumes"]
        .as_array()
        .map(|volumes| {
            volumes
                .iter()
                .map(|v| v["name"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn nodes_join_vote_forward_writes_and_outlive_the_leader() {
    let dir = test_dir("cluster_join").unwrap();
    let (mut n1, a1) = listening(&dir, "n1", "r1");
    let (n2, a2) = listening(&dir, "n2", "r2");
    let (n3, a3) = listening(&dir, "n3", "r3");
    let (n4, _a4) = listening(&dir, "n4", "r1");

    n1.vessel_ok(&["cluster", "init"]).unwrap();
    let joined = n2.vessel_ok(&["node", "join", &a1]).unwrap();
    assert!(
        joined.contains("joined cluster") && joined.contains("as a voter"),
        "{joined}"
    );
    // Through a follower: it points the new node at the leader.
    let joined = n3.vessel_ok(&["node", "join", &a2]).unwrap();
    assert!(joined.contains("as a voter"), "{joined}");
    let joined = n4.vessel_ok(&["node", "join", &a3]).unwrap();
    assert!(joined.contains("as a learner"), "{joined}");
    let again = n2.vessel(&["node", "join", &a1]).unwrap();
    assert!(again.status.success(), "{again:?}");
    assert!(stdout(&again).contains("already a member"), "{again:?}");

    // Every node sees every node, with its role and labels.
    let list = n4.vessel_json(&["node", "list"]).unwrap();
    let nodes = list["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 4, "{list}");
    let role = |name: &str| {
        nodes
            .iter()
            .find(|node| node["name"] == name)
            .map(|node| node["role"].as_str().unwrap().to_owned())
            .unwrap()
    };
    assert_eq!(
        [role("n1"), role("n2"), role("n3"), role("n4")],
        ["voter", "voter", "voter", "learner"],
        "{list}"
    );
    assert_eq!(
        nodes.iter().filter(|node| node["leader"] == true).count(),
        1,
        "{list}"
    );
    assert!(
        nodes
            .iter()
            .any(|node| node["name"] == "n4" && node["labels"]["rack"] == "r1")
    );
    let table = n1.vessel_ok(&["node", "list"]).unwrap();
    assert!(
        table.contains("ROLE") && table.contains("learner"),
        "{table}"
    );

    // Writes sent to any node land in the one state.
    let disk = dir.join("n4-disk.img");
    n4.vessel_ok(&["disk", "add", disk.to_str().unwrap(), "--size", "1G"])
        .unwrap();
    // The only node with disks carries a rack label: racks are the failure domains.
    assert_eq!(
        n1.vessel_json(&["cluster", "status"]).unwrap()["failure_domain"],
        "rack"
    );
    n3.vessel_ok(&["volume", "create", "v1", "--size", "256M"])
        .unwrap();
    for node in [&n1, &n2, &n4] {
        eventually("every node lists v1", || volume_names(node) == ["v1"]);
    }

    // v1's extents are on n4's disk, the only one; n1 serves it all the same, its I/O going to n4. One node at a
    // time: n4 may not attach it meanwhile.
    let socket = dir.join("v1.sock");
    let socket = socket.to_str().unwrap();
    n1.vessel_ok(&["volume", "attach", "v1", "--vhost-user", socket])
        .unwrap();
    let elsewhere = dir.join("v1-n4.sock");
    assert_fails(
        &n4.vessel(&[
            "volume",
            "attach",
            "v1",
            "--vhost-user",
            elsewhere.to_str().unwrap(),
        ])
        .unwrap(),
        5,
        "is already attached at",
    );
    // A write through n1 allocates an extent on n4's disk; every node learns n4's use from n4 itself.
    {
        let mut client = BlkClient::connect(Path::new(socket), 1).unwrap();
        let buffer = client.buffer(4096).unwrap();
        let queue = client.queue(0);
        queue.write(0, buffer.as_mut_ptr(), 4096, 0, ReqFlags::empty());
        complete(queue, 1).unwrap();
    }
    let list = n1.vessel_json(&["node", "list"]).unwrap();
    let n4_entry = list["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|node| node["name"] == "n4")
        .unwrap()
        .clone();
    assert_eq!(n4_entry["reachable"], true, "{list}");
    assert!(n4_entry["used_bytes"].as_u64().unwrap() >= 4096, "{list}");
    let disks = n2.vessel_json(&["disk", "list"]).unwrap();
    assert!(
        disks["disks"][0]["used_bytes"].as_u64().unwrap() >= 4096,
        "{disks}"
    );
    n1.vessel_ok(&["volume", "detach", "v1"]).unwrap();

    // n1 dies (it initialised the cluster, so it is most likely the leader): the two other voters go on committing,
    // and a write sent to the learner reaches their leader.
    let n1_id = n1.vessel_json(&["cluster", "status"]).unwrap()["node_id"].clone();
    n1.kill().unwrap();
    n4.vessel_ok(&["volume", "create", "v2", "--size", "256M"])
        .unwrap();
    let status = n2.vessel_json(&["cluster", "status"]).unwrap();
    assert!(status["leader_id"].is_u64(), "{status}");
    assert_ne!(status["leader_id"], n1_id, "{status}");
    let table = n2.vessel_ok(&["node", "list"]).unwrap();
    let n1_row = table
        .lines()
        .find(|line| line.contains(" n1 "))
        .unwrap_or_default();
    assert!(n1_row.contains("active (unreachable)"), "{table}");

    // It comes back as a member and catches up.
    n1.restart().unwrap();
    eventually("the restarted node has v2", || {
        let mut names = volume_names(&n1);
        names.sort();
        names == ["v1", "v2"]
    });
    assert_eq!(
        n1.vessel_json(&["node", "list"]).unwrap()["nodes"]
            .as_array()
            .unwrap()
            .len(),
        4
    );

    // Removal: refused while the node holds replicas, or when asked of the node itself.
    assert_fails(
        &n2.vessel(&["node", "remove", "n4"]).unwrap(),
        5,
        "node 'n4' holds replicas of volume(s) 'v1', 'v2'",
    );
    assert_fails(
        &n2.vessel(&["node", "remove", "n2"]).unwrap(),
        5,
        "send `vessel node remove` to another member",
    );
    assert_fails(
        &n2.vessel(&["node", "remove", "n9"]).unwrap(),
        3,
        "node 'n9' not found",
    );
    // A voter leaves: the learner takes its vote, so three voters remain.
    let removed = n2.vessel_ok(&["node", "remove", "n1"]).unwrap();
    assert!(
        removed.contains("node 'n1'") && removed.contains("removed"),
        "{removed}"
    );
    eventually("n3 sees n2, n3 and n4 as the voters", || {
        let list = n3.vessel_json(&["node", "list"]).unwrap();
        let nodes = list["nodes"].as_array().unwrap();
        let mut voters: Vec<&str> = nodes
            .iter()
            .filter(|node| node["role"] == "voter")
            .map(|node| node["name"].as_str().unwrap())
            .collect();
        voters.sort_unstable();
        nodes.len() == 3 && voters == ["n2", "n3", "n4"]
    });
    // The cluster goes on committing without it.
    n4.vessel_ok(&["volume", "create", "v3", "--size", "64M"])
        .unwrap();
}

#[test]
fn joining_errors_say_what_to_do() {
    let dir = test_dir("cluster_join_errors").unwrap();
    let standalone = Daemon::start(&dir.join("alone"), DaemonOptions::default()).unwrap();
    assert_fails(
        &standalone.vessel(&["node", "join", "127.0.0.1:9"]).unwrap(),
        5,
        "already a member of cluster",
    );

    let (fresh, _) = listening(&dir, "fresh", "r1");
    assert_fails(
        &fresh.vessel(&["node", "join", "somewhere"]).unwrap(),
        2,
        "seed address 'somewhere' is not IP:PORT",
    );
    let closed = free_addr();
    assert_fails(
        &fresh.vessel(&["node", "join", &closed]).unwrap(),
        7,
        &format!("cannot join through {closed}: cannot reach {closed}"),
    );
    let (other, other_addr) = listening(&dir, "other", "r2");
    assert_fails(
        &fresh.vessel(&["node", "join", &other_addr]).unwrap(),
        5,
        "that node is not a cluster member itself; run `vessel cluster init`",
    );
    // Nothing was changed by the refusals: both still wait.
    for node in [&fresh, &other] {
        assert_eq!(
            node.vessel_json(&["cluster", "status"]).unwrap()["state"],
            "waiting"
        );
    }
}

#[test]
fn replicas_serve_extent_io_on_the_listen_port_at_their_epoch() {
    use vstore::replica::{Opcode, ReplicaConnection, ReplicaRequest, Status};

    let dir = test_dir("cluster_replicas").unwrap();
    let (a, addr_a) = listening(&dir, "a", "r1");
    let (b, addr_b) = listening(&dir, "b", "r2");
    let (c, addr_c) = listening(&dir, "c", "r3");
    a.vessel_ok(&["cluster", "init"]).unwrap();
    b.vessel_ok(&["node", "join", &addr_a]).unwrap();
    c.vessel_ok(&["node", "join", &addr_a]).unwrap();
    for (node, name) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        let disk = dir.join(format!("{name}-disk.img"));
        node.vessel_ok(&["disk", "add", disk.to_str().unwrap(), "--size", "1G"])
            .unwrap();
    }
    a.vessel_ok(&[
        "volume",
        "create",
        "r2",
        "--size",
        "128M",
        "--replicas",
        "2",
    ])
    .unwrap();
    let shown = a.vessel_json(&["volume", "show", "r2"]).unwrap();
    let run = &shown["placement"][0];
    let epoch = run["epoch"].as_u64().unwrap();
    let holders: Vec<String> = run["node_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|name| name.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(holders.len(), 2, "{shown}");
    let table = a.vessel_ok(&["volume", "show", "r2"]).unwrap();
    assert!(
        table.contains("EPOCH") && table.contains(&holders.join(", ")),
        "{table}"
    );
    let volume = uuid::Uuid::parse_str(shown["id"].as_str().unwrap()).unwrap();

    let write = |epoch| ReplicaRequest {
        opcode: Opcode::Write,
        volume,
        extent: 0,
        epoch,
        offset: 8192,
        length: 4096,
        durable: true,
    };
    let read = ReplicaRequest {
        opcode: Opcode::Read,
        ..write(epoch)
    };
    let data = vec![0x5A; 4096];
    // A replica answers NotReplica until it has applied the volume's creation: wait for the followers.
    for node in [&b, &c] {
        eventually("every node knows r2", || volume_names(node) == ["r2"]);
    }
    for (name, address) in [("a", &addr_a), ("b", &addr_b), ("c", &addr_c)] {
        let mut connection = ReplicaConnection::connect(address, Duration::from_secs(2)).unwrap();
        connection.send(&write(epoch), &data).unwrap();
        let reply = connection.receive().unwrap();
        if holders.iter().any(|holder| holder == name) {
            assert_eq!(reply.status, Status::Ok, "node {name}: {reply:?}");
            connection.send(&read, &[]).unwrap();
            let reply = connection.receive().unwrap();
            assert_eq!(reply.status, Status::Ok);
            assert!(reply.data == data, "node {name} reads back other bytes");
            connection.send(&write(epoch - 1), &data).unwrap();
            let reply = connection.receive().unwrap();
            assert_eq!((reply.status, reply.epoch), (Status::StaleEpoch, epoch));
        } else {
            assert_eq!(reply.status, Status::NotReplica, "node {name}: {reply:?}");
        }
        // Garbage on the same port closes that connection only; gRPC goes on there.
        let mut junk = ReplicaConnection::connect(address, Duration::from_secs(2)).unwrap();
        junk.stream()
            .write_all(&[b'V', b'S', b'L', b'D', 0xff, 0xff])
            .unwrap();
        junk.stream().write_all(&[0; 74]).unwrap();
        let mut rest = Vec::new();
        junk.stream()
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(junk.stream().read_to_end(&mut rest).unwrap(), 0);
        let status = std::process::Command::new(vessel_tests::daemon::binary("vessel").unwrap())
            .args(["--endpoint", address, "cluster", "status"])
            .output()
            .unwrap();
        assert!(status.status.success(), "{status:?}");
    }

    // Deleting the volume, through any node, frees its replicas' space on every node that held one.
    let used = |node: &Daemon| -> Vec<u64> {
        let list = node.vessel_json(&["node", "list"]).unwrap();
        list["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["used_bytes"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(used(&c).iter().filter(|&&bytes| bytes > 0).count(), 2);
    c.vessel_ok(&["volume", "delete", "r2"]).unwrap();
    eventually("every node's disks are empty again", || {
        used(&a).iter().all(|&bytes| bytes == 0)
    });
}
