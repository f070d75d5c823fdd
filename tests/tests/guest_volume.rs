//! An unmodified Linux guest (QEMU, software emulation) with a Vessel volume as its vhost-user-blk disk: it writes and
//! verifies data with fio, sees discards read back as zeroes and the disk grow while attached, keeps its data across a
//! reboot, and keeps writing without an I/O error while the daemon is killed with SIGKILL and restarted.

use std::time::{Duration, Instant};

use vessel_tests::daemon::{Daemon, DaemonOptions, test_dir};
use vessel_tests::guest::{Guest, GuestConfig, GuestImage, VhostUserBlkDisk, running_as_root};

const MINUTE: Duration = Duration::from_secs(60);

/// A daemon with one attached volume, and a guest booted on it.
fn boot_on_volume(name: &str, size: &str, queues: u16) -> Option<(Daemon, Guest, String)> {
    if !running_as_root() {
        eprintln!("SKIPPED: guest tests need root (QEMU with shared memory, /dev/kvm-free TCG)");
        return None;
    }
    let dir = test_dir(name).unwrap();
    let daemon = Daemon::start(&dir, DaemonOptions::default()).unwrap();
    let socket = dir.join("vm.sock");
    let created = daemon
        .vessel_json(&["volume", "create", "vm", "--size", size])
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let queue_arg = queues.to_string();
    daemon
        .vessel_ok(&[
            "volume",
            "attach",
            "vm",
            "--vhost-user",
            socket.to_str().unwrap(),
            "--queues",
            &queue_arg,
        ])
        .unwrap();
    let image = GuestImage::get().unwrap();
    let config = GuestConfig {
        cpus: u32::from(queues),
        disks: vec![VhostUserBlkDisk {
            socket,
            queues,
            reconnect: true,
        }],
        ..GuestConfig::default()
    };
    let guest = Guest::boot(&image, config).unwrap();
    Some((daemon, guest, id))
}

fn wait_for(guest: &mut Guest, command: &str, expected: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let output = guest.run(command, MINUTE).unwrap();
        if output.output.trim() == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "`{command}` still says {:?}, expected {expected:?}",
            output.output
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// fio with a deterministic random pattern, so a second run with `--verify_only` checks the same blocks.
fn fio(extra: &str) -> String {
    format!(
        "fio --name=vessel --filename=/dev/vda --ioengine=libaio --direct=1 --bs=4k --iodepth=8 --rw=randwrite \
         --size=48M --randrepeat=1 --randseed=42 --verify=crc32c --verify_fatal=1 --output-format=terse {extra}"
    )
}

#[test]
fn guest_writes_verifies_grows_and_reads_back_after_a_reboot() {
    let Some((daemon, mut guest, id)) = boot_on_volume("guest_basic", "1G", 2) else {
        return;
    };

    // The device as the guest sees it: size, serial (GET_ID), queues, cache mode.
    guest
        .run_ok("test $(cat /sys/block/vda/size) -eq 2097152", MINUTE)
        .unwrap();
    let serial = guest.run_ok("cat /sys/block/vda/serial", MINUTE).unwrap();
    assert_eq!(serial.trim(), id.replace('-', "").get(..20).unwrap());
    guest
        .run_ok("test $(ls /sys/block/vda/mq | wc -l) -eq 2", MINUTE)
        .unwrap();
    assert_eq!(
        guest
            .run_ok("cat /sys/block/vda/queue/write_cache", MINUTE)
            .unwrap()
            .trim(),
        "write back"
    );

    // Write and verify with fio.
    guest.run_ok(&fio(""), 5 * MINUTE).unwrap();

    // Discard reads back as zeroes (in a range fio does not use).
    let at = 512 << 20;
    guest
        .run_ok(
            &format!(
                "dd if=/dev/urandom of=/dev/vda bs=1M count=8 seek={} oflag=direct 2>/dev/null",
                at >> 20
            ),
            MINUTE,
        )
        .unwrap();
    guest
        .run_ok(
            &format!("blkdiscard -o {at} -l {} /dev/vda", 8 << 20),
            MINUTE,
        )
        .unwrap();
    let zeroes = guest
        .run_ok(&format!("dd if=/dev/vda bs=1M count=8 skip={} iflag=direct 2>/dev/null | tr -d '\\0' | wc -c", at >> 20), MINUTE)
        .unwrap();
    assert_eq!(zeroes.trim(), "0", "discarded range reads back as zeroes");

    // Write-through mode, chosen by the guest, reaches the device and still serves I/O.
    let cache = |daemon: &Daemon| {
        daemon.vessel_json(&["volume", "show", "vm"]).unwrap()["attachment"]["write_back"].clone()
    };
    assert_eq!(cache(&daemon), true);
    guest
        .run_ok("echo 'write through' > /sys/block/vda/cache_type", MINUTE)
        .unwrap();
    assert_eq!(cache(&daemon), false);
    guest
        .run_ok(
            "dd if=/dev/urandom of=/dev/vda bs=4k count=16 seek=200000 oflag=direct 2>/dev/null",
            MINUTE,
        )
        .unwrap();
    guest
        .run_ok("echo 'write back' > /sys/block/vda/cache_type", MINUTE)
        .unwrap();
    assert_eq!(cache(&daemon), true);

    // Growing the attached volume: the guest sees the new size.
    daemon
        .vessel_ok(&["volume", "grow", "vm", "--size", "2G"])
        .unwrap();
    wait_for(&mut guest, "cat /sys/block/vda/size", "4194304", MINUTE);

    // After a reboot the data fio wrote is still there.
    guest.reboot(2 * MINUTE).unwrap();
    guest.run_ok(&fio("--verify_only"), 5 * MINUTE).unwrap();
    guest
        .run_ok("test $(cat /sys/block/vda/size) -eq 4194304", MINUTE)
        .unwrap();
    guest.shutdown().unwrap();

    let shown = daemon.vessel_json(&["volume", "show", "vm"]).unwrap();
    assert_eq!(shown["stats"]["errors"].as_u64().unwrap(), 0, "{shown}");
    assert!(
        shown["stats"]["writes"].as_u64().unwrap() >= 48 * 256,
        "{shown}"
    );
}

#[test]
fn guest_keeps_writing_across_a_daemon_crash_and_restart() {
    let Some((mut daemon, mut guest, _)) = boot_on_volume("guest_crash", "1G", 1) else {
        return;
    };
    // Write-through makes every write durable before it completes (RWF_DSYNC).
    guest
        .run_ok("echo 'write through' > /sys/block/vda/cache_type", MINUTE)
        .unwrap();
    // fio writes and then verifies everything it wrote, while a second writer keeps large requests in flight
    // (small ones complete in microseconds, and a kill must catch some in the daemon).
    let start = format!(
        "({} > /tmp/fio.log 2>&1; echo $? > /tmp/fio.rc) & echo $! > /tmp/fio.pid",
        fio("--iodepth=16 --size=96M")
    );
    guest.run_ok(&start, MINUTE).unwrap();
    guest
        .run_ok(
            "fio --name=stream --filename=/dev/vda --ioengine=libaio --direct=1 --bs=1M --iodepth=8 --rw=write \
             --offset=512M --size=256M --time_based --runtime=600 > /tmp/stream.log 2>&1 & echo $! > /tmp/stream.pid",
            MINUTE,
        )
        .unwrap();
    let recovered = |daemon: &Daemon| daemon.log().matches("recovered requests in flight").count();
    let mut kills = 0;
    while recovered(&daemon) == 0 && kills < 8 {
        // Let the guest make progress on the (restarted) daemon, then kill it while requests are in flight.
        let deadline = Instant::now() + 2 * MINUTE;
        loop {
            let shown = daemon.vessel_json(&["volume", "show", "vm"]).unwrap();
            if shown["stats"]["writes"].as_u64().unwrap() > 300 {
                break;
            }
            if Instant::now() >= deadline {
                // What the guest's kernel says about its disk tells a lost notification from a broken queue.
                let dmesg = guest
                    .run("dmesg | tail -n 40; cat /sys/block/vda/inflight", MINUTE)
                    .map_or_else(|error| error.to_string(), |output| output.output);
                panic!("the guest is not writing: {shown}\nguest kernel log:\n{dmesg}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon.kill().unwrap();
        kills += 1;
        // Asked only now: a guest command right before the kill would pause fio (one vCPU) and drain the queue.
        guest
            .run_ok("test ! -e /tmp/fio.rc", MINUTE)
            .expect("fio was still running when the daemon was killed");
        daemon.restart().unwrap();
    }
    // The restarted daemon kept the cache mode the guest chose (the guest will not say it again).
    let deadline = Instant::now() + MINUTE;
    let shown = loop {
        let shown = daemon.vessel_json(&["volume", "show", "vm"]).unwrap();
        if shown["attachment"]["connected"] == true || Instant::now() > deadline {
            break shown;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(shown["attachment"]["write_back"], false, "{shown}");
    assert!(
        recovered(&daemon) > 0,
        "{kills} kills never caught a request in flight (no inflight recovery logged)"
    );

    wait_for(
        &mut guest,
        "cat /tmp/fio.rc 2>/dev/null || echo running",
        "0",
        10 * MINUTE,
    );
    guest.run_ok("kill $(cat /tmp/stream.pid)", MINUTE).unwrap();
    let log = guest.run_ok("cat /tmp/fio.log", MINUTE).unwrap();
    assert!(!log.contains("error"), "fio reported an error: {log}");
    let kernel = guest.run_ok("dmesg", MINUTE).unwrap();
    assert!(
        !kernel.contains("I/O error"),
        "the guest saw an I/O error:\n{kernel}"
    );
    // And once more, from a clean read.
    guest.run_ok(&fio("--verify_only"), 5 * MINUTE).unwrap();
    guest.shutdown().unwrap();
}
