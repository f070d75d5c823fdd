//! Overlay networks through the daemon, on two nodes in network namespaces (`deploy/netns-cluster`): networks and
//! tap ports made with the CLI, traffic between nodes over VXLAN, counters, a node's restart (also with its taps moved
//! into guest namespaces), a port's deletion.
//! Needs root (CI runs it as root); without it, it says so and passes.

use std::time::Duration;

use vessel_tests::local_cluster::eventually_within;
use vessel_tests::namespaces::{Netns, is_root, rx_packets, tcp_transfer};
use vessel_tests::netns::NetnsCluster;

fn pings(from: &Netns, ip: &str) -> bool {
    from.exec(&["busybox", "ping", "-c", "1", "-W", "1", ip])
        .is_ok()
}

#[test]
fn taps_on_two_nodes_talk_over_the_overlay_and_after_a_restart() {
    if !is_root() {
        return;
    }
    let cluster = NetnsCluster::up("nets", 2).unwrap();
    let (ns1, ns2) = (
        Netns::existing(&cluster.namespace(1)),
        Netns::existing(&cluster.namespace(2)),
    );
    cluster
        .vessel_ok(
            1,
            &[
                "net",
                "create",
                "blue",
                "--vni",
                "100",
                "--subnet",
                "10.0.0.0/24",
            ],
        )
        .unwrap();
    // Each node's switch creates its tap in its own namespace; the node's kernel is the "guest" here.
    cluster
        .vessel_ok(
            1,
            &["port", "create", "blue", "--tap", "vt1", "--ip", "10.0.0.1"],
        )
        .unwrap();
    cluster
        .vessel_ok(
            2,
            &["port", "create", "blue", "--tap", "vt2", "--ip", "10.0.0.2"],
        )
        .unwrap();
    for (ns, ifname, ip) in [(&ns1, "vt1", "10.0.0.1/24"), (&ns2, "vt2", "10.0.0.2/24")] {
        eventually_within(
            &format!("{ifname} exists and is up"),
            Duration::from_secs(20),
            || {
                ns.ip(&["link", "show", ifname])
                    .is_ok_and(|out| out.contains("UP"))
            },
        );
        ns.ip(&["addr", "add", ip, "dev", ifname]).unwrap();
    }
    // The MTU is the network's (1450 by default).
    assert!(
        ns1.ip(&["link", "show", "vt1"])
            .unwrap()
            .contains("mtu 1450")
    );
    eventually_within(
        "node 1 reaches node 2 over the overlay",
        Duration::from_secs(30),
        || pings(&ns1, "10.0.0.2"),
    );
    tcp_transfer(&ns1, &ns2, "10.0.0.2", 5002, 4 << 20);
    tcp_transfer(&ns2, &ns1, "10.0.0.1", 5002, 1 << 20);

    // Counters: node 1 answers for node 2's port too.
    let list = cluster
        .vessel_json(1, &["port", "list", "--network", "blue"])
        .unwrap();
    let ports = list["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 2, "{list}");
    for port in ports {
        let rx: u64 = port["counters"]["rx_bytes"].as_u64().unwrap_or(0);
        let tx: u64 = port["counters"]["tx_bytes"].as_u64().unwrap_or(0);
        assert!(rx > 1 << 20 && tx > 1 << 20, "{port}");
    }
    let metrics = ns1.http_get("http://10.99.0.1:9650/metrics").unwrap();
    assert!(
        metrics.contains("vessel_port_rx_bytes_total{port=")
            && metrics.contains("vessel_network_mac_entries{network=\"blue\"}"),
        "{metrics}"
    );

    // Node 2's daemon restarts: its tap outlives it (persistent, with its address), traffic resumes.
    cluster.kill(2).unwrap();
    assert!(
        !pings(&ns1, "10.0.0.2"),
        "answered while node 2's switch is down"
    );
    cluster.start(2).unwrap();
    eventually_within(
        "traffic resumes after node 2's restart",
        Duration::from_secs(30),
        || pings(&ns1, "10.0.0.2"),
    );
    tcp_transfer(&ns1, &ns2, "10.0.0.2", 5002, 1 << 20);

    // Deleting the port removes its tap.
    cluster.vessel_ok(1, &["port", "delete", "vt2"]).unwrap();
    eventually_within("vt2 is gone", Duration::from_secs(20), || {
        ns2.ip(&["link", "show", "vt2"]).is_err()
    });
    assert!(!pings(&ns1, "10.0.0.2"));
}

#[test]
fn guests_on_one_node_stay_in_their_network_and_a_mac_moves_between_nodes() {
    if !is_root() {
        return;
    }
    let cluster = NetnsCluster::up("netm", 2).unwrap();
    let (ns1, ns2) = (
        Netns::existing(&cluster.namespace(1)),
        Netns::existing(&cluster.namespace(2)),
    );
    for (name, vni) in [("blue", "100"), ("red", "200")] {
        cluster
            .vessel_ok(1, &["net", "create", name, "--vni", vni])
            .unwrap();
    }
    // Two networks on node 1 with the same MACs and IPs; each tap's kernel side goes to a guest namespace of its
    // own (the daemon created it in its namespace with the port's MAC and the network's MTU).
    let mac = |n: u8| format!("02:00:00:00:01:{n:02x}");
    let pid = std::process::id() % 100_000;
    let mut guests = Vec::new();
    for (network, tap, n) in [
        ("blue", "ba", 1),
        ("blue", "bb", 2),
        ("red", "ra", 1),
        ("red", "rb", 2),
    ] {
        let ip = format!("10.0.0.{n}");
        cluster
            .vessel_ok(
                1,
                &[
                    "port",
                    "create",
                    network,
                    "--tap",
                    tap,
                    "--ip",
                    &ip,
                    "--mac",
                    &mac(n),
                ],
            )
            .unwrap();
        eventually_within(&format!("{tap} exists"), Duration::from_secs(20), || {
            ns1.ip(&["link", "show", tap]).is_ok()
        });
        let guest = Netns::new(&format!("vsl-g{tap}-{pid}")).unwrap();
        ns1.give(tap, &guest).unwrap();
        guest
            .configure(tap, &format!("{ip}/24"), 1450, None)
            .unwrap();
        guests.push(guest);
    }
    let (blue_a, blue_b, red_a, red_b) = (&guests[0], &guests[1], &guests[2], &guests[3]);
    let quiet_red = rx_packets(red_b, "rb");
    eventually_within(
        "blue's guests reach each other",
        Duration::from_secs(20),
        || pings(blue_a, "10.0.0.2"),
    );
    tcp_transfer(blue_a, blue_b, "10.0.0.2", 5002, 2 << 20);
    assert_eq!(
        rx_packets(red_b, "rb"),
        quiet_red,
        "blue's frames reached red"
    );
    eventually_within(
        "red's guests reach each other",
        Duration::from_secs(20),
        || pings(red_a, "10.0.0.2"),
    );

    // Node 1's daemon restarts: it finds the taps in the guests' namespaces (by name and MAC) and adopts them
    // there, rather than making new ones of those names in its own.
    cluster.kill(1).unwrap();
    cluster.start(1).unwrap();
    for (guest, what) in [(blue_a, "blue"), (red_a, "red")] {
        eventually_within(
            &format!("{what}'s guests reach each other after node 1's restart"),
            Duration::from_secs(30),
            || pings(guest, "10.0.0.2"),
        );
    }
    for tap in ["ba", "bb", "ra", "rb"] {
        assert!(
            ns1.ip(&["link", "show", tap]).is_err(),
            "{tap} was made again in node 1's namespace"
        );
    }

    // Blue's 10.0.0.2 moves to node 2: the port is deleted on node 1 and made again, same MAC and IP, on node 2.
    // Blue's guest on node 1 keeps its ARP entry, so its frames go to the MAC, which node 1 now sends over VXLAN.
    cluster.vessel_ok(1, &["port", "delete", "bb"]).unwrap();
    eventually_within(
        "bb is gone from its guest's namespace",
        Duration::from_secs(20),
        || blue_b.ip(&["link", "show", "bb"]).is_err(),
    );
    cluster
        .vessel_ok(
            2,
            &[
                "port",
                "create",
                "blue",
                "--tap",
                "bb2",
                "--ip",
                "10.0.0.2",
                "--mac",
                &mac(2),
            ],
        )
        .unwrap();
    eventually_within("bb2 exists", Duration::from_secs(20), || {
        ns2.ip(&["link", "show", "bb2"]).is_ok()
    });
    ns2.ip(&["addr", "add", "10.0.0.2/24", "dev", "bb2"])
        .unwrap();
    eventually_within(
        "blue's 10.0.0.2 answers from node 2",
        Duration::from_secs(30),
        || pings(blue_a, "10.0.0.2"),
    );
    tcp_transfer(blue_a, &ns2, "10.0.0.2", 5002, 1 << 20);
    assert!(rx_packets(&ns2, "bb2") > 0);
    assert!(
        rx_packets(red_b, "rb") > quiet_red,
        "red's traffic went missing"
    );
}
