//! Counters of the switch: per port, for the underlay, and why frames were dropped.
//!
//! Counters are relaxed atomics bumped on the forwarding path (no lock, no allocation); readers
//! take a [`TrafficStats`] snapshot, whose fields may be a frame apart from each other.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::frame::FrameError;
use crate::vxlan::VxlanError;

/// Why the switch dropped a frame. [`DropReason::label`] is the stable name an exporter uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Shorter than an Ethernet header.
    Runt,
    /// More payload than the network's MTU.
    Oversized,
    /// A header (Ethernet, 802.1Q, ARP) that contradicts itself or the frame's length.
    Malformed,
    /// The source MAC is multicast, broadcast or zero: no station sends from it.
    InvalidSourceMac,
    /// Port security: the source MAC is not the port's.
    SpoofedMac,
    /// Port security: an ARP whose sender MAC is not the port's, or whose sender IP is not the
    /// port's (when it has one).
    SpoofedArp,
    /// The destination lies where the frame came from: its own port, or, for a frame from the
    /// underlay, behind a VTEP (split horizon).
    SameSide,
    /// A datagram too short for a VXLAN header.
    VxlanTooShort,
    /// A VXLAN header without the I flag.
    VxlanNoVni,
    /// A VNI of no network on this node.
    UnknownVni,
    /// A datagram from an address that is not a VTEP of the VNI's network.
    UnknownVtep,
    /// A frame from a port the switch does not have (any more): a worker racing the removal of
    /// its port. Returned, but counted nowhere.
    UnknownPort,
    /// The egress would not take the frame: the port's queue was full or gone, or the underlay
    /// socket refused the datagram. Counted on the egress port (or the underlay) by the worker
    /// that tried, through [`crate::Switch::delivery_failed`].
    TxFailed,
}

impl DropReason {
    /// Number of reasons.
    pub const COUNT: usize = 13;
    /// Every reason, in the order of their indices.
    pub const ALL: [DropReason; Self::COUNT] = [
        Self::Runt,
        Self::Oversized,
        Self::Malformed,
        Self::InvalidSourceMac,
        Self::SpoofedMac,
        Self::SpoofedArp,
        Self::SameSide,
        Self::VxlanTooShort,
        Self::VxlanNoVni,
        Self::UnknownVni,
        Self::UnknownVtep,
        Self::UnknownPort,
        Self::TxFailed,
    ];

    /// A snake_case name for metrics labels and logs.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Runt => "runt",
            Self::Oversized => "oversized",
            Self::Malformed => "malformed",
            Self::InvalidSourceMac => "invalid_source_mac",
            Self::SpoofedMac => "spoofed_mac",
            Self::SpoofedArp => "spoofed_arp",
            Self::SameSide => "same_side",
            Self::VxlanTooShort => "vxlan_too_short",
            Self::VxlanNoVni => "vxlan_no_vni",
            Self::UnknownVni => "unknown_vni",
            Self::UnknownVtep => "unknown_vtep",
            Self::UnknownPort => "unknown_port",
            Self::TxFailed => "tx_failed",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

impl From<FrameError> for DropReason {
    fn from(error: FrameError) -> Self {
        match error {
            FrameError::Runt { .. } => Self::Runt,
            FrameError::Oversized { .. } => Self::Oversized,
            FrameError::Malformed(_) => Self::Malformed,
        }
    }
}

impl From<VxlanError> for DropReason {
    fn from(error: VxlanError) -> Self {
        match error {
            VxlanError::TooShort { .. } => Self::VxlanTooShort,
            // A decoded header never carries an out-of-range VNI; this is for completeness.
            VxlanError::NoVni { .. } | VxlanError::VniOutOfRange(_) => Self::VxlanNoVni,
        }
    }
}

/// Frames and bytes one way and the other, and drops by reason.
#[derive(Debug, Default)]
pub(crate) struct TrafficCounters {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    drops: [AtomicU64; DropReason::COUNT],
}

impl TrafficCounters {
    pub(crate) fn received(&self, bytes: usize) {
        self.received_many(1, bytes as u64);
    }

    pub(crate) fn sent(&self, bytes: usize) {
        self.sent_many(1, bytes as u64);
    }

    /// Counts `packets` received frames of `bytes` in all at once: each atomic add is a full barrier on x86, so a
    /// batch counts once rather than per frame.
    pub(crate) fn received_many(&self, packets: u64, bytes: u64) {
        if packets > 0 {
            self.rx_packets.fetch_add(packets, Ordering::Relaxed);
            self.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Counts `packets` sent frames of `bytes` in all at once (see [`TrafficCounters::received_many`]).
    pub(crate) fn sent_many(&self, packets: u64, bytes: u64) {
        if packets > 0 {
            self.tx_packets.fetch_add(packets, Ordering::Relaxed);
            self.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    pub(crate) fn dropped(&self, reason: DropReason) {
        self.drops[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> TrafficStats {
        TrafficStats {
            rx_packets: self.rx_packets.load(Ordering::Relaxed),
            rx_bytes: self.rx_bytes.load(Ordering::Relaxed),
            tx_packets: self.tx_packets.load(Ordering::Relaxed),
            tx_bytes: self.tx_bytes.load(Ordering::Relaxed),
            drops: std::array::from_fn(|i| self.drops[i].load(Ordering::Relaxed)),
        }
    }
}

/// A snapshot of a port's or the underlay's counters.
///
/// For a port, rx is what it sent into the switch (dropped frames included) and tx what the
/// switch handed to it (ARP replies included). For the underlay, rx is VXLAN datagrams received
/// and tx the datagrams the switch asked to send, one per VTEP; bytes are UDP payload bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    drops: [u64; DropReason::COUNT],
}

impl TrafficStats {
    /// Frames dropped for `reason`.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    /// Frames dropped for any reason.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// Each reason with its count, zeroes included (a metrics exporter's series).
    pub fn drops_by_reason(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .into_iter()
            .map(|reason| (reason, self.drops(reason)))
    }
}

/// A snapshot of one network's MAC table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetworkStats {
    /// Entries, static and learned.
    pub mac_entries: usize,
    pub learned_entries: usize,
    /// New MACs not learned because the table was full.
    pub learning_refused: u64,
    /// Learned MACs that moved to another port or VTEP.
    pub mac_moves: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_index_their_own_slot_and_have_distinct_labels() {
        for (i, reason) in DropReason::ALL.into_iter().enumerate() {
            assert_eq!(reason.index(), i);
        }
        let mut labels: Vec<_> = DropReason::ALL.iter().map(|r| r.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), DropReason::COUNT);
    }

    #[test]
    fn counts_what_it_is_told() {
        let counters = TrafficCounters::default();
        counters.received(60);
        counters.received(1514);
        counters.sent(42);
        counters.dropped(DropReason::SpoofedMac);
        counters.dropped(DropReason::SpoofedMac);
        counters.dropped(DropReason::Runt);
        let stats = counters.snapshot();
        assert_eq!((stats.rx_packets, stats.rx_bytes), (2, 1574));
        assert_eq!((stats.tx_packets, stats.tx_bytes), (1, 42));
        assert_eq!(stats.drops(DropReason::SpoofedMac), 2);
        assert_eq!(stats.drops(DropReason::Runt), 1);
        assert_eq!(stats.total_drops(), 3);
        assert_eq!(stats.drops_by_reason().filter(|(_, n)| *n > 0).count(), 2);
    }
}
