//! The admin CLI against a real daemon: the spellings DESIGN.md fixes, the exit codes scripts rely on, the one-line
//! errors that say what to do, `--output json`, and metadata that survives a restart.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use vessel_tests::daemon::{Daemon, DaemonOptions, binary, test_dir};

/// Asserts the exit code and that stderr is one line containing `message`.
fn assert_fails(output: &Output, code: i32, message: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "stderr: {stderr}");
    assert!(
        stderr.contains(message),
        "expected {message:?} in {stderr:?}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
    assert!(stderr.starts_with("error: "), "{stderr:?}");
}

#[test]
fn volume_lifecycle_errors_and_exit_codes() {
    let dir = test_dir("cli_lifecycle").unwrap();
    let daemon = Daemon::start(&dir, DaemonOptions::default()).unwrap();
    let socket = dir.join("db1.sock");
    let socket = socket.to_str().unwrap();

    let created = daemon
        .vessel_ok(&["volume", "create", "db1", "--size", "2G"])
        .unwrap();
    assert_eq!(created.trim(), "volume db1 created (2 GiB)");

    assert_fails(
        &daemon
            .vessel(&["volume", "create", "db1", "--size", "1G"])
            .unwrap(),
        4,
        "volume 'db1' already exists",
    );
    assert_fails(
        &daemon
            .vessel(&["volume", "create", "odd", "--size", "1000"])
            .unwrap(),
        2,
        "size 1000 B is not a multiple of the block size 512 B; round it up to 1 KiB",
    );
    assert_fails(
        &daemon
            .vessel(&[
                "volume",
                "create",
                "odd",
                "--size",
                "6K",
                "--block-size",
                "4K",
            ])
            .unwrap(),
        2,
        "not a multiple of the block size 4096 B",
    );
    assert_fails(
        &daemon
            .vessel(&["volume", "create", "huge", "--size", "1T"])
            .unwrap(),
        6,
        "exceeds the pool's overcommit limit",
    );
    assert_fails(
        &daemon.vessel(&["volume", "show", "nope"]).unwrap(),
        3,
        "volume 'nope' not found",
    );
    assert_fails(
        &daemon
            .vessel(&["volume", "grow", "db1", "--size", "1G"])
            .unwrap(),
        2,
        "shrinking",
    );
    // Argument errors are clap's: the reason first, then a pointer to --help.
    let bad_size = daemon
        .vessel(&["volume", "create", "x", "--size", "10Q"])
        .unwrap();
    assert_eq!(bad_size.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_size.stderr).starts_with("error: invalid value '10Q'"));
    assert_fails(
        &daemon.vessel(&["volume", "detach", "db1"]).unwrap(),
        5,
        "volume 'db1' is not attached",
    );

    daemon
        .vessel_ok(&[
            "volume",
            "attach",
            "db1",
            "--vhost-user",
            socket,
            "--queues",
            "2",
        ])
        .unwrap();
    let mode = std::fs::metadata(socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "vhost-user socket mode");
    assert_fails(
        &daemon
            .vessel(&["volume", "attach", "db1", "--vhost-user", socket])
            .unwrap(),
        5,
        "volume 'db1' is already attached",
    );
    daemon
        .vessel_ok(&["volume", "create", "db2", "--size", "1G"])
        .unwrap();
    assert_fails(
        &daemon
            .vessel(&["volume", "attach", "db2", "--vhost-user", socket])
            .unwrap(),
        4,
        "is already used by volume 'db1'",
    );
    assert_fails(
        &daemon
            .vessel(&[
                "volume",
                "attach",
                "db2",
                "--vhost-user",
                "/tmp/x.sock",
                "--socket-mode",
                "666",
            ])
            .unwrap(),
        2,
        "world-writable",
    );
    assert_fails(
        &daemon.vessel(&["volume", "delete", "db1"]).unwrap(),
        5,
        "detach it first",
    );

    // Tables for people, JSON for scripts.
    let table = daemon.vessel_ok(&["volume", "list"]).unwrap();
    let header = table.lines().next().unwrap();
    assert!(
        header.starts_with("NAME") && header.contains("SIZE") && header.contains("ATTACHED"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|line| line.starts_with("db1 ") && line.contains(socket)),
        "{table}"
    );
    let listed = daemon.vessel_json(&["volume", "list"]).unwrap();
    let volumes = listed["volumes"].as_array().unwrap();
    assert_eq!(volumes.len(), 2);
    assert_eq!(volumes[0]["name"], "db1");
    assert_eq!(volumes[0]["size_bytes"], 2u64 << 30);
    assert_eq!(volumes[0]["attachment"]["queues"], 2);
    let json_error = daemon
        .vessel(&["volume", "show", "nope", "--output", "json"])
        .unwrap();
    let parsed: serde_json::Value = serde_json::from_slice(&json_error.stdout).unwrap();
    assert_eq!(parsed["error"]["kind"], "not_found");

    // Metadata (and the attachment) survive a restart.
    let mut daemon = daemon;
    daemon.restart().unwrap();
    let shown = daemon.vessel_json(&["volume", "show", "db1"]).unwrap();
    assert_eq!(shown["size_bytes"], 2u64 << 30);
    assert_eq!(shown["attachment"]["vhost_user_socket"], socket);
    assert!(
        Path::new(socket).exists(),
        "the device listens again after the restart"
    );

    daemon.vessel_ok(&["volume", "detach", "db1"]).unwrap();
    let deleted = daemon.vessel_ok(&["volume", "delete", "db1"]).unwrap();
    assert!(deleted.starts_with("volume db1 deleted"), "{deleted}");
    assert_fails(
        &daemon.vessel(&["volume", "show", "db1"]).unwrap(),
        3,
        "not found",
    );
}

#[test]
fn cluster_and_disks() {
    let dir = test_dir("cli_cluster").unwrap();
    let daemon = Daemon::start(&dir, DaemonOptions::default()).unwrap();
    let mode = std::fs::metadata(daemon.admin_socket())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "admin socket mode");

    let status = daemon.vessel_json(&["cluster", "status"]).unwrap();
    assert_eq!(status["state"], "running");
    assert_eq!(status["voters"].as_array().unwrap().len(), 1);
    assert_eq!(status["leader_id"], status["node_id"]);
    let again = daemon.vessel_ok(&["cluster", "init"]).unwrap();
    assert!(again.contains("already initialised"), "{again}");

    let nodes = daemon.vessel_json(&["node", "list"]).unwrap();
    assert_eq!(nodes["nodes"].as_array().unwrap().len(), 1);

    // The default pool is one sparse file; add a second disk, then remove it.
    let disks = daemon.vessel_json(&["disk", "list"]).unwrap();
    assert_eq!(disks["disks"].as_array().unwrap().len(), 1);
    let extra = dir.join("extra.img");
    let extra = extra.to_str().unwrap();
    assert_fails(
        &daemon.vessel(&["disk", "add", extra]).unwrap(),
        2,
        "pass --size",
    );
    let added = daemon
        .vessel_json(&["disk", "add", extra, "--size", "1G"])
        .unwrap();
    assert_eq!(added["path"], extra);
    assert_fails(
        &daemon.vessel(&["disk", "add", extra]).unwrap(),
        4,
        "already in the pool",
    );
    let status = daemon.vessel_json(&["cluster", "status"]).unwrap();
    assert!(
        status["capacity_bytes"].as_u64().unwrap() > 4u64 << 30,
        "{status}"
    );
    let removed = daemon.vessel_ok(&["disk", "remove", extra]).unwrap();
    assert!(removed.contains("removed"), "{removed}");
    assert_fails(
        &daemon.vessel(&["disk", "remove", extra]).unwrap(),
        3,
        "not found",
    );
}

#[test]
fn unreachable_daemon_and_bad_arguments() {
    let dir = test_dir("cli_unreachable").unwrap();
    let output = std::process::Command::new(binary("vessel").unwrap())
        .args([
            "--admin-socket",
            dir.join("none.sock").to_str().unwrap(),
            "volume",
            "list",
        ])
        .output()
        .unwrap();
    assert_fails(&output, 7, "is vesseld running?");
    let output = std::process::Command::new(binary("vessel").unwrap())
        .args(["volume", "frobnicate"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn a_second_daemon_on_the_same_data_dir_is_refused() {
    let dir = test_dir("cli_lock").unwrap();
    let daemon = Daemon::start(&dir, DaemonOptions::default()).unwrap();
    let output = std::process::Command::new(binary("vesseld").unwrap())
        .arg("--data-dir")
        .arg(daemon.data_dir())
        .args(["--metrics", "off"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("in use by another vesseld"), "{stderr}");
}

#[test]
fn a_listening_node_waits_for_cluster_init_and_serves_the_api_over_tcp() {
    let dir = test_dir("cli_listen").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("127.0.0.1:{port}");
    let options = DaemonOptions {
        args: vec!["--listen".to_owned(), endpoint.clone()],
        ..DaemonOptions::default()
    };
    let _daemon = Daemon::start(&dir, options).unwrap();
    let vessel = |args: &[&str]| {
        std::process::Command::new(binary("vessel").unwrap())
            .args(["--endpoint", &endpoint])
            .args(args)
            .output()
            .unwrap()
    };
    let json = |args: &[&str]| -> serde_json::Value {
        let output = vessel(&[args, &["--output", "json"]].concat());
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    };

    let status = json(&["cluster", "status"]);
    assert_eq!(status["state"], "waiting", "{status}");
    assert_fails(
        &vessel(&["volume", "create", "v", "--size", "1G"]),
        5,
        "run `vessel cluster init`",
    );

    let init = vessel(&["cluster", "init"]);
    assert!(
        String::from_utf8_lossy(&init.stdout).contains("initialised"),
        "{init:?}"
    );
    let status = json(&["cluster", "status"]);
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(
        json(&["node", "list"])["nodes"][0]["address"],
        endpoint.as_str()
    );

    // A --listen node brings no default disk: the operator adds them.
    assert_fails(
        &vessel(&["volume", "create", "v", "--size", "1G"]),
        6,
        "the cluster has no disks yet; add one with `vessel disk add",
    );
    let disk = dir.join("d0.img");
    let added = vessel(&["disk", "add", disk.to_str().unwrap(), "--size", "1G"]);
    assert!(added.status.success(), "{added:?}");
    let created = vessel(&["volume", "create", "v", "--size", "1G"]);
    assert!(created.status.success(), "{created:?}");
}

#[test]
fn a_missing_disk_stops_the_node_from_serving_volumes_rather_than_reading_zeroes() {
    let dir = test_dir("cli_missing_disk").unwrap();
    let mut daemon = Daemon::start(&dir, DaemonOptions::default()).unwrap();
    let socket = dir.join("m.sock");
    let socket = socket.to_str().unwrap();
    daemon
        .vessel_ok(&["volume", "create", "m", "--size", "1G"])
        .unwrap();
    daemon
        .vessel_ok(&["volume", "attach", "m", "--vhost-user", socket])
        .unwrap();
    daemon.stop().unwrap();

    let disk = daemon.data_dir().join("disks/disk0.img");
    let moved = daemon.data_dir().join("disks/elsewhere.img");
    std::fs::rename(&disk, &moved).unwrap();
    daemon.restart().unwrap();
    let status = daemon.vessel_json(&["cluster", "status"]).unwrap();
    let warnings = status["warnings"].to_string();
    assert!(warnings.contains("cannot be opened"), "{status}");
    assert!(!Path::new(socket).exists(), "the attachment is not served");
    daemon.vessel_ok(&["volume", "detach", "m"]).unwrap();
    assert_fails(
        &daemon
            .vessel(&["volume", "attach", "m", "--vhost-user", socket])
            .unwrap(),
        5,
        "could not be opened",
    );

    std::fs::rename(&moved, &disk).unwrap();
    daemon.restart().unwrap();
    daemon
        .vessel_ok(&["volume", "attach", "m", "--vhost-user", socket])
        .unwrap();
    assert!(Path::new(socket).exists());
}
