//! A three-node cluster in network namespaces (deploy/netns-cluster): the metadata stays writable through a
//! partitioned leader and a killed follower, and both catch up when they return.

use std::time::{Duration, Instant};

use vessel_tests::netns::NetnsCluster;

/// Polls `check` until it holds.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Node number (1-based) of the leader as node `asked` sees it, if it knows one.
fn leader(cluster: &NetnsCluster, asked: usize) -> Option<usize> {
    let list = cluster.vessel_json(asked, &["node", "list"]).ok()?;
    let leader = list["nodes"]
        .as_array()?
        .iter()
        .find(|node| node["leader"] == true)?;
    leader["name"].as_str()?.strip_prefix('n')?.parse().ok()
}

fn has_volume(cluster: &NetnsCluster, node: usize, name: &str) -> bool {
    cluster
        .vessel_json(node, &["volume", "list"])
        .ok()
        .and_then(|list| {
            list["volumes"]
                .as_array()
                .map(|volumes| volumes.iter().any(|v| v["name"] == name))
        })
        .unwrap_or(false)
}

#[test]
fn metadata_outlives_a_partitioned_leader_and_a_killed_follower() {
    let cluster = NetnsCluster::up("meta", 3).unwrap();
    // Node 2 applies what the others committed a moment after them.
    eventually("node 2 sees three voters with a disk each", || {
        let list = cluster.vessel_json(2, &["node", "list"]).unwrap();
        let nodes = list["nodes"].as_array().unwrap();
        nodes.len() == 3
            && nodes
                .iter()
                .all(|node| node["role"] == "voter" && node["disks"] == 1)
    });

    // Placement: one replica per node, and no more replicas than nodes.
    cluster
        .vessel_ok(
            2,
            &["volume", "create", "r3", "--size", "1G", "--replicas", "3"],
        )
        .unwrap();
    let four = cluster
        .vessel(
            3,
            &["volume", "create", "r4", "--size", "1G", "--replicas", "4"],
        )
        .unwrap();
    assert_eq!(four.status.code(), Some(6), "{four:?}");
    assert!(
        String::from_utf8_lossy(&four.stderr)
            .contains("needs 4 replicas but only 3 node(s) with disks can hold them"),
        "{four:?}"
    );

    // The leader loses its link: the other two elect one of themselves and go on committing.
    let old = leader(&cluster, 1).expect("a leader");
    let survivors: Vec<usize> = (1..=3).filter(|&n| n != old).collect();
    cluster.cut(old).unwrap();
    cluster
        .vessel_ok(survivors[0], &["volume", "create", "v1", "--size", "64M"])
        .unwrap();
    let new = leader(&cluster, survivors[1]).expect("a new leader");
    assert_ne!(new, old);
    let reachable = |asked: usize, node: usize| -> bool {
        let list = cluster.vessel_json(asked, &["node", "list"]).unwrap();
        list["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == format!("n{node}") && n["reachable"] == true)
    };
    assert!(
        !reachable(survivors[0], old),
        "the cut node is listed as reachable"
    );
    assert!(reachable(survivors[0], survivors[1]));
    eventually("the other survivor has v1", || {
        has_volume(&cluster, survivors[1], "v1")
    });
    // Cut off, the old leader commits nothing.
    let refused = cluster
        .vessel(old, &["volume", "create", "stale", "--size", "64M"])
        .unwrap();
    assert!(!refused.status.success(), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("majority of voters"), "{stderr}");

    // Back on the network it follows the new leader and catches up.
    cluster.heal(old).unwrap();
    eventually("the healed node has v1", || has_volume(&cluster, old, "v1"));
    eventually("the healed node is reachable again", || {
        reachable(survivors[0], old)
    });
    eventually("the healed node follows the new leader", || {
        leader(&cluster, old).is_some_and(|l| l != old)
    });
    for node in 1..=3 {
        assert!(
            !has_volume(&cluster, node, "stale"),
            "node {node} has the refused volume"
        );
    }

    // A follower is killed: writes go on; restarted, it catches up from the log.
    let leader_now = leader(&cluster, 1).expect("a leader");
    let follower = (1..=3).find(|&n| n != leader_now).unwrap();
    cluster.kill(follower).unwrap();
    let other = (1..=3).find(|&n| n != follower).unwrap();
    cluster
        .vessel_ok(other, &["volume", "create", "v2", "--size", "64M"])
        .unwrap();
    cluster.start(follower).unwrap();
    eventually("the restarted follower has v2", || {
        has_volume(&cluster, follower, "v2")
    });
}
