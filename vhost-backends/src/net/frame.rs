//! Frames in and out of descriptor chains, independent of rings and threads (so they are
//! unit-tested and fuzzed on their own).
//!
//! Transmit: [`read_tx_frame`] gathers a chain of device-readable buffers into one contiguous
//! buffer (header, then frame) and checks the header against the negotiated offloads.
//! Receive: [`check_rx_chain`] vets a chain the guest offered (device-writable buffers inside
//! guest memory, room for at least a header) and [`write_rx_frame`] scatters header + frame
//! over one or more such chains.
//!
//! Invariant: every guest access goes through vm-memory's bounds-checked accessors against
//! the snapshot passed in; nothing a guest writes into a chain can make these functions panic
//! or touch memory outside its regions.

use smallvec::SmallVec;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::config::HostOffloads;
use super::header::{HEADER_LEN, VirtioNetHeader};
use super::port::MAX_FRAME_LEN;
use super::stats::Counter;
use crate::chain::{ChainError, Descriptor};
use crate::memory::guest_slice;

/// Shortest frame carried: an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;

/// Why a transmit chain was dropped. The chain itself is always returned to the guest (used
/// length 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TxDrop {
    /// The descriptor chain could not be walked.
    #[error("broken descriptor chain: {0}")]
    Chain(ChainError),
    /// A transmit chain holds a device-writable buffer.
    #[error("transmit chain has a device-writable descriptor")]
    Writable,
    /// Fewer bytes than a virtio-net header.
    #[error("transmit chain of {len} bytes has no room for the 12-byte header")]
    NoHeader { len: u64 },
    /// A buffer is not in guest memory.
    #[error("transmit buffer at guest address {addr:#x} ({len} bytes) is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    /// Longer than [`MAX_FRAME_LEN`].
    #[error("transmit frame of {len} bytes is longer than {MAX_FRAME_LEN}")]
    TooBig { len: u64 },
    /// Shorter than an Ethernet header.
    #[error("transmit frame of {len} bytes is shorter than an Ethernet header")]
    Runt { len: usize },
    /// The header asks for something the guest did not negotiate, or points outside the frame.
    #[error("transmit header refused: {0}")]
    BadHeader(&'static str),
}

impl TxDrop {
    pub(crate) fn counter(&self) -> Counter {
        match self {
            TxDrop::Chain(_) | TxDrop::Writable | TxDrop::NoHeader { .. } => Counter::TxBadChain,
            TxDrop::OutsideMemory { .. } => Counter::TxBadChain,
            TxDrop::TooBig { .. } => Counter::TxTooBig,
            TxDrop::Runt { .. } => Counter::TxRunt,
            TxDrop::BadHeader(_) => Counter::TxBadHeader,
        }
    }
}

/// Reads the transmit chain `descs` into `buf` (cleared first): on success `buf` holds the
/// 12-byte header followed by the frame (`&buf[HEADER_LEN..]`), and the checked header is
/// returned with `num_buffers` zeroed.
pub fn read_tx_frame(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    offloads: HostOffloads,
    buf: &mut Vec<u8>,
) -> Result<VirtioNetHeader, TxDrop> {
    buf.clear();
    append_tx_frame(mem, descs, offloads, buf)
}

/// [`read_tx_frame`] appending to `buf`: on success the header and frame follow what `buf`
/// held before; on failure `buf` is left as it was.
pub fn append_tx_frame(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    offloads: HostOffloads,
    buf: &mut Vec<u8>,
) -> Result<VirtioNetHeader, TxDrop> {
    let start = buf.len();
    let read = read_tx_chain(mem, descs, offloads, buf, start);
    if read.is_err() {
        buf.truncate(start);
    }
    read
}

fn read_tx_chain(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    offloads: HostOffloads,
    buf: &mut Vec<u8>,
    start: usize,
) -> Result<VirtioNetHeader, TxDrop> {
    // One walk for both. chain.rs caps a chain at 4 GiB, so the sum cannot overflow.
    let mut total = 0u64;
    for d in descs {
        if d.writable {
            return Err(TxDrop::Writable);
        }
        total += u64::from(d.len);
    }
    if total < HEADER_LEN as u64 {
        return Err(TxDrop::NoHeader { len: total });
    }
    let frame_len = total - HEADER_LEN as u64;
    if frame_len > MAX_FRAME_LEN as u64 {
        return Err(TxDrop::TooBig { len: frame_len });
    }
    // total <= HEADER_LEN + MAX_FRAME_LEN, far below usize::MAX.
    let total = total as usize;
    buf.reserve(total);
    // SAFETY: `reserve` made room for `total` bytes after the first `start` (= len) in the allocation.
    let into = unsafe { buf.as_mut_ptr().add(start) };
    let mut at = 0;
    for d in descs {
        let len = d.len as usize;
        // at + len <= total: the descriptors' lengths sum to it.
        let to = into.wrapping_add(at);
        match guest_slice(mem, d.addr, len) {
            // SAFETY: `span` is `len` bytes of guest memory, mapped while `mem` lives, with no Rust reference into
            // it, and `to` has room for as many; a plain memcpy, as `VolatileSlice::copy_to` makes for more than 8
            // bytes, without its checks and calls, which cost as much as the copy for a small frame.
            Some(span) => unsafe {
                std::ptr::copy_nonoverlapping(span.ptr_guard().as_ptr(), to, len)
            },
            // Across a region border: through the memory table.
            None => {
                let mut bytes = vec![0; len];
                mem.read_slice(&mut bytes, d.addr)
                    .map_err(|_| TxDrop::OutsideMemory {
                        addr: d.addr.0,
                        len: d.len,
                    })?;
                // SAFETY: `to` has room for `len` bytes, as above, and `bytes` is a buffer of ours.
                unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), to, len) };
            }
        }
        at += len;
    }
    // SAFETY: the loop wrote all `total` bytes after the first `start` (the descriptors' lengths sum to it).
    unsafe { buf.set_len(start + total) };
    let read = &buf[start..];
    let mut raw = [0u8; HEADER_LEN];
    raw.copy_from_slice(&read[..HEADER_LEN]);
    let mut header = VirtioNetHeader::from_bytes(&raw);
    header.num_buffers = 0;
    let frame = &read[HEADER_LEN..];
    if frame.len() < MIN_FRAME_LEN {
        return Err(TxDrop::Runt { len: frame.len() });
    }
    check_tx_header(&header, frame.len(), offloads)?;
    Ok(header)
}

fn check_tx_header(
    header: &VirtioNetHeader,
    frame_len: usize,
    offloads: HostOffloads,
) -> Result<(), TxDrop> {
    if header.needs_csum() {
        if !offloads.csum {
            return Err(TxDrop::BadHeader(
                "partial checksum without CSUM negotiated",
            ));
        }
        let end = usize::from(header.csum_start) + usize::from(header.csum_offset) + 2;
        if end > frame_len {
            return Err(TxDrop::BadHeader("checksum offsets outside the frame"));
        }
    }
    if header.gso_type != 0 && !offloads.accepts_gso(header) {
        return Err(TxDrop::BadHeader(
            "segmentation type not negotiated, or segment size 0",
        ));
    }
    Ok(())
}

/// A receive chain the guest offered, vetted: device-writable buffers, all in guest memory
/// (as of the snapshot it was checked against), with room for at least a header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxChain {
    /// The chain's head, to return it with.
    pub head: u16,
    /// The buffers (most chains have one or two: no allocation for those).
    bufs: SmallVec<[(GuestAddress, u32); 2]>,
    capacity: usize,
}

impl RxChain {
    /// Bytes the chain can take.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Why a receive chain cannot be used; it is returned to the guest with used length 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RxChainError {
    /// The descriptor chain could not be walked.
    #[error("broken descriptor chain: {0}")]
    Chain(ChainError),
    /// A receive chain holds a device-readable buffer.
    #[error("receive chain has a device-readable descriptor")]
    ReadOnly,
    /// A buffer is not in guest memory.
    #[error("receive buffer at guest address {addr:#x} ({len} bytes) is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    /// Not even a header fits (virtio 1.2 §5.1.6.3.1 requires that much).
    #[error("receive chain of {len} bytes has no room for the 12-byte header")]
    TooSmall { len: usize },
}

/// Vets the chain `descs` of `head` for receiving into.
pub fn check_rx_chain(
    mem: &GuestMemoryMmap,
    head: u16,
    descs: &[Descriptor],
) -> Result<RxChain, RxChainError> {
    let mut bufs = SmallVec::new();
    let mut capacity = 0usize;
    for d in descs {
        if !d.writable {
            return Err(RxChainError::ReadOnly);
        }
        if d.len == 0 {
            continue;
        }
        // One region holds a buffer as a rule; one that spans regions is checked piece by piece.
        if guest_slice(mem, d.addr, d.len as usize).is_none()
            && !GuestMemoryBackend::check_range(mem, d.addr, d.len as usize)
        {
            return Err(RxChainError::OutsideMemory {
                addr: d.addr.0,
                len: d.len,
            });
        }
        // Nothing is ever written past HEADER_LEN + MAX_FRAME_LEN: stop counting there.
        capacity = capacity
            .saturating_add(d.len as usize)
            .min(HEADER_LEN + MAX_FRAME_LEN);
        bufs.push((d.addr, d.len));
    }
    if capacity < HEADER_LEN {
        return Err(RxChainError::TooSmall { len: capacity });
    }
    Ok(RxChain {
        head,
        bufs,
        capacity,
    })
}

/// Writes `header` then `frame` into the receive chain `descs` if it is the common kind: one
/// device-writable buffer, in one memory region, with room for both. Returns the used length then;
/// `None` (nothing written) for any other chain, which [`check_rx_chain`] and [`write_rx_frame`]
/// handle. Linux's driver with MRG_RXBUF and DPDK's post buffers of this kind.
pub fn write_rx_frame_in_one(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    header: &VirtioNetHeader,
    frame: &[u8],
) -> Option<u32> {
    let [buffer] = descs else {
        return None;
    };
    let needed = HEADER_LEN + frame.len();
    if !buffer.writable || (buffer.len as usize) < needed {
        return None;
    }
    let span = guest_slice(mem, buffer.addr, needed)?;
    let to = span.ptr_guard_mut().as_ptr();
    // The copies below are what `VolatileSlice::copy_from` does for more than 8 bytes (a plain memcpy), without
    // its checks and calls, which cost as much as the copies for a small frame.
    // SAFETY: `span` is `needed` = HEADER_LEN + frame.len() bytes of guest memory, mapped while `mem`
    // lives, and no Rust reference points into it.
    unsafe { std::ptr::copy_nonoverlapping(header.to_bytes().as_ptr(), to, HEADER_LEN) };
    // SAFETY: as above; the frame's part starts HEADER_LEN bytes in.
    let to = unsafe { to.add(HEADER_LEN) };
    // SAFETY: as above.
    unsafe { std::ptr::copy_nonoverlapping(frame.as_ptr(), to, frame.len()) };
    // needed <= buffer.len, a u32.
    Some(needed as u32)
}

/// Writes `header` then `frame` across `chains`, in order, and appends `(head, bytes written)`
/// for each chain to `used`. The chains must hold `HEADER_LEN + frame.len()` bytes together;
/// a chain left with nothing to take gets 0. Fails only if a buffer left guest memory since it
/// was checked (the memory table changed); nothing is appended then.
pub fn write_rx_frame(
    mem: &GuestMemoryMmap,
    chains: &[RxChain],
    header: &VirtioNetHeader,
    frame: &[u8],
    used: &mut Vec<(u16, u32)>,
) -> Result<(), vm_memory::GuestMemoryError> {
    let header = header.to_bytes();
    let total = HEADER_LEN + frame.len();
    let first_used = used.len();
    let mut done = 0usize;
    for chain in chains {
        let mut written = 0u32;
        for &(addr, len) in &chain.bufs {
            if done == total {
                break;
            }
            let n = (len as usize).min(total - done);
            let result = write_span(mem, addr, &header, frame, done, n);
            if let Err(e) = result {
                used.truncate(first_used);
                return Err(e);
            }
            done += n;
            // n <= len, a u32.
            written += n as u32;
        }
        used.push((chain.head, written));
    }
    Ok(())
}

/// Writes bytes `from..from + n` of the stream header ++ frame at `addr`: translated once when
/// one memory region holds the span, as a rule.
fn write_span(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    header: &[u8; HEADER_LEN],
    frame: &[u8],
    from: usize,
    n: usize,
) -> Result<(), vm_memory::GuestMemoryError> {
    let in_header = n.min(HEADER_LEN.saturating_sub(from));
    let header_part = &header[from.min(HEADER_LEN)..][..in_header];
    let frame_from = from.saturating_sub(HEADER_LEN);
    let frame_part = &frame[frame_from..frame_from + (n - in_header)];
    if let Some(span) = guest_slice(mem, addr, n) {
        span.copy_from(header_part);
        if !frame_part.is_empty() {
            span.offset(in_header)?.copy_from(frame_part);
        }
        return Ok(());
    }
    mem.write_slice(header_part, addr)?;
    if !frame_part.is_empty() {
        mem.write_slice(
            frame_part,
            GuestAddress(addr.0.wrapping_add(in_header as u64)),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::header::{FLAG_NEEDS_CSUM, GSO_TCPV4};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, writable: bool) -> Descriptor {
        Descriptor {
            addr: GuestAddress(addr),
            len,
            writable,
        }
    }

    #[test]
    fn tx_header_checks() {
        let m = mem();
        let tso = VirtioNetHeader {
            flags: FLAG_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            ..VirtioNetHeader::PLAIN
        };
        m.write_slice(&tso.to_bytes(), GuestAddress(0x1000))
            .unwrap();
        let descs = [desc(0x1000, 12, false), desc(0x2000, 100, false)];
        let mut buf = Vec::new();
        assert_eq!(
            read_tx_frame(&m, &descs, HostOffloads::ALL, &mut buf),
            Ok(tso)
        );
        assert_eq!(buf.len(), 112);
        let no_tso = HostOffloads {
            tso4: false,
            ..HostOffloads::ALL
        };
        assert!(matches!(
            read_tx_frame(&m, &descs, no_tso, &mut buf),
            Err(TxDrop::BadHeader(_))
        ));
        assert!(matches!(
            read_tx_frame(&m, &descs, HostOffloads::default(), &mut buf),
            Err(TxDrop::BadHeader(_))
        ));
        // Checksum field past the end of a 40-byte frame.
        let short = [desc(0x1000, 12, false), desc(0x2000, 40, false)];
        assert!(matches!(
            read_tx_frame(&m, &short, HostOffloads::ALL, &mut buf),
            Err(TxDrop::BadHeader(_))
        ));
    }

    #[test]
    fn frames_append_after_each_other_and_a_bad_one_leaves_nothing() {
        let m = mem();
        let frame: Vec<u8> = (0..60u8).collect();
        m.write_slice(&VirtioNetHeader::PLAIN.to_bytes(), GuestAddress(0x1000))
            .unwrap();
        m.write_slice(&frame, GuestAddress(0x2000)).unwrap();
        let good = [desc(0x1000, 12, false), desc(0x2000, 60, false)];
        let mut buf = b"before".to_vec();
        append_tx_frame(&m, &good, HostOffloads::ALL, &mut buf).unwrap();
        assert_eq!(buf.len(), 6 + 72);
        assert_eq!(&buf[6 + 12..], &frame[..]);
        let runt = [desc(0x1000, 12, false), desc(0x2000, 10, false)];
        assert!(matches!(
            append_tx_frame(&m, &runt, HostOffloads::ALL, &mut buf),
            Err(TxDrop::Runt { len: 10 })
        ));
        assert_eq!(buf.len(), 78, "nothing of the refused frame stays");
        append_tx_frame(&m, &good, HostOffloads::ALL, &mut buf).unwrap();
        assert_eq!(&buf[78 + 12..], &frame[..]);
    }

    #[test]
    fn rx_frame_is_scattered_over_chains() {
        let m = mem();
        let a = check_rx_chain(&m, 3, &[desc(0x1000, 8, true), desc(0x1100, 8, true)]).unwrap();
        let b = check_rx_chain(&m, 5, &[desc(0x2000, 64, true)]).unwrap();
        assert_eq!(a.capacity(), 16);
        let frame: Vec<u8> = (0..60u8).collect();
        let h = VirtioNetHeader {
            num_buffers: 2,
            ..VirtioNetHeader::PLAIN
        };
        let mut used = Vec::new();
        write_rx_frame(&m, &[a, b], &h, &frame, &mut used).unwrap();
        assert_eq!(used, vec![(3, 16), (5, 56)]);
        let mut got = vec![0u8; 8];
        m.read_slice(&mut got, GuestAddress(0x1100)).unwrap();
        assert_eq!(
            &got[..4],
            &[0, 0, 2, 0][..],
            "header tail: csum_offset, num_buffers"
        );
        assert_eq!(&got[4..], &frame[..4]);
        let mut rest = vec![0u8; 56];
        m.read_slice(&mut rest, GuestAddress(0x2000)).unwrap();
        assert_eq!(&rest[..], &frame[4..]);

        assert_eq!(
            check_rx_chain(&m, 0, &[desc(0x1000, 8, false)]),
            Err(RxChainError::ReadOnly)
        );
        assert_eq!(
            check_rx_chain(&m, 0, &[desc(0x1000, 11, true)]),
            Err(RxChainError::TooSmall { len: 11 })
        );
        assert!(matches!(
            check_rx_chain(&m, 0, &[desc(0x1ff00, 0x200, true)]),
            Err(RxChainError::OutsideMemory { .. })
        ));
    }

    #[test]
    fn buffers_spanning_two_regions_are_read_and_written_whole() {
        // Two regions back to back: a buffer may run from one into the next.
        let m = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
        ])
        .unwrap();
        let frame: Vec<u8> = (0..64u8).collect();
        let mut sent = VirtioNetHeader::PLAIN.to_bytes().to_vec();
        sent.extend_from_slice(&frame);
        m.write_slice(&sent, GuestAddress(0xfff0)).unwrap();
        let mut buf = Vec::new();
        let tx = [desc(0xfff0, sent.len() as u32, false)];
        read_tx_frame(&m, &tx, HostOffloads::default(), &mut buf).unwrap();
        assert_eq!(&buf[HEADER_LEN..], &frame[..]);

        let chain = check_rx_chain(&m, 1, &[desc(0xfffa, 128, true)]).unwrap();
        let mut used = Vec::new();
        write_rx_frame(&m, &[chain], &VirtioNetHeader::PLAIN, &frame, &mut used).unwrap();
        assert_eq!(used, vec![(1, (HEADER_LEN + frame.len()) as u32)]);
        let mut got = vec![0u8; HEADER_LEN + frame.len()];
        m.read_slice(&mut got, GuestAddress(0xfffa)).unwrap();
        assert_eq!(got, sent);
    }

    /// What the fuzz target checks, over random guest memory and descriptor tables: no panic,
    /// a frame read is at least an Ethernet header behind an allowed header, and a vetted
    /// receive chain takes a frame whole.
    #[test]
    fn random_chains_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x7e55e1);
        let m = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x8000),
            (GuestAddress(0x8000), 0x8000),
            (GuestAddress(0x20000), 0x4000),
        ])
        .unwrap();
        let mut descs = Vec::new();
        let mut buf = Vec::new();
        let (mut frames_read, mut frames_written) = (0, 0);
        for _ in 0..3000 {
            let queue_size = 1u16 << rng.random_range(0..9);
            for i in 0..queue_size {
                let addr = u64::from(rng.random::<u16>()) * 2;
                let len = u32::from(rng.random::<u16>() % 0x3000);
                let flags = rng.random::<u16>() & 3;
                let next = rng.random::<u16>() % queue_size;
                let d = virtio_queue::desc::split::Descriptor::new(addr, len, flags, next);
                m.write_obj(d, GuestAddress(0x1000 + 16 * u64::from(i)))
                    .unwrap();
            }
            let head = rng.random::<u16>() % queue_size;
            if crate::chain::read_chain(
                &m,
                GuestAddress(0x1000),
                queue_size,
                head,
                false,
                &mut descs,
            )
            .is_err()
            {
                continue;
            }
            let offloads = HostOffloads {
                csum: rng.random(),
                tso4: rng.random(),
                tso6: rng.random(),
                ecn: rng.random(),
            };
            if let Ok(h) = read_tx_frame(&m, &descs, offloads, &mut buf) {
                assert!(buf.len() >= HEADER_LEN + MIN_FRAME_LEN);
                assert!(!h.is_gso() || offloads.accepts_gso(&h));
                frames_read += 1;
            }
            if let Ok(chain) = check_rx_chain(&m, head, &descs) {
                let len = rng.random_range(0..=(chain.capacity() - HEADER_LEN).min(4096));
                let frame = vec![0x5a; len];
                let mut used = Vec::new();
                write_rx_frame(&m, &[chain], &VirtioNetHeader::PLAIN, &frame, &mut used).unwrap();
                assert_eq!(used, vec![(head, (HEADER_LEN + len) as u32)]);
                frames_written += 1;
            }
        }
        assert!(
            frames_read > 20 && frames_written > 100,
            "{frames_read} {frames_written}"
        );
    }
}
