//! Descriptor chains of a split virtqueue, read into a flat list of guest buffers.
//!
//! `virtio_queue::DescriptorChain` cannot be built from an arbitrary head (inflight resubmission
//! needs that) and ends a chain silently on a bad link, which makes a broken chain look like a
//! short valid one. This walker reports every defect instead, so a device can tell "answer with
//! an error status" from "cannot answer at all".
//!
//! Invariant: the walk reads at most `queue_size` direct entries and at most
//! [`MAX_INDIRECT_DESCRIPTORS`] entries of one indirect table, every entry through bounds-checked
//! guest memory accessors; a looping or oversized chain is an error, never a hang. The buffers it
//! returns are *not* checked against guest memory here: devices translate them and must check.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use virtio_queue::desc::split::Descriptor as RawSplitDescriptor;

/// Descriptor continues via the `next` field.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Buffer is device-writable.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Buffer holds an indirect descriptor table.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// Largest indirect table accepted (QEMU's VIRTQUEUE_MAX_SIZE; Linux stays far below).
pub const MAX_INDIRECT_DESCRIPTORS: u32 = 1024;

const DESCRIPTOR_SIZE: u64 = 16;

/// One guest buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (`VIRTQ_DESC_F_WRITE`).
    pub writable: bool,
}

/// Why a chain could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A head or `next` index beyond the table.
    #[error("descriptor index {index} is outside its table of {size} entries")]
    IndexOutOfRange { index: u32, size: u32 },
    /// The table entry is not in guest memory.
    #[error("descriptor table entry at guest address {addr:#x} is not in guest memory")]
    TableNotInMemory { addr: u64 },
    /// The chain revisits entries or is longer than its table.
    #[error("descriptor chain is longer than its table of {limit} entries (a loop?)")]
    TooLong { limit: u32 },
    /// An indirect descriptor inside an indirect table.
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    /// An indirect descriptor that also has NEXT set.
    #[error("indirect descriptor with the NEXT flag set")]
    IndirectWithNext,
    /// Indirect table length not a non-zero multiple of 16 or too large.
    #[error(
        "indirect table of {len} bytes is not a non-zero multiple of 16 up to {MAX_INDIRECT_DESCRIPTORS} entries"
    )]
    BadIndirectTable { len: u32 },
    /// Indirect descriptor although RING_INDIRECT_DESC was not negotiated.
    #[error("indirect descriptor used without VIRTIO_RING_F_INDIRECT_DESC negotiated")]
    IndirectNotNegotiated,
    /// The chain's buffers add up to more than 4 GiB.
    #[error("descriptor chain describes more than 4 GiB")]
    TooManyBytes,
}

/// Reads the chain starting at `head` of the descriptor table at `table` (a ring of
/// `queue_size` entries) into `out` (cleared first).
pub fn read_chain<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    table: GuestAddress,
    queue_size: u16,
    head: u16,
    indirect_allowed: bool,
    out: &mut Vec<Descriptor>,
) -> Result<(), ChainError> {
    walk_chain(
        mem,
        |index| read_entry(mem, table, index),
        queue_size,
        head,
        indirect_allowed,
        out,
    )
}

/// One entry of a descriptor table as the driver wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TableEntry {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl TableEntry {
    /// The buffer it describes (what a chain is made of, once walked).
    pub(crate) fn descriptor(&self) -> Descriptor {
        Descriptor {
            addr: GuestAddress(self.addr),
            len: self.len,
            writable: self.flags & VIRTQ_DESC_F_WRITE != 0,
        }
    }

    /// Whether it is a whole chain by itself: no next descriptor, no indirect table.
    pub(crate) fn is_alone(&self) -> bool {
        self.flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT) == 0
    }

    /// Decodes an entry from its 16 bytes read as two native words (the layout is little-endian:
    /// `addr`, then `len`, `flags` and `next` packed in the second word).
    pub(crate) fn from_words(words: [u64; 2]) -> Self {
        let second = u64::from_le(words[1]);
        TableEntry {
            addr: u64::from_le(words[0]),
            len: second as u32,
            flags: (second >> 32) as u16,
            next: (second >> 48) as u16,
        }
    }
}

/// Reads entry `index` of the table at `table` through the guest memory accessors.
fn read_entry<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    table: GuestAddress,
    index: u32,
) -> Result<TableEntry, ChainError> {
    let addr = table
        .checked_add(u64::from(index) * DESCRIPTOR_SIZE)
        .ok_or(ChainError::TableNotInMemory {
            addr: table.raw_value(),
        })?;
    let desc: RawSplitDescriptor =
        mem.read_obj(addr)
            .map_err(|_| ChainError::TableNotInMemory {
                addr: addr.raw_value(),
            })?;
    Ok(TableEntry {
        addr: desc.addr().raw_value(),
        len: desc.len(),
        flags: desc.flags(),
        next: desc.next(),
    })
}

/// [`read_chain`] with the ring's own table read by `direct` (entry index → entry; a running
/// [`crate::vring::Vring`] reads it through a host pointer it keeps), indirect tables through
/// `mem`.
pub(crate) fn walk_chain<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    direct: impl Fn(u32) -> Result<TableEntry, ChainError>,
    queue_size: u16,
    head: u16,
    indirect_allowed: bool,
    out: &mut Vec<Descriptor>,
) -> Result<(), ChainError> {
    out.clear();
    // `None` while in the ring's own table, then the indirect table's address.
    let mut indirect_table: Option<GuestAddress> = None;
    let mut table_size = u32::from(queue_size);
    let mut index = u32::from(head);
    let mut budget = table_size;
    let mut total: u64 = 0;
    loop {
        if index >= table_size {
            return Err(ChainError::IndexOutOfRange {
                index,
                size: table_size,
            });
        }
        if budget == 0 {
            return Err(ChainError::TooLong { limit: table_size });
        }
        budget -= 1;
        let desc = match indirect_table {
            None => direct(index)?,
            Some(table) => read_entry(mem, table, index)?,
        };
        if desc.flags & VIRTQ_DESC_F_INDIRECT != 0 {
            if !indirect_allowed {
                return Err(ChainError::IndirectNotNegotiated);
            }
            if indirect_table.is_some() {
                return Err(ChainError::NestedIndirect);
            }
            if desc.flags & VIRTQ_DESC_F_NEXT != 0 {
                return Err(ChainError::IndirectWithNext);
            }
            let len = desc.len;
            let entries = len / DESCRIPTOR_SIZE as u32;
            if len == 0
                || !len.is_multiple_of(DESCRIPTOR_SIZE as u32)
                || entries > MAX_INDIRECT_DESCRIPTORS
            {
                return Err(ChainError::BadIndirectTable { len });
            }
            indirect_table = Some(GuestAddress(desc.addr));
            table_size = entries;
            budget = entries;
            index = 0;
            continue;
        }
        total += u64::from(desc.len);
        if total > u64::from(u32::MAX) {
            return Err(ChainError::TooManyBytes);
        }
        out.push(desc.descriptor());
        if desc.flags & VIRTQ_DESC_F_NEXT == 0 {
            return Ok(());
        }
        index = u32::from(desc.next);
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    const TABLE: u64 = 0x1000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn put(
        mem: &GuestMemoryMmap,
        table: u64,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let d = RawSplitDescriptor::new(addr, len, flags, next);
        mem.write_obj(d, GuestAddress(table + u64::from(index) * 16))
            .unwrap();
    }

    #[test]
    fn table_entries_decode_from_the_drivers_layout() {
        let m = mem();
        put(
            &m,
            TABLE,
            2,
            0x1122_3344_5566_7788,
            0x99aa_bbcc,
            0xddee,
            0x0ff1,
        );
        let words: [u64; 2] = m.read_obj(GuestAddress(TABLE + 32)).unwrap();
        assert_eq!(
            TableEntry::from_words(words),
            TableEntry {
                addr: 0x1122_3344_5566_7788,
                len: 0x99aa_bbcc,
                flags: 0xddee,
                next: 0x0ff1
            }
        );
        assert_eq!(
            read_entry(&m, GuestAddress(TABLE), 2),
            Ok(TableEntry::from_words(words))
        );
    }

    #[test]
    fn direct_chain_is_read_in_order() {
        let m = mem();
        put(&m, TABLE, 3, 0x4000, 16, VIRTQ_DESC_F_NEXT, 7);
        put(
            &m,
            TABLE,
            7,
            0x5000,
            512,
            VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
            1,
        );
        put(&m, TABLE, 1, 0x6000, 1, VIRTQ_DESC_F_WRITE, 0);
        let mut out = Vec::new();
        read_chain(&m, GuestAddress(TABLE), 8, 3, true, &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                Descriptor {
                    addr: GuestAddress(0x4000),
                    len: 16,
                    writable: false
                },
                Descriptor {
                    addr: GuestAddress(0x5000),
                    len: 512,
                    writable: true
                },
                Descriptor {
                    addr: GuestAddress(0x6000),
                    len: 1,
                    writable: true
                },
            ]
        );
    }

    #[test]
    fn indirect_table_is_followed() {
        let m = mem();
        put(&m, TABLE, 0, 0x2000, 48, VIRTQ_DESC_F_INDIRECT, 0);
        put(&m, 0x2000, 0, 0x4000, 16, VIRTQ_DESC_F_NEXT, 1);
        put(&m, 0x2000, 1, 0x5000, 4096, VIRTQ_DESC_F_NEXT, 2);
        put(&m, 0x2000, 2, 0x6000, 1, VIRTQ_DESC_F_WRITE, 0);
        let mut out = Vec::new();
        read_chain(&m, GuestAddress(TABLE), 8, 0, true, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[1].len, 4096);
        assert_eq!(
            read_chain(&m, GuestAddress(TABLE), 8, 0, false, &mut out),
            Err(ChainError::IndirectNotNegotiated)
        );
    }

    #[test]
    fn defects_are_reported() {
        let m = mem();
        let mut out = Vec::new();
        // Loop: 0 -> 1 -> 0.
        put(&m, TABLE, 0, 0x4000, 16, VIRTQ_DESC_F_NEXT, 1);
        put(&m, TABLE, 1, 0x4000, 16, VIRTQ_DESC_F_NEXT, 0);
        assert_eq!(
            read_chain(&m, GuestAddress(TABLE), 4, 0, true, &mut out),
            Err(ChainError::TooLong { limit: 4 })
        );
        // Next out of range.
        put(&m, TABLE, 1, 0x4000, 16, VIRTQ_DESC_F_NEXT, 9);
        assert_eq!(
            read_chain(&m, GuestAddress(TABLE), 4, 0, true, &mut out),
            Err(ChainError::IndexOutOfRange { index: 9, size: 4 })
        );
        // Head out of range.
        assert_eq!(
            read_chain(&m, GuestAddress(TABLE), 4, 4, true, &mut out),
            Err(ChainError::IndexOutOfRange { index: 4, size: 4 })
        );
        // Table outside guest memory.
        assert_eq!(
            read_chain(&m, GuestAddress(0xfff8), 4, 1, true, &mut out),
            Err(ChainError::TableNotInMemory { addr: 0x10008 })
        );
        // Indirect with NEXT, nested indirect, bad table length.
        put(
            &m,
            TABLE,
            2,
            0x2000,
            32,
            VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT,
            0,
        );
        assert_eq!(
            read_chain(&m, GuestAddress(TABLE), 4, 2, true, &mut out),
            Err(ChainError::IndirectWithNext)
        );
        put(&m, TABLE, 2, 0x2000, 32, VIRTQ_DESC_F_INDIRECT, 0);
        put(&m, 0x2000, 0, 0x3000, 32, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(
            read_chain(&m, GuestAddress(TABLE), 4, 2, true, &mut out),
            Err(ChainError::NestedIndirect)
        );
        put(&m, TABLE, 2, 0x2000, 20, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(
            read_chain(&m, GuestAddress(TABLE), 4, 2, true, &mut out),
            Err(ChainError::BadIndirectTable { len: 20 })
        );
        put(&m, TABLE, 2, 0x2000, 16 * 2048, VIRTQ_DESC_F_INDIRECT, 0);
        assert!(matches!(
            read_chain(&m, GuestAddress(TABLE), 4, 2, true, &mut out),
            Err(ChainError::BadIndirectTable { .. })
        ));
        // More than 4 GiB in total.
        put(&m, TABLE, 3, 0x4000, u32::MAX, VIRTQ_DESC_F_NEXT, 0);
        put(&m, TABLE, 0, 0x4000, 16, 0, 0);
        assert_eq!(
            read_chain(&m, GuestAddress(TABLE), 4, 3, true, &mut out),
            Err(ChainError::TooManyBytes)
        );
    }

    #[test]
    fn looping_indirect_table_is_bounded() {
        let m = mem();
        put(&m, TABLE, 0, 0x2000, 32, VIRTQ_DESC_F_INDIRECT, 0);
        put(&m, 0x2000, 0, 0x4000, 16, VIRTQ_DESC_F_NEXT, 1);
        put(&m, 0x2000, 1, 0x4000, 16, VIRTQ_DESC_F_NEXT, 0);
        let mut out = Vec::new();
        assert_eq!(
            read_chain(&m, GuestAddress(TABLE), 4, 0, true, &mut out),
            Err(ChainError::TooLong { limit: 2 })
        );
    }
}
