//! Two unmodified Linux guests (QEMU, software emulation) with vhost-user-net NICs on two nodes of a cluster in
//! network namespaces (`deploy/netns-cluster`): they ping each other and pass an iperf3 run over the overlay, and
//! one guest gets its link back after its node's daemon is killed and restarted (QEMU reconnects).

use std::path::Path;
use std::time::{Duration, Instant};

use vessel_tests::guest::{Guest, GuestConfig, GuestImage, running_as_root};
use vessel_tests::local_cluster::eventually_within;
use vessel_tests::netns::NetnsCluster;

const MINUTE: Duration = Duration::from_secs(60);

/// QEMU arguments for a vhost-user-net NIC on `socket` (INTx: QEMU under TCG fails with MSI-X here, see
/// ENVIRONMENT.md).
fn nic(socket: &Path, mac: &str) -> Vec<String> {
    vec![
        "-chardev".to_owned(),
        format!("socket,id=vunet0,path={},reconnect=1", socket.display()),
        "-netdev".to_owned(),
        "vhost-user,id=net0,chardev=vunet0".to_owned(),
        "-device".to_owned(),
        format!("virtio-net-pci,netdev=net0,mac={mac},host_mtu=1450,vectors=0"),
    ]
}

/// Brings the guest's NIC up with `ip`/24.
fn configure(guest: &mut Guest, ip: &str) {
    guest
        .run_ok(
            &format!("ip link set eth0 up && ip addr add {ip}/24 dev eth0"),
            MINUTE,
        )
        .unwrap();
}

fn pings(guest: &mut Guest, ip: &str) -> bool {
    guest
        .run(&format!("ping -c 1 -W 2 {ip}"), MINUTE)
        .is_ok_and(|out| out.success())
}

#[test]
fn guests_on_two_nodes_talk_over_vhost_user_net_and_the_overlay() {
    if !running_as_root() {
        eprintln!("SKIPPED: guest tests need root (QEMU with shared memory, namespaces)");
        return;
    }
    let cluster = NetnsCluster::up("gnet", 2).unwrap();
    cluster
        .vessel_ok(1, &["net", "create", "blue", "--vni", "100"])
        .unwrap();
    let sockets = [
        cluster.dir().join("vm1.sock"),
        cluster.dir().join("vm2.sock"),
    ];
    let macs = ["52:54:00:00:00:01", "52:54:00:00:00:02"];
    for (node, (socket, mac)) in [1, 2].into_iter().zip(sockets.iter().zip(macs)) {
        let ip = format!("10.0.0.{node}");
        cluster
            .vessel_ok(
                node,
                &[
                    "port",
                    "create",
                    "blue",
                    "--vhost-user",
                    socket.to_str().unwrap(),
                    "--mac",
                    mac,
                    "--ip",
                    &ip,
                ],
            )
            .unwrap();
        eventually_within("the port's socket", MINUTE, || socket.exists());
    }
    let image = GuestImage::get().unwrap();
    let boot = |socket: &Path, mac: &str| {
        Guest::boot(
            &image,
            GuestConfig {
                extra_args: nic(socket, mac),
                ..GuestConfig::default()
            },
        )
        .unwrap()
    };
    let mut a = boot(&sockets[0], macs[0]);
    let mut b = boot(&sockets[1], macs[1]);
    configure(&mut a, "10.0.0.1");
    configure(&mut b, "10.0.0.2");

    let deadline = Instant::now() + 2 * MINUTE;
    while !pings(&mut a, "10.0.0.2") {
        if Instant::now() > deadline {
            let ports = cluster
                .vessel(1, &["port", "list"])
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            let link = a.run("ip -s link show eth0; cat /sys/class/net/eth0/mtu", MINUTE);
            panic!(
                "guest a never reached guest b\nports: {ports:?}\nlink: {link:?}\nlog 1: {}\nlog 2: {}",
                cluster.log(1),
                cluster.log(2)
            );
        }
    }
    assert!(pings(&mut b, "10.0.0.1"));
    b.run_ok("iperf3 -s -D", MINUTE).unwrap();
    let report = a
        .run_ok("iperf3 -c 10.0.0.2 -t 3 -f m", 2 * MINUTE)
        .unwrap();
    assert!(report.contains("receiver"), "iperf3 printed: {report}");
    eprintln!("iperf3 between the guests under TCG:\n{report}");

    // Node 2's daemon dies and comes back: QEMU reconnects to the new device, the guest's link comes back.
    cluster.kill(2).unwrap();
    cluster.start(2).unwrap();
    eventually_within(
        "guest a reaches guest b after node 2's restart",
        3 * MINUTE,
        || pings(&mut a, "10.0.0.2"),
    );
    a.shutdown().unwrap();
    b.shutdown().unwrap();
}
