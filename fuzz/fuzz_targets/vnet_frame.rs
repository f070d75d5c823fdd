//! Fuzzes the virtual switch with what guests and the underlay may send: a sequence of frames
//! from local ports and of datagrams from VTEPs (VXLAN header included), into a switch with two
//! networks whose ports share MACs and IPs. Nothing may panic, and no decision may leave the
//! network the frame came in on, go back out of its ingress port, or send an underlay frame back
//! to the underlay. Learning carries over from one record to the next, so later frames meet
//! whatever earlier ones taught the switch.
//!
//! Input: records of [selector, length (u16, little-endian), bytes...]. The selector's low nibble
//! picks the ingress (five ports, or one of four underlay sources, one of them no VTEP of any
//! network); its high nibble moves the clock on by as many seconds.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vnet::{
    Egress, Location, Mac, NetworkConfig, NetworkId, PortConfig, PortId, Switch, SwitchConfig,
    Verdict, Vni, vxlan,
};

const BLUE: NetworkId = NetworkId(1);
const RED: NetworkId = NetworkId(2);
const PORTS: [PortId; 5] = [PortId(1), PortId(2), PortId(3), PortId(11), PortId(12)];

fn vtep(n: u8) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, n], vxlan::DEFAULT_UDP_PORT))
}

fn switch() -> Switch {
    let mut switch = Switch::new(SwitchConfig { mac_limit: 16, ..SwitchConfig::default() });
    for (id, vni, mtu) in [(BLUE, 100, 1450), (RED, 200, 100)] {
        let vni = Vni::new(vni).unwrap();
        switch.add_network(NetworkConfig { id, vni, mtu }).unwrap();
    }
    let a = Mac([0x52, 0x54, 0, 0, 0, 0x0a]);
    let b = Mac([0x52, 0x54, 0, 0, 0, 0x0b]);
    let ip_a = Some(Ipv4Addr::new(10, 0, 0, 1));
    let ports = [
        (PORTS[0], BLUE, a, ip_a, false),
        (PORTS[1], BLUE, b, None, false),
        (PORTS[2], BLUE, Mac([0x52, 0x54, 0, 0, 0, 0x0c]), None, true),
        (PORTS[3], RED, a, ip_a, false),
        (PORTS[4], RED, b, None, true),
    ];
    for (id, network, mac, ipv4, allow_any_mac) in ports {
        let port = PortConfig { id, network, mac, ipv4, allow_any_mac };
        switch.add_port(port).unwrap();
    }
    switch.set_vteps(BLUE, [vtep(1), vtep(2)]).unwrap();
    switch.set_vteps(RED, [vtep(1), vtep(3)]).unwrap();
    let remote = Mac([0x52, 0x54, 0, 0, 1, 1]);
    switch.set_static_mac(RED, remote, Location::Vtep(vtep(3))).unwrap();
    switch.set_remote_ip(BLUE, Ipv4Addr::new(10, 0, 0, 50), remote).unwrap();
    switch
}

/// Every destination lies in `network`; none is the ingress port; nothing from the underlay
/// returns to it.
fn check(switch: &Switch, network: NetworkId, ingress: Option<PortId>, out: &[Egress]) {
    let own_vni = switch.network_config(network).unwrap().vni;
    let vteps = switch.vteps(network).unwrap();
    for egress in out {
        match *egress {
            Egress::Port(port) => {
                assert_eq!(switch.port_config(port).unwrap().network, network, "{egress:?}");
                assert_ne!(Some(port), ingress, "sent back out of its ingress port");
            }
            Egress::Vtep { addr, vni } => {
                assert!(ingress.is_some(), "an underlay frame went back to the underlay");
                assert_eq!(vni, own_vni, "{egress:?} left network {network}");
                assert!(vteps.contains(&addr), "{addr} is no VTEP of network {network}");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let switch = switch();
    let mut now = Instant::now();
    let mut out = Vec::new();
    let mut rest = data;
    while let [selector, len_low, len_high, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*len_low, *len_high]));
        let (bytes, next) = tail.split_at(len.min(tail.len()));
        rest = next;
        now += Duration::from_secs(u64::from(selector >> 4));
        match usize::from(selector & 0x0f) % 9 {
            index @ 0..5 => {
                let port = PORTS[index];
                let verdict = switch.port_ingress(port, bytes, now, &mut out);
                let network = switch.port_config(port).unwrap().network;
                check(&switch, network, Some(port), &out);
                if let Verdict::Reply(reply) = verdict {
                    assert!(out.is_empty());
                    assert_eq!(reply.as_bytes().len(), vnet::arp::REPLY_FRAME_LEN);
                }
            }
            index => {
                let source = SocketAddr::from(([192, 0, 2, index as u8 - 4], 50000));
                let verdict = switch.underlay_ingress(source, bytes, now, &mut out);
                if verdict == Verdict::Forward && !out.is_empty() {
                    let (vni, _) = vxlan::decode(bytes).expect("forwarded a bad VXLAN header");
                    let network = [BLUE, RED]
                        .into_iter()
                        .find(|id| switch.network_config(*id).unwrap().vni == vni)
                        .expect("forwarded a frame of an unknown VNI");
                    check(&switch, network, None, &out);
                }
                assert!(!matches!(verdict, Verdict::Reply(_)), "the underlay is never answered");
            }
        }
    }
});
