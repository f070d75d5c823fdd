//! The on-disk format of a pool disk, version 1.
//!
//! Owns the byte layout and nothing else: no I/O happens here. [`crate::disk`] reads and writes
//! these structures; this module encodes, decodes and validates them.
//!
//! ```text
//! offset 0            header block (4 KiB): DiskHeader, rest zero
//! TABLE_OFFSET        slot table: one 32-byte SlotEntry per slot, padded to whole 4 KiB blocks
//! data_offset         data area, aligned to 1 MiB: slot N lives at data_offset + N * extent_size
//! ```
//!
//! Every integer is little-endian. The header carries a CRC32C over all of its bytes before the
//! CRC field. A slot entry is either all zeroes (free) or carries a CRC32C over the disk id, its
//! own slot number and its other fields, so a table block written to the wrong place, or copied
//! from another disk, is detected rather than trusted.
//!
//! Invariant kept by the callers and checked here on load: a free slot's data reads as zeroes,
//! an `ALLOCATED` entry names exactly one (volume, extent), and an entry with `RELEASING` set no
//! longer belongs to its volume; its space must be zeroed before the slot is handed out again.

use uuid::Uuid;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// "VESSELDK": the first eight bytes of every pool disk.
pub(crate) const MAGIC: [u8; 8] = *b"VESSELDK";
/// Bumped on any incompatible change; readers refuse versions they do not know.
pub(crate) const FORMAT_VERSION: u32 = 1;
/// Unit of every metadata write: the header and each slot-table block.
pub(crate) const META_BLOCK: u64 = 4096;
/// The slot table starts right after the header block.
pub(crate) const TABLE_OFFSET: u64 = META_BLOCK;
/// The data area starts on this boundary, so every extent is aligned for any O_DIRECT device.
pub(crate) const DATA_ALIGN: u64 = 1 << 20;
pub(crate) const SLOT_ENTRY_SIZE: u64 = size_of::<SlotEntry>() as u64;
pub(crate) const ENTRIES_PER_BLOCK: u64 = META_BLOCK / SLOT_ENTRY_SIZE;

/// The slot belongs to the volume and extent it names.
pub(crate) const FLAG_ALLOCATED: u32 = 1;
/// The slot's extent was freed; its space is being zeroed and it becomes free afterwards.
pub(crate) const FLAG_RELEASING: u32 = 2;
const KNOWN_FLAGS: u32 = FLAG_ALLOCATED | FLAG_RELEASING;

/// Header block of a pool disk (the first bytes of block 0).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct DiskHeader {
    pub magic: [u8; 8],
    pub version: U32,
    /// Size of this struct as written; lets a later version append fields.
    pub header_size: U32,
    pub disk_id: [u8; 16],
    pub extent_size: U64,
    pub slot_count: U64,
    pub table_offset: U64,
    pub table_size: U64,
    pub data_offset: U64,
    /// Size of the disk when it was formatted: a shorter disk now means a truncated file.
    pub device_size: U64,
    pub crc32c: U32,
}

/// One slot-table entry. All zeroes means free.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub(crate) struct SlotEntry {
    pub volume: [u8; 16],
    pub extent: U64,
    pub flags: U32,
    pub crc32c: U32,
}

/// Where the parts of a disk live, derived from its size and extent size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DiskLayout {
    pub extent_size: u64,
    pub slot_count: u64,
    pub table_size: u64,
    pub data_offset: u64,
}

impl DiskLayout {
    /// The largest layout that fits `device_size`; `None` when not even one extent fits.
    pub fn for_device(device_size: u64, extent_size: u64) -> Option<Self> {
        let mut slots = device_size / extent_size;
        while slots > 0 {
            let layout = Self::with_slots(slots, extent_size)?;
            if layout.end() <= device_size {
                return Some(layout);
            }
            // Each slot dropped frees at least 1 MiB of data against 32 bytes of table, so this
            // converges within a few rounds.
            slots -= 1;
        }
        None
    }

    fn with_slots(slot_count: u64, extent_size: u64) -> Option<Self> {
        let table_size = slot_count
            .checked_mul(SLOT_ENTRY_SIZE)?
            .checked_next_multiple_of(META_BLOCK)?;
        let data_offset = TABLE_OFFSET
            .checked_add(table_size)?
            .checked_next_multiple_of(DATA_ALIGN)?;
        let layout = Self {
            extent_size,
            slot_count,
            table_size,
            data_offset,
        };
        slot_count
            .checked_mul(extent_size)?
            .checked_add(data_offset)?;
        Some(layout)
    }

    /// First byte past the data area.
    pub fn end(&self) -> u64 {
        self.data_offset + self.slot_count * self.extent_size
    }

    pub fn slot_offset(&self, slot: u64) -> u64 {
        self.data_offset + slot * self.extent_size
    }
}

/// Why a header was refused; [`crate::disk`] turns it into a `StoreError` naming the disk.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HeaderProblem {
    NoMagic,
    Version(u32),
    Corrupt(String),
}

impl DiskHeader {
    pub fn new(disk_id: Uuid, layout: &DiskLayout, device_size: u64) -> Self {
        let mut header = Self {
            magic: MAGIC,
            version: FORMAT_VERSION.into(),
            header_size: (size_of::<Self>() as u32).into(),
            disk_id: disk_id.into_bytes(),
            extent_size: layout.extent_size.into(),
            slot_count: layout.slot_count.into(),
            table_offset: TABLE_OFFSET.into(),
            table_size: layout.table_size.into(),
            data_offset: layout.data_offset.into(),
            device_size: device_size.into(),
            crc32c: 0.into(),
        };
        header.crc32c = header.compute_crc().into();
        header
    }

    fn compute_crc(&self) -> u32 {
        let bytes = self.as_bytes();
        crc32c::crc32c(&bytes[..bytes.len() - size_of::<U32>()])
    }

    /// Parses and checks the header at the start of `block`. Layout fields are checked against
    /// each other; the caller checks them against the device.
    pub fn decode(block: &[u8]) -> Result<(Self, DiskLayout), HeaderProblem> {
        let (header, _) = Self::read_from_prefix(block)
            .map_err(|_| HeaderProblem::Corrupt("short header block".into()))?;
        if header.magic != MAGIC {
            return Err(HeaderProblem::NoMagic);
        }
        if header.version.get() != FORMAT_VERSION {
            return Err(HeaderProblem::Version(header.version.get()));
        }
        if header.header_size.get() as usize != size_of::<Self>() {
            return Err(HeaderProblem::Corrupt(format!(
                "header size {} is wrong for version 1",
                header.header_size.get()
            )));
        }
        let crc = header.compute_crc();
        if crc != header.crc32c.get() {
            return Err(HeaderProblem::Corrupt(format!(
                "header checksum mismatch (stored {:#010x}, computed {crc:#010x})",
                header.crc32c.get()
            )));
        }
        let extent_size = header.extent_size.get();
        if !valid_extent_size(extent_size) {
            return Err(HeaderProblem::Corrupt(format!(
                "extent size {extent_size} is not a non-zero multiple of 1 MiB"
            )));
        }
        let expected =
            DiskLayout::with_slots(header.slot_count.get(), extent_size).ok_or_else(|| {
                HeaderProblem::Corrupt(format!("slot count {} overflows", header.slot_count.get()))
            })?;
        if header.slot_count.get() == 0
            || header.table_offset.get() != TABLE_OFFSET
            || header.table_size.get() != expected.table_size
            || header.data_offset.get() != expected.data_offset
        {
            return Err(HeaderProblem::Corrupt(format!(
                "inconsistent layout: {} slots, table at {} ({} bytes), data at {}",
                header.slot_count.get(),
                header.table_offset.get(),
                header.table_size.get(),
                header.data_offset.get()
            )));
        }
        Ok((header, expected))
    }

    pub fn disk_id(&self) -> Uuid {
        Uuid::from_bytes(self.disk_id)
    }
}

/// Largest extent size: keeps every size computation far from overflow.
pub(crate) const MAX_EXTENT_SIZE: u64 = 1 << 30;

/// Extent sizes are whole MiB so every extent starts on the data area's alignment.
pub(crate) fn valid_extent_size(extent_size: u64) -> bool {
    extent_size > 0 && extent_size <= MAX_EXTENT_SIZE && extent_size.is_multiple_of(DATA_ALIGN)
}

/// What a decoded slot entry says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SlotState {
    Free,
    Allocated { volume: Uuid, extent: u64 },
    Releasing { volume: Uuid, extent: u64 },
}

impl SlotEntry {
    pub fn encode(disk_id: Uuid, slot: u64, state: SlotState) -> Self {
        let (volume, extent, flags) = match state {
            SlotState::Free => return Self::default(),
            SlotState::Allocated { volume, extent } => (volume, extent, FLAG_ALLOCATED),
            SlotState::Releasing { volume, extent } => {
                (volume, extent, FLAG_ALLOCATED | FLAG_RELEASING)
            }
        };
        let mut entry = Self {
            volume: volume.into_bytes(),
            extent: extent.into(),
            flags: flags.into(),
            crc32c: 0.into(),
        };
        entry.crc32c = entry.compute_crc(disk_id, slot).into();
        entry
    }

    fn compute_crc(&self, disk_id: Uuid, slot: u64) -> u32 {
        let bytes = self.as_bytes();
        let crc = crc32c::crc32c(disk_id.as_bytes());
        let crc = crc32c::crc32c_append(crc, &slot.to_le_bytes());
        crc32c::crc32c_append(crc, &bytes[..bytes.len() - size_of::<U32>()])
    }

    /// `None` when the entry is corrupt: a checksum mismatch, unknown flags, or a releasing
    /// entry without its allocated bit.
    pub fn decode(&self, disk_id: Uuid, slot: u64) -> Option<SlotState> {
        if *self == Self::default() {
            return Some(SlotState::Free);
        }
        if self.crc32c.get() != self.compute_crc(disk_id, slot) {
            return None;
        }
        let flags = self.flags.get();
        let volume = Uuid::from_bytes(self.volume);
        let extent = self.extent.get();
        if flags & !KNOWN_FLAGS != 0 || flags & FLAG_ALLOCATED == 0 || volume.is_nil() {
            return None;
        }
        Some(if flags & FLAG_RELEASING != 0 {
            SlotState::Releasing { volume, extent }
        } else {
            SlotState::Allocated { volume, extent }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn layout_fits_device_and_aligns_data() {
        for (device, extent) in [
            (64 * MIB, MIB),
            (10 * 1024 * MIB + 12345, 64 * MIB),
            (3 * MIB, MIB),
            (1 << 44, 64 * MIB),
        ] {
            let layout = DiskLayout::for_device(device, extent).unwrap();
            assert!(layout.end() <= device, "{layout:?} exceeds {device}");
            assert_eq!(layout.data_offset % DATA_ALIGN, 0);
            assert!(layout.table_size >= layout.slot_count * SLOT_ENTRY_SIZE);
            // One more slot would not fit: the layout uses the space.
            let bigger = DiskLayout::with_slots(layout.slot_count + 1, extent).unwrap();
            assert!(bigger.end() > device);
        }
        // 64 MiB of 1 MiB extents: 1 MiB goes to header + table, 63 slots remain.
        assert_eq!(
            DiskLayout::for_device(64 * MIB, MIB).unwrap().slot_count,
            63
        );
        assert_eq!(DiskLayout::for_device(MIB, MIB), None);
        assert_eq!(DiskLayout::for_device(2 * MIB - 1, MIB), None);
    }

    #[test]
    fn header_round_trip_and_corruption() {
        let layout = DiskLayout::for_device(100 * MIB, MIB).unwrap();
        let id = Uuid::new_v4();
        let header = DiskHeader::new(id, &layout, 100 * MIB);
        let mut block = vec![0u8; META_BLOCK as usize];
        block[..size_of::<DiskHeader>()].copy_from_slice(header.as_bytes());
        let (decoded, decoded_layout) = DiskHeader::decode(&block).unwrap();
        assert_eq!(decoded.disk_id(), id);
        assert_eq!(decoded_layout, layout);
        assert_eq!(decoded.device_size.get(), 100 * MIB);

        // Every single-byte flip inside the header is refused, never accepted or panicking.
        for i in 0..size_of::<DiskHeader>() {
            let mut bad = block.clone();
            bad[i] ^= 0x40;
            assert!(
                DiskHeader::decode(&bad).is_err(),
                "flip at byte {i} accepted"
            );
        }
        assert_eq!(
            DiskHeader::decode(&vec![0u8; 4096]).unwrap_err(),
            HeaderProblem::NoMagic
        );
        let mut v2 = header;
        v2.version = 2.into();
        v2.crc32c = v2.compute_crc().into();
        assert_eq!(
            DiskHeader::decode(v2.as_bytes()).unwrap_err(),
            HeaderProblem::Version(2)
        );
        assert!(DiskHeader::decode(&block[..10]).is_err());
    }

    #[test]
    fn slot_entry_round_trip_and_corruption() {
        let disk = Uuid::new_v4();
        let volume = Uuid::new_v4();
        for state in [
            SlotState::Free,
            SlotState::Allocated { volume, extent: 7 },
            SlotState::Releasing {
                volume,
                extent: u64::MAX,
            },
        ] {
            let entry = SlotEntry::encode(disk, 42, state);
            assert_eq!(entry.decode(disk, 42), Some(state));
            if state != SlotState::Free {
                // The same bytes at another slot, or on another disk, are refused.
                assert_eq!(entry.decode(disk, 43), None);
                assert_eq!(entry.decode(Uuid::new_v4(), 42), None);
                for i in 0..size_of::<SlotEntry>() {
                    let mut bytes = entry.as_bytes().to_vec();
                    bytes[i] ^= 1;
                    let bad = SlotEntry::read_from_bytes(&bytes).unwrap();
                    assert_eq!(bad.decode(disk, 42), None, "flip at byte {i} accepted");
                }
            }
        }
        assert_eq!(ENTRIES_PER_BLOCK, 128);
    }
}
