//! Features and config space of the vhost-user-net device (virtio 1.2 §5.1.3–5.1.4), and what
//! the frontend negotiated.
//!
//! QEMU owns a vhost-user-net device's config space: it builds it from its own properties
//! (`mac=`, `host_mtu=`, `mq=`) and never asks the backend. Other frontends (DPDK's
//! virtio-user, a test driver) do ask with GET_CONFIG, so the device answers with the same
//! values the docs tell the operator to give QEMU.

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};

use virtio_bindings::virtio_config::{VIRTIO_F_IN_ORDER, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::header::{GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, VirtioNetHeader};

/// Smallest MTU accepted (IPv4's minimum datagram; virtio 1.2 §5.1.4.1).
pub const MIN_MTU: u16 = 68;

/// Bytes of config space answered: mac, status, max_virtqueue_pairs, mtu. The fields after
/// them belong to features (SPEED_DUPLEX, RSS) this device does not offer.
pub const CONFIG_SPACE_LEN: usize = 12;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Virtio features offered for a device of `queue_pairs` queue pairs.
pub fn features(queue_pairs: u16) -> u64 {
    // IN_ORDER: both rings return chains in the order they were made available (the transmit path as it takes
    // them; the receive path holds chains for a frame in order and sends them back before any chain after them).
    // DPDK's driver takes its in-order paths then, as it does against its own vhost.
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_F_IN_ORDER)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_NET_F_CSUM)
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_HOST_TSO4)
        | bit(VIRTIO_NET_F_HOST_TSO6)
        | bit(VIRTIO_NET_F_HOST_ECN)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | bit(VIRTIO_NET_F_GUEST_TSO6)
        | bit(VIRTIO_NET_F_GUEST_ECN)
        | bit(VIRTIO_NET_F_MTU)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_STATUS);
    if queue_pairs > 1 {
        // The control queue MQ needs is QEMU's (or virtio-user's) own; it never reaches us.
        f |= bit(VIRTIO_NET_F_MQ);
    }
    f
}

/// `struct virtio_net_config` up to `mtu`: the link is always up while a frontend is connected
/// (QEMU shows it down while the backend is gone).
pub fn config_space(mac: [u8; 6], queue_pairs: u16, mtu: u16) -> Vec<u8> {
    let mut c = Vec::with_capacity(CONFIG_SPACE_LEN);
    c.extend_from_slice(&mac);
    c.extend_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    c.extend_from_slice(&queue_pairs.to_le_bytes());
    c.extend_from_slice(&mtu.to_le_bytes());
    c
}

/// Offloads the guest accepts on receive (negotiated GUEST_* features). Whoever pushes frames
/// into an [`super::RxQueue`] must not push GSO frames outside these: the device drops them.
/// Partial checksums are fine either way (the device completes them for a guest without
/// `csum`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestOffloads {
    /// GUEST_CSUM: frames may carry `FLAG_NEEDS_CSUM` / `FLAG_DATA_VALID`.
    pub csum: bool,
    /// GUEST_TSO4: TCP/IPv4 GSO frames.
    pub tso4: bool,
    /// GUEST_TSO6: TCP/IPv6 GSO frames.
    pub tso6: bool,
    /// GUEST_ECN: GSO frames with `GSO_ECN`.
    pub ecn: bool,
}

impl GuestOffloads {
    fn from_features(f: u64) -> Self {
        GuestOffloads {
            csum: f & bit(VIRTIO_NET_F_GUEST_CSUM) != 0,
            tso4: f & bit(VIRTIO_NET_F_GUEST_TSO4) != 0,
            tso6: f & bit(VIRTIO_NET_F_GUEST_TSO6) != 0,
            ecn: f & bit(VIRTIO_NET_F_GUEST_ECN) != 0,
        }
    }

    /// Whether a frame with `header` may be handed to the guest as a GSO frame (or is none).
    pub fn accepts_gso(&self, header: &VirtioNetHeader) -> bool {
        gso_allowed(header, self.tso4, self.tso6, self.ecn)
    }
}

/// Offloads the guest may use on transmit (negotiated HOST_* features and CSUM).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostOffloads {
    /// CSUM: transmitted frames may carry `FLAG_NEEDS_CSUM`.
    pub csum: bool,
    /// HOST_TSO4.
    pub tso4: bool,
    /// HOST_TSO6.
    pub tso6: bool,
    /// HOST_ECN.
    pub ecn: bool,
}

impl HostOffloads {
    fn from_features(f: u64) -> Self {
        HostOffloads {
            csum: f & bit(VIRTIO_NET_F_CSUM) != 0,
            tso4: f & bit(VIRTIO_NET_F_HOST_TSO4) != 0,
            tso6: f & bit(VIRTIO_NET_F_HOST_TSO6) != 0,
            ecn: f & bit(VIRTIO_NET_F_HOST_ECN) != 0,
        }
    }

    /// Every transmit offload (what the device offers).
    pub const ALL: HostOffloads = HostOffloads {
        csum: true,
        tso4: true,
        tso6: true,
        ecn: true,
    };

    /// Whether the guest was allowed to send a frame with `header`.
    pub fn accepts_gso(&self, header: &VirtioNetHeader) -> bool {
        gso_allowed(header, self.tso4, self.tso6, self.ecn)
    }
}

fn gso_allowed(header: &VirtioNetHeader, tso4: bool, tso6: bool, ecn: bool) -> bool {
    let kind_ok = match header.gso_kind() {
        GSO_NONE => return header.gso_type == GSO_NONE,
        GSO_TCPV4 => tso4,
        GSO_TCPV6 => tso6,
        // UDP fragmentation and anything newer are not offered.
        _ => false,
    };
    kind_ok && (header.gso_type & GSO_ECN == 0 || ecn) && header.gso_size != 0
}

/// What the frontend negotiated and set, shared by the handler thread and the workers.
#[derive(Debug)]
pub struct NetSettings {
    acked: AtomicU64,
    mtu: AtomicU16,
}

impl NetSettings {
    /// Nothing negotiated, MTU `mtu`.
    pub fn new(mtu: u16) -> Self {
        NetSettings {
            acked: AtomicU64::new(0),
            mtu: AtomicU16::new(mtu),
        }
    }

    /// Records SET_FEATURES.
    pub fn set_acked(&self, features: u64) {
        self.acked.store(features, Ordering::Release);
    }

    /// The negotiated features.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    /// MRG_RXBUF negotiated: a frame may span several receive chains.
    pub fn mrg_rxbuf(&self) -> bool {
        self.acked() & bit(VIRTIO_NET_F_MRG_RXBUF) != 0
    }

    /// Receive offloads negotiated.
    pub fn guest_offloads(&self) -> GuestOffloads {
        GuestOffloads::from_features(self.acked())
    }

    /// Transmit offloads negotiated.
    pub fn host_offloads(&self) -> HostOffloads {
        HostOffloads::from_features(self.acked())
    }

    /// The MTU in the config space (last NET_SET_MTU, else the port's maximum).
    pub fn mtu(&self) -> u16 {
        self.mtu.load(Ordering::Acquire)
    }

    pub(crate) fn set_mtu(&self, mtu: u16) {
        self.mtu.store(mtu, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::header::{GSO_UDP, VirtioNetHeader};

    #[test]
    fn features_and_config_space() {
        let one = features(1);
        assert_eq!(one & bit(VIRTIO_NET_F_MQ), 0, "MQ only with several pairs");
        assert_ne!(features(4) & bit(VIRTIO_NET_F_MQ), 0);
        for b in [
            VIRTIO_F_VERSION_1,
            VIRTIO_F_IN_ORDER,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
        ] {
            assert_ne!(one & bit(b), 0, "feature bit {b}");
        }
        let c = config_space([0x52, 0x54, 0, 1, 2, 3], 4, 9000);
        assert_eq!(c.len(), CONFIG_SPACE_LEN);
        assert_eq!(&c[..6], &[0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1, "link up");
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 4);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 9000);
    }

    #[test]
    fn gso_needs_the_matching_feature() {
        let s = NetSettings::new(1500);
        let tso4 = VirtioNetHeader {
            gso_type: GSO_TCPV4,
            gso_size: 1448,
            ..VirtioNetHeader::PLAIN
        };
        let ecn6 = VirtioNetHeader {
            gso_type: GSO_TCPV6 | GSO_ECN,
            gso_size: 1428,
            ..VirtioNetHeader::PLAIN
        };
        let udp = VirtioNetHeader {
            gso_type: GSO_UDP,
            gso_size: 1400,
            ..VirtioNetHeader::PLAIN
        };
        let g = s.guest_offloads();
        assert!(g.accepts_gso(&VirtioNetHeader::PLAIN));
        assert!(!g.accepts_gso(&tso4));
        s.set_acked(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4));
        let g = s.guest_offloads();
        assert!(g.csum && g.accepts_gso(&tso4));
        assert!(!g.accepts_gso(&ecn6));
        assert!(HostOffloads::ALL.accepts_gso(&ecn6));
        assert!(!HostOffloads::ALL.accepts_gso(&udp), "UFO is not offered");
        let zero = VirtioNetHeader {
            gso_size: 0,
            ..tso4
        };
        assert!(!HostOffloads::ALL.accepts_gso(&zero));
    }
}
