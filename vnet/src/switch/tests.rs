//! Forwarding tests. Two networks, blue and red, deliberately use the same MACs and IPs for their
//! ports, so that any crosstalk between them shows.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::arp::tests::request as arp_request;
use crate::frame::tests::frame;

const BLUE: NetworkId = NetworkId(1);
const RED: NetworkId = NetworkId(2);
const BLUE_VNI: u32 = 100;
const RED_VNI: u32 = 200;

const MAC_A: Mac = Mac([0x52, 0x54, 0, 0, 0, 0x0a]);
const MAC_B: Mac = Mac([0x52, 0x54, 0, 0, 0, 0x0b]);
const MAC_C: Mac = Mac([0x52, 0x54, 0, 0, 0, 0x0c]);
/// MACs of ports on other nodes.
const MAC_X: Mac = Mac([0x52, 0x54, 0, 0, 1, 0x01]);
const MAC_Y: Mac = Mac([0x52, 0x54, 0, 0, 1, 0x02]);
const MAC_Z: Mac = Mac([0x52, 0x54, 0, 0, 1, 0x03]);
const IP_A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const IP_B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

// Blue: A (with IP) and B (with IP) are secured; C allows any MAC and has no IP.
const P_BLUE_A: PortId = PortId(1);
const P_BLUE_B: PortId = PortId(2);
const P_BLUE_C: PortId = PortId(3);
// Red: the same MACs and IPs as blue's A and B.
const P_RED_A: PortId = PortId(11);
const P_RED_B: PortId = PortId(12);

fn vtep(n: u8) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, n], vxlan::DEFAULT_UDP_PORT))
}

fn vni(value: u32) -> Vni {
    Vni::new(value).unwrap()
}

fn to_vtep(n: u8, network_vni: u32) -> Egress {
    Egress::Vtep {
        addr: vtep(n),
        vni: vni(network_vni),
    }
}

fn port(id: PortId, network: NetworkId, mac: Mac, ipv4: Option<Ipv4Addr>) -> PortConfig {
    PortConfig {
        id,
        network,
        mac,
        ipv4,
        allow_any_mac: false,
    }
}

fn two_networks(config: SwitchConfig) -> Switch {
    let mut switch = Switch::new(config);
    switch
        .add_network(NetworkConfig {
            id: BLUE,
            vni: vni(BLUE_VNI),
            mtu: DEFAULT_MTU,
        })
        .unwrap();
    switch
        .add_network(NetworkConfig {
            id: RED,
            vni: vni(RED_VNI),
            mtu: DEFAULT_MTU,
        })
        .unwrap();
    switch
        .add_port(port(P_BLUE_A, BLUE, MAC_A, Some(IP_A)))
        .unwrap();
    switch
        .add_port(port(P_BLUE_B, BLUE, MAC_B, Some(IP_B)))
        .unwrap();
    let open = PortConfig {
        allow_any_mac: true,
        ..port(P_BLUE_C, BLUE, MAC_C, None)
    };
    switch.add_port(open).unwrap();
    switch
        .add_port(port(P_RED_A, RED, MAC_A, Some(IP_A)))
        .unwrap();
    switch
        .add_port(port(P_RED_B, RED, MAC_B, Some(IP_B)))
        .unwrap();
    // Node 1 has ports in both networks, node 2 only in blue, node 3 only in red.
    switch.set_vteps(BLUE, [vtep(1), vtep(2)]).unwrap();
    switch.set_vteps(RED, [vtep(3), vtep(1)]).unwrap();
    switch
}

fn switch() -> Switch {
    two_networks(SwitchConfig::default())
}

fn datagram(network_vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut bytes = vxlan::encode(vni(network_vni)).to_vec();
    bytes.extend_from_slice(inner);
    bytes
}

/// Frames a test sends through one switch, with the time fixed unless moved on.
struct Run {
    switch: Switch,
    now: Instant,
    out: Vec<Egress>,
}

impl Run {
    fn new(switch: Switch) -> Self {
        Run {
            switch,
            now: Instant::now(),
            out: Vec::new(),
        }
    }

    fn port_ingress(&mut self, port: PortId, frame: &[u8]) -> Verdict {
        self.switch
            .port_ingress(port, frame, self.now, &mut self.out)
    }

    fn vtep_ingress(&mut self, n: u8, datagram: &[u8]) -> Verdict {
        let source = SocketAddr::from(([192, 0, 2, n], 40000 + u16::from(n)));
        self.switch
            .underlay_ingress(source, datagram, self.now, &mut self.out)
    }

    /// Where a frame from `port` goes, when forwarded.
    fn egress_from_port(&mut self, port: PortId, frame: &[u8]) -> BTreeSet<Egress> {
        assert_eq!(self.port_ingress(port, frame), Verdict::Forward);
        self.egress()
    }

    fn egress_from_vtep(&mut self, n: u8, datagram: &[u8]) -> BTreeSet<Egress> {
        assert_eq!(self.vtep_ingress(n, datagram), Verdict::Forward);
        self.egress()
    }

    fn egress(&self) -> BTreeSet<Egress> {
        let set: BTreeSet<Egress> = self.out.iter().copied().collect();
        assert_eq!(
            set.len(),
            self.out.len(),
            "a destination listed twice: {:?}",
            self.out
        );
        set
    }
}

fn set<const N: usize>(egress: [Egress; N]) -> BTreeSet<Egress> {
    egress.into()
}

const IPV4: u16 = 0x0800;

#[test]
fn known_unicast_goes_to_its_one_port() {
    let mut run = Run::new(switch());
    let sent = frame(MAC_B, MAC_A, IPV4, 100);
    assert_eq!(
        run.egress_from_port(P_BLUE_A, &sent),
        set([Egress::Port(P_BLUE_B)])
    );
    let from = run.switch.port_stats(P_BLUE_A).unwrap();
    let to = run.switch.port_stats(P_BLUE_B).unwrap();
    assert_eq!(
        (from.rx_packets, from.rx_bytes, from.tx_packets),
        (1, 114, 0)
    );
    assert_eq!((to.tx_packets, to.tx_bytes, to.rx_packets), (1, 114, 0));
    assert_eq!(run.switch.port_stats(P_BLUE_C).unwrap().tx_packets, 0);
}

#[test]
fn broadcast_unknown_and_multicast_flood_their_own_network_only() {
    let mut run = Run::new(switch());
    let blue_flood = set([
        Egress::Port(P_BLUE_B),
        Egress::Port(P_BLUE_C),
        to_vtep(1, BLUE_VNI),
        to_vtep(2, BLUE_VNI),
    ]);
    let red_flood = set([
        Egress::Port(P_RED_B),
        to_vtep(1, RED_VNI),
        to_vtep(3, RED_VNI),
    ]);
    let multicast = Mac([0x01, 0x00, 0x5e, 0, 0, 0xfb]);
    for dst in [Mac::BROADCAST, MAC_Z, multicast] {
        let sent = frame(dst, MAC_A, IPV4, 64);
        assert_eq!(
            run.egress_from_port(P_BLUE_A, &sent),
            blue_flood,
            "{dst} from blue"
        );
        assert_eq!(
            run.egress_from_port(P_RED_A, &sent),
            red_flood,
            "{dst} from red"
        );
    }
    let underlay = run.switch.underlay_stats();
    assert_eq!(
        (underlay.tx_packets, underlay.tx_bytes),
        (12, 12 * (8 + 78))
    );
}

#[test]
fn floods_from_the_underlay_stay_local_split_horizon() {
    let mut run = Run::new(switch());
    let sent = datagram(BLUE_VNI, &frame(Mac::BROADCAST, MAC_X, IPV4, 64));
    let local = set([
        Egress::Port(P_BLUE_A),
        Egress::Port(P_BLUE_B),
        Egress::Port(P_BLUE_C),
    ]);
    assert_eq!(run.egress_from_vtep(2, &sent), local);
    let unknown = datagram(BLUE_VNI, &frame(MAC_Z, MAC_X, IPV4, 64));
    assert_eq!(run.egress_from_vtep(2, &unknown), local);
    // Red's VNI from node 1 reaches red's ports only.
    let red = datagram(RED_VNI, &frame(Mac::BROADCAST, MAC_X, IPV4, 64));
    assert_eq!(
        run.egress_from_vtep(1, &red),
        set([Egress::Port(P_RED_A), Egress::Port(P_RED_B)])
    );
    let underlay = run.switch.underlay_stats();
    assert_eq!((underlay.rx_packets, underlay.tx_packets), (3, 0));
}

#[test]
fn macs_learned_behind_a_vtep_are_sent_there_and_not_flooded() {
    let mut run = Run::new(switch());
    run.egress_from_vtep(
        2,
        &datagram(BLUE_VNI, &frame(Mac::BROADCAST, MAC_X, IPV4, 64)),
    );
    assert_eq!(
        run.switch.lookup_mac(BLUE, MAC_X, run.now),
        Some(Location::Vtep(vtep(2)))
    );
    let reply = frame(MAC_X, MAC_A, IPV4, 64);
    assert_eq!(
        run.egress_from_port(P_BLUE_A, &reply),
        set([to_vtep(2, BLUE_VNI)])
    );
    // Red has not seen MAC_X: the same frame there is flooded within red.
    assert_eq!(run.switch.lookup_mac(RED, MAC_X, run.now), None);
    assert_eq!(run.egress_from_port(P_RED_A, &reply).len(), 3);
    // A frame from the underlay to a MAC behind a VTEP is not sent back out (split horizon).
    let back = datagram(BLUE_VNI, &frame(MAC_X, MAC_Y, IPV4, 64));
    assert_eq!(
        run.vtep_ingress(1, &back),
        Verdict::Drop(DropReason::SameSide)
    );
    assert_eq!(run.switch.underlay_stats().drops(DropReason::SameSide), 1);
}

#[test]
fn the_same_macs_in_two_networks_never_meet() {
    let mut run = Run::new(switch());
    // Both networks have a port with MAC_A and one with MAC_B.
    let a_to_b = frame(MAC_B, MAC_A, IPV4, 64);
    assert_eq!(
        run.egress_from_port(P_BLUE_A, &a_to_b),
        set([Egress::Port(P_BLUE_B)])
    );
    assert_eq!(
        run.egress_from_port(P_RED_A, &a_to_b),
        set([Egress::Port(P_RED_B)])
    );
    let b_to_a = frame(MAC_A, MAC_B, IPV4, 64);
    assert_eq!(
        run.egress_from_port(P_RED_B, &b_to_a),
        set([Egress::Port(P_RED_A)])
    );
    // From the underlay, the VNI decides, whatever the MACs: node 1 is in both networks.
    let blue = datagram(BLUE_VNI, &frame(MAC_A, MAC_X, IPV4, 64));
    let red = datagram(RED_VNI, &frame(MAC_A, MAC_X, IPV4, 64));
    assert_eq!(
        run.egress_from_vtep(1, &blue),
        set([Egress::Port(P_BLUE_A)])
    );
    assert_eq!(run.egress_from_vtep(1, &red), set([Egress::Port(P_RED_A)]));
    // And MAC_X, learned in both, points at node 1 in both, each with its own VNI.
    let to_x = frame(MAC_X, MAC_A, IPV4, 64);
    assert_eq!(
        run.egress_from_port(P_BLUE_A, &to_x),
        set([to_vtep(1, BLUE_VNI)])
    );
    assert_eq!(
        run.egress_from_port(P_RED_A, &to_x),
        set([to_vtep(1, RED_VNI)])
    );
}

#[test]
fn the_underlay_is_heard_only_from_the_networks_vteps() {
    let mut run = Run::new(switch());
    let inner = frame(Mac::BROADCAST, MAC_X, IPV4, 64);
    // Node 3 is in red, not blue.
    assert_eq!(
        run.vtep_ingress(3, &datagram(BLUE_VNI, &inner)),
        Verdict::Drop(DropReason::UnknownVtep)
    );
    assert!(run.out.is_empty());
    assert_eq!(
        run.vtep_ingress(9, &datagram(RED_VNI, &inner)),
        Verdict::Drop(DropReason::UnknownVtep)
    );
    assert_eq!(
        run.vtep_ingress(1, &datagram(300, &inner)),
        Verdict::Drop(DropReason::UnknownVni)
    );
    // A dual-stack socket reports IPv4 sources as mapped IPv6 addresses.
    let mapped: SocketAddr = "[::ffff:192.0.2.2]:40000".parse().unwrap();
    let verdict =
        run.switch
            .underlay_ingress(mapped, &datagram(BLUE_VNI, &inner), run.now, &mut run.out);
    assert_eq!(verdict, Verdict::Forward);
    assert_eq!(run.out.len(), 3);
    let stats = run.switch.underlay_stats();
    assert_eq!(stats.drops(DropReason::UnknownVtep), 2);
    assert_eq!(stats.drops(DropReason::UnknownVni), 1);
    assert_eq!(stats.rx_packets, 4);
}

#[test]
fn bad_datagrams_from_the_underlay_are_dropped_and_counted() {
    let mut run = Run::new(switch());
    let good_inner = frame(MAC_A, MAC_X, IPV4, 64);
    let mut no_i_flag = datagram(BLUE_VNI, &good_inner);
    no_i_flag[0] = 0;
    let mut oversized = frame(MAC_A, MAC_X, IPV4, usize::from(DEFAULT_MTU) + 1);
    let cases: Vec<(Vec<u8>, DropReason)> = vec![
        (vec![0x08, 0, 0], DropReason::VxlanTooShort),
        (no_i_flag, DropReason::VxlanNoVni),
        (datagram(BLUE_VNI, &good_inner[..13]), DropReason::Runt),
        (datagram(BLUE_VNI, &oversized), DropReason::Oversized),
        (
            datagram(BLUE_VNI, &frame(MAC_A, MAC_X, 0x0600 - 1, 64)),
            DropReason::Malformed,
        ),
        (
            datagram(BLUE_VNI, &frame(MAC_A, Mac::BROADCAST, IPV4, 64)),
            DropReason::InvalidSourceMac,
        ),
        (
            datagram(BLUE_VNI, &frame(MAC_A, Mac::ZERO, IPV4, 64)),
            DropReason::InvalidSourceMac,
        ),
    ];
    for (bytes, reason) in &cases {
        assert_eq!(
            run.vtep_ingress(1, bytes),
            Verdict::Drop(*reason),
            "{reason:?}"
        );
        assert!(run.out.is_empty());
    }
    let stats = run.switch.underlay_stats();
    assert_eq!(stats.total_drops(), cases.len() as u64);
    assert_eq!(stats.drops(DropReason::InvalidSourceMac), 2);
    // Nothing was learned from them, and the ports saw nothing.
    assert_eq!(run.switch.network_stats(BLUE).unwrap().learned_entries, 0);
    assert_eq!(run.switch.port_stats(P_BLUE_A).unwrap().tx_packets, 0);
    // At the MTU exactly, the inner frame passes.
    oversized.pop();
    assert_eq!(
        run.egress_from_vtep(1, &datagram(BLUE_VNI, &oversized)),
        set([Egress::Port(P_BLUE_A)])
    );
}

#[test]
fn a_run_of_datagrams_is_switched_as_one_by_one() {
    // The same datagrams through a memo and without one: the same verdicts, egress and counters.
    let to_a = frame(MAC_A, MAC_X, IPV4, 1000);
    let to_b = frame(MAC_B, MAC_X, IPV4, 1000);
    let oversized = frame(MAC_A, MAC_X, IPV4, usize::from(DEFAULT_MTU) + 1);
    let run: Vec<(SocketAddr, Vec<u8>)> = vec![
        (vtep(1), datagram(BLUE_VNI, &to_a)),
        (vtep(1), datagram(BLUE_VNI, &to_a)),
        // Same headers, but a frame the switch must refuse.
        (vtep(1), datagram(BLUE_VNI, &oversized)),
        (vtep(1), datagram(BLUE_VNI, &to_a[..13])),
        (vtep(1), datagram(BLUE_VNI, &to_a)),
        // Another destination, another sender, another network.
        (vtep(1), datagram(BLUE_VNI, &to_b)),
        (vtep(3), datagram(BLUE_VNI, &to_b)),
        (vtep(3), datagram(RED_VNI, &to_b)),
        (vtep(1), datagram(RED_VNI, &to_b)),
        (vtep(1), datagram(BLUE_VNI, &to_b)),
        // The run ends on datagrams the memo forwards: they are counted when it is dropped.
        (vtep(1), datagram(BLUE_VNI, &to_b)),
    ];
    let (one_by_one, memo_switch) = (switch(), switch());
    let mut memo = IngressMemo::default();
    let now = Instant::now();
    for (source, bytes) in &run {
        let (mut alone, mut in_run) = (Vec::new(), Vec::new());
        let expected = one_by_one.underlay_ingress(*source, bytes, now, &mut alone);
        let verdict =
            memo_switch.underlay_ingress_in_run(&mut memo, *source, bytes, now, &mut in_run);
        assert_eq!((verdict, &in_run), (expected, &alone), "from {source}");
    }
    drop(memo);
    for port in [P_BLUE_A, P_BLUE_B, P_RED_B] {
        assert_eq!(
            memo_switch.port_stats(port).unwrap(),
            one_by_one.port_stats(port).unwrap()
        );
    }
    assert_eq!(memo_switch.underlay_stats(), one_by_one.underlay_stats());
    assert_eq!(one_by_one.port_stats(P_BLUE_A).unwrap().tx_packets, 3);
}

#[test]
fn a_batch_of_port_frames_is_switched_as_one_by_one() {
    // The same frames through a memo and without one: the same verdicts, egress and counters.
    let (one_by_one, memo_switch) = (switch(), switch());
    let now = Instant::now();
    let behind_vtep = datagram(BLUE_VNI, &frame(MAC_A, MAC_X, IPV4, 64));
    for switch in [&one_by_one, &memo_switch] {
        switch.underlay_ingress(vtep(1), &behind_vtep, now, &mut Vec::new());
    }
    let to_b = frame(MAC_B, MAC_A, IPV4, 100);
    let mut spoofed_arp = arp_request(MAC_A, Ipv4Addr::new(10, 0, 0, 99), IP_B);
    spoofed_arp[..6].copy_from_slice(&MAC_B.0);
    let gso = frame(MAC_B, MAC_A, IPV4, 3000);
    let frames: Vec<(PortId, Option<u16>, Vec<u8>)> = vec![
        (P_BLUE_A, None, to_b.clone()),
        (P_BLUE_A, None, to_b.clone()),
        // Same addresses, but frames the switch must refuse.
        (
            P_BLUE_A,
            None,
            frame(MAC_B, MAC_A, IPV4, usize::from(DEFAULT_MTU) + 1),
        ),
        (P_BLUE_A, None, to_b[..13].to_vec()),
        (P_BLUE_A, None, spoofed_arp),
        (P_BLUE_A, None, to_b.clone()),
        // GSO frames are told apart by their segment size.
        (P_BLUE_A, Some(1400), gso.clone()),
        (P_BLUE_A, Some(1400), gso.clone()),
        (P_BLUE_A, Some(DEFAULT_MTU + 1), gso),
        // Another port with the same addresses; a MAC behind a VTEP; a broadcast; another network.
        (P_BLUE_B, None, to_b.clone()),
        (P_BLUE_A, None, frame(MAC_X, MAC_A, IPV4, 100)),
        (P_BLUE_A, None, frame(MAC_X, MAC_A, IPV4, 200)),
        (P_BLUE_A, None, frame(Mac::BROADCAST, MAC_A, IPV4, 100)),
        (P_RED_A, None, to_b.clone()),
        // The run ends on frames the memo forwards: they are counted when it is dropped.
        (P_RED_A, None, to_b.clone()),
        (P_RED_A, None, to_b),
    ];
    let mut memo = IngressMemo::default();
    for (port, gso_size, bytes) in &frames {
        let (mut alone, mut in_run) = (Vec::new(), Vec::new());
        let expected = match gso_size {
            Some(size) => one_by_one.port_ingress_gso(*port, bytes, *size, now, &mut alone),
            None => one_by_one.port_ingress(*port, bytes, now, &mut alone),
        };
        let verdict =
            memo_switch.port_ingress_in_run(&mut memo, *port, bytes, *gso_size, now, &mut in_run);
        assert_eq!(
            (verdict, &in_run),
            (expected, &alone),
            "from {port}: {gso_size:?}"
        );
    }
    drop(memo);
    for port in [P_BLUE_A, P_BLUE_B, P_BLUE_C, P_RED_A, P_RED_B] {
        assert_eq!(
            memo_switch.port_stats(port).unwrap(),
            one_by_one.port_stats(port).unwrap(),
            "{port}"
        );
    }
    assert_eq!(memo_switch.underlay_stats(), one_by_one.underlay_stats());
    let a = one_by_one.port_stats(P_BLUE_A).unwrap();
    assert_eq!(
        (
            a.drops(DropReason::SpoofedArp),
            a.drops(DropReason::Oversized)
        ),
        (1, 2)
    );
    assert_eq!(one_by_one.port_stats(P_BLUE_B).unwrap().tx_packets, 6);
}

#[test]
fn bad_frames_from_a_port_are_dropped_and_counted_on_it() {
    let mut run = Run::new(switch());
    let mtu = usize::from(DEFAULT_MTU);
    let mut cut_tag = frame(MAC_B, MAC_A, frame::ETHERTYPE_VLAN, 0);
    cut_tag.extend_from_slice(&[0, 5]);
    let mut short_arp = arp_request(MAC_A, IP_A, IP_B);
    short_arp.truncate(30);
    let cases: Vec<(Vec<u8>, DropReason)> = vec![
        (vec![0xff; 13], DropReason::Runt),
        (Vec::new(), DropReason::Runt),
        (frame(MAC_B, MAC_A, IPV4, mtu + 1), DropReason::Oversized),
        (cut_tag, DropReason::Malformed),
        (short_arp, DropReason::Malformed),
        (
            frame(MAC_B, Mac::BROADCAST, IPV4, 64),
            DropReason::InvalidSourceMac,
        ),
    ];
    for (bytes, reason) in &cases {
        assert_eq!(
            run.port_ingress(P_BLUE_A, bytes),
            Verdict::Drop(*reason),
            "{reason:?}"
        );
        assert!(run.out.is_empty());
    }
    let stats = run.switch.port_stats(P_BLUE_A).unwrap();
    assert_eq!(stats.rx_packets, cases.len() as u64);
    assert_eq!(stats.total_drops(), cases.len() as u64);
    assert_eq!(stats.drops(DropReason::Runt), 2);
    assert_eq!(run.switch.port_stats(P_BLUE_B).unwrap().tx_packets, 0);
    assert_eq!(run.switch.underlay_stats().tx_packets, 0);
    assert_eq!(
        run.egress_from_port(P_BLUE_A, &frame(MAC_B, MAC_A, IPV4, mtu))
            .len(),
        1
    );
}

#[test]
fn port_security_drops_spoofed_sources_and_arp() {
    let mut run = Run::new(switch());
    // A sends as B: dropped, and B's location is not poisoned.
    assert_eq!(
        run.port_ingress(P_BLUE_A, &frame(MAC_C, MAC_B, IPV4, 64)),
        Verdict::Drop(DropReason::SpoofedMac)
    );
    assert_eq!(
        run.port_ingress(P_BLUE_A, &frame(MAC_C, MAC_X, IPV4, 64)),
        Verdict::Drop(DropReason::SpoofedMac)
    );
    assert_eq!(
        run.switch.lookup_mac(BLUE, MAC_B, run.now),
        Some(Location::Port(P_BLUE_B))
    );
    assert_eq!(run.switch.lookup_mac(BLUE, MAC_X, run.now), None);
    // ARP claiming another IP, or another MAC inside the ARP.
    let other_ip = arp_request(MAC_A, Ipv4Addr::new(10, 0, 0, 99), IP_B);
    assert_eq!(
        run.port_ingress(P_BLUE_A, &other_ip),
        Verdict::Drop(DropReason::SpoofedArp)
    );
    let mut other_mac = arp_request(MAC_A, IP_A, Ipv4Addr::new(10, 0, 0, 77));
    other_mac[22..28].copy_from_slice(&MAC_B.0);
    assert_eq!(
        run.port_ingress(P_BLUE_A, &other_mac),
        Verdict::Drop(DropReason::SpoofedArp)
    );
    let stats = run.switch.port_stats(P_BLUE_A).unwrap();
    assert_eq!(
        (
            stats.drops(DropReason::SpoofedMac),
            stats.drops(DropReason::SpoofedArp)
        ),
        (2, 2)
    );
    assert_eq!(run.switch.port_stats(P_BLUE_B).unwrap().tx_packets, 0);
    // Its own IP, or none at all (an address conflict probe), is fine.
    let probe = arp_request(MAC_A, Ipv4Addr::UNSPECIFIED, Ipv4Addr::new(10, 0, 0, 77));
    assert_eq!(run.egress_from_port(P_BLUE_A, &probe).len(), 4);
    let own = arp_request(MAC_A, IP_A, Ipv4Addr::new(10, 0, 0, 77));
    assert_eq!(run.egress_from_port(P_BLUE_A, &own).len(), 4);
}

#[test]
fn a_port_that_allows_any_mac_sends_from_any_and_its_macs_are_learned() {
    let mut run = Run::new(switch());
    let spoof_free = frame(Mac::BROADCAST, MAC_Y, IPV4, 64);
    assert_eq!(run.egress_from_port(P_BLUE_C, &spoof_free).len(), 4);
    assert_eq!(
        run.switch.lookup_mac(BLUE, MAC_Y, run.now),
        Some(Location::Port(P_BLUE_C))
    );
    let any_arp = arp_request(
        MAC_Y,
        Ipv4Addr::new(10, 9, 9, 9),
        Ipv4Addr::new(10, 0, 0, 77),
    );
    assert_eq!(run.egress_from_port(P_BLUE_C, &any_arp).len(), 4);
    assert_eq!(
        run.egress_from_port(P_BLUE_A, &frame(MAC_Y, MAC_A, IPV4, 64)),
        set([Egress::Port(P_BLUE_C)])
    );
    // Two MACs behind the same port talking: the switch does not send it back in.
    let hairpin = frame(MAC_Y, MAC_Z, IPV4, 64);
    assert_eq!(
        run.port_ingress(P_BLUE_C, &hairpin),
        Verdict::Drop(DropReason::SameSide)
    );
    // Its own MAC is still its own, whatever it sends: learning cannot move a port's static MAC.
    assert_eq!(
        run.egress_from_port(P_BLUE_C, &frame(Mac::BROADCAST, MAC_A, IPV4, 64))
            .len(),
        4
    );
    assert_eq!(
        run.switch.lookup_mac(BLUE, MAC_A, run.now),
        Some(Location::Port(P_BLUE_A))
    );
}

#[test]
fn arp_for_a_known_ip_is_answered_with_a_correct_reply() {
    let mut run = Run::new(switch());
    let request = arp_request(MAC_A, IP_A, IP_B);
    let Verdict::Reply(reply) = run.port_ingress(P_BLUE_A, &request) else {
        panic!("not answered: {:?}", run.out);
    };
    assert!(run.out.is_empty(), "an answered request is not flooded");
    let mut expected = Vec::new();
    expected.extend_from_slice(&MAC_A.0);
    expected.extend_from_slice(&MAC_B.0);
    expected.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 2]);
    expected.extend_from_slice(&MAC_B.0);
    expected.extend_from_slice(&IP_B.octets());
    expected.extend_from_slice(&MAC_A.0);
    expected.extend_from_slice(&IP_A.octets());
    expected.resize(arp::REPLY_FRAME_LEN, 0);
    assert_eq!(reply.as_bytes(), &expected[..]);
    let stats = run.switch.port_stats(P_BLUE_A).unwrap();
    assert_eq!(
        (stats.rx_packets, stats.tx_packets, stats.tx_bytes),
        (1, 1, 60)
    );
    assert_eq!(run.switch.port_stats(P_BLUE_B).unwrap().tx_packets, 0);
}

#[test]
fn arp_answers_come_from_the_askers_network() {
    let mut run = Run::new(switch());
    let remote = Ipv4Addr::new(10, 0, 0, 50);
    run.switch.set_remote_ip(BLUE, remote, MAC_X).unwrap();
    run.switch.set_remote_ip(RED, remote, MAC_Y).unwrap();
    let request = arp_request(MAC_A, IP_A, remote);
    let answer = |verdict| match verdict {
        Verdict::Reply(reply) => {
            let bytes = reply.as_bytes();
            arp::parse(&bytes[frame::HEADER_LEN..]).unwrap().sender_mac
        }
        other => panic!("not answered: {other:?}"),
    };
    assert_eq!(answer(run.port_ingress(P_BLUE_A, &request)), MAC_X);
    assert_eq!(answer(run.port_ingress(P_RED_A, &request)), MAC_Y);
    // Known in blue only: red floods it within red.
    let blue_only = Ipv4Addr::new(10, 0, 0, 51);
    run.switch.set_remote_ip(BLUE, blue_only, MAC_Z).unwrap();
    let request = arp_request(MAC_A, IP_A, blue_only);
    assert_eq!(run.egress_from_port(P_RED_A, &request).len(), 3);
    // Unknown anywhere, and announcements: flooded as usual.
    assert_eq!(
        run.egress_from_port(
            P_BLUE_A,
            &arp_request(MAC_A, IP_A, Ipv4Addr::new(10, 0, 0, 99))
        )
        .len(),
        4
    );
    assert_eq!(
        run.egress_from_port(P_BLUE_A, &arp_request(MAC_A, IP_A, IP_A))
            .len(),
        4
    );
    // Forgotten: flooded again.
    assert!(run.switch.remove_remote_ip(BLUE, remote).unwrap());
    assert_eq!(
        run.egress_from_port(P_BLUE_A, &arp_request(MAC_A, IP_A, remote))
            .len(),
        4
    );
}

#[test]
fn static_entries_hold_against_learning_and_time() {
    let mut run = Run::new(switch());
    run.switch
        .set_static_mac(BLUE, MAC_X, Location::Vtep(vtep(2)))
        .unwrap();
    // MAC_X shows up from node 1: not moved, the control plane said node 2.
    run.egress_from_vtep(
        1,
        &datagram(BLUE_VNI, &frame(Mac::BROADCAST, MAC_X, IPV4, 64)),
    );
    run.now += Duration::from_secs(3600);
    run.switch.expire(run.now);
    let to_x = frame(MAC_X, MAC_A, IPV4, 64);
    assert_eq!(
        run.egress_from_port(P_BLUE_A, &to_x),
        set([to_vtep(2, BLUE_VNI)])
    );
    // A remote frame claiming a local port's MAC does not take it over either.
    run.egress_from_vtep(
        1,
        &datagram(BLUE_VNI, &frame(Mac::BROADCAST, MAC_B, IPV4, 64)),
    );
    assert_eq!(
        run.egress_from_port(P_BLUE_A, &frame(MAC_B, MAC_A, IPV4, 64)),
        set([Egress::Port(P_BLUE_B)])
    );
    assert!(run.switch.remove_static_mac(BLUE, MAC_X).unwrap());
    assert_eq!(run.egress_from_port(P_BLUE_A, &to_x).len(), 4);
}

#[test]
fn macs_move_between_vteps_and_ports() {
    let mut run = Run::new(switch());
    let from_x = frame(Mac::BROADCAST, MAC_X, IPV4, 64);
    let to_x = frame(MAC_X, MAC_A, IPV4, 64);
    run.egress_from_vtep(1, &datagram(BLUE_VNI, &from_x));
    assert_eq!(
        run.egress_from_port(P_BLUE_A, &to_x),
        set([to_vtep(1, BLUE_VNI)])
    );
    // The guest migrated to node 2...
    run.egress_from_vtep(2, &datagram(BLUE_VNI, &from_x));
    assert_eq!(
        run.egress_from_port(P_BLUE_A, &to_x),
        set([to_vtep(2, BLUE_VNI)])
    );
    // ...and then here, behind the port that allows any MAC.
    run.egress_from_port(P_BLUE_C, &from_x);
    assert_eq!(
        run.egress_from_port(P_BLUE_A, &to_x),
        set([Egress::Port(P_BLUE_C)])
    );
    assert_eq!(run.switch.network_stats(BLUE).unwrap().mac_moves, 2);
}

#[test]
fn learned_macs_age_out_into_flooding() {
    let mut run = Run::new(two_networks(SwitchConfig {
        mac_aging: Duration::from_secs(30),
        ..SwitchConfig::default()
    }));
    run.egress_from_vtep(
        1,
        &datagram(BLUE_VNI, &frame(Mac::BROADCAST, MAC_X, IPV4, 64)),
    );
    let to_x = frame(MAC_X, MAC_A, IPV4, 64);
    run.now += Duration::from_secs(29);
    assert_eq!(run.egress_from_port(P_BLUE_A, &to_x).len(), 1);
    assert_eq!(run.switch.network_stats(BLUE).unwrap().mac_entries, 4);
    run.now += Duration::from_secs(1);
    assert_eq!(run.egress_from_port(P_BLUE_A, &to_x).len(), 4);
    run.switch.expire(run.now);
    // The three ports' own MACs are static and stay.
    assert_eq!(run.switch.network_stats(BLUE).unwrap().mac_entries, 3);
    // Frames to a local port's own MAC are never flooded, however long it was silent.
    assert_eq!(
        run.egress_from_port(P_BLUE_A, &frame(MAC_B, MAC_A, IPV4, 64))
            .len(),
        1
    );
}

#[test]
fn a_full_mac_table_stops_learning_and_counts_it() {
    let mut run = Run::new(two_networks(SwitchConfig {
        mac_limit: 2,
        ..SwitchConfig::default()
    }));
    for mac in [MAC_X, MAC_Y, MAC_Z] {
        run.egress_from_vtep(
            1,
            &datagram(BLUE_VNI, &frame(Mac::BROADCAST, mac, IPV4, 64)),
        );
    }
    let stats = run.switch.network_stats(BLUE).unwrap();
    assert_eq!(
        (
            stats.learned_entries,
            stats.learning_refused,
            stats.mac_entries
        ),
        (2, 1, 5)
    );
    assert_eq!(
        run.egress_from_port(P_BLUE_A, &frame(MAC_Y, MAC_A, IPV4, 64))
            .len(),
        1
    );
    assert_eq!(
        run.egress_from_port(P_BLUE_A, &frame(MAC_Z, MAC_A, IPV4, 64))
            .len(),
        4
    );
    // Red has a table of its own.
    run.egress_from_vtep(
        1,
        &datagram(RED_VNI, &frame(Mac::BROADCAST, MAC_Z, IPV4, 64)),
    );
    assert_eq!(run.switch.network_stats(RED).unwrap().learned_entries, 1);
}

#[test]
fn removing_a_port_forgets_it() {
    let mut run = Run::new(switch());
    run.egress_from_port(P_BLUE_C, &frame(Mac::BROADCAST, MAC_Y, IPV4, 64));
    let stats = run.switch.remove_port(P_BLUE_C).unwrap();
    assert_eq!(stats.rx_packets, 1);
    run.switch.remove_port(P_BLUE_B).unwrap();
    assert_eq!(
        run.switch.remove_port(P_BLUE_B),
        Err(SwitchError::NoSuchPort(P_BLUE_B))
    );
    let flood = set([
        Egress::Port(P_BLUE_A),
        to_vtep(1, BLUE_VNI),
        to_vtep(2, BLUE_VNI),
    ]);
    let flood = flood
        .into_iter()
        .filter(|e| *e != Egress::Port(P_BLUE_A))
        .collect::<BTreeSet<_>>();
    assert_eq!(
        run.egress_from_port(P_BLUE_A, &frame(MAC_Y, MAC_A, IPV4, 64)),
        flood
    );
    assert_eq!(
        run.egress_from_port(P_BLUE_A, &arp_request(MAC_A, IP_A, IP_B)),
        flood
    );
    assert_eq!(
        run.port_ingress(P_BLUE_B, &frame(MAC_A, MAC_B, IPV4, 64)),
        Verdict::Drop(DropReason::UnknownPort)
    );
    // Red's B, with the same MAC and IP, is untouched.
    assert!(matches!(
        run.port_ingress(P_RED_A, &arp_request(MAC_A, IP_A, IP_B)),
        Verdict::Reply(_)
    ));
    // Its MAC and IP are free for a new port.
    run.switch
        .add_port(port(PortId(4), BLUE, MAC_B, Some(IP_B)))
        .unwrap();
}

#[test]
fn vteps_that_leave_are_forgotten() {
    let mut run = Run::new(switch());
    run.egress_from_vtep(
        2,
        &datagram(BLUE_VNI, &frame(Mac::BROADCAST, MAC_X, IPV4, 64)),
    );
    run.switch
        .set_static_mac(BLUE, MAC_Y, Location::Vtep(vtep(2)))
        .unwrap();
    run.switch.set_vteps(BLUE, [vtep(1)]).unwrap();
    assert_eq!(run.switch.vteps(BLUE), Some(&[vtep(1)][..]));
    assert_eq!(run.switch.lookup_mac(BLUE, MAC_X, run.now), None);
    // Control-plane entries are the control plane's to remove.
    assert_eq!(
        run.switch.lookup_mac(BLUE, MAC_Y, run.now),
        Some(Location::Vtep(vtep(2)))
    );
    let inner = frame(Mac::BROADCAST, MAC_X, IPV4, 64);
    assert_eq!(
        run.vtep_ingress(2, &datagram(BLUE_VNI, &inner)),
        Verdict::Drop(DropReason::UnknownVtep)
    );
    let flood = run.egress_from_port(P_BLUE_A, &frame(Mac::BROADCAST, MAC_A, IPV4, 64));
    assert_eq!(
        flood,
        set([
            Egress::Port(P_BLUE_B),
            Egress::Port(P_BLUE_C),
            to_vtep(1, BLUE_VNI)
        ])
    );
}

#[test]
fn configuration_mistakes_are_refused_with_the_reason() {
    let mut switch = switch();
    let blue = NetworkConfig {
        id: BLUE,
        vni: vni(999),
        mtu: 1500,
    };
    assert_eq!(
        switch.add_network(blue),
        Err(SwitchError::NetworkExists(BLUE))
    );
    let same_vni = NetworkConfig {
        id: NetworkId(3),
        vni: vni(BLUE_VNI),
        mtu: 1500,
    };
    assert_eq!(
        switch.add_network(same_vni),
        Err(SwitchError::VniInUse {
            vni: vni(BLUE_VNI),
            network: BLUE
        })
    );
    for mtu in [MIN_MTU - 1, MAX_MTU + 1] {
        let network = NetworkConfig {
            id: NetworkId(3),
            vni: vni(3),
            mtu,
        };
        assert_eq!(
            switch.add_network(network),
            Err(SwitchError::MtuOutOfRange(mtu))
        );
    }
    assert_eq!(
        switch.remove_network(BLUE),
        Err(SwitchError::NetworkHasPorts {
            network: BLUE,
            ports: 3
        })
    );
    assert_eq!(
        switch.add_port(port(P_BLUE_A, RED, MAC_C, None)),
        Err(SwitchError::PortExists(P_BLUE_A))
    );
    assert_eq!(
        switch.add_port(port(PortId(9), BLUE, MAC_A, None)),
        Err(SwitchError::MacInUse {
            mac: MAC_A,
            port: P_BLUE_A,
            network: BLUE
        })
    );
    assert_eq!(
        switch.add_port(port(PortId(9), BLUE, MAC_Z, Some(IP_B))),
        Err(SwitchError::IpInUse {
            ip: IP_B,
            network: BLUE
        })
    );
    assert_eq!(
        switch.add_port(port(PortId(9), BLUE, Mac::BROADCAST, None)),
        Err(SwitchError::NotUnicast {
            mac: Mac::BROADCAST
        })
    );
    assert_eq!(
        switch.add_port(port(PortId(9), NetworkId(7), MAC_Z, None)),
        Err(SwitchError::NoSuchNetwork(NetworkId(7)))
    );
    assert_eq!(
        switch.set_static_mac(BLUE, MAC_Z, Location::Port(P_RED_A)),
        Err(SwitchError::PortNotInNetwork {
            port: P_RED_A,
            network: BLUE
        })
    );
    assert_eq!(
        switch.set_remote_ip(BLUE, IP_A, MAC_Z),
        Err(SwitchError::IpInUse {
            ip: IP_A,
            network: BLUE
        })
    );
    let message = SwitchError::NetworkHasPorts {
        network: BLUE,
        ports: 3,
    }
    .to_string();
    assert_eq!(message, "network 1 still has 3 port(s); delete them first");
    // An emptied network can go, and its VNI with it.
    for id in [P_RED_A, P_RED_B] {
        switch.remove_port(id).unwrap();
    }
    switch.remove_network(RED).unwrap();
    let mut out = Vec::new();
    let red = datagram(RED_VNI, &frame(Mac::BROADCAST, MAC_X, IPV4, 64));
    let verdict = switch.underlay_ingress(vtep(1), &red, Instant::now(), &mut out);
    assert_eq!(verdict, Verdict::Drop(DropReason::UnknownVni));
}

#[test]
fn the_switch_is_shared_between_threads() {
    fn assert_sync<T: Send + Sync>() {}
    assert_sync::<Switch>();
}

/// Checks that every destination of a decision lies in `network` and none is the ingress.
fn assert_stays_in(switch: &Switch, network: NetworkId, ingress: Option<PortId>, out: &[Egress]) {
    let own_vni = switch.network_config(network).unwrap().vni;
    let vteps = switch.vteps(network).unwrap();
    for egress in out {
        match *egress {
            Egress::Port(port) => {
                assert_eq!(
                    switch.port_config(port).unwrap().network,
                    network,
                    "{egress:?}"
                );
                assert_ne!(Some(port), ingress, "back out of its ingress port");
            }
            Egress::Vtep { addr, vni } => {
                assert!(ingress.is_some(), "from the underlay back to it");
                assert_eq!(vni, own_vni);
                assert!(vteps.contains(&addr), "{addr} is not a VTEP of {network}");
            }
        }
    }
}

proptest! {
    /// Whatever arrives, in whatever order, nothing leaves its network. Frames are built from a
    /// handful of MACs, IPs and EtherTypes so that forwarding, learning and ARP really happen.
    #[test]
    fn nothing_ever_leaves_its_network(
        inputs in proptest::collection::vec(
            (0usize..7, 0usize..6, 0usize..6, 0usize..4, 0usize..4, any::<bool>(), 0usize..100),
            1..40,
        )
    ) {
        let macs = [MAC_A, MAC_B, MAC_C, MAC_X, Mac::BROADCAST, MAC_Y];
        let ips = [IP_A, IP_B, Ipv4Addr::new(10, 0, 0, 50), Ipv4Addr::UNSPECIFIED];
        let mut switch = switch();
        switch.set_remote_ip(BLUE, Ipv4Addr::new(10, 0, 0, 50), MAC_X).unwrap();
        switch.set_static_mac(RED, MAC_X, Location::Vtep(vtep(3))).unwrap();
        let ports = [P_BLUE_A, P_BLUE_B, P_BLUE_C, P_RED_A, P_RED_B];
        let mut out = Vec::new();
        let now = Instant::now();
        for (from, dst, src, sender_ip, target_ip, arp_frame, extra) in inputs {
            let mut bytes = if arp_frame {
                let mut bytes = arp_request(macs[src], ips[sender_ip], ips[target_ip]);
                bytes[..6].copy_from_slice(&macs[dst].0);
                bytes
            } else {
                frame(macs[dst], macs[src], IPV4, extra)
            };
            if extra % 7 == 0 {
                bytes.truncate(extra % 20);
            }
            if let Some(&port) = ports.get(from) {
                switch.port_ingress(port, &bytes, now, &mut out);
                let network = switch.port_config(port).unwrap().network;
                assert_stays_in(&switch, network, Some(port), &out);
            } else {
                let (network, vni_value, node) = if from == 5 { (BLUE, BLUE_VNI, 2) } else { (RED, RED_VNI, 1) };
                let source = SocketAddr::from(([192, 0, 2, node], 50000));
                switch.underlay_ingress(source, &datagram(vni_value, &bytes), now, &mut out);
                assert_stays_in(&switch, network, None, &out);
            }
        }
    }
}

#[test]
fn gso_frames_pass_whole_when_their_segments_fit_the_mtu() {
    let mut run = Run::new(switch());
    let mtu = DEFAULT_MTU;
    let big = frame(MAC_B, MAC_A, IPV4, 60_000);
    // Learn B's port, so the frame is known unicast.
    run.port_ingress(P_BLUE_B, &frame(MAC_A, MAC_B, IPV4, 64));
    let gso = |run: &mut Run, frame: &[u8], size: u16| {
        run.switch
            .port_ingress_gso(P_BLUE_A, frame, size, run.now, &mut run.out)
    };
    assert_eq!(gso(&mut run, &big, mtu - 40), Verdict::Forward);
    assert_eq!(run.out, vec![Egress::Port(P_BLUE_B)]);
    // Segments larger than the MTU, or of no size, are not let through.
    assert_eq!(
        gso(&mut run, &big, mtu + 1),
        Verdict::Drop(DropReason::Oversized)
    );
    assert_eq!(gso(&mut run, &big, 0), Verdict::Drop(DropReason::Oversized));
    // Without the GSO marking the same frame is oversized.
    assert_eq!(
        run.port_ingress(P_BLUE_A, &big),
        Verdict::Drop(DropReason::Oversized)
    );
    // Port security holds for GSO frames too.
    let spoofed = frame(MAC_B, MAC_C, IPV4, 60_000);
    assert_eq!(
        gso(&mut run, &spoofed, 1400),
        Verdict::Drop(DropReason::SpoofedMac)
    );
}
