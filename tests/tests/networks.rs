//! Networks and ports through the admin CLI against a real single-node daemon: the spellings DESIGN.md fixes, each
//! refusal's one-line message and exit code, `--output json`, and state that survives a restart. The data plane is
//! not wired to this state yet, so nothing here sends a frame.

use std::process::Output;

use serde_json::Value;
use vessel_tests::daemon::{Daemon, DaemonOptions, test_dir};
use vessel_tests::namespaces::Netns;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Options for a test's daemon: as root, it runs in a network namespace of its own, so that the taps its switch
/// creates for tap ports vanish with the namespace (dropped after the daemon: declare it first).
fn isolated(test: &str) -> (Option<Netns>, DaemonOptions) {
    if !is_root() {
        return (None, DaemonOptions::default());
    }
    let netns = Netns::new(&format!("vsl-{test}-{}", std::process::id())).unwrap();
    let options = DaemonOptions {
        netns: Some(netns.0.clone()),
        ..DaemonOptions::default()
    };
    (Some(netns), options)
}

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

fn fails(daemon: &Daemon, args: &[&str], code: i32, message: &str) {
    assert_fails(&daemon.vessel(args).unwrap(), code, message);
}

/// Rows of a table printed by the CLI, split on whitespace, without the header.
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().map(str::to_owned).collect())
        .collect()
}

#[test]
fn network_lifecycle_errors_and_json() {
    let dir = test_dir("net_lifecycle").unwrap();
    let (_netns, options) = isolated("netlife");
    let daemon = Daemon::start(&dir, options).unwrap();

    let created = daemon
        .vessel_ok(&[
            "net",
            "create",
            "blue",
            "--vni",
            "100",
            "--subnet",
            "10.0.0.0/24",
        ])
        .unwrap();
    assert_eq!(
        created.trim(),
        "network blue created (id 1, VNI 100, MTU 1450, subnet 10.0.0.0/24)"
    );
    let red = daemon
        .vessel_json(&["net", "create", "red", "--vni", "200", "--mtu", "8950"])
        .unwrap();
    assert_eq!(red["id"], 2);
    assert_eq!(red["mtu"], 8950);
    assert_eq!(red["subnet"], "");

    fails(
        &daemon,
        &["net", "create", "blue", "--vni", "101"],
        4,
        "network 'blue' already exists; choose another name",
    );
    fails(
        &daemon,
        &["net", "create", "green", "--vni", "100"],
        4,
        "VNI 100 is already used by network 'blue'; choose another VNI",
    );
    fails(
        &daemon,
        &["net", "create", "green", "--vni", "0"],
        2,
        "VNI 0 is out of range; use 1 to 16777215",
    );
    fails(
        &daemon,
        &["net", "create", "green", "--vni", "16777216"],
        2,
        "VNI 16777216 is out of range; use 1 to 16777215",
    );
    fails(
        &daemon,
        &["net", "create", "green", "--vni", "5", "--mtu", "9000"],
        2,
        "MTU 9000 is out of range; use 68 to 8950",
    );
    fails(
        &daemon,
        &["net", "create", "green", "--vni", "5", "--mtu", "70000"],
        2,
        "MTU 70000 is out of range; use 68 to 8950",
    );
    fails(
        &daemon,
        &[
            "net",
            "create",
            "green",
            "--vni",
            "5",
            "--subnet",
            "10.0.0.1/24",
        ],
        2,
        "invalid subnet: 10.0.0.1/24 has host bits set; the network address for /24 is 10.0.0.0",
    );
    fails(
        &daemon,
        &[
            "net", "create", "green", "--vni", "5", "--subnet", "10.0.0.0",
        ],
        2,
        "'10.0.0.0' is not a subnet: write it as ADDRESS/PREFIX",
    );
    fails(
        &daemon,
        &[
            "net",
            "create",
            "green",
            "--vni",
            "5",
            "--subnet",
            "10.0.0.0/40",
        ],
        2,
        "prefix length 40 is out of range; use 0 to 32",
    );
    fails(
        &daemon,
        &["net", "create", "no/slash", "--vni", "5"],
        2,
        "is not a valid network name",
    );
    fails(
        &daemon,
        &["net", "create", "123", "--vni", "5"],
        2,
        "it looks like an id",
    );
    fails(
        &daemon,
        &["net", "show", "nope"],
        3,
        "network 'nope' not found; `vessel net list` shows the networks",
    );
    fails(
        &daemon,
        &["net", "delete", "nope"],
        3,
        "network 'nope' not found",
    );

    let table = daemon.vessel_ok(&["net", "list"]).unwrap();
    assert!(table.starts_with("NAME"), "{table}");
    assert_eq!(
        rows(&table),
        [
            ["blue", "1", "100", "1450", "10.0.0.0/24", "0", "-"],
            ["red", "2", "200", "8950", "-", "0", "-"],
        ]
    );
    let list = daemon.vessel_json(&["net", "list"]).unwrap();
    let networks = list["networks"].as_array().unwrap();
    assert_eq!(networks.len(), 2);
    assert_eq!(networks[0]["name"], "blue");
    assert_eq!(networks[0]["vni"], 100);
    assert_eq!(networks[0]["subnet"], "10.0.0.0/24");
    assert_eq!(networks[0]["port_count"], 0);

    // By name or id.
    let shown = daemon.vessel_json(&["net", "show", "2"]).unwrap();
    assert_eq!(shown["name"], "red");
    let shown = daemon.vessel_ok(&["net", "show", "blue"]).unwrap();
    assert!(shown.starts_with("Network blue\n"), "{shown}");
    assert!(shown.contains("subnet:       10.0.0.0/24"), "{shown}");
    assert!(
        shown.contains("nodes:        none (no ports yet)"),
        "{shown}"
    );

    let error = daemon
        .vessel(&["net", "show", "nope", "--output", "json"])
        .unwrap();
    let parsed: Value = serde_json::from_slice(&error.stdout).unwrap();
    assert_eq!(parsed["error"]["kind"], "not_found");

    let deleted = daemon.vessel_ok(&["net", "delete", "red"]).unwrap();
    assert_eq!(deleted.trim(), "network red deleted");
    // Ids are never reused: a new network after a deletion gets a new one.
    let green = daemon
        .vessel_json(&["net", "create", "green", "--vni", "200"])
        .unwrap();
    assert_eq!(green["id"], 3);
}

#[test]
fn port_lifecycle_errors_and_json() {
    let dir = test_dir("net_ports").unwrap();
    let (netns, options) = isolated("netports");
    let daemon = Daemon::start(&dir, options).unwrap();
    let vm1 = dir.join("vm1.sock");
    let vm1 = vm1.to_str().unwrap();
    let db1 = dir.join("db1.sock");
    let db1 = db1.to_str().unwrap();
    daemon
        .vessel_ok(&[
            "net",
            "create",
            "blue",
            "--vni",
            "100",
            "--subnet",
            "10.0.0.0/24",
        ])
        .unwrap();
    daemon
        .vessel_ok(&["net", "create", "red", "--vni", "200"])
        .unwrap();
    let node = daemon.vessel_json(&["cluster", "status"]).unwrap()["node_id"].clone();

    let created = daemon
        .vessel_ok(&[
            "port",
            "create",
            "blue",
            "--tap",
            "vtap1",
            "--mac",
            "52:54:00:12:34:56",
            "--ip",
            "10.0.0.5",
        ])
        .unwrap();
    assert!(
        created.starts_with("port 1 created: tap vtap1 in network blue on node "),
        "{created}"
    );
    assert!(
        created
            .trim_end()
            .ends_with("(MAC 52:54:00:12:34:56, IP 10.0.0.5)"),
        "{created}"
    );

    let guest = daemon
        .vessel_json(&[
            "port",
            "create",
            "blue",
            "--vhost-user",
            vm1,
            "--queues",
            "4",
            "--socket-mode",
            "660",
        ])
        .unwrap();
    assert_eq!(guest["id"], 2);
    assert_eq!(guest["kind"], "vhost-user");
    assert_eq!(guest["vhost_user_socket"], vm1);
    assert_eq!(guest["tap"], "");
    assert_eq!(guest["queues"], 4);
    assert_eq!(guest["socket_mode"], 0o660);
    assert_eq!(guest["network"], "blue");
    assert_eq!(guest["node_id"], node);
    assert_eq!(guest["ip"], "");
    assert_eq!(guest["allow_any_mac"], false);
    // A generated MAC is unicast and locally administered.
    let mac = guest["mac"].as_str().unwrap();
    let first = u8::from_str_radix(&mac[..2], 16).unwrap();
    assert_eq!(first & 0x03, 0x02, "{mac}");
    assert_eq!(mac.len(), 17, "{mac}");

    // The same MAC and IP are free in another network; any address goes where there is no subnet.
    let red = daemon
        .vessel_json(&[
            "port",
            "create",
            "red",
            "--tap",
            "vtap2",
            "--mac",
            "52:54:00:12:34:56",
            "--ip",
            "10.0.0.5",
            "--allow-any-mac",
        ])
        .unwrap();
    assert_eq!(red["id"], 3);
    assert_eq!(red["allow_any_mac"], true);
    // The node's switch follows before the command returns: the device is there now.
    if let Some(netns) = &netns {
        assert!(netns.ip(&["link", "show", "vtap2"]).is_ok());
    }

    fails(
        &daemon,
        &["port", "create", "nope", "--tap", "t9"],
        3,
        "network 'nope' not found",
    );
    fails(
        &daemon,
        &["port", "create", "blue", "--tap", "t9", "--ip", "10.0.1.5"],
        2,
        "10.0.1.5 is outside network 'blue''s subnet 10.0.0.0/24; give an address in 10.0.0.0/24",
    );
    fails(
        &daemon,
        &[
            "port",
            "create",
            "blue",
            "--tap",
            "t9",
            "--ip",
            "10.0.0.255",
        ],
        2,
        "10.0.0.255 is the network or broadcast address of network 'blue''s subnet 10.0.0.0/24",
    );
    fails(
        &daemon,
        &["port", "create", "blue", "--tap", "t9", "--ip", "10.0.0.5"],
        4,
        "10.0.0.5 is already used by port 1 of network 'blue'; give another address",
    );
    fails(
        &daemon,
        &[
            "port",
            "create",
            "blue",
            "--tap",
            "t9",
            "--ip",
            "10.0.0.300",
        ],
        2,
        "'10.0.0.300' is not an IPv4 address",
    );
    fails(
        &daemon,
        &[
            "port",
            "create",
            "blue",
            "--tap",
            "t9",
            "--mac",
            "52:54:00:12:34:56",
        ],
        4,
        "MAC 52:54:00:12:34:56 is already used by port 1 of network 'blue'",
    );
    fails(
        &daemon,
        &[
            "port",
            "create",
            "blue",
            "--tap",
            "t9",
            "--mac",
            "01:00:5e:00:00:01",
        ],
        2,
        "MAC 01:00:5e:00:00:01 is a multicast or all-zero address",
    );
    fails(
        &daemon,
        &[
            "port",
            "create",
            "blue",
            "--tap",
            "t9",
            "--mac",
            "52:54:00:12:34",
        ],
        2,
        "'52:54:00:12:34' is not a MAC address",
    );
    fails(
        &daemon,
        &["port", "create", "blue", "--tap", "a-very-long-name"],
        2,
        "'a-very-long-name' is not a valid tap device name: it is longer than 15 bytes (IFNAMSIZ)",
    );
    fails(
        &daemon,
        &["port", "create", "red", "--tap", "vtap1"],
        4,
        "tap 'vtap1' on node",
    );
    fails(
        &daemon,
        &["port", "create", "red", "--vhost-user", vm1],
        4,
        &format!("vhost-user socket {vm1} on node"),
    );
    fails(
        &daemon,
        &["port", "create", "blue", "--tap", "t9", "--queues", "17"],
        2,
        "17 queues is out of range for a port; use 1 to 16",
    );
    fails(
        &daemon,
        &[
            "port",
            "create",
            "blue",
            "--vhost-user",
            "/tmp/x.sock",
            "--socket-mode",
            "666",
        ],
        2,
        "socket mode 0666 would make the socket world-writable",
    );
    // A vhost-user socket is one device: a volume and a port never share one.
    daemon
        .vessel_ok(&["volume", "create", "db1", "--size", "64M"])
        .unwrap();
    daemon
        .vessel_ok(&["volume", "attach", "db1", "--vhost-user", db1])
        .unwrap();
    fails(
        &daemon,
        &["port", "create", "blue", "--vhost-user", db1],
        4,
        "is already used by volume 'db1'; choose another path",
    );
    daemon.vessel_ok(&["volume", "detach", "db1"]).unwrap();
    fails(
        &daemon,
        &["volume", "attach", "db1", "--vhost-user", vm1],
        4,
        "is already used by port 2 of network 'blue'; choose another path",
    );
    // Exactly one of --vhost-user and --tap (clap's own usage error, exit 2).
    for args in [
        &["port", "create", "blue"][..],
        &[
            "port",
            "create",
            "blue",
            "--tap",
            "t9",
            "--vhost-user",
            "/tmp/y.sock",
        ][..],
    ] {
        let output = daemon.vessel(args).unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
    }

    // Lists: a table and JSON. As root, the ports are plugged into the switch a moment after the commit.
    if is_root() {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while daemon.vessel_json(&["port", "list"]).unwrap()["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|port| port["counters"].is_null())
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the ports are never served"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    let table = daemon.vessel_ok(&["port", "list"]).unwrap();
    assert!(table.starts_with("ID"), "{table}");
    let listed = rows(&table);
    assert_eq!(listed.len(), 3, "{table}");
    assert_eq!(listed[0][1], "blue");
    assert_eq!(
        listed[0][3..9],
        ["tap", "vtap1", "1", "52:54:00:12:34:56", "10.0.0.5", "no"]
    );
    // Traffic counters: none yet on ports the switch serves (as root); "-" for a port it does not serve (a tap,
    // without root).
    if is_root() {
        assert_eq!(listed[0][9..], ["0", "0", "0"], "{table}");
        assert_eq!(listed[1][9..], ["0", "0", "0"], "{table}");
    } else {
        assert_eq!(listed[0][9..], ["-", "-", "-"], "{table}");
    }
    assert_eq!(listed[1][3..6], ["vhost-user", vm1, "4"]);
    assert_eq!(listed[2][1], "red");
    assert_eq!(listed[2][8], "yes");
    let blue = daemon
        .vessel_json(&["port", "list", "--network", "blue"])
        .unwrap();
    let ports = blue["ports"].as_array().unwrap();
    assert_eq!(
        ports
            .iter()
            .map(|p| p["id"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2]
    );
    fails(
        &daemon,
        &["port", "list", "--network", "nope"],
        3,
        "network 'nope' not found",
    );

    // A port is named by its id, its socket path or its tap name.
    assert_eq!(
        daemon.vessel_json(&["port", "show", "1"]).unwrap()["tap"],
        "vtap1"
    );
    assert_eq!(
        daemon.vessel_json(&["port", "show", "vtap2"]).unwrap()["id"],
        3
    );
    assert_eq!(daemon.vessel_json(&["port", "show", vm1]).unwrap()["id"], 2);
    let shown = daemon.vessel_ok(&["port", "show", "vtap1"]).unwrap();
    assert!(shown.starts_with("Port 1\n"), "{shown}");
    assert!(shown.contains("mac:          52:54:00:12:34:56"), "{shown}");
    assert!(shown.contains("ip:           10.0.0.5"), "{shown}");
    fails(
        &daemon,
        &["port", "show", "99"],
        3,
        "port '99' not found; `vessel port list` shows the ports",
    );
    fails(
        &daemon,
        &["port", "show", "nosuchtap"],
        3,
        "port 'nosuchtap' not found",
    );
    fails(
        &daemon,
        &["port", "delete", "/run/none.sock"],
        3,
        "port '/run/none.sock' not found",
    );

    // The network knows its ports and the nodes that serve them.
    let network = daemon.vessel_json(&["net", "show", "blue"]).unwrap();
    assert_eq!(network["port_count"], 2);
    assert_eq!(network["node_ids"], Value::Array(vec![node.clone()]));
    assert_eq!(network["ports"].as_array().unwrap().len(), 2);
    let shown = daemon.vessel_ok(&["net", "show", "blue"]).unwrap();
    assert!(shown.contains("Ports\nID"), "{shown}");

    // A network with ports is deleted only with --force, which takes its ports.
    fails(
        &daemon,
        &["net", "delete", "blue"],
        5,
        "network 'blue' still has 2 port(s); delete them first (`vessel port list --network blue`), or delete the \
         network with --force to delete them too",
    );
    let deleted = daemon.vessel_ok(&["port", "delete", "vtap2"]).unwrap();
    assert!(
        deleted.starts_with("port 3 deleted: tap vtap2 in network red"),
        "{deleted}"
    );
    // And gone now.
    if let Some(netns) = &netns {
        assert!(netns.ip(&["link", "show", "vtap2"]).is_err());
    }
    assert_eq!(
        daemon.vessel_ok(&["net", "delete", "red"]).unwrap().trim(),
        "network red deleted"
    );
    let forced = daemon
        .vessel_json(&["net", "delete", "blue", "--force"])
        .unwrap();
    assert_eq!(forced["name"], "blue");
    assert_eq!(forced["deleted_ports"].as_array().unwrap().len(), 2);
    assert_eq!(
        daemon.vessel_json(&["port", "list"]).unwrap()["ports"],
        Value::Array(vec![])
    );
    // The socket is free for a volume again.
    daemon
        .vessel_ok(&["volume", "attach", "db1", "--vhost-user", vm1])
        .unwrap();
    daemon.vessel_ok(&["volume", "detach", "db1"]).unwrap();

    // A socket directory that does not exist yet (/run/vessel after a reboot) is made; one that cannot be is the
    // caller's error, and no port is created.
    daemon
        .vessel_ok(&["net", "create", "green", "--vni", "300"])
        .unwrap();
    let fresh = dir.join("run").join("vessel").join("vm9.sock");
    daemon
        .vessel_ok(&[
            "port",
            "create",
            "green",
            "--vhost-user",
            fresh.to_str().unwrap(),
        ])
        .unwrap();
    assert!(fresh.parent().unwrap().is_dir());
    let blocker = dir.join("a-file");
    std::fs::write(&blocker, b"").unwrap();
    let blocked = blocker.join("vm10.sock");
    fails(
        &daemon,
        &[
            "port",
            "create",
            "green",
            "--vhost-user",
            blocked.to_str().unwrap(),
        ],
        2,
        "cannot create the directory of socket",
    );
    assert_eq!(
        daemon.vessel_json(&["port", "list"]).unwrap()["ports"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn networks_and_ports_survive_a_restart() {
    let dir = test_dir("net_restart").unwrap();
    let (_netns, options) = isolated("netrestart");
    let mut daemon = Daemon::start(&dir, options).unwrap();
    let vm1 = dir.join("vm1.sock");
    let vm1 = vm1.to_str().unwrap();
    daemon
        .vessel_ok(&[
            "net",
            "create",
            "blue",
            "--vni",
            "100",
            "--subnet",
            "10.0.0.0/24",
            "--mtu",
            "1400",
        ])
        .unwrap();
    daemon
        .vessel_ok(&[
            "port",
            "create",
            "blue",
            "--vhost-user",
            vm1,
            "--ip",
            "10.0.0.2",
            "--queues",
            "2",
        ])
        .unwrap();
    daemon
        .vessel_ok(&["port", "create", "blue", "--tap", "vtap1"])
        .unwrap();
    daemon.vessel_ok(&["port", "delete", "vtap1"]).unwrap();
    let networks = daemon.vessel_json(&["net", "list"]).unwrap();
    let ports = daemon.vessel_json(&["port", "list"]).unwrap();

    daemon.restart().unwrap();
    assert_eq!(daemon.vessel_json(&["net", "list"]).unwrap(), networks);
    assert_eq!(daemon.vessel_json(&["port", "list"]).unwrap(), ports);
    let port = daemon.vessel_json(&["port", "show", vm1]).unwrap();
    assert_eq!(port["ip"], "10.0.0.2");
    assert_eq!(port["queues"], 2);
    // The id counter survives too: the deleted port's id is not handed out again.
    let next = daemon
        .vessel_json(&["port", "create", "blue", "--tap", "vtap1"])
        .unwrap();
    assert_eq!(next["id"], 3);
    fails(
        &daemon,
        &["port", "create", "blue", "--vhost-user", vm1],
        4,
        "already used by port 1",
    );
}

/// A 42-byte ARP request from `mac`/`ip` for `target`.
fn arp_request(mac: [u8; 6], ip: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&target);
    frame
}

#[test]
fn a_guest_nic_on_a_vhost_user_port_talks_to_a_tap() {
    if !is_root() {
        eprintln!("skipped: needs root (tap devices, a network namespace); CI runs it as root");
        return;
    }
    let dir = test_dir("net_vhost").unwrap();
    let (netns, options) = isolated("netvhost");
    let netns = netns.unwrap();
    let daemon = Daemon::start(&dir, options).unwrap();
    daemon
        .vessel_ok(&[
            "net",
            "create",
            "blue",
            "--vni",
            "100",
            "--subnet",
            "10.0.0.0/24",
        ])
        .unwrap();
    let socket = dir.join("vm1.sock");
    let (guest_mac, tap_mac) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    daemon
        .vessel_ok(&[
            "port",
            "create",
            "blue",
            "--vhost-user",
            socket.to_str().unwrap(),
            "--ip",
            "10.0.0.1",
            "--mac",
            "02:00:00:00:00:01",
        ])
        .unwrap();
    daemon
        .vessel_ok(&[
            "port",
            "create",
            "blue",
            "--tap",
            "vt2",
            "--ip",
            "10.0.0.2",
            "--mac",
            "02:00:00:00:00:02",
        ])
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while netns.ip(&["link", "show", "vt2"]).is_err() {
        assert!(std::time::Instant::now() < deadline, "vt2 never appeared");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    netns
        .ip(&["addr", "add", "10.0.0.2/24", "dev", "vt2"])
        .unwrap();
    // No VM yet: the port says its socket waits for one.
    let shown = daemon
        .vessel_json(&["port", "show", socket.to_str().unwrap()])
        .unwrap();
    assert_eq!(shown["counters"]["frontend_connected"], false, "{shown}");
    let text = daemon
        .vessel_ok(&["port", "show", socket.to_str().unwrap()])
        .unwrap();
    assert!(text.contains("none connected"), "{text}");
    let mut nic = vessel_tests::net_driver::NetDriver::connect(&socket).unwrap();
    let wait = std::time::Duration::from_secs(5);

    // The guest's ARP for the tap's IP is answered by the switch, which knows the port's address.
    nic.send(&arp_request(guest_mac, [10, 0, 0, 1], [10, 0, 0, 2]))
        .unwrap();
    let reply = loop {
        let frame = nic.receive(wait).unwrap().expect("no ARP reply");
        if frame.len() >= 42 && frame[12..14] == [0x08, 0x06] && frame[20..22] == [0, 2] {
            break frame;
        }
    };
    assert_eq!(reply[22..28], tap_mac, "the reply names the tap's MAC");
    assert_eq!(reply[28..32], [10, 0, 0, 2]);

    // An echo request reaches the tap's kernel, whose reply comes back to the guest.
    let mut echo = Vec::new();
    etherparse::PacketBuilder::ethernet2(guest_mac, tap_mac)
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .icmpv4_echo_request(9, 1)
        .write(&mut echo, b"vessel over vhost-user")
        .unwrap();
    nic.send(&echo).unwrap();
    loop {
        let frame = nic.receive(wait).unwrap().expect("no echo reply");
        let Ok(packet) = etherparse::SlicedPacket::from_ethernet(&frame) else {
            continue;
        };
        if let Some(etherparse::TransportSlice::Icmpv4(icmp)) = &packet.transport
            && matches!(icmp.icmp_type(), etherparse::Icmpv4Type::EchoReply(e) if e.id == 9)
        {
            assert_eq!(frame[..6], guest_mac);
            break;
        }
    }
    let shown = daemon
        .vessel_json(&["port", "show", socket.to_str().unwrap()])
        .unwrap();
    let counters = &shown["counters"];
    assert!(
        counters["rx_packets"].as_u64().unwrap_or(0) >= 2
            && counters["tx_packets"].as_u64().unwrap_or(0) >= 2,
        "{shown}"
    );
    assert_eq!(counters["frontend_connected"], true, "{shown}");
    let metrics = netns
        .http_get(&format!(
            "http://{}/metrics",
            daemon.metrics_addr().unwrap()
        ))
        .unwrap();
    let connected = metrics
        .lines()
        .find(|line| line.starts_with("vessel_port_frontend_connected{"))
        .unwrap_or_default();
    assert!(connected.ends_with(" 1"), "{metrics}");
    // Deleting the port stops its device: the socket goes.
    drop(nic);
    daemon
        .vessel_ok(&["port", "delete", socket.to_str().unwrap()])
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while socket.exists() {
        assert!(std::time::Instant::now() < deadline, "the socket stays");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
