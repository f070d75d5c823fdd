//! Per queue pair counters of the net device.
//!
//! The pair's worker is the only writer of its counters (relaxed atomics on a line of their
//! own); readers take a [`NetStats`] snapshot at any time. Refusals of [`super::RxQueue::push`]
//! are counted by the queue itself and merged into the snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one queue pair (or their sum), as seen by the guest's driver: `tx` is what the
/// guest sent, `rx` what it received.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames the guest sent that the port took.
    pub tx_frames: u64,
    /// Their bytes (Ethernet frame, without the virtio-net header).
    pub tx_bytes: u64,
    /// Transmit chains that could not be read: a device-writable descriptor, no room for the
    /// header, a buffer outside guest memory, or a broken descriptor chain.
    pub tx_dropped_bad_chain: u64,
    /// Transmit frames longer than [`super::MAX_FRAME_LEN`].
    pub tx_dropped_too_big: u64,
    /// Transmit frames shorter than an Ethernet header.
    pub tx_dropped_runt: u64,
    /// Transmit headers asking for an offload the guest did not negotiate or with offsets
    /// outside the frame.
    pub tx_dropped_bad_header: u64,
    /// Transmit frames the port refused.
    pub tx_dropped_refused: u64,
    /// Frames delivered into the guest's receive buffers.
    pub rx_frames: u64,
    /// Their bytes (without the virtio-net header).
    pub rx_bytes: u64,
    /// Frames refused because the receive queue was full (the guest did not provide buffers
    /// fast enough).
    pub rx_dropped_no_buffer: u64,
    /// Frames that did not fit: without MRG_RXBUF larger than one receive chain, or refused by
    /// the receive queue as too big or runt.
    pub rx_dropped_too_big: u64,
    /// GSO frames the guest did not negotiate (the switch side must segment them), or partial
    /// checksums with offsets outside the frame.
    pub rx_dropped_offload: u64,
    /// Frames refused or discarded because the guest's frontend was not connected.
    pub rx_dropped_link_down: u64,
    /// Receive chains returned unused because they were malformed (a read-only descriptor,
    /// shorter than the header, outside guest memory).
    pub rx_bad_chains: u64,
}

impl NetStats {
    /// Every drop of either direction.
    pub fn dropped(&self) -> u64 {
        self.tx_dropped_bad_chain
            + self.tx_dropped_too_big
            + self.tx_dropped_runt
            + self.tx_dropped_bad_header
            + self.tx_dropped_refused
            + self.rx_dropped_no_buffer
            + self.rx_dropped_too_big
            + self.rx_dropped_offload
            + self.rx_dropped_link_down
    }

    /// Sum of two snapshots (e.g. over queue pairs).
    pub fn add(&self, o: &NetStats) -> NetStats {
        NetStats {
            tx_frames: self.tx_frames + o.tx_frames,
            tx_bytes: self.tx_bytes + o.tx_bytes,
            tx_dropped_bad_chain: self.tx_dropped_bad_chain + o.tx_dropped_bad_chain,
            tx_dropped_too_big: self.tx_dropped_too_big + o.tx_dropped_too_big,
            tx_dropped_runt: self.tx_dropped_runt + o.tx_dropped_runt,
            tx_dropped_bad_header: self.tx_dropped_bad_header + o.tx_dropped_bad_header,
            tx_dropped_refused: self.tx_dropped_refused + o.tx_dropped_refused,
            rx_frames: self.rx_frames + o.rx_frames,
            rx_bytes: self.rx_bytes + o.rx_bytes,
            rx_dropped_no_buffer: self.rx_dropped_no_buffer + o.rx_dropped_no_buffer,
            rx_dropped_too_big: self.rx_dropped_too_big + o.rx_dropped_too_big,
            rx_dropped_offload: self.rx_dropped_offload + o.rx_dropped_offload,
            rx_dropped_link_down: self.rx_dropped_link_down + o.rx_dropped_link_down,
            rx_bad_chains: self.rx_bad_chains + o.rx_bad_chains,
        }
    }
}

/// What a worker counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Counter {
    TxFrames,
    TxBytes,
    TxBadChain,
    TxTooBig,
    TxRunt,
    TxBadHeader,
    TxRefused,
    RxFrames,
    RxBytes,
    RxTooBig,
    RxOffload,
    RxLinkDown,
    RxBadChains,
}

const COUNTERS: usize = Counter::RxBadChains as usize + 1;

/// The live counters of one queue pair.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(crate) struct Counters([AtomicU64; COUNTERS]);

impl Counters {
    pub(crate) fn add(&self, counter: Counter, n: u64) {
        self.0[counter as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// A snapshot, with the receive queue's refusals `(full, too big, closed)` merged in.
    pub(crate) fn snapshot(&self, refusals: (u64, u64, u64)) -> NetStats {
        let get = |c: Counter| self.0[c as usize].load(Ordering::Relaxed);
        let (full, too_big, closed) = refusals;
        NetStats {
            tx_frames: get(Counter::TxFrames),
            tx_bytes: get(Counter::TxBytes),
            tx_dropped_bad_chain: get(Counter::TxBadChain),
            tx_dropped_too_big: get(Counter::TxTooBig),
            tx_dropped_runt: get(Counter::TxRunt),
            tx_dropped_bad_header: get(Counter::TxBadHeader),
            tx_dropped_refused: get(Counter::TxRefused),
            rx_frames: get(Counter::RxFrames),
            rx_bytes: get(Counter::RxBytes),
            rx_dropped_no_buffer: full,
            rx_dropped_too_big: get(Counter::RxTooBig) + too_big,
            rx_dropped_offload: get(Counter::RxOffload),
            rx_dropped_link_down: get(Counter::RxLinkDown) + closed,
            rx_bad_chains: get(Counter::RxBadChains),
        }
    }
}
