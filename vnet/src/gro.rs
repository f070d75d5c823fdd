//! Receive-side coalescing (software GRO): consecutive TCP segments of one flow, bound for one
//! port, merged into a single frame of up to 64 KiB that a tap takes in one write.
//!
//! The underlay carries MTU-sized frames; a tap with offloads accepts 64 KiB frames whose
//! virtio-net header says "GSO TCP, segments of `gso_size`, checksum partial". Writing one of
//! those instead of forty small frames is what makes the overlay fast: the receiving kernel then
//! handles one large segment, as it would after its own GRO.
//!
//! The [`Coalescer`] is handed frames one at a time, each with the egress it goes to (the key),
//! and hands frames on through an `emit` callback: merged frames with a GSO header, everything
//! else as it came with an all-zero header. It holds a few flows at a time, so flows that
//! interleave still merge; [`Coalescer::flush`] empties it (the caller does so at the end of every
//! batch, so nothing waits for more traffic).
//!
//! A segment joins the frame held for its flow only if the result is exactly what a TSO sender
//! would have handed over, so that cutting it again ([`crate::offload::segment_tcp`]) gives back
//! the original segments byte for byte:
//! - same egress, untagged Ethernet, TCP over IPv4 (not a fragment) or IPv6 (no extension
//!   headers), with IP lengths that match the frame (no padding) and valid IPv4 header and TCP
//!   checksums (the merged frame's checksum is left partial, so nobody would check them later):
//!   verified here, unless the caller vouches for them ([`Coalescer::push_computed`]);
//! - all header bytes equal to the first segment's except the IPv4 length, id (which must be the
//!   first's plus the segment's index) and header checksum, the IPv6 payload length, and the TCP
//!   sequence number (which must continue exactly where the previous segment ended) and checksum;
//!   so the same IP options, TCP options (timestamps included), window, acknowledgement and ECN
//!   bits;
//! - flags ACK (with ECE, if the first has it) and a payload: a segment with SYN, FIN, RST, URG or
//!   CWR, or a bare ACK, is never merged. PSH is allowed on the last segment, which then ends the
//!   frame, as does a segment shorter than the first (the first's payload is the `gso_size`);
//! - the merged IP length stays within 65535.
//!
//! A frame that cannot join is handed on after whatever is held for its flow, so a flow's frames
//! keep their order; frames of different flows may pass each other, as under the kernel's GRO.

use vessel_proto::checksum::{add_words, fold};

use crate::offload::{self, FLAG_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, TcpLayout, VirtioNetHeader};

/// Flows held at once; the oldest is handed on when a new one needs room.
pub const MAX_FLOWS: usize = 8;
/// Largest merged frame: a 64 KiB IP packet behind an Ethernet header.
pub const MAX_MERGED_FRAME: usize = ETHERNET_LEN + 65_535;

const ETHERNET_LEN: usize = 14;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ETHERTYPE_IPV6: [u8; 2] = [0x86, 0xdd];
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;
const TCP_CWR: u8 = 0x80;
/// Where the TCP checksum lies in the TCP header.
const TCP_CHECKSUM_OFFSET: u16 = 16;

/// A frame handed on by the [`Coalescer`].
#[derive(Debug)]
pub struct Coalesced<'a> {
    /// The virtio-net header to write before it: all zero, or GSO TCP with a partial checksum.
    pub header: VirtioNetHeader,
    pub frame: &'a [u8],
    /// How many frames it stands for (1 unless merged).
    pub segments: usize,
}

/// Merges consecutive TCP segments of a flow bound for the same egress `K`.
#[derive(Debug)]
pub struct Coalescer<K> {
    /// Flows held, oldest first.
    flows: Vec<Flow<K>>,
    /// Buffers of flows handed on, kept for the next ones.
    spare: Vec<Vec<u8>>,
}

impl<K> Default for Coalescer<K> {
    fn default() -> Self {
        Coalescer {
            flows: Vec::with_capacity(MAX_FLOWS),
            spare: Vec::new(),
        }
    }
}

/// The frame held for one flow: the first segment's headers, then every segment's payload.
#[derive(Debug)]
struct Flow<K> {
    key: K,
    frame: Vec<u8>,
    layout: TcpLayout,
    /// Payload bytes of the first segment: every other segment but the last has as many.
    mss: usize,
    segments: usize,
    /// Sequence number the next segment must start at.
    next_seq: u32,
}

/// A TCP segment that may be merged: its layout and the fields that vary between segments.
struct Segment {
    layout: TcpLayout,
    seq: u32,
    flags: u8,
}

impl<K: Copy + Eq> Coalescer<K> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes `frame`, bound for `key`: holds it, merges it into the frame held for its flow, or
    /// hands it on; what is held for its flow and cannot wait is handed on first.
    pub fn push(&mut self, key: K, frame: &[u8], emit: &mut impl FnMut(K, Coalesced<'_>)) {
        self.take(key, frame, Checksums::Verify, emit);
    }

    /// [`Coalescer::push`] of a frame whose IPv4 header and TCP checksums its sender computed
    /// itself and whose bytes the transport protected on the way (a Vessel VTEP's mark, see
    /// [`crate::vxlan::MARK_CHECKSUMS_COMPUTED`]): they are taken as valid, not summed again.
    pub fn push_computed(&mut self, key: K, frame: &[u8], emit: &mut impl FnMut(K, Coalesced<'_>)) {
        self.take(key, frame, Checksums::Computed, emit);
    }

    fn take(
        &mut self,
        key: K,
        frame: &[u8],
        checksums: Checksums,
        emit: &mut impl FnMut(K, Coalesced<'_>),
    ) {
        let Some(segment) = mergeable(frame, checksums) else {
            // Not a data segment we merge; if it is TCP, its flow's held frame goes first.
            if let Some(index) = self.flows.iter().position(|flow| same_flow(flow, frame)) {
                self.hand_on(index, emit);
            }
            emit(key, plain(frame));
            return;
        };
        if let Some(index) = self.flows.iter().position(|flow| same_flow(flow, frame)) {
            let flow = &mut self.flows[index];
            if flow.key == key && flow.append(&segment, frame) {
                // The last segment of its frame: marked so, short, or the frame is full (a
                // shorter segment may still fit, as the last of a sender's 64 KiB frame does).
                if segment.flags & TCP_PSH != 0
                    || segment.payload_len(frame) < flow.mss
                    || flow.ip_len() == 65_535
                {
                    self.hand_on(index, emit);
                }
                return;
            }
            self.hand_on(index, emit);
        }
        if segment.flags & TCP_PSH != 0 {
            // It would end its frame at once: nothing to merge it with.
            emit(key, plain(frame));
            return;
        }
        if self.flows.len() == MAX_FLOWS {
            self.hand_on(0, emit);
        }
        let mut buffer = self
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(MAX_MERGED_FRAME));
        buffer.clear();
        buffer.extend_from_slice(frame);
        let mss = segment.payload_len(frame);
        self.flows.push(Flow {
            key,
            frame: buffer,
            mss,
            segments: 1,
            next_seq: segment.seq.wrapping_add(mss as u32),
            layout: segment.layout,
        });
    }

    /// Hands on every frame held.
    pub fn flush(&mut self, emit: &mut impl FnMut(K, Coalesced<'_>)) {
        while !self.flows.is_empty() {
            self.hand_on(0, emit);
        }
    }

    fn hand_on(&mut self, index: usize, emit: &mut impl FnMut(K, Coalesced<'_>)) {
        let mut flow = self.flows.remove(index);
        if flow.segments == 1 {
            emit(flow.key, plain(&flow.frame));
        } else {
            let header = flow.finish();
            emit(
                flow.key,
                Coalesced {
                    header,
                    frame: &flow.frame,
                    segments: flow.segments,
                },
            );
        }
        self.spare.push(flow.frame);
    }
}

fn plain(frame: &[u8]) -> Coalesced<'_> {
    Coalesced {
        header: VirtioNetHeader::default(),
        frame,
        segments: 1,
    }
}

impl Segment {
    fn payload_len(&self, frame: &[u8]) -> usize {
        frame.len() - self.layout.payload
    }
}

impl<K> Flow<K> {
    /// The IPv4 total length, or IPv6 payload length, of the frame held.
    fn ip_len(&self) -> usize {
        self.frame.len() - self.layout.l3 - if self.layout.v6 { 40 } else { 0 }
    }

    /// Appends `segment`'s payload if it continues this flow's frame exactly.
    fn append(&mut self, segment: &Segment, frame: &[u8]) -> bool {
        let held = &self.frame;
        let layout = &self.layout;
        let (l3, l4, payload) = (layout.l3, layout.l4, layout.payload);
        let added = segment.payload_len(frame);
        let ip_len = self.ip_len() + added;
        if segment.layout.v6 != layout.v6
            || segment.layout.l4 != l4
            || segment.layout.payload != payload
            || segment.seq != self.next_seq
            || added > self.mss
            || ip_len > 65_535
        {
            return false;
        }
        // Header bytes that must be equal; the ones between vary from segment to segment.
        let same = |from: usize, to: usize| held[from..to] == frame[from..to];
        let ip_same = if layout.v6 {
            // Version, class and flow label; next header, hop limit, addresses.
            same(0, l3 + 4) && same(l3 + 6, l4)
        } else {
            let id = u16::from_be_bytes([held[l3 + 4], held[l3 + 5]]);
            let expected = id.wrapping_add(self.segments as u16).to_be_bytes();
            // Version, length and TOS; flags, TTL, protocol; addresses and options.
            same(0, l3 + 2)
                && frame[l3 + 4..l3 + 6] == expected
                && same(l3 + 6, l3 + 10)
                && same(l3 + 12, l4)
        };
        // Ports; acknowledgement and data offset; flags but PSH; window; urgent pointer and options.
        let tcp_same = same(l4, l4 + 4)
            && same(l4 + 8, l4 + 13)
            && held[l4 + 13] == segment.flags & !TCP_PSH
            && same(l4 + 14, l4 + 16)
            && same(l4 + 18, payload);
        if !(ip_same && tcp_same) {
            return false;
        }
        self.frame.extend_from_slice(&frame[payload..]);
        self.frame[l4 + 13] = segment.flags;
        self.segments += 1;
        self.next_seq = self.next_seq.wrapping_add(added as u32);
        true
    }

    /// Sets the merged frame's lengths and checksums; returns its virtio-net header.
    fn finish(&mut self) -> VirtioNetHeader {
        let TcpLayout {
            l4, payload, v6, ..
        } = self.layout;
        let frame = &mut self.frame;
        let tcp_len = frame.len() - l4;
        offload::set_ip_lengths(frame, &self.layout, tcp_len);
        let pseudo = fold(offload::tcp_pseudo_sum(frame, &self.layout, tcp_len));
        frame[l4 + 16..l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
        VirtioNetHeader {
            flags: FLAG_NEEDS_CSUM,
            gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: payload as u16,
            gso_size: self.mss as u16,
            csum_start: l4 as u16,
            csum_offset: TCP_CHECKSUM_OFFSET,
            num_buffers: 0,
        }
    }
}

/// Whether `frame` is TCP of `flow`'s connection: same Ethernet header, addresses and ports.
fn same_flow<K>(flow: &Flow<K>, frame: &[u8]) -> bool {
    let held = &flow.frame;
    let TcpLayout { l3, l4, v6, .. } = flow.layout;
    let addresses = if v6 {
        l3 + 8..l3 + 40
    } else {
        l3 + 12..l3 + 20
    };
    let protocol = if v6 { l3 + 6 } else { l3 + 9 };
    // The version, and for IPv4 the header length: where the TCP header (its ports) would be.
    let version_mask = if v6 { 0xf0 } else { 0xff };
    frame.len() >= l4 + 4
        && held[..ETHERNET_LEN] == frame[..ETHERNET_LEN]
        && frame[l3] & version_mask == held[l3] & version_mask
        && frame[protocol] == held[protocol]
        && held[addresses.clone()] == frame[addresses]
        && held[l4..l4 + 4] == frame[l4..l4 + 4]
}

/// Whether a frame's checksums are to be verified before it is merged.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Checksums {
    Verify,
    /// Its sender computed them, and the transport protected the bytes since.
    Computed,
}

/// The segment, if `frame` is a TCP data segment the coalescer may merge (see the module docs).
fn mergeable(frame: &[u8], checksums: Checksums) -> Option<Segment> {
    let verify = checksums == Checksums::Verify;
    if frame.get(12..14)? != ETHERTYPE_IPV4 && frame[12..14] != ETHERTYPE_IPV6 {
        return None;
    }
    let layout = offload::tcp_layout(frame)?;
    let TcpLayout {
        l3, l4, payload, ..
    } = layout;
    if frame.len() <= payload {
        return None;
    }
    let flags = frame[l4 + 13];
    if flags & (TCP_FIN | TCP_SYN | TCP_RST | TCP_URG | TCP_CWR) != 0 || flags & TCP_ACK == 0 {
        return None;
    }
    if layout.v6 {
        if usize::from(u16::from_be_bytes([frame[l3 + 4], frame[l3 + 5]])) != frame.len() - l3 - 40
        {
            return None;
        }
    } else {
        let total = usize::from(u16::from_be_bytes([frame[l3 + 2], frame[l3 + 3]]));
        // More fragments, or a fragment offset: a fragment, not a segment.
        let fragment = u16::from_be_bytes([frame[l3 + 6], frame[l3 + 7]]) & 0x3fff != 0;
        if total != frame.len() - l3
            || fragment
            || verify && fold(add_words(0, &frame[l3..l4])) != 0xffff
        {
            return None;
        }
    }
    if verify {
        let pseudo = offload::tcp_pseudo_sum(frame, &layout, frame.len() - l4);
        if fold(add_words(pseudo, &frame[l4..])) != 0xffff {
            return None;
        }
    }
    let seq = u32::from_be_bytes([frame[l4 + 4], frame[l4 + 5], frame[l4 + 6], frame[l4 + 7]]);
    Some(Segment { layout, seq, flags })
}

#[cfg(test)]
mod tests;
