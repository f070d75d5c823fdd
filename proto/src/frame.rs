//! The data-path frame between nodes, version 1: a fixed little-endian header, then the raw payload.
//!
//! ```text
//! offset  size  field
//!      0     4  magic      "VSLD"
//!      4     2  version    1
//!      6     2  opcode     request opcode; replies set REPLY_BIT and echo it
//!      8     4  flags      request flags (FLAG_DURABLE); 0 in replies
//!     12     4  status     0 in requests; the outcome in replies
//!     16    16  volume     volume id (UUID bytes)
//!     32     8  extent     extent index within the volume
//!     40     8  epoch      the sender's replica-set epoch (fencing); replies carry the replica's
//!     48     8  offset     byte offset within the extent
//!     56     4  length     bytes the request covers (reads, discards: the range; writes: the payload)
//!     60     4  payload    bytes of payload that follow the header
//!     64     8  sequence   the sender's request number; a reply echoes it (pipelining)
//!     72     4  crc32c     CRC32C over the header with this field zero, then the payload
//!     76     4  reserved   0
//! ```
//!
//! Blocks are never serialized: a write's payload is the guest's bytes, a read reply's payload the
//! disk's, and a receiver reads the header ([`HEADER_LEN`] bytes), checks it with [`decode`], reads
//! `payload` bytes straight into their final buffer, then checks the CRC with [`verify`]. A frame
//! that fails any check is a protocol error: the connection it came on is closed, nothing else.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// "VSLD": the first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"VSLD";
/// Bumped on any incompatible change; a receiver refuses versions it does not know.
pub const VERSION: u16 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = size_of::<RawHeader>();
/// Largest payload a frame carries (and the largest range one request covers).
pub const MAX_PAYLOAD: u32 = 4 << 20;
/// Set in the opcode of a reply.
pub const REPLY_BIT: u16 = 0x8000;
/// A write (or write-zeroes, discard) must be durable before the reply (write-through).
pub const FLAG_DURABLE: u32 = 1;
const KNOWN_FLAGS: u32 = FLAG_DURABLE;

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawHeader {
    magic: [u8; 4],
    version: U16,
    opcode: U16,
    flags: U32,
    status: U32,
    volume: [u8; 16],
    extent: U64,
    epoch: U64,
    offset: U64,
    length: U32,
    payload: U32,
    sequence: U64,
    crc32c: U32,
    reserved: U32,
}

const CRC_OFFSET: usize = HEADER_LEN - 8;

/// What a request asks of a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Opcode {
    Read,
    Write,
    /// Makes every write acknowledged so far durable.
    Flush,
    /// The range reads back as zeroes afterwards; whole extents are freed.
    Discard,
    WriteZeroes,
    /// Answered at once with `Ok`, touching nothing: shows that the node's data service is
    /// alive (not merely that its port accepts connections).
    Ping,
}

impl Opcode {
    fn code(self) -> u16 {
        match self {
            Self::Read => 1,
            Self::Write => 2,
            Self::Flush => 3,
            Self::Discard => 4,
            Self::WriteZeroes => 5,
            Self::Ping => 6,
        }
    }

    fn from_code(code: u16) -> Option<Self> {
        Some(match code {
            1 => Self::Read,
            2 => Self::Write,
            3 => Self::Flush,
            4 => Self::Discard,
            5 => Self::WriteZeroes,
            6 => Self::Ping,
            _ => return None,
        })
    }
}

/// The outcome a reply carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Ok,
    /// The request's epoch is older than the replica's: the sender was fenced off.
    StaleEpoch,
    /// The range lies outside the extent.
    OutOfRange,
    /// The replica's disks are full.
    NoSpace,
    /// The replica's disk failed the I/O.
    IoError,
    /// The replica does not hold this extent (at this epoch).
    NotReplica,
    /// A well-formed frame asking for something unsupported.
    Unsupported,
}

impl Status {
    fn code(self) -> u32 {
        match self {
            Self::Ok => 0,
            Self::StaleEpoch => 1,
            Self::OutOfRange => 2,
            Self::NoSpace => 3,
            Self::IoError => 4,
            Self::NotReplica => 5,
            Self::Unsupported => 6,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            0 => Self::Ok,
            1 => Self::StaleEpoch,
            2 => Self::OutOfRange,
            3 => Self::NoSpace,
            4 => Self::IoError,
            5 => Self::NotReplica,
            6 => Self::Unsupported,
            _ => return None,
        })
    }
}

/// Whether a frame asks or answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Request { flags: u32 },
    Reply { status: Status },
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    pub opcode: Opcode,
    pub kind: Kind,
    pub volume: [u8; 16],
    pub extent: u64,
    pub epoch: u64,
    pub offset: u64,
    pub length: u32,
    /// Bytes of payload after the header.
    pub payload: u32,
    pub sequence: u64,
}

/// Why a frame was refused. Any of these closes the connection it arrived on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("not a Vessel data frame (magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("data frame version {0} is not supported (this node speaks version {VERSION})")]
    UnsupportedVersion(u16),
    #[error("unknown data frame opcode {0:#06x}")]
    UnknownOpcode(u16),
    #[error("unknown reply status {0}")]
    UnknownStatus(u32),
    #[error("unknown request flags {0:#x}")]
    UnknownFlags(u32),
    #[error("malformed data frame: {0}")]
    Malformed(&'static str),
    #[error("data frame payload of {0} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLarge(u32),
    #[error("data frame CRC mismatch (corrupted in transit)")]
    BadCrc,
}

/// Encodes `header` for `payload` (whose length must be `header.payload`), CRC included.
pub fn encode(header: &Header, payload: &[u8]) -> [u8; HEADER_LEN] {
    encode_vectored(header, &[payload])
}

/// [`encode`] for a payload in pieces (a guest request's segments), sent as they are.
pub fn encode_vectored(header: &Header, payload: &[&[u8]]) -> [u8; HEADER_LEN] {
    debug_assert_eq!(
        payload.iter().map(|piece| piece.len()).sum::<usize>(),
        header.payload as usize
    );
    let (opcode, flags, status) = match header.kind {
        Kind::Request { flags } => (header.opcode.code(), flags, 0),
        Kind::Reply { status } => (header.opcode.code() | REPLY_BIT, 0, status.code()),
    };
    let raw = RawHeader {
        magic: MAGIC,
        version: VERSION.into(),
        opcode: opcode.into(),
        flags: flags.into(),
        status: status.into(),
        volume: header.volume,
        extent: header.extent.into(),
        epoch: header.epoch.into(),
        offset: header.offset.into(),
        length: header.length.into(),
        payload: header.payload.into(),
        sequence: header.sequence.into(),
        crc32c: 0.into(),
        reserved: 0.into(),
    };
    let mut bytes = [0u8; HEADER_LEN];
    bytes.copy_from_slice(raw.as_bytes());
    let crc = payload.iter().fold(crc32c::crc32c(&bytes), |crc, piece| {
        crc32c::crc32c_append(crc, piece)
    });
    bytes[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    bytes
}

/// Decodes and checks a header (everything but the CRC, which needs the payload: [`verify`]).
pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
    let raw =
        RawHeader::read_from_bytes(bytes).map_err(|_| FrameError::Malformed("short header"))?;
    if raw.magic != MAGIC {
        return Err(FrameError::BadMagic(raw.magic));
    }
    if raw.version.get() != VERSION {
        return Err(FrameError::UnsupportedVersion(raw.version.get()));
    }
    if raw.reserved.get() != 0 {
        return Err(FrameError::Malformed("reserved field is not zero"));
    }
    let code = raw.opcode.get();
    let opcode = Opcode::from_code(code & !REPLY_BIT).ok_or(FrameError::UnknownOpcode(code))?;
    let kind = if code & REPLY_BIT == 0 {
        let flags = raw.flags.get();
        if flags & !KNOWN_FLAGS != 0 {
            return Err(FrameError::UnknownFlags(flags));
        }
        if raw.status.get() != 0 {
            return Err(FrameError::Malformed("a request carries a status"));
        }
        Kind::Request { flags }
    } else {
        if raw.flags.get() != 0 {
            return Err(FrameError::Malformed("a reply carries flags"));
        }
        let status = Status::from_code(raw.status.get())
            .ok_or(FrameError::UnknownStatus(raw.status.get()))?;
        Kind::Reply { status }
    };
    let (length, payload) = (raw.length.get(), raw.payload.get());
    if length > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(length));
    }
    if payload > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(payload));
    }
    // Only writes carry data one way and read replies the other; the rest carry none.
    let expected = match (opcode, kind) {
        (Opcode::Write, Kind::Request { .. })
        | (Opcode::Read, Kind::Reply { status: Status::Ok }) => length,
        _ => 0,
    };
    if payload != expected {
        return Err(FrameError::Malformed(
            "payload length does not fit the opcode",
        ));
    }
    Ok(Header {
        opcode,
        kind,
        volume: raw.volume,
        extent: raw.extent.get(),
        epoch: raw.epoch.get(),
        offset: raw.offset.get(),
        length,
        payload,
        sequence: raw.sequence.get(),
    })
}

/// Checks the CRC of a decoded frame against the header bytes it came in and its payload.
pub fn verify(bytes: &[u8; HEADER_LEN], payload: &[u8]) -> Result<(), FrameError> {
    verify_vectored(bytes, &[payload])
}

/// [`verify`] for a payload received into pieces (a guest request's segments).
pub fn verify_vectored(bytes: &[u8; HEADER_LEN], payload: &[&[u8]]) -> Result<(), FrameError> {
    let mut zeroed = *bytes;
    zeroed[CRC_OFFSET..CRC_OFFSET + 4].fill(0);
    let sent = u32::from_le_bytes([
        bytes[CRC_OFFSET],
        bytes[CRC_OFFSET + 1],
        bytes[CRC_OFFSET + 2],
        bytes[CRC_OFFSET + 3],
    ]);
    let computed = payload.iter().fold(crc32c::crc32c(&zeroed), |crc, piece| {
        crc32c::crc32c_append(crc, piece)
    });
    if sent == computed {
        Ok(())
    } else {
        Err(FrameError::BadCrc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(sequence: u64, payload: &[u8]) -> Header {
        Header {
            opcode: Opcode::Write,
            kind: Kind::Request {
                flags: FLAG_DURABLE,
            },
            volume: [7; 16],
            extent: 3,
            epoch: 9,
            offset: 4096,
            length: u32::try_from(payload.len()).unwrap(),
            payload: u32::try_from(payload.len()).unwrap(),
            sequence,
        }
    }

    #[test]
    fn layout_is_the_documented_one() {
        assert_eq!(HEADER_LEN, 80);
        let header = encode(&write(0x0102_0304_0506_0708, b"data"), b"data");
        assert_eq!(&header[..4], b"VSLD");
        assert_eq!(&header[4..6], &[1, 0]);
        assert_eq!(&header[6..8], &[2, 0]);
        assert_eq!(&header[64..72], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&header[76..80], &[0; 4]);
    }

    #[test]
    fn round_trips_and_verifies() {
        let payload = vec![0xA5; 8192];
        let header = write(42, &payload);
        let bytes = encode(&header, &payload);
        assert_eq!(decode(&bytes).unwrap(), header);
        verify(&bytes, &payload).unwrap();

        let reply = Header {
            opcode: Opcode::Write,
            kind: Kind::Reply {
                status: Status::StaleEpoch,
            },
            length: 8192,
            payload: 0,
            ..header
        };
        let bytes = encode(&reply, &[]);
        assert_eq!(decode(&bytes).unwrap(), reply);
        verify(&bytes, &[]).unwrap();
    }

    #[test]
    fn a_payload_in_pieces_has_the_crc_of_the_whole() {
        let payload: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        let header = write(5, &payload);
        let whole = encode(&header, &payload);
        let (a, rest) = payload.split_at(1000);
        let (b, c) = rest.split_at(4096);
        assert_eq!(encode_vectored(&header, &[a, b, c]), whole);
        verify_vectored(&whole, &[a, &[], b, c]).unwrap();
        let mut changed = c.to_vec();
        changed[17] ^= 0x10;
        assert_eq!(
            verify_vectored(&whole, &[a, b, &changed]),
            Err(FrameError::BadCrc)
        );
    }

    #[test]
    fn any_flipped_bit_is_caught() {
        let payload = b"0123456789abcdef".to_vec();
        let bytes = encode(&write(1, &payload), &payload);
        for bit in 0..(HEADER_LEN + payload.len()) * 8 {
            let (mut header, mut data) = (bytes, payload.clone());
            let byte = bit / 8;
            if byte < HEADER_LEN {
                header[byte] ^= 1 << (bit % 8);
            } else {
                data[byte - HEADER_LEN] ^= 1 << (bit % 8);
            }
            let refused = decode(&header).and_then(|_| verify(&header, &data));
            assert!(refused.is_err(), "bit {bit} flipped unnoticed");
        }
    }

    #[test]
    fn malformed_headers_say_what_is_wrong() {
        let good = encode(&write(1, b"x"), b"x");
        let with = |offset: usize, value: &[u8]| {
            let mut bytes = good;
            bytes[offset..offset + value.len()].copy_from_slice(value);
            decode(&bytes).unwrap_err()
        };
        assert_eq!(with(0, b"HTTP"), FrameError::BadMagic(*b"HTTP"));
        assert_eq!(with(4, &[2, 0]), FrameError::UnsupportedVersion(2));
        assert_eq!(with(6, &[9, 0]), FrameError::UnknownOpcode(9));
        assert_eq!(with(8, &[2, 0, 0, 0]), FrameError::UnknownFlags(2));
        assert_eq!(with(56, &[0, 0, 0, 1]), FrameError::TooLarge(1 << 24));
        assert_eq!(
            with(60, &[0, 0, 0, 0]),
            FrameError::Malformed("payload length does not fit the opcode")
        );
        assert_eq!(
            with(12, &[1, 0, 0, 0]),
            FrameError::Malformed("a request carries a status")
        );
        assert_eq!(
            with(76, &[1, 0, 0, 0]),
            FrameError::Malformed("reserved field is not zero")
        );
    }
}
