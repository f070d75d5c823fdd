//! Several daemons on loopback addresses in one test process: `--listen` nodes with names and rack labels, formed
//! into a cluster with `cluster init` and `node join`, each with a file disk.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::daemon::{Daemon, DaemonOptions};

/// A loopback address nothing listens on at the moment.
pub fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// A fresh `--listen` node named `name` with a `rack` label, its data under `dir/name`.
pub fn listening(dir: &Path, name: &str, rack: &str) -> (Daemon, String) {
    listening_with(dir, name, rack, "")
}

/// [`listening`] with more top-level config lines (e.g. `stale_replica_keep = "1s"`).
pub fn listening_with(dir: &Path, name: &str, rack: &str, config: &str) -> (Daemon, String) {
    let addr = free_addr();
    let options = DaemonOptions {
        netns: None,
        // A modest rebuild rate, so that tests can write while a rebuild runs.
        config: Some(format!(
            "name = \"{name}\"\nrebuild_rate = \"48M\"\n{config}\n[labels]\nrack = \"{rack}\"\n"
        )),
        args: vec!["--listen".to_owned(), addr.clone()],
        wrapper: Vec::new(),
    };
    (Daemon::start(&dir.join(name), options).unwrap(), addr)
}

/// Polls `check` until it holds (a follower applies a moment after the leader).
pub fn eventually(what: &str, check: impl FnMut() -> bool) {
    eventually_within(what, Duration::from_secs(20), check);
}

/// [`eventually`] with a deadline of the caller's.
pub fn eventually_within(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The bytes of every rebuild a node's log reports done, in order.
pub fn rebuilds_logged(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|line| line.contains("rebuild done"))
        .filter_map(|line| {
            line.split_whitespace()
                .find_map(|field| field.strip_prefix("bytes="))?
                .parse()
                .ok()
        })
        .collect()
}

/// The bytes of the first rebuild the node whose log `log` reads reports after the `before` it had reported:
/// waited for, since the line follows the state's change (a poll may see the replica set whole a moment before the
/// line is written).
pub fn next_rebuild_bytes(before: usize, log: impl Fn() -> String) -> u64 {
    let mut bytes = None;
    eventually("the rebuild is logged", || {
        bytes = rebuilds_logged(&log()).get(before).copied();
        bytes.is_some()
    });
    bytes.unwrap_or_default()
}

/// Nodes `names` (racks r1, r2, ...), the first initialising the cluster and the others joining it, each with a
/// sparse 1 GiB file disk; returns them once every node knows every disk.
pub fn cluster_of(dir: &Path, names: &[&str]) -> Vec<(Daemon, String)> {
    cluster_with(dir, names, "")
}

/// [`cluster_of`] with more top-level config lines for every node.
pub fn cluster_with(dir: &Path, names: &[&str], config: &str) -> Vec<(Daemon, String)> {
    let nodes: Vec<(Daemon, String)> = names
        .iter()
        .enumerate()
        .map(|(i, name)| listening_with(dir, name, &format!("r{}", i + 1), config))
        .collect();
    nodes[0].0.vessel_ok(&["cluster", "init"]).unwrap();
    for (node, _) in &nodes[1..] {
        node.vessel_ok(&["node", "join", &nodes[0].1]).unwrap();
    }
    for ((node, _), name) in nodes.iter().zip(names) {
        let disk = dir.join(format!("{name}-disk.img"));
        node.vessel_ok(&["disk", "add", disk.to_str().unwrap(), "--size", "1G"])
            .unwrap();
    }
    for (node, _) in &nodes {
        eventually("every node knows every disk", || {
            node.vessel_json(&["disk", "list"])
                .ok()
                .and_then(|list| list["disks"].as_array().map(Vec::len))
                == Some(names.len())
        });
    }
    nodes
}

/// Whether a `volume show --output json` answer shows every run with `replicas` healthy replicas and no rebuild.
pub fn at_full_strength(shown: &serde_json::Value, replicas: usize) -> bool {
    shown["placement"].as_array().is_some_and(|runs| {
        runs.iter().all(|run| {
            run["node_names"].as_array().map(Vec::len) == Some(replicas)
                && run["rebuild_targets"].as_array().is_none_or(Vec::is_empty)
        })
    })
}
