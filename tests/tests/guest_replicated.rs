//! An unmodified Linux guest (QEMU, software emulation) on a three-replica volume of a three-node cluster (daemons on
//! loopback addresses): it writes and verifies data with fio while one replica node is killed, without an I/O error,
//! and reads everything back once the lost replica has been rebuilt.

use std::time::{Duration, Instant};

use vessel_tests::daemon::test_dir;
use vessel_tests::guest::{Guest, GuestConfig, GuestImage, VhostUserBlkDisk, running_as_root};
use vessel_tests::local_cluster::{at_full_strength, cluster_of};

const MINUTE: Duration = Duration::from_secs(60);

/// fio with a deterministic random pattern, so a second run with `--verify_only` checks the same blocks.
fn fio(extra: &str) -> String {
    format!(
        "fio --name=vessel --filename=/dev/vda --ioengine=libaio --direct=1 --bs=4k --iodepth=8 --rw=randwrite \
         --size=48M --randrepeat=1 --randseed=7 --verify=crc32c --verify_fatal=1 --output-format=terse {extra}"
    )
}

#[test]
fn guest_on_a_replicated_volume_survives_the_loss_of_a_replica() {
    if !running_as_root() {
        eprintln!("SKIPPED: guest tests need root (QEMU with shared memory)");
        return;
    }
    let dir = test_dir("guest_replicated").unwrap();
    let mut nodes = cluster_of(&dir, &["a", "b", "c"]);
    let (mut c, _) = nodes.pop().unwrap();
    let (b, _) = nodes.pop().unwrap();
    let (a, _) = nodes.pop().unwrap();
    a.vessel_ok(&["volume", "create", "vm", "--size", "1G", "--replicas", "3"])
        .unwrap();
    let socket = dir.join("vm.sock");
    a.vessel_ok(&[
        "volume",
        "attach",
        "vm",
        "--vhost-user",
        socket.to_str().unwrap(),
    ])
    .unwrap();
    let image = GuestImage::get().unwrap();
    let config = GuestConfig {
        disks: vec![VhostUserBlkDisk {
            socket,
            queues: 1,
            reconnect: true,
        }],
        ..GuestConfig::default()
    };
    let mut guest = Guest::boot(&image, config).unwrap();

    // fio writes and verifies while replica node c dies.
    guest
        .run_ok(
            &format!(
                "({} > /tmp/fio.log 2>&1; echo $? > /tmp/fio.rc) &",
                fio("--size=96M")
            ),
            MINUTE,
        )
        .unwrap();
    let deadline = Instant::now() + 2 * MINUTE;
    while a.vessel_json(&["volume", "show", "vm"]).unwrap()["stats"]["writes"]
        .as_u64()
        .unwrap()
        < 500
    {
        assert!(Instant::now() < deadline, "the guest is not writing");
        std::thread::sleep(Duration::from_millis(100));
    }
    c.kill().unwrap();
    let deadline = Instant::now() + 10 * MINUTE;
    loop {
        let rc = guest
            .run_ok("cat /tmp/fio.rc 2>/dev/null || echo running", MINUTE)
            .unwrap();
        if rc.trim() != "running" {
            assert_eq!(rc.trim(), "0", "fio failed");
            break;
        }
        assert!(Instant::now() < deadline, "fio did not finish");
        std::thread::sleep(Duration::from_secs(1));
    }
    let log = guest.run_ok("cat /tmp/fio.log", MINUTE).unwrap();
    assert!(!log.contains("error"), "fio reported an error: {log}");
    let kernel = guest.run_ok("dmesg", MINUTE).unwrap();
    assert!(
        !kernel.contains("I/O error"),
        "the guest saw an I/O error:\n{kernel}"
    );
    assert!(a.log().contains("fenced it off"), "c was not fenced off");

    // c returns and is rebuilt; the guest's data reads back.
    c.restart().unwrap();
    let deadline = Instant::now() + 5 * MINUTE;
    loop {
        let shown = b.vessel_json(&["volume", "show", "vm"]).unwrap();
        let full = at_full_strength(&shown, 3);
        if full {
            break;
        }
        assert!(Instant::now() < deadline, "no full strength: {shown}");
        std::thread::sleep(Duration::from_millis(500));
    }
    guest.run_ok(&fio("--verify_only"), 5 * MINUTE).unwrap();
    guest.shutdown().unwrap();
}
