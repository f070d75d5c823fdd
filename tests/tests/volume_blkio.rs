//! A volume attached through the daemon and driven by an independent vhost-user-blk frontend (libblkio): a verifying
//! random workload across queues with discard, write-zeroes and flush; reconnects; growth while attached; a daemon
//! crash (SIGKILL) and restart with the data intact; counters in `volume show` and on /metrics; a full pool.

use std::io::{Read, Write};
use std::path::Path;

use vessel_tests::blk_client::{BlkClient, Workload, run_workload, verify_models};
use vessel_tests::daemon::{Daemon, DaemonOptions, test_dir};

fn connect(socket: &Path, queues: usize) -> BlkClient {
    BlkClient::connect_retrying(socket, queues, false)
}

fn scrape(addr: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

fn metric(text: &str, name: &str, volume: &str) -> u64 {
    let prefix = format!("{name}{{volume=\"{volume}\"");
    text.lines()
        .find(|line| line.starts_with(&prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in:\n{text}"))
}

#[test]
fn verifying_workload_over_two_queues_survives_reconnect_growth_and_a_crash() {
    let dir = test_dir("verifying_workload").unwrap();
    let mut daemon = Daemon::start(&dir, DaemonOptions::default()).unwrap();
    let socket = dir.join("db1.sock");
    daemon
        .vessel_ok(&["volume", "create", "db1", "--size", "256M"])
        .unwrap();
    let attached = daemon
        .vessel_ok(&[
            "volume",
            "attach",
            "db1",
            "--vhost-user",
            socket.to_str().unwrap(),
            "--queues",
            "2",
        ])
        .unwrap();
    assert!(attached.contains("attached"), "{attached}");

    let workload = Workload {
        seed: 0x5eed,
        span: 64 << 20,
        chunk: 64 << 10,
        rounds: 250,
        depth: 8,
    };
    let mut client = connect(&socket, 2);
    assert_eq!(client.capacity(), 256 << 20);
    let (report, models) = run_workload(&mut client, workload).unwrap();
    assert!(report.reads > 100 && report.writes > 100, "{report:?}");
    assert!(
        report.discards > 10 && report.write_zeroes > 10 && report.flushes > 10,
        "{report:?}"
    );

    // The counters saw the same requests.
    let shown = daemon.vessel_json(&["volume", "show", "db1"]).unwrap();
    let stats = &shown["stats"];
    assert!(stats["reads"].as_u64().unwrap() >= report.reads, "{shown}");
    assert!(
        stats["writes"].as_u64().unwrap() >= report.writes,
        "{shown}"
    );
    assert!(
        stats["discards"].as_u64().unwrap() >= report.discards,
        "{shown}"
    );
    assert!(
        stats["flushes"].as_u64().unwrap() >= report.flushes,
        "{shown}"
    );
    assert_eq!(stats["errors"].as_u64().unwrap(), 0, "{shown}");
    assert_eq!(shown["attachment"]["connected"], true, "{shown}");
    let metrics = scrape(&daemon.metrics_addr().unwrap());
    assert_eq!(
        metric(&metrics, "vessel_volume_reads_total", "db1"),
        stats["reads"].as_u64().unwrap()
    );
    assert!(
        metrics.contains("vessel_volume_request_duration_seconds_bucket{volume=\"db1\""),
        "{metrics}"
    );

    // A new frontend connection sees the same data.
    drop(client);
    let mut client = connect(&socket, 2);
    assert_eq!(
        verify_models(&mut client, workload, &models).unwrap(),
        workload.span
    );

    // Growing while attached: the device reports the new capacity.
    daemon
        .vessel_ok(&["volume", "grow", "db1", "--size", "512M"])
        .unwrap();
    assert_eq!(client.current_capacity().unwrap(), 512 << 20);
    drop(client);

    // SIGKILL: the attachment comes back with the restarted daemon, and every acknowledged write is there.
    daemon.kill().unwrap();
    daemon.restart().unwrap();
    let mut client = connect(&socket, 2);
    assert_eq!(client.capacity(), 512 << 20);
    assert_eq!(
        verify_models(&mut client, workload, &models).unwrap(),
        workload.span
    );
    drop(client);

    daemon.vessel_ok(&["volume", "detach", "db1"]).unwrap();
    assert!(!socket.exists(), "the socket is removed on detach");
    let deleted = daemon.vessel_json(&["volume", "delete", "db1"]).unwrap();
    assert!(deleted["freed_bytes"].as_u64().unwrap() > 0, "{deleted}");
}

#[test]
fn a_full_pool_fails_writes_with_ioerr_and_counts_them() {
    let dir = test_dir("full_pool").unwrap();
    // 16 extents of 4 MiB, and volumes may provision twice that.
    let options = DaemonOptions {
        config: Some("default_disk_size = \"66M\"\nextent_size = \"4M\"\n".to_owned()),
        ..DaemonOptions::default()
    };
    let daemon = Daemon::start(&dir, options).unwrap();
    let socket = dir.join("big.sock");
    daemon
        .vessel_ok(&["volume", "create", "big", "--size", "128M"])
        .unwrap();
    daemon
        .vessel_ok(&[
            "volume",
            "attach",
            "big",
            "--vhost-user",
            socket.to_str().unwrap(),
        ])
        .unwrap();
    let mut client = connect(&socket, 1);
    let mut buffer = client.buffer(4096).unwrap();
    buffer.slice_mut(0, 4096).fill(7);
    let mut failed = 0;
    for extent in 0..32u64 {
        let queue = client.queue(0);
        queue.write(
            extent * (4 << 20),
            buffer.as_mut_ptr(),
            4096,
            0,
            blkio::ReqFlags::empty(),
        );
        if vessel_tests::blk_client::complete(queue, 1).is_err() {
            failed += 1;
        }
    }
    assert_eq!(failed, 16, "half the extents find no space");
    let shown = daemon.vessel_json(&["volume", "show", "big"]).unwrap();
    assert_eq!(
        shown["stats"]["no_space_errors"].as_u64().unwrap(),
        16,
        "{shown}"
    );
    assert_eq!(shown["extents_allocated"].as_u64().unwrap(), 16, "{shown}");
    let disks = daemon.vessel_json(&["disk", "list"]).unwrap();
    let disk = &disks["disks"][0];
    assert_eq!(disk["used_bytes"], disk["capacity_bytes"], "{disks}");
}

#[test]
fn a_read_only_attachment_serves_the_data_and_says_it_is_read_only() {
    let dir = test_dir("read_only").unwrap();
    let daemon = Daemon::start(&dir, DaemonOptions::default()).unwrap();
    let socket = dir.join("ro.sock");
    let socket_arg = socket.to_str().unwrap();
    daemon
        .vessel_ok(&["volume", "create", "ro", "--size", "64M"])
        .unwrap();
    daemon
        .vessel_ok(&["volume", "attach", "ro", "--vhost-user", socket_arg])
        .unwrap();
    let mut client = connect(&socket, 1);
    let mut buffer = client.buffer(4096).unwrap();
    buffer.slice_mut(0, 4096).fill(0x3c);
    client
        .queue(0)
        .write(8192, buffer.as_mut_ptr(), 4096, 0, blkio::ReqFlags::empty());
    vessel_tests::blk_client::complete(client.queue(0), 1).unwrap();
    drop(client);
    daemon.vessel_ok(&["volume", "detach", "ro"]).unwrap();

    daemon
        .vessel_ok(&[
            "volume",
            "attach",
            "ro",
            "--vhost-user",
            socket_arg,
            "--read-only",
        ])
        .unwrap();
    // A read-write client is refused: libblkio sees VIRTIO_BLK_F_RO.
    let refused = BlkClient::connect(&socket, 1).unwrap_err().to_string();
    assert!(refused.contains("read-only"), "{refused}");
    let mut client = BlkClient::connect_retrying(&socket, 1, true);
    assert!(client.read_only().unwrap());
    let mut buffer = client.buffer(4096).unwrap();
    client
        .queue(0)
        .read(8192, buffer.as_mut_ptr(), 4096, 0, blkio::ReqFlags::empty());
    vessel_tests::blk_client::complete(client.queue(0), 1).unwrap();
    assert!(buffer.slice_mut(0, 4096).iter().all(|b| *b == 0x3c));
    let shown = daemon.vessel_json(&["volume", "show", "ro"]).unwrap();
    assert_eq!(shown["attachment"]["read_only"], true, "{shown}");
}
