//! vnet: Vessel's virtual switch.
//!
//! Every node runs one [`Switch`]. It joins the node's local ports (guest NICs served over
//! vhost-user-net, tap devices) into isolated L2 networks, and stretches each network across
//! nodes over a VXLAN overlay: frames for ports on other nodes travel, behind an 8-byte VXLAN
//! header, in UDP datagrams between the nodes' VTEPs (their underlay address and VXLAN port).
//!
//! The switch core does no I/O and knows nothing of virtio: it is handed a frame and answers
//! where the frame goes. Those that drive it (not in this crate):
//! - a **vhost-user-net worker** per queue pair and a **tap worker** per tap queue take frames
//!   from their port and call [`Switch::port_ingress`]; they deliver the [`Egress::Port`] decisions
//!   to the ports' receive queues, and pass [`Egress::Vtep`] ones to the underlay socket;
//! - the **underlay worker** owns the UDP socket: it prepends [`vxlan::encode`] to frames bound for
//!   a VTEP and sends them (the kernel builds the outer IP and UDP headers), and hands each
//!   received datagram to [`Switch::underlay_ingress`];
//! - the **control plane** adds and removes networks and ports, sets each network's VTEP flood
//!   list, and pushes what it knows of ports on other nodes (MAC→VTEP entries, IP→MAC for the
//!   ARP responder); a timer calls [`Switch::expire`]; the metrics exporter reads the stats.
//!
//! How the switch is shared between those threads, and what each frame costs, is in
//! [`switch`]'s documentation.
//!
//! Map of the crate:
//! - [`mac`]: the MAC address type.
//! - [`frame`]: an Ethernet frame's L2 header, checked against the network's MTU.
//! - [`arp`]: ARP parsing (for port security) and the replies of the ARP responder.
//! - [`vxlan`]: the RFC 7348 header.
//! - [`mac_table`]: one network's MAC table: learning, aging, size limit, static entries.
//! - [`switch`]: networks, ports, VTEPs, and the forwarding decision.
//! - [`stats`]: counters, and the reasons frames are dropped.
//! - [`tap`]: creating or adopting a multiqueue tap device with a virtio-net header.

pub mod arp;
pub mod frame;
pub mod mac;
pub mod mac_table;
pub mod stats;
pub mod switch;
pub mod tap;
pub mod vxlan;

use std::fmt;

pub use mac::{Mac, ParseMacError};
pub use mac_table::{Location, MacTable};
pub use stats::{DropReason, NetworkStats, TrafficStats};
pub use switch::{Egress, NetworkConfig, PortConfig, Switch, SwitchConfig, SwitchError, Verdict};
pub use tap::{Tap, TapError};
pub use vxlan::Vni;

/// A network's id, assigned by the control plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetworkId(pub u64);

/// A local port's id, assigned by the control plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(pub u64);

impl fmt::Display for NetworkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for PortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
