//! Replicated volumes served by real daemons on loopback addresses: the node a volume is attached on sends every
//! write to each replica of the extent and reads from its own replica or a remote one. Attaching the same volume on
//! each node in turn reads every replica back, so a workload verified from every node proves that each replica
//! holds every acknowledged write.

use std::path::Path;

use vessel_tests::blk_client::{BlkClient, Workload, run_workload, verify_models};
use vessel_tests::daemon::{Daemon, test_dir};
use vessel_tests::local_cluster::{
    at_full_strength, cluster_of, cluster_with, eventually, eventually_within, next_rebuild_bytes,
};

fn attach(node: &Daemon, volume: &str, socket: &Path) {
    node.vessel_ok(&[
        "volume",
        "attach",
        volume,
        "--vhost-user",
        socket.to_str().unwrap(),
        "--queues",
        "2",
    ])
    .unwrap();
}

/// Creates the 256 MiB 3-replica volume "r3" through `node` and waits until each of `others` knows it.
fn create_r3(node: &Daemon, others: &[&Daemon]) {
    node.vessel_ok(&[
        "volume",
        "create",
        "r3",
        "--size",
        "256M",
        "--replicas",
        "3",
    ])
    .unwrap();
    for other in others {
        eventually("every node knows r3", || {
            other.vessel_json(&["volume", "show", "r3"]).is_ok()
        });
    }
}

/// Names of the nodes holding each run of `volume`'s extents.
fn holders(node: &Daemon, volume: &str) -> Vec<Vec<String>> {
    let shown = node.vessel_json(&["volume", "show", volume]).unwrap();
    shown["placement"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| {
            run["node_names"]
                .as_array()
                .unwrap()
                .iter()
                .map(|name| name.as_str().unwrap().to_owned())
                .collect()
        })
        .collect()
}

#[test]
fn a_replicated_volume_keeps_every_write_on_every_replica() {
    let dir = test_dir("replicated_workload").unwrap();
    let names = ["a", "b", "c"];
    let nodes = cluster_of(&dir, &names);
    let node = |name: &str| &nodes[names.iter().position(|n| *n == name).unwrap()].0;
    let workload = Workload {
        seed: 0x3e91,
        span: 192 << 20,
        chunk: 64 << 10,
        rounds: 120,
        depth: 8,
    };

    // Three replicas: written through a, then read back through each node from its own replica.
    create_r3(node("a"), &names.map(node));
    let socket = dir.join("r3.sock");
    attach(node("a"), "r3", &socket);
    let mut client = BlkClient::connect_retrying(&socket, 2, false);
    let (report, models) = run_workload(&mut client, workload).unwrap();
    assert!(report.writes > 100 && report.discards > 5, "{report:?}");
    drop(client);
    node("a").vessel_ok(&["volume", "detach", "r3"]).unwrap();
    for name in ["b", "c"] {
        attach(node(name), "r3", &socket);
        let mut client = BlkClient::connect_retrying(&socket, 2, false);
        let verified = verify_models(&mut client, workload, &models).unwrap();
        assert_eq!(verified, workload.span, "through {name}");
        drop(client);
        node(name).vessel_ok(&["volume", "detach", "r3"]).unwrap();
    }

    // Two replicas, attached on a node that lacks one for some extents: those it reads and writes remotely.
    node("b")
        .vessel_ok(&[
            "volume",
            "create",
            "r2",
            "--size",
            "256M",
            "--replicas",
            "2",
        ])
        .unwrap();
    let runs = holders(node("b"), "r2");
    let outsider = names
        .iter()
        .find(|name| runs.iter().any(|run| !run.iter().any(|n| n == *name)))
        .unwrap();
    eventually("the outsider knows r2", || {
        node(outsider)
            .vessel_json(&["volume", "show", "r2"])
            .is_ok()
    });
    let socket = dir.join("r2.sock");
    attach(node(outsider), "r2", &socket);
    let mut client = BlkClient::connect_retrying(&socket, 2, false);
    let (_, models) = run_workload(
        &mut client,
        Workload {
            seed: 0x77,
            ..workload
        },
    )
    .unwrap();
    drop(client);
    node(outsider)
        .vessel_ok(&["volume", "detach", "r2"])
        .unwrap();
    // The writes landed on the holders: read back through one of them (from its own replicas, and remotely for
    // any run it does not hold).
    let holder = runs[0][0].clone();
    attach(node(&holder), "r2", &socket);
    let mut client = BlkClient::connect_retrying(&socket, 2, false);
    verify_models(
        &mut client,
        Workload {
            seed: 0x77,
            ..workload
        },
        &models,
    )
    .unwrap();
}

/// The epochs and holders of each run of `volume`, as `node` sees them.
fn placement(node: &Daemon, volume: &str) -> Vec<(u64, Vec<String>)> {
    let shown = node.vessel_json(&["volume", "show", volume]).unwrap();
    shown["placement"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| {
            let names = run["node_names"]
                .as_array()
                .unwrap()
                .iter()
                .map(|name| name.as_str().unwrap().to_owned())
                .collect();
            (run["epoch"].as_u64().unwrap(), names)
        })
        .collect()
}

#[test]
fn writes_go_on_when_a_replica_node_dies_and_it_is_fenced_off() {
    let dir = test_dir("replicated_failover").unwrap();
    let mut nodes = cluster_of(&dir, &["a", "b", "c"]);
    let (mut c, _) = nodes.pop().unwrap();
    let (b, _) = nodes.pop().unwrap();
    let (a, _) = nodes.pop().unwrap();
    create_r3(&a, &[&b]);
    let before = placement(&a, "r3");
    let socket = dir.join("r3.sock");
    attach(&a, "r3", &socket);
    let workload = Workload {
        seed: 0xdead,
        span: 128 << 20,
        chunk: 64 << 10,
        rounds: 600,
        depth: 8,
    };
    let mut client = BlkClient::connect_retrying(&socket, 2, false);
    // c dies in the middle of the workload; no request may fail for it.
    let (report, models) = std::thread::scope(|scope| {
        let killer = scope.spawn(|| {
            std::thread::sleep(std::time::Duration::from_millis(800));
            c.kill().unwrap();
        });
        let result = run_workload(&mut client, workload);
        killer.join().unwrap();
        result.unwrap()
    });
    assert!(report.writes > 500, "{report:?}");
    drop(client);
    // c was taken out of every replica set, at a newer epoch.
    let after = placement(&a, "r3");
    assert_eq!(after.len(), before.len());
    for ((old_epoch, _), (epoch, names)) in before.iter().zip(&after) {
        assert!(epoch > old_epoch, "{before:?} -> {after:?}");
        let mut names = names.clone();
        names.sort();
        assert_eq!(names, ["a", "b"], "{after:?}");
    }
    assert!(
        a.log().contains("fenced it off"),
        "a's log tells of the failover"
    );
    // b's replica holds every acknowledged write.
    a.vessel_ok(&["volume", "detach", "r3"]).unwrap();
    eventually("b sees r3 detached", || {
        b.vessel_json(&["volume", "show", "r3"])
            .is_ok_and(|shown| shown["attachment"].is_null())
    });
    attach(&b, "r3", &socket);
    let mut client = BlkClient::connect_retrying(&socket, 2, false);
    assert_eq!(
        verify_models(&mut client, workload, &models).unwrap(),
        workload.span
    );

    // c comes back: b, which now serves the volume, rebuilds c's replicas while the guest writes beyond the
    // workload's span.
    c.restart().unwrap();
    let mut buffer = client.buffer(4096).unwrap();
    let mut written = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut saw_progress = false;
    while !full_strength(&b, "r3") {
        assert!(
            std::time::Instant::now() < deadline,
            "no full strength: {:?}",
            placement(&b, "r3")
        );
        for _ in 0..50 {
            let index = written.len() as u64;
            let offset = workload.span + (index * 7919 % 2048) * (64 << 10);
            buffer.slice_mut(0, 4096).fill((index % 251) as u8 + 1);
            let queue = client.queue(0);
            queue.write(
                offset,
                buffer.as_mut_ptr(),
                4096,
                0,
                blkio::ReqFlags::empty(),
            );
            vessel_tests::blk_client::complete(queue, 1).unwrap();
            written.push((offset, (index % 251) as u8 + 1));
        }
        let table = b.vessel_ok(&["volume", "show", "r3"]).unwrap();
        saw_progress |= table.contains("% to c");
    }
    assert!(saw_progress, "volume show never showed the rebuild");
    drop(client);
    b.vessel_ok(&["volume", "detach", "r3"]).unwrap();
    // Through c, from its own rebuilt replica: the workload and every later write. (c checks an attach against
    // its own view of the state: it must have seen the detach.)
    eventually("c sees r3 detached", || {
        c.vessel_json(&["volume", "show", "r3"])
            .is_ok_and(|shown| shown["attachment"].is_null())
    });
    attach(&c, "r3", &socket);
    let mut client = BlkClient::connect_retrying(&socket, 1, false);
    assert_eq!(
        verify_models(&mut client, workload, &models).unwrap(),
        workload.span
    );
    let buffer = client.buffer(4096).unwrap();
    let mut last = std::collections::HashMap::new();
    for (offset, byte) in &written {
        last.insert(*offset, *byte);
    }
    for (offset, byte) in last {
        let queue = client.queue(0);
        queue.read(
            offset,
            buffer.as_mut_ptr(),
            4096,
            0,
            blkio::ReqFlags::empty(),
        );
        vessel_tests::blk_client::complete(queue, 1).unwrap();
        assert!(
            buffer.slice(0, 4096).iter().all(|b| *b == byte),
            "the write at {offset} is missing on the rebuilt replica"
        );
    }
    assert!(
        b.log().contains("rebuild done"),
        "b's log tells of the rebuild"
    );
}

/// Whether every run of `volume` has three healthy replicas and no rebuild.
fn full_strength(node: &Daemon, volume: &str) -> bool {
    at_full_strength(&node.vessel_json(&["volume", "show", volume]).unwrap(), 3)
}

/// Writes `byte` over 4 KiB at `offset` through queue 0 of `client`.
fn write_block(client: &mut BlkClient, offset: u64, byte: u8) {
    try_write_block(client, offset, byte).unwrap();
}

/// [`write_block`], returning the device's error instead of failing.
fn try_write_block(client: &mut BlkClient, offset: u64, byte: u8) -> anyhow::Result<()> {
    let mut buffer = client.buffer(4096)?;
    buffer.slice_mut(0, 4096).fill(byte);
    let queue = client.queue(0);
    queue.write(
        offset,
        buffer.as_mut_ptr(),
        4096,
        0,
        blkio::ReqFlags::empty(),
    );
    vessel_tests::blk_client::complete(queue, 1).map(|_| ())
}

/// Reads 4 KiB at `offset` through queue 0 of `client`.
fn read_block(client: &mut BlkClient, offset: u64) -> Vec<u8> {
    let buffer = client.buffer(4096).unwrap();
    let queue = client.queue(0);
    queue.read(
        offset,
        buffer.as_mut_ptr(),
        4096,
        0,
        blkio::ReqFlags::empty(),
    );
    vessel_tests::blk_client::complete(queue, 1).unwrap();
    buffer.slice(0, 4096).to_vec()
}

/// Three nodes `config` sets up, with a 256 MiB 3-replica volume attached on a and written everywhere (a full copy
/// would move all of it). c is killed, a write at 100 MiB fails on it and gets it fenced off, another at 200 MiB comes
/// after — with a crashing and restarting in between if `holder_crashes` — and c comes back in time. Checks that c's
/// replica then holds every write; returns the bytes its catch-up copied.
fn a_replica_comes_back(name: &str, config: &str, holder_crashes: bool) -> u64 {
    let dir = test_dir(name).unwrap();
    let mut nodes = cluster_with(&dir, &["a", "b", "c"], config);
    let (mut c, _) = nodes.pop().unwrap();
    let (b, _) = nodes.pop().unwrap();
    let (mut a, _) = nodes.pop().unwrap();
    create_r3(&a, &[&b, &c]);
    let socket = dir.join("r3.sock");
    attach(&a, "r3", &socket);
    let mut client = BlkClient::connect_retrying(&socket, 1, false);
    for offset in (0..256u64 << 20).step_by(1 << 20) {
        write_block(&mut client, offset, 0x11);
    }
    if holder_crashes {
        // The state's record starts from the activity log (extents written in about the last half minute): let
        // the filling age out of it, as a volume's cold data does.
        eventually_within(
            "the activity log empties",
            std::time::Duration::from_secs(90),
            || {
                a.vessel_json(&["volume", "show", "r3"]).is_ok_and(|shown| {
                    shown["attachment"]["active_extents"]
                        .as_array()
                        .is_none_or(Vec::is_empty)
                })
            },
        );
    }
    c.kill().unwrap();
    write_block(&mut client, 100 << 20, 0x22);
    eventually("c is fenced off", || {
        placement(&a, "r3")
            .iter()
            .all(|(_, names)| !names.iter().any(|n| n == "c"))
    });
    if holder_crashes {
        // Its memory of what c misses is gone with it; the cluster state's is not.
        drop(client);
        a.kill().unwrap();
        a.restart().unwrap();
        client = BlkClient::connect_retrying(&socket, 1, false);
    }
    write_block(&mut client, 200 << 20, 0x33);
    // The operator sees whom the volume waits for, and how much a catch-up would copy at most.
    let shown = a.vessel_json(&["volume", "show", "r3"]).unwrap();
    let away = &shown["placement"][0]["away"][0];
    assert_eq!(away["node_name"], "c", "{shown}");
    if holder_crashes {
        assert_eq!(away["changed_extents"], 2, "{shown}");
    }
    let text = a.vessel_ok(&["volume", "show", "r3"]).unwrap();
    assert!(text.contains("waiting for c (away"), "{text}");
    c.restart().unwrap();
    eventually("r3 is back to three replicas", || full_strength(&a, "r3"));
    let bytes = next_rebuild_bytes(0, || a.log());
    drop(client);
    a.vessel_ok(&["volume", "detach", "r3"]).unwrap();
    eventually("c sees r3 detached", || {
        c.vessel_json(&["volume", "show", "r3"])
            .is_ok_and(|shown| shown["attachment"].is_null())
    });
    attach(&c, "r3", &socket);
    let mut client = BlkClient::connect_retrying(&socket, 1, false);
    for (offset, byte) in [
        (0, 0x11),
        (100 << 20, 0x22),
        (200 << 20, 0x33),
        (150 << 20, 0x11),
    ] {
        assert!(
            read_block(&mut client, offset).iter().all(|b| *b == byte),
            "c's replica at {offset} lacks {byte:#x}"
        );
    }
    bytes
}

#[test]
fn a_replica_back_in_time_copies_only_what_changed() {
    let bytes = a_replica_comes_back("replicated_catch_up", "", false);
    assert!(
        bytes <= 2 << 20,
        "copied {bytes} bytes for two changed regions"
    );
}

#[test]
fn a_replica_back_in_time_catches_up_even_after_the_attaching_node_crashed() {
    // Small extents, so that copying the two changed ones is far from copying the volume.
    let bytes = a_replica_comes_back("replicated_catch_up_restart", "extent_size = \"4M\"", true);
    assert!(
        bytes > 0 && bytes <= 2 * (4 << 20),
        "copied {bytes} bytes for two changed 4 MiB extents"
    );
}

#[test]
fn a_write_waits_while_the_cluster_state_is_out_of_reach() {
    let dir = test_dir("replicated_no_quorum").unwrap();
    let names = ["a", "b", "c", "d"];
    // a, b and c vote; d is a learner (three voters at most).
    let mut nodes = cluster_of(&dir, &names);
    let index = |name: &str| names.iter().position(|n| *n == name).unwrap();
    // A 2-replica volume on d and one voter: the other two voters can then go while both replicas stay.
    let mut chosen = None;
    for i in 0..8 {
        let volume = format!("v{i}");
        nodes[0]
            .0
            .vessel_ok(&[
                "volume",
                "create",
                &volume,
                "--size",
                "128M",
                "--replicas",
                "2",
            ])
            .unwrap();
        let on: std::collections::BTreeSet<String> = holders(&nodes[0].0, &volume)
            .into_iter()
            .flatten()
            .collect();
        if on.len() == 2 && on.contains("d") {
            chosen = Some((volume, on));
            break;
        }
    }
    let (volume, on) = chosen.expect("placement put one of eight volumes on d and one voter");
    let voter = on.iter().find(|name| *name != "d").unwrap().clone();
    let holder = &nodes[index(&voter)].0;
    eventually("the holder knows the volume", || {
        holder.vessel_json(&["volume", "show", &volume]).is_ok()
    });
    let socket = dir.join("v.sock");
    attach(holder, &volume, &socket);
    let mut client = BlkClient::connect_retrying(&socket, 1, false);
    // Extent 0 enters the activity log while the cluster is whole.
    write_block(&mut client, 0, 0x51);
    let others: Vec<usize> = ["a", "b", "c"]
        .iter()
        .filter(|name| **name != voter)
        .map(|name| index(name))
        .collect();
    for other in &others {
        nodes[*other].0.kill().unwrap();
    }
    // No quorum now. A write to extent 1 (not in the log) waits — longer than a proposal waits for a leader —
    // and goes out once one of the voters is back.
    let mut returning = nodes.swap_remove(others[0]).0;
    let back = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(15));
        returning.restart().unwrap();
        returning
    });
    let started = std::time::Instant::now();
    let written = try_write_block(&mut client, 64 << 20, 0x52);
    let waited = started.elapsed();
    let _returned = back.join().unwrap();
    written.expect("the write waits for the cluster state instead of failing");
    assert!(
        waited >= std::time::Duration::from_secs(14),
        "the write completed without the cluster state ({waited:?})"
    );
    assert!(read_block(&mut client, 64 << 20).iter().all(|b| *b == 0x52));
    assert!(read_block(&mut client, 0).iter().all(|b| *b == 0x51));
}

#[test]
fn a_volume_is_taken_over_with_force_only_once_its_holder_is_gone() {
    let dir = test_dir("replicated_takeover").unwrap();
    let mut nodes = cluster_of(&dir, &["a", "b", "c"]);
    let (c, _) = nodes.pop().unwrap();
    let (b, _) = nodes.pop().unwrap();
    let (mut a, _) = nodes.pop().unwrap();
    create_r3(&a, &[&b]);
    let socket = dir.join("r3.sock");
    attach(&a, "r3", &socket);
    let mut client = BlkClient::connect_retrying(&socket, 1, false);
    write_block(&mut client, 64 << 20, 0x5a);
    drop(client);
    // The write's extent is in a's activity log, in the cluster state.
    let shown = a.vessel_json(&["volume", "show", "r3"]).unwrap();
    assert_eq!(
        shown["attachment"]["active_extents"],
        serde_json::json!([1]),
        "{shown}"
    );
    eventually("b sees r3 attached on a", || {
        b.vessel_json(&["volume", "show", "r3"])
            .is_ok_and(|shown| !shown["attachment"].is_null())
    });
    let on_b = dir.join("r3-b.sock");
    let on_b = on_b.to_str().unwrap();
    // While a lives: refused, with and without --force.
    let refused = b
        .vessel(&["volume", "attach", "r3", "--vhost-user", on_b])
        .unwrap();
    assert_eq!(refused.status.code(), Some(5), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("attach with --force"),
        "{refused:?}"
    );
    let refused = b
        .vessel(&["volume", "attach", "r3", "--vhost-user", on_b, "--force"])
        .unwrap();
    assert_eq!(refused.status.code(), Some(5), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("is alive"),
        "{refused:?}"
    );
    // a dies: b takes the volume over, and a's replica sets move to new epochs.
    let before = placement(&b, "r3");
    a.kill().unwrap();
    b.vessel_ok(&["volume", "attach", "r3", "--vhost-user", on_b, "--force"])
        .unwrap();
    let after = placement(&b, "r3");
    assert!(
        before
            .iter()
            .zip(&after)
            .all(|((old, _), (new, _))| new > old),
        "{before:?} -> {after:?}"
    );
    // b reconciled what a may have left half-written before serving the volume.
    assert!(b.log().contains("reconciled the replicas"), "{}", b.log());
    let shown = b.vessel_json(&["volume", "show", "r3"]).unwrap();
    assert!(
        shown["attachment"]["active_extents"]
            .as_array()
            .is_none_or(Vec::is_empty),
        "{shown}"
    );
    let mut client = BlkClient::connect_retrying(Path::new(on_b), 1, false);
    assert!(
        read_block(&mut client, 64 << 20)
            .iter()
            .all(|byte| *byte == 0x5a)
    );
    // a comes back: it no longer serves the volume, and b's writes go on (a is fenced off, then rebuilt).
    a.restart().unwrap();
    write_block(&mut client, 65 << 20, 0x6b);
    assert!(!socket.exists() || std::os::unix::net::UnixStream::connect(&socket).is_err());
    drop(c);
}

#[test]
fn a_drained_node_hands_its_replicas_over_frees_their_space_and_can_then_be_removed() {
    let dir = test_dir("replicated_drain").unwrap();
    let names = ["a", "b", "c", "d"];
    // Stale replicas are freed a second after a node sees itself out of their sets (15 minutes by default).
    let nodes = cluster_with(&dir, &names, "stale_replica_keep = \"1s\"");
    let node = |name: &str| &nodes[names.iter().position(|n| *n == name).unwrap()].0;
    create_r3(node("a"), &[]);
    let socket = dir.join("r3.sock");
    attach(node("a"), "r3", &socket);
    let mut client = BlkClient::connect_retrying(&socket, 1, false);
    for (offset, byte) in [(0, 0x21), (100 << 20, 0x32), (200 << 20, 0x43)] {
        write_block(&mut client, offset, byte);
    }
    // A replica node other than the holder is drained.
    let holding: Vec<String> = placement(node("a"), "r3")
        .into_iter()
        .flat_map(|(_, names)| names)
        .collect();
    let drained = ["b", "c", "d"]
        .into_iter()
        .find(|name| holding.iter().any(|n| n == name))
        .unwrap();
    let said = node("a").vessel_ok(&["node", "drain", drained]).unwrap();
    assert!(said.contains("is draining"), "{said}");
    eventually("the drained node holds no replica", || {
        let runs = placement(node("a"), "r3");
        runs.iter()
            .all(|(_, names)| names.len() == 3 && !names.iter().any(|n| n == drained))
            && full_strength(node("a"), "r3")
    });
    let list = node("a").vessel_json(&["node", "list"]).unwrap();
    assert!(
        list["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == drained && n["state"] == "draining"),
        "{list}"
    );
    // The drained node's copies are freed (checked every 10 s): its disk is empty again.
    let disk = format!("{drained}-disk.img");
    let used = || -> u64 {
        let list = node(drained).vessel_json(&["disk", "list"]).unwrap();
        list["disks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["path"].as_str().is_some_and(|p| p.ends_with(&disk)))
            .map(|d| d["used_bytes"].as_u64().unwrap_or(0))
            .sum()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while used() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the drained node still uses {} bytes: {}",
            used(),
            node(drained).log()
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    node("a").vessel_ok(&["node", "remove", drained]).unwrap();
    // The data is all there, on the replicas that remain.
    for (offset, byte) in [(0, 0x21), (100 << 20, 0x32), (200 << 20, 0x43)] {
        assert!(read_block(&mut client, offset).iter().all(|b| *b == byte));
    }
}
