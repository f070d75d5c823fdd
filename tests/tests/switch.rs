//! The switching core (vnet's `Datapath`) end to end, with real tap devices and a real VXLAN
//! underlay, in network namespaces: "guest" namespaces hold the taps' kernel side (an interface
//! with an address, as a VM's NIC would be), "node" namespaces hold a switch each. Needs root;
//! without it each test says so and passes.

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vessel_tests::bench::cpu_time;
use vessel_tests::namespaces::{Netns, is_root, rx_packets, tcp_transfer, veth};
use vnet::offload::VirtioNetHeader;
use vnet::switch::{NetworkConfig, PortConfig, SwitchConfig};
use vnet::{Datapath, FrameSink, Mac, NetworkId, PortId, Tap, Vni};

/// Unique names per test and process (interface names are at most 15 bytes).
fn names(test: &str) -> impl Fn(&str) -> String {
    let tag = format!("{}{}", test, std::process::id() % 100_000);
    move |what: &str| format!("vn{tag}{what}")
}

const NET_A: NetworkId = NetworkId(1);
const NET_B: NetworkId = NetworkId(2);

fn mac(last: u8) -> Mac {
    Mac([0x02, 0, 0, 0, 0, last])
}

/// A tap made in `node`'s namespace and moved into `guest`'s, where it gets `mac` and `ip`/24.
fn guest_tap(node: &Netns, guest: &Netns, name: &str, mac: Mac, ip: &str) -> Tap {
    let tap = node.enter(|| Tap::open(name, 2).expect("tap")).unwrap();
    node.give(name, guest).unwrap();
    guest
        .configure(name, &format!("{ip}/24"), 1450, Some(&mac.to_string()))
        .unwrap();
    tap
}

fn port(id: u64, network: NetworkId, mac: Mac, ip: &str) -> PortConfig {
    PortConfig {
        id: PortId(id),
        network,
        mac,
        ipv4: Some(ip.parse().unwrap()),
        allow_any_mac: false,
    }
}

fn network(id: NetworkId, vni: u32) -> NetworkConfig {
    NetworkConfig {
        id,
        vni: Vni::new(vni).unwrap(),
        mtu: 1450,
    }
}

fn ping(from: &Netns, to: &str) {
    from.exec(&["busybox", "ping", "-c", "3", "-W", "2", to])
        .unwrap();
}

#[test]
fn two_taps_on_one_switch_ping_and_talk_tcp() {
    if !is_root() {
        return;
    }
    let name = names("a");
    let node = Netns::new(&name("n")).unwrap();
    let (g1, g2) = (
        Netns::new(&name("g1")).unwrap(),
        Netns::new(&name("g2")).unwrap(),
    );
    let underlay = node
        .enter(|| UdpSocket::bind("127.0.0.1:0").unwrap())
        .unwrap();
    let datapath = Datapath::start(underlay, SwitchConfig::default()).unwrap();
    datapath
        .configure()
        .add_network(network(NET_A, 100))
        .unwrap();
    let tap1 = guest_tap(&node, &g1, &name("t1"), mac(1), "10.0.0.1");
    let tap2 = guest_tap(&node, &g2, &name("t2"), mac(2), "10.0.0.2");
    datapath
        .add_tap(port(1, NET_A, mac(1), "10.0.0.1"), tap1)
        .unwrap();
    datapath
        .add_tap(port(2, NET_A, mac(2), "10.0.0.2"), tap2)
        .unwrap();

    ping(&g1, "10.0.0.2");
    tcp_transfer(&g1, &g2, "10.0.0.2", 5001, 8 << 20);
    // The stream made the core poll; with the traffic gone it sleeps in epoll again (the window
    // is 50 µs; this process runs nothing else).
    std::thread::sleep(Duration::from_millis(20));
    let before = cpu_time(std::process::id()).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let used = cpu_time(std::process::id()).unwrap() - before;
    assert!(
        used < Duration::from_millis(50),
        "the switch used {used:?} of CPU in 500 ms with no traffic"
    );
    let (one, two) = {
        let switch = datapath.switch();
        (
            switch.port_stats(PortId(1)).unwrap(),
            switch.port_stats(PortId(2)).unwrap(),
        )
    };
    assert!(one.rx_bytes > 8 << 20, "{one:?}");
    assert!(two.tx_bytes > 8 << 20 && two.rx_packets > 0, "{two:?}");
    // With segmentation offload the 8 MiB cross in far fewer frames than 1450-byte ones would be.
    assert!(one.rx_packets < (8 << 20) / 1450, "{one:?}");
    // g1's ARP for 10.0.0.2 was answered by the switch: the port's IP is known.
    assert_eq!(one.total_drops(), 0, "{one:?}");

    // Unplugged, port 2 is unreachable.
    datapath.remove_port(PortId(2)).unwrap();
    let failed = Command::new("ip")
        .args([
            "netns", "exec", &g1.0, "busybox", "ping", "-c", "1", "-W", "1",
        ])
        .arg("10.0.0.2")
        .output()
        .unwrap();
    assert!(!failed.status.success());
}

#[test]
fn networks_span_two_nodes_over_vxlan_and_never_mix() {
    if !is_root() {
        return;
    }
    let name = names("b");
    let (n1, n2) = (
        Netns::new(&name("n1")).unwrap(),
        Netns::new(&name("n2")).unwrap(),
    );
    // The underlay: a veth between the two node namespaces.
    veth(&n1, "ul", &n2, "ul").unwrap();
    n1.configure("ul", "10.200.0.1/24", 1500, None).unwrap();
    n2.configure("ul", "10.200.0.2/24", 1500, None).unwrap();
    let vtep1: SocketAddr = "10.200.0.1:4789".parse().unwrap();
    let vtep2: SocketAddr = "10.200.0.2:4789".parse().unwrap();
    let switch1 = Datapath::start(
        n1.enter(|| UdpSocket::bind(vtep1).unwrap()).unwrap(),
        SwitchConfig::default(),
    )
    .unwrap();
    let switch2 = Datapath::start(
        n2.enter(|| UdpSocket::bind(vtep2).unwrap()).unwrap(),
        SwitchConfig::default(),
    )
    .unwrap();
    // Two networks with the same MACs and IPs: a and b on node 1, c and d on node 2.
    let guests: Vec<Netns> = ["ga", "gb", "gc", "gd"]
        .iter()
        .map(|g| Netns::new(&name(g)).unwrap())
        .collect();
    for (datapath, other) in [(&switch1, vtep2), (&switch2, vtep1)] {
        let mut switch = datapath.configure();
        for (net, vni) in [(NET_A, 100), (NET_B, 200)] {
            switch.add_network(network(net, vni)).unwrap();
            switch.set_vteps(net, vec![other]).unwrap();
        }
    }
    let plug = |datapath: &Datapath, node: &Netns, guest: &Netns, id, net, last, ip| {
        let tap = guest_tap(node, guest, &name(&format!("t{id}")), mac(last), ip);
        datapath.add_tap(port(id, net, mac(last), ip), tap).unwrap();
    };
    plug(&switch1, &n1, &guests[0], 1, NET_A, 1, "10.0.0.1");
    plug(&switch1, &n1, &guests[1], 2, NET_B, 1, "10.0.0.1");
    plug(&switch2, &n2, &guests[2], 3, NET_A, 2, "10.0.0.2");
    plug(&switch2, &n2, &guests[3], 4, NET_B, 2, "10.0.0.2");
    let ifname = |id: u64| name(&format!("t{id}"));

    // Network A's traffic reaches A's other guest only (TCP is cut into segments for the
    // underlay: the taps hand over 64 KiB frames).
    let quiet_b = rx_packets(&guests[3], &ifname(4));
    ping(&guests[0], "10.0.0.2");
    tcp_transfer(&guests[0], &guests[2], "10.0.0.2", 5001, 4 << 20);
    assert_eq!(
        rx_packets(&guests[3], &ifname(4)),
        quiet_b,
        "a frame of network A reached network B"
    );
    // And B's, B's.
    let quiet_a = rx_packets(&guests[2], &ifname(3));
    ping(&guests[1], "10.0.0.2");
    tcp_transfer(&guests[3], &guests[1], "10.0.0.1", 5001, 1 << 20);
    assert_eq!(
        rx_packets(&guests[2], &ifname(3)),
        quiet_a,
        "a frame of network B reached network A"
    );

    // The underlay drops what it cannot place: an unknown VNI, a header without the I flag, a
    // datagram too short for a header.
    let before = switch2.switch().underlay_stats();
    n1.enter(|| {
        let socket = UdpSocket::bind("10.200.0.1:0").unwrap();
        let mut frame = vec![0u8; 8 + 60];
        frame[..8].copy_from_slice(&vnet::vxlan::encode(Vni::new(999).unwrap()));
        socket.send_to(&frame, vtep2).unwrap();
        frame[0] = 0;
        socket.send_to(&frame, vtep2).unwrap();
        socket.send_to(&[1, 2, 3], vtep2).unwrap();
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let after = switch2.switch().underlay_stats();
        if after.total_drops() >= before.total_drops() + 3 {
            use vnet::DropReason::{UnknownVni, VxlanNoVni, VxlanTooShort};
            for reason in [UnknownVni, VxlanNoVni, VxlanTooShort] {
                assert_eq!(after.drops(reason), before.drops(reason) + 1, "{reason:?}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "drops not counted: {after:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The switch still forwards afterwards.
    ping(&guests[0], "10.0.0.2");
}

/// A virtual port's far side that keeps what it is given, visible once flushed.
#[derive(Default)]
struct Recorder {
    pushed: Mutex<Vec<Vec<u8>>>,
    flushed: Mutex<Vec<Vec<u8>>>,
}

impl FrameSink for Recorder {
    fn push(&self, header: &VirtioNetHeader, frame: &[u8]) -> bool {
        assert!(
            !header.is_gso(),
            "a GSO frame reached a sink that takes none"
        );
        self.pushed.lock().unwrap().push(frame.to_vec());
        true
    }

    fn flush(&self) {
        let pushed = std::mem::take(&mut *self.pushed.lock().unwrap());
        self.flushed.lock().unwrap().extend(pushed);
    }

    fn accepts_gso(&self, _header: &VirtioNetHeader) -> bool {
        false
    }
}

#[test]
fn a_virtual_port_and_a_tap_talk() {
    if !is_root() {
        return;
    }
    let name = names("c");
    let node = Netns::new(&name("n")).unwrap();
    let guest = Netns::new(&name("g")).unwrap();
    let underlay = node
        .enter(|| UdpSocket::bind("127.0.0.1:0").unwrap())
        .unwrap();
    let datapath = Datapath::start(underlay, SwitchConfig::default()).unwrap();
    datapath
        .configure()
        .add_network(network(NET_A, 100))
        .unwrap();
    let tap = guest_tap(&node, &guest, &name("t"), mac(2), "10.0.0.2");
    datapath
        .add_tap(port(2, NET_A, mac(2), "10.0.0.2"), tap)
        .unwrap();
    // The virtual port stands for a vhost-user-net guest at 10.0.0.1.
    let mut sender = datapath.sender(PortId(1));
    let sink = Arc::new(Recorder::default());
    datapath
        .add_virtual_port(
            port(1, NET_A, mac(1), "10.0.0.1"),
            Arc::clone(&sink) as Arc<dyn FrameSink>,
        )
        .unwrap();

    // An echo request from the virtual port: the tap's kernel answers it (its ARP for 10.0.0.1 is
    // answered by the switch), and the reply reaches the sink.
    let mut echo = Vec::new();
    etherparse::PacketBuilder::ethernet2(mac(1).0, mac(2).0)
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .icmpv4_echo_request(7, 1)
        .write(&mut echo, b"vessel")
        .unwrap();
    assert!(sender.send(&VirtioNetHeader::default(), &echo));
    sender.flush();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let replied = sink.flushed.lock().unwrap().iter().any(|frame| {
            etherparse::SlicedPacket::from_ethernet(frame).is_ok_and(|packet| {
                matches!(
                    (&packet.net, &packet.transport),
                    (
                        Some(etherparse::NetSlice::Ipv4(ip)),
                        Some(etherparse::TransportSlice::Icmpv4(icmp)),
                    ) if ip.header().source() == [10, 0, 0, 2]
                        && ip.header().destination() == [10, 0, 0, 1]
                        && matches!(
                            icmp.icmp_type(),
                            etherparse::Icmpv4Type::EchoReply(e) if e.id == 7
                        )
                )
            })
        });
        if replied {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no echo reply reached the virtual port"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let stats = datapath.switch().port_stats(PortId(1)).unwrap();
    assert!(stats.rx_packets >= 1 && stats.tx_packets >= 1, "{stats:?}");

    // An unplugged virtual port sends nothing more.
    datapath.remove_port(PortId(1)).unwrap();
    assert!(!sender.send(&VirtioNetHeader::default(), &echo));
}
