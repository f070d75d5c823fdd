//! virtio-blk requests: from a descriptor chain in guest memory to an owned request.
//!
//! The chain is treated as the byte stream the virtio spec defines (no assumption about how the
//! driver split it into descriptors): device-readable bytes first — the 16-byte
//! `virtio_blk_outhdr`, then OUT / DISCARD / WRITE_ZEROES payload — and device-writable bytes
//! after — IN / GET_ID payload, then the one status byte, which is the last writable byte.
//!
//! Outcome, in this order of precedence:
//! - no place for a status byte (chain unreadable, last buffer not writable or empty, status
//!   outside guest memory): [`Parsed::NoStatus`], the chain goes back with used length 0;
//! - anything else wrong: [`Parsed::Reject`] with IOERR (malformed, out of range, read-only) or
//!   UNSUPP (unknown type, feature not negotiated, unknown flags);
//! - otherwise [`Parsed::Ready`] with host-address segments for the block store.
//!
//! Invariant: every host address in a returned [`Segment`] was translated from a guest range
//! that lies wholly inside one region of the `GuestMemoryMmap` the caller passed, and the
//! caller keeps that snapshot alive while the segments are in use. Nothing here writes guest
//! memory; nothing here panics on any chain.

use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vstore::Segment;

use crate::chain::{ChainError, Descriptor};

/// virtio-blk sector size; request offsets are in these units whatever the block size.
pub const SECTOR_SIZE: u64 = 512;
/// Size of `virtio_blk_outhdr`.
pub const HEADER_SIZE: u64 = 16;
/// Size of one `virtio_blk_discard_write_zeroes` segment.
pub const DISCARD_SEGMENT_SIZE: u64 = 16;
/// Bytes of a GET_ID answer.
pub const ID_BYTES: usize = 20;

/// Status byte values.
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// Status byte for an unsupported request.
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// What the parser must know about the device and the negotiated features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Volume size in bytes.
    pub capacity: u64,
    /// Volume block size (offsets and lengths must be multiples).
    pub block_size: u32,
    /// Writes refused.
    pub read_only: bool,
    /// Most data descriptors in an IN/OUT request (SEG_MAX).
    pub seg_max: u32,
    /// DISCARD negotiated.
    pub discard: bool,
    /// WRITE_ZEROES negotiated.
    pub write_zeroes: bool,
    /// Advertised limits for DISCARD.
    pub max_discard_sectors: u32,
    /// Advertised segment limit for DISCARD.
    pub max_discard_seg: u32,
    /// Advertised limits for WRITE_ZEROES.
    pub max_write_zeroes_sectors: u32,
    /// Advertised segment limit for WRITE_ZEROES.
    pub max_write_zeroes_seg: u32,
}

/// A byte range of the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    /// Offset in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A request ready for the block store.
#[derive(Debug)]
pub enum Request {
    /// Read `len` bytes at `offset` into `segments`.
    Read {
        offset: u64,
        len: u64,
        segments: Vec<Segment>,
    },
    /// Write `len` bytes at `offset` from `segments`.
    Write {
        offset: u64,
        len: u64,
        segments: Vec<Segment>,
    },
    /// Make acknowledged writes durable.
    Flush,
    /// Write the device id into these guest ranges (at most [`ID_BYTES`] in total).
    GetId { dest: Vec<(GuestAddress, usize)> },
    /// Discard these ranges.
    Discard { ranges: Vec<ByteRange> },
    /// Zero these ranges, unmapping if allowed.
    WriteZeroes { ranges: Vec<ByteRange>, unmap: bool },
}

impl PartialEq for Request {
    fn eq(&self, other: &Self) -> bool {
        // vstore::Segment carries raw pointers and no PartialEq; compare address and length.
        let same = |a: &[Segment], b: &[Segment]| {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(x, y)| x.addr == y.addr && x.len == y.len)
        };
        match (self, other) {
            (
                Request::Read {
                    offset: a,
                    len: b,
                    segments: c,
                },
                Request::Read {
                    offset: x,
                    len: y,
                    segments: z,
                },
            )
            | (
                Request::Write {
                    offset: a,
                    len: b,
                    segments: c,
                },
                Request::Write {
                    offset: x,
                    len: y,
                    segments: z,
                },
            ) => a == x && b == y && same(c, z),
            (Request::Flush, Request::Flush) => true,
            (Request::GetId { dest: a }, Request::GetId { dest: b }) => a == b,
            (Request::Discard { ranges: a }, Request::Discard { ranges: b }) => a == b,
            (
                Request::WriteZeroes {
                    ranges: a,
                    unmap: u,
                },
                Request::WriteZeroes {
                    ranges: b,
                    unmap: v,
                },
            ) => a == b && u == v,
            _ => false,
        }
    }
}

impl Eq for Request {}

impl Request {
    /// Bytes the device writes into the chain on success, status byte excluded.
    pub fn written_bytes(&self) -> u64 {
        match self {
            Request::Read { len, .. } => *len,
            Request::GetId { dest } => dest.iter().map(|(_, l)| *l as u64).sum(),
            _ => 0,
        }
    }
}

/// Why a request is refused or unanswerable; for logs and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("descriptor chain unreadable: {0}")]
    Chain(ChainError),
    #[error("chain has no device-writable status byte at its end")]
    NoStatusDescriptor,
    #[error("status byte is outside guest memory")]
    StatusNotInMemory,
    #[error("device-readable buffer after a device-writable one")]
    ReadableAfterWritable,
    #[error("request header shorter than 16 bytes")]
    HeaderTooShort,
    #[error("request header is outside guest memory")]
    HeaderNotInMemory,
    #[error("request type {0} is not supported")]
    UnknownType(u32),
    #[error("data buffer in the wrong direction for this request type")]
    WrongDirection,
    #[error("data length {0} is not a multiple of the sector and block size")]
    BadLength(u64),
    #[error("request uses {count} data buffers, more than the {max} advertised")]
    TooManySegments { count: usize, max: u32 },
    #[error("sector range starting at sector {sector} runs past the end of the volume")]
    OutOfRange { sector: u64 },
    #[error("offset of sector {sector} is not aligned to the volume block size")]
    Misaligned { sector: u64 },
    #[error("data buffer at guest address {0:#x} is outside guest memory")]
    BufferNotInMemory(u64),
    #[error("write to a read-only volume")]
    ReadOnly,
    #[error("feature for request type {0} was not negotiated")]
    NotNegotiated(u32),
    #[error("discard/write-zeroes payload of {0} bytes is not a non-zero multiple of 16")]
    BadSegmentPayload(u64),
    #[error("discard/write-zeroes segment of {sectors} sectors exceeds the advertised {max}")]
    SegmentTooLarge { sectors: u32, max: u32 },
    #[error("discard/write-zeroes segment has unsupported flags {0:#x}")]
    UnsupportedFlags(u32),
    #[error("GET_ID without a buffer for the id")]
    NoIdBuffer,
}

/// Outcome of parsing one chain.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// No status byte can be written: return the chain with used length 0.
    NoStatus(RequestError),
    /// Complete at once with `status`; `req_type` is the header's type when it was readable.
    Reject {
        status_addr: GuestAddress,
        status: u8,
        error: RequestError,
        req_type: Option<u32>,
    },
    /// Hand `request` to the block store, then write the status at `status_addr`.
    Ready {
        status_addr: GuestAddress,
        request: Request,
    },
}

/// Parses the chain `descs` (as read by [`crate::chain::read_chain`], or the error it gave).
pub fn parse(
    mem: &GuestMemoryMmap,
    descs: Result<&[Descriptor], ChainError>,
    limits: &Limits,
) -> Parsed {
    let descs = match descs {
        Ok(d) => d,
        Err(e) => return Parsed::NoStatus(RequestError::Chain(e)),
    };
    let Some(last) = descs.last().filter(|d| d.writable && d.len > 0) else {
        return Parsed::NoStatus(RequestError::NoStatusDescriptor);
    };
    // len > 0 and the chain walker bounded addr + len by nothing, so check the add.
    let Some(status_addr) = last.addr.checked_add(u64::from(last.len) - 1) else {
        return Parsed::NoStatus(RequestError::StatusNotInMemory);
    };
    if mem.find_region(status_addr).is_none() {
        return Parsed::NoStatus(RequestError::StatusNotInMemory);
    }
    let mut req_type = None;
    match parse_body(mem, descs, limits, &mut req_type) {
        Ok(request) => Parsed::Ready {
            status_addr,
            request,
        },
        Err((status, error)) => Parsed::Reject {
            status_addr,
            status,
            error,
            req_type,
        },
    }
}

type Refusal = (u8, RequestError);

fn ioerr(e: RequestError) -> Refusal {
    (STATUS_IOERR, e)
}

fn parse_body(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    limits: &Limits,
    req_type_out: &mut Option<u32>,
) -> Result<Request, Refusal> {
    let first_writable = descs.iter().position(|d| d.writable).unwrap_or(descs.len());
    if descs[first_writable..].iter().any(|d| !d.writable) {
        return Err(ioerr(RequestError::ReadableAfterWritable));
    }
    let (readable, writable) = descs.split_at(first_writable);
    let readable_len: u64 = readable.iter().map(|d| u64::from(d.len)).sum();
    let writable_len: u64 = writable.iter().map(|d| u64::from(d.len)).sum();
    if readable_len < HEADER_SIZE {
        return Err(ioerr(RequestError::HeaderTooShort));
    }
    let mut header = [0u8; HEADER_SIZE as usize];
    read_bytes(mem, readable, 0, &mut header)
        .map_err(|_| ioerr(RequestError::HeaderNotInMemory))?;
    let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    *req_type_out = Some(req_type);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    // Payload ranges: readable after the header, writable before the status byte.
    let out_payload = ranges(readable, HEADER_SIZE, readable_len - HEADER_SIZE);
    let in_payload = ranges(writable, 0, writable_len - 1);

    match req_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let is_read = req_type == VIRTIO_BLK_T_IN;
            let (data, other) = if is_read {
                (&in_payload, &out_payload)
            } else {
                (&out_payload, &in_payload)
            };
            if !other.is_empty() {
                return Err(ioerr(RequestError::WrongDirection));
            }
            if !is_read && limits.read_only {
                return Err(ioerr(RequestError::ReadOnly));
            }
            let len: u64 = data.iter().map(|r| r.1).sum();
            if !len.is_multiple_of(SECTOR_SIZE)
                || !len.is_multiple_of(u64::from(limits.block_size.max(1)))
            {
                return Err(ioerr(RequestError::BadLength(len)));
            }
            if data.len() > limits.seg_max as usize {
                return Err(ioerr(RequestError::TooManySegments {
                    count: data.len(),
                    max: limits.seg_max,
                }));
            }
            let offset = check_range(sector, len, limits)?;
            let mut segments = Vec::with_capacity(data.len());
            for &(gpa, len) in data {
                translate(mem, gpa, len, &mut segments).map_err(ioerr)?;
            }
            Ok(if is_read {
                Request::Read {
                    offset,
                    len,
                    segments,
                }
            } else {
                Request::Write {
                    offset,
                    len,
                    segments,
                }
            })
        }
        VIRTIO_BLK_T_FLUSH => Ok(Request::Flush),
        VIRTIO_BLK_T_GET_ID => {
            if !out_payload.is_empty() {
                return Err(ioerr(RequestError::WrongDirection));
            }
            let mut dest = Vec::new();
            let mut left = ID_BYTES as u64;
            for &(gpa, len) in &in_payload {
                if left == 0 {
                    break;
                }
                let take = len.min(left);
                if !range_in_memory(mem, gpa, take) {
                    return Err(ioerr(RequestError::BufferNotInMemory(gpa.raw_value())));
                }
                dest.push((gpa, take as usize));
                left -= take;
            }
            if dest.is_empty() {
                return Err(ioerr(RequestError::NoIdBuffer));
            }
            Ok(Request::GetId { dest })
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = req_type == VIRTIO_BLK_T_DISCARD;
            let negotiated = if discard {
                limits.discard
            } else {
                limits.write_zeroes
            };
            if !negotiated {
                return Err((STATUS_UNSUPP, RequestError::NotNegotiated(req_type)));
            }
            if !in_payload.is_empty() {
                return Err(ioerr(RequestError::WrongDirection));
            }
            if limits.read_only {
                return Err(ioerr(RequestError::ReadOnly));
            }
            let (max_sectors, max_seg) = if discard {
                (limits.max_discard_sectors, limits.max_discard_seg)
            } else {
                (limits.max_write_zeroes_sectors, limits.max_write_zeroes_seg)
            };
            let payload_len = readable_len - HEADER_SIZE;
            if payload_len == 0 || !payload_len.is_multiple_of(DISCARD_SEGMENT_SIZE) {
                return Err(ioerr(RequestError::BadSegmentPayload(payload_len)));
            }
            let count = payload_len / DISCARD_SEGMENT_SIZE;
            if count > u64::from(max_seg) {
                return Err(ioerr(RequestError::TooManySegments {
                    count: count as usize,
                    max: max_seg,
                }));
            }
            // count <= max_seg, so this buffer is small.
            let mut raw = vec![0u8; payload_len as usize];
            read_bytes(mem, readable, HEADER_SIZE, &mut raw)
                .map_err(|gpa| ioerr(RequestError::BufferNotInMemory(gpa)))?;
            let mut ranges = Vec::with_capacity(count as usize);
            let mut unmap = true;
            for seg in raw.chunks_exact(DISCARD_SEGMENT_SIZE as usize) {
                let seg_sector = u64::from_le_bytes([
                    seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
                ]);
                let sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
                let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
                let allowed = if discard {
                    0
                } else {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                };
                if flags & !allowed != 0 {
                    return Err((STATUS_UNSUPP, RequestError::UnsupportedFlags(flags)));
                }
                unmap &= flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                if sectors > max_sectors {
                    return Err(ioerr(RequestError::SegmentTooLarge {
                        sectors,
                        max: max_sectors,
                    }));
                }
                let len = u64::from(sectors) * SECTOR_SIZE;
                if !len.is_multiple_of(u64::from(limits.block_size.max(1))) {
                    return Err(ioerr(RequestError::BadLength(len)));
                }
                let offset = check_range(seg_sector, len, limits)?;
                if len > 0 {
                    ranges.push(ByteRange { offset, len });
                }
            }
            Ok(if discard {
                Request::Discard { ranges }
            } else {
                Request::WriteZeroes { ranges, unmap }
            })
        }
        other => Err((STATUS_UNSUPP, RequestError::UnknownType(other))),
    }
}

/// Byte offset of `sector` if `[sector, sector + len)` lies within the volume and is aligned.
fn check_range(sector: u64, len: u64, limits: &Limits) -> Result<u64, Refusal> {
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(ioerr(RequestError::OutOfRange { sector }))?;
    match offset.checked_add(len) {
        Some(end) if end <= limits.capacity => {}
        _ => return Err(ioerr(RequestError::OutOfRange { sector })),
    }
    if !offset.is_multiple_of(u64::from(limits.block_size.max(1))) {
        return Err(ioerr(RequestError::Misaligned { sector }));
    }
    Ok(offset)
}

/// The guest ranges covering `len` bytes starting `skip` bytes into the buffers `descs`.
fn ranges(descs: &[Descriptor], skip: u64, len: u64) -> Vec<(GuestAddress, u64)> {
    let mut out = Vec::new();
    let mut skip = skip;
    let mut left = len;
    for d in descs {
        if left == 0 {
            break;
        }
        let dlen = u64::from(d.len);
        if skip >= dlen {
            skip -= dlen;
            continue;
        }
        let take = (dlen - skip).min(left);
        // addr + skip may wrap for a hostile descriptor; such a range is then simply not in
        // memory and translation refuses it.
        out.push((GuestAddress(d.addr.raw_value().wrapping_add(skip)), take));
        left -= take;
        skip = 0;
    }
    out
}

/// Copies bytes `[skip, skip + buf.len())` of the buffers `descs` into `buf`; on failure returns
/// the guest address that was not in memory.
fn read_bytes(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    skip: u64,
    buf: &mut [u8],
) -> Result<(), u64> {
    let mut done = 0usize;
    for (gpa, len) in ranges(descs, skip, buf.len() as u64) {
        let len = len as usize;
        mem.read_slice(&mut buf[done..done + len], gpa)
            .map_err(|_| gpa.raw_value())?;
        done += len;
    }
    Ok(())
}

fn range_in_memory(mem: &GuestMemoryMmap, gpa: GuestAddress, len: u64) -> bool {
    let mut segs = Vec::new();
    translate(mem, gpa, len, &mut segs).is_ok()
}

/// Appends the host segments backing guest range `[gpa, gpa + len)`, split at region borders.
fn translate(
    mem: &GuestMemoryMmap,
    gpa: GuestAddress,
    len: u64,
    out: &mut Vec<Segment>,
) -> Result<(), RequestError> {
    let not_in_memory = RequestError::BufferNotInMemory(gpa.raw_value());
    let mut addr = gpa;
    let mut left = len;
    while left > 0 {
        let region = mem.find_region(addr).ok_or(not_in_memory)?;
        let within = addr.raw_value() - region.start_addr().raw_value();
        let take = (region.len() - within).min(left);
        let host = region
            .get_host_address(MemoryRegionAddress(within))
            .map_err(|_| not_in_memory)?;
        let take_usize = usize::try_from(take).map_err(|_| not_in_memory)?;
        out.push(Segment {
            addr: host,
            len: take_usize,
        });
        left -= take;
        if left > 0 {
            addr = addr.checked_add(take).ok_or(not_in_memory)?;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    pub(crate) fn limits() -> Limits {
        Limits {
            capacity: 1 << 20,
            block_size: 512,
            read_only: false,
            seg_max: 8,
            discard: true,
            write_zeroes: true,
            max_discard_sectors: 1024,
            max_discard_seg: 4,
            max_write_zeroes_sectors: 1024,
            max_write_zeroes_seg: 4,
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
        ])
        .unwrap()
    }

    fn header(m: &GuestMemoryMmap, at: u64, t: u32, sector: u64) -> Descriptor {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(at)).unwrap();
        Descriptor {
            addr: GuestAddress(at),
            len: 16,
            writable: false,
        }
    }

    fn rd(addr: u64, len: u32) -> Descriptor {
        Descriptor {
            addr: GuestAddress(addr),
            len,
            writable: false,
        }
    }

    fn wr(addr: u64, len: u32) -> Descriptor {
        Descriptor {
            addr: GuestAddress(addr),
            len,
            writable: true,
        }
    }

    fn reject_status(p: &Parsed) -> (u8, RequestError) {
        match p {
            Parsed::Reject { status, error, .. } => (*status, *error),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn read_with_data_split_across_a_region_border() {
        let m = mem();
        let descs = [
            header(&m, 0x100, VIRTIO_BLK_T_IN, 8),
            wr(0xf000, 0x2000),
            wr(0x300, 1),
        ];
        match parse(&m, Ok(&descs), &limits()) {
            Parsed::Ready {
                status_addr,
                request:
                    Request::Read {
                        offset,
                        len,
                        segments,
                    },
            } => {
                assert_eq!(status_addr, GuestAddress(0x300));
                assert_eq!((offset, len), (4096, 0x2000));
                assert_eq!(segments.len(), 2, "split at the region border");
                assert_eq!(segments[0].len + segments[1].len, 0x2000);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn header_data_and_status_in_any_framing() {
        let m = mem();
        // Header and write payload in one readable buffer, status in its own.
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        m.write_slice(&h, GuestAddress(0x1000)).unwrap();
        let descs = [rd(0x1000, 16 + 1024), wr(0x3000, 1)];
        match parse(&m, Ok(&descs), &limits()) {
            Parsed::Ready {
                request:
                    Request::Write {
                        offset: 0,
                        len: 1024,
                        segments,
                    },
                ..
            } => {
                assert_eq!(segments.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        // Read payload and status in one writable buffer.
        let descs = [header(&m, 0x100, VIRTIO_BLK_T_IN, 0), wr(0x4000, 513)];
        match parse(&m, Ok(&descs), &limits()) {
            Parsed::Ready {
                status_addr,
                request: Request::Read { len: 512, .. },
            } => {
                assert_eq!(status_addr, GuestAddress(0x4200));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_chains_get_ioerr_or_no_status() {
        let m = mem();
        let l = limits();
        let h = header(&m, 0x100, VIRTIO_BLK_T_IN, 0);
        // No status descriptor at all.
        assert_eq!(
            parse(&m, Ok(&[h]), &l),
            Parsed::NoStatus(RequestError::NoStatusDescriptor)
        );
        // Status not writable.
        assert_eq!(
            parse(&m, Ok(&[h, wr(0x2000, 512), rd(0x300, 1)]), &l),
            Parsed::NoStatus(RequestError::NoStatusDescriptor)
        );
        // Status too short (empty).
        assert_eq!(
            parse(&m, Ok(&[h, wr(0x2000, 512), wr(0x300, 0)]), &l),
            Parsed::NoStatus(RequestError::NoStatusDescriptor)
        );
        // Status outside guest memory.
        assert_eq!(
            parse(&m, Ok(&[h, wr(0x2000, 512), wr(0x40000, 1)]), &l),
            Parsed::NoStatus(RequestError::StatusNotInMemory)
        );
        // Unreadable chain.
        assert_eq!(
            parse(&m, Err(ChainError::TooLong { limit: 4 }), &l),
            Parsed::NoStatus(RequestError::Chain(ChainError::TooLong { limit: 4 }))
        );
        // Data in the wrong direction for IN and OUT.
        let (s, e) = reject_status(&parse(&m, Ok(&[h, rd(0x2000, 512), wr(0x300, 1)]), &l));
        assert_eq!((s, e), (STATUS_IOERR, RequestError::WrongDirection));
        let w = header(&m, 0x180, VIRTIO_BLK_T_OUT, 0);
        let (s, e) = reject_status(&parse(&m, Ok(&[w, wr(0x2000, 512), wr(0x300, 1)]), &l));
        assert_eq!((s, e), (STATUS_IOERR, RequestError::WrongDirection));
        // Readable after writable.
        let (s, e) = reject_status(&parse(
            &m,
            Ok(&[h, wr(0x2000, 512), rd(0x2400, 512), wr(0x300, 1)]),
            &l,
        ));
        assert_eq!((s, e), (STATUS_IOERR, RequestError::ReadableAfterWritable));
        // Length not a multiple of 512.
        let (s, e) = reject_status(&parse(&m, Ok(&[h, wr(0x2000, 100), wr(0x300, 1)]), &l));
        assert_eq!((s, e), (STATUS_IOERR, RequestError::BadLength(100)));
        // Too many segments.
        let mut many = vec![h];
        many.extend((0..9).map(|i| wr(0x2000 + i * 0x200, 512)));
        many.push(wr(0x300, 1));
        let (s, e) = reject_status(&parse(&m, Ok(&many), &l));
        assert_eq!(
            (s, e),
            (
                STATUS_IOERR,
                RequestError::TooManySegments { count: 9, max: 8 }
            )
        );
        // Header too short.
        let (s, e) = reject_status(&parse(&m, Ok(&[rd(0x100, 8), wr(0x300, 1)]), &l));
        assert_eq!((s, e), (STATUS_IOERR, RequestError::HeaderTooShort));
        // Data buffer outside guest memory.
        let (s, e) = reject_status(&parse(&m, Ok(&[h, wr(0x1f000, 0x2000), wr(0x300, 1)]), &l));
        assert_eq!(
            (s, e),
            (STATUS_IOERR, RequestError::BufferNotInMemory(0x1f000))
        );
        // Data buffer whose address wraps around.
        let (s, _) = reject_status(&parse(
            &m,
            Ok(&[h, wr(u64::MAX - 100, 512), wr(0x300, 1)]),
            &l,
        ));
        assert_eq!(s, STATUS_IOERR);
    }

    #[test]
    fn ranges_types_and_read_only() {
        let m = mem();
        let l = limits();
        // Last sector is fine, one past is not; huge sectors do not overflow.
        let ok = header(&m, 0x100, VIRTIO_BLK_T_IN, (1 << 20) / 512 - 1);
        assert!(matches!(
            parse(&m, Ok(&[ok, wr(0x2000, 512), wr(0x300, 1)]), &l),
            Parsed::Ready { .. }
        ));
        let past = header(&m, 0x100, VIRTIO_BLK_T_IN, (1 << 20) / 512);
        assert_eq!(
            reject_status(&parse(&m, Ok(&[past, wr(0x2000, 512), wr(0x300, 1)]), &l)).0,
            STATUS_IOERR
        );
        let huge = header(&m, 0x100, VIRTIO_BLK_T_IN, u64::MAX / 2);
        assert_eq!(
            reject_status(&parse(&m, Ok(&[huge, wr(0x2000, 512), wr(0x300, 1)]), &l)).0,
            STATUS_IOERR
        );
        // Unknown type.
        let unknown = header(&m, 0x100, 77, 0);
        assert_eq!(
            reject_status(&parse(&m, Ok(&[unknown, wr(0x300, 1)]), &l)),
            (STATUS_UNSUPP, RequestError::UnknownType(77))
        );
        // Read-only.
        let ro = Limits {
            read_only: true,
            ..l
        };
        let w = header(&m, 0x100, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            reject_status(&parse(&m, Ok(&[w, rd(0x2000, 512), wr(0x300, 1)]), &ro)),
            (STATUS_IOERR, RequestError::ReadOnly)
        );
        let r = header(&m, 0x140, VIRTIO_BLK_T_IN, 0);
        assert!(matches!(
            parse(&m, Ok(&[r, wr(0x2000, 512), wr(0x300, 1)]), &ro),
            Parsed::Ready { .. }
        ));
        // 4 KiB block size: 512-byte I/O and unaligned offsets are refused.
        let big = Limits {
            block_size: 4096,
            ..l
        };
        assert_eq!(
            reject_status(&parse(&m, Ok(&[r, wr(0x2000, 512), wr(0x300, 1)]), &big)).0,
            STATUS_IOERR
        );
        let odd = header(&m, 0x100, VIRTIO_BLK_T_IN, 1);
        assert_eq!(
            reject_status(&parse(&m, Ok(&[odd, wr(0x2000, 4096), wr(0x300, 1)]), &big)),
            (STATUS_IOERR, RequestError::Misaligned { sector: 1 })
        );
    }

    fn discard_payload(m: &GuestMemoryMmap, at: u64, segs: &[(u64, u32, u32)]) -> Descriptor {
        let mut raw = Vec::new();
        for &(sector, n, flags) in segs {
            raw.extend_from_slice(&sector.to_le_bytes());
            raw.extend_from_slice(&n.to_le_bytes());
            raw.extend_from_slice(&flags.to_le_bytes());
        }
        m.write_slice(&raw, GuestAddress(at)).unwrap();
        rd(at, raw.len() as u32)
    }

    #[test]
    fn discard_and_write_zeroes_segments() {
        let m = mem();
        let l = limits();
        let d = header(&m, 0x100, VIRTIO_BLK_T_DISCARD, 0);
        let p = discard_payload(&m, 0x2000, &[(0, 8, 0), (100, 16, 0)]);
        assert_eq!(
            parse(&m, Ok(&[d, p, wr(0x300, 1)]), &l),
            Parsed::Ready {
                status_addr: GuestAddress(0x300),
                request: Request::Discard {
                    ranges: vec![
                        ByteRange {
                            offset: 0,
                            len: 4096
                        },
                        ByteRange {
                            offset: 51200,
                            len: 8192
                        }
                    ]
                }
            }
        );
        // UNMAP on discard and unknown flags on write-zeroes are UNSUPP.
        let p = discard_payload(&m, 0x2000, &[(0, 8, 1)]);
        assert_eq!(
            reject_status(&parse(&m, Ok(&[d, p, wr(0x300, 1)]), &l)).0,
            STATUS_UNSUPP
        );
        let z = header(&m, 0x180, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let p = discard_payload(&m, 0x2000, &[(0, 8, 2)]);
        assert_eq!(
            reject_status(&parse(&m, Ok(&[z, p, wr(0x300, 1)]), &l)).0,
            STATUS_UNSUPP
        );
        // Unmap is honoured only when every segment allows it.
        let p = discard_payload(&m, 0x2000, &[(0, 8, 1), (8, 8, 1)]);
        assert!(matches!(
            parse(&m, Ok(&[z, p, wr(0x300, 1)]), &l),
            Parsed::Ready {
                request: Request::WriteZeroes { unmap: true, .. },
                ..
            }
        ));
        let p = discard_payload(&m, 0x2000, &[(0, 8, 1), (8, 8, 0)]);
        assert!(matches!(
            parse(&m, Ok(&[z, p, wr(0x300, 1)]), &l),
            Parsed::Ready {
                request: Request::WriteZeroes { unmap: false, .. },
                ..
            }
        ));
        // Limits: sectors per segment, number of segments, payload shape, range.
        let p = discard_payload(&m, 0x2000, &[(0, 1025, 0)]);
        assert_eq!(
            reject_status(&parse(&m, Ok(&[d, p, wr(0x300, 1)]), &l)),
            (
                STATUS_IOERR,
                RequestError::SegmentTooLarge {
                    sectors: 1025,
                    max: 1024
                }
            )
        );
        let p = discard_payload(&m, 0x2000, &[(0, 1, 0); 5]);
        assert_eq!(
            reject_status(&parse(&m, Ok(&[d, p, wr(0x300, 1)]), &l)).0,
            STATUS_IOERR
        );
        assert_eq!(
            reject_status(&parse(&m, Ok(&[d, rd(0x2000, 15), wr(0x300, 1)]), &l)),
            (STATUS_IOERR, RequestError::BadSegmentPayload(15))
        );
        let p = discard_payload(&m, 0x2000, &[(2047, 2, 0)]);
        assert_eq!(
            reject_status(&parse(&m, Ok(&[d, p, wr(0x300, 1)]), &l)).0,
            STATUS_IOERR
        );
        // Not negotiated.
        let off = Limits {
            discard: false,
            ..l
        };
        let p = discard_payload(&m, 0x2000, &[(0, 8, 0)]);
        assert_eq!(
            reject_status(&parse(&m, Ok(&[d, p, wr(0x300, 1)]), &off)).0,
            STATUS_UNSUPP
        );
        // Read-only.
        let ro = Limits {
            read_only: true,
            ..l
        };
        assert_eq!(
            reject_status(&parse(&m, Ok(&[z, p, wr(0x300, 1)]), &ro)).0,
            STATUS_IOERR
        );
    }

    #[test]
    fn get_id_and_flush() {
        let m = mem();
        let l = limits();
        let g = header(&m, 0x100, VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(
            parse(
                &m,
                Ok(&[g, wr(0x2000, 10), wr(0x2100, 64), wr(0x300, 1)]),
                &l
            ),
            Parsed::Ready {
                status_addr: GuestAddress(0x300),
                request: Request::GetId {
                    dest: vec![(GuestAddress(0x2000), 10), (GuestAddress(0x2100), 10)]
                }
            }
        );
        assert_eq!(
            reject_status(&parse(&m, Ok(&[g, wr(0x300, 1)]), &l)).1,
            RequestError::NoIdBuffer
        );
        let f = header(&m, 0x180, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(
            parse(&m, Ok(&[f, wr(0x300, 1)]), &l),
            Parsed::Ready {
                status_addr: GuestAddress(0x300),
                request: Request::Flush
            }
        );
    }
}
