//! vnet: Vessel's virtual switch.
//!
//! Every node runs one [`Switch`]. It joins the node's local ports (guest NICs served over
//! vhost-user-net, tap devices) into isolated L2 networks, and stretches each network across
//! nodes over a VXLAN overlay: frames for ports on other nodes travel, behind an 8-byte VXLAN
//! header, in UDP datagrams between the nodes' VTEPs (their underlay address and VXLAN port).
//!
//! The switch core ([`Switch`]) does no I/O and knows nothing of virtio: it is handed a frame and
//! answers where the frame goes. The [`Datapath`] drives it for tap ports and the underlay: one
//! thread (the switching core) reads frames from every tap queue and VXLAN datagrams from the
//! UDP underlay socket, calls [`Switch::port_ingress`] / [`Switch::underlay_ingress`], and writes
//! each frame where the switch says — to tap queues, or behind [`vxlan::encode`] to other nodes'
//! VTEPs (the kernel builds the outer IP and UDP headers). The vhost-user-net device's queue workers
//! (in `vhost-backends`, wired up by the daemon) hand the frames their guests send to the same
//! switch through [`PortSender`]s, and receive frames through a [`FrameSink`]. The **control plane** adds and removes
//! networks and ports, sets each network's VTEP flood list, and pushes what it knows of ports on
//! other nodes (MAC→VTEP entries, IP→MAC for the ARP responder); the metrics exporter reads the
//! stats.
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
//! - [`netns`]: the machine's other network namespaces, where an operator may have moved a tap.
//! - [`offload`]: the virtio-net header; TCP segmentation and checksums in software.
//! - [`gro`]: merging received TCP segments of a flow into one large frame for a tap.
//! - [`underlay`]: UDP GSO and GRO on the underlay socket.
//! - [`datapath`]: the switching core: the thread that moves frames between tap queues and the
//!   VXLAN underlay socket as the switch decides.

pub mod arp;
pub mod datapath;
pub mod frame;
pub mod gro;
pub mod mac;
pub mod mac_table;
pub mod netns;
pub mod offload;
pub mod stats;
pub mod switch;
pub mod tap;
pub mod underlay;
pub mod vxlan;

use std::fmt;

pub use datapath::{AddPortError, Datapath, FrameSink, PortSender, SinkRun};
pub use mac::{Mac, ParseMacError};
pub use mac_table::{Location, MacTable};
pub use stats::{DropReason, NetworkStats, TrafficStats};
pub use switch::{
    Egress, IngressMemo, NetworkConfig, PortConfig, Switch, SwitchConfig, SwitchError, Verdict,
};
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
