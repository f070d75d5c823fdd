//! virtio-blk feature bits, config space and the write-cache mode.
//!
//! The config space is built on demand from the volume's current layout, so a grown volume
//! shows its new capacity at the next GET_CONFIG. The cache mode follows virtio 1.2 §5.2.6:
//! with CONFIG_WCE negotiated the driver chooses through the `writeback` byte; without it the
//! device is write-back exactly when FLUSH was negotiated. Write-through means every write is
//! submitted with `write_through` (RWF_DSYNC) before it is acknowledged.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::request::{Limits, SECTOR_SIZE};

/// Largest data segment a request may use (SIZE_MAX), 1 MiB.
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest DISCARD / WRITE_ZEROES segment, in sectors (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Most segments per DISCARD / WRITE_ZEROES request.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Physical block size reported through TOPOLOGY: O_DIRECT is cheapest at this granularity.
pub const PHYSICAL_BLOCK_SIZE: u32 = 4096;
/// Size of `struct virtio_blk_config` in virtio 1.2 (with the secure-erase and zoned parts).
pub const CONFIG_SPACE_SIZE: usize = 96;
/// Offset of the `writeback` byte.
pub const WRITEBACK_OFFSET: u32 = 32;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Data segments per request advertised for a ring of `queue_size` (as QEMU does: two
/// descriptors go to header and status).
pub fn seg_max(queue_size: u16) -> u32 {
    u32::from(queue_size).saturating_sub(2).clamp(1, 254)
}

/// Feature bits offered for a volume.
pub fn features(read_only: bool) -> u64 {
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_BLK_F_SIZE_MAX)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_TOPOLOGY)
        | bit(VIRTIO_BLK_F_MQ)
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_CONFIG_WCE)
        | bit(VIRTIO_BLK_F_DISCARD)
        | bit(VIRTIO_BLK_F_WRITE_ZEROES);
    if read_only {
        f |= bit(VIRTIO_BLK_F_RO);
    }
    f
}

/// The negotiated features and the driver's cache choice, shared by the handler thread (which
/// writes them) and the queue workers (which read them per request).
#[derive(Debug)]
pub struct BlkSettings {
    acked: AtomicU64,
    /// The `writeback` byte as last written by the driver (CONFIG_WCE); starts write-back.
    wce: AtomicBool,
}

impl Default for BlkSettings {
    fn default() -> Self {
        BlkSettings {
            acked: AtomicU64::new(0),
            wce: AtomicBool::new(true),
        }
    }
}

impl BlkSettings {
    /// Records the frontend's acknowledged features.
    pub fn set_acked(&self, features: u64) {
        self.acked.store(features, Ordering::Release);
    }

    /// The acknowledged features.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    fn has(&self, b: u32) -> bool {
        self.acked() & bit(b) != 0
    }

    /// The `writeback` byte as the driver reads it.
    pub fn writeback(&self) -> bool {
        if self.has(VIRTIO_BLK_F_CONFIG_WCE) || self.acked() == 0 {
            // Before negotiation QEMU reads the config to learn our defaults; report the mode
            // that applies once CONFIG_WCE is accepted.
            self.wce.load(Ordering::Acquire)
        } else {
            self.has(VIRTIO_BLK_F_FLUSH)
        }
    }

    /// Whether writes must be durable before they are acknowledged.
    pub fn write_through(&self) -> bool {
        !self.writeback()
    }

    /// The driver writes the `writeback` byte. Refused without CONFIG_WCE or for values other
    /// than 0 and 1.
    pub fn set_writeback(&self, value: u8) -> Result<(), &'static str> {
        if !self.has(VIRTIO_BLK_F_CONFIG_WCE) {
            return Err("VIRTIO_BLK_F_CONFIG_WCE was not negotiated");
        }
        match value {
            0 | 1 => {
                self.wce.store(value == 1, Ordering::Release);
                Ok(())
            }
            _ => Err("writeback must be 0 or 1"),
        }
    }

    /// The guest's cache choice, as kept across a restart of this process: `[version 1, wce]`.
    pub fn saved_state(&self) -> Vec<u8> {
        vec![1, u8::from(self.wce.load(Ordering::Acquire))]
    }

    /// Takes back [`BlkSettings::saved_state`]; anything else (an empty state: a fresh device) restores the
    /// default, write-back.
    pub fn restore_state(&self, state: &[u8]) {
        let wce = match state {
            [1, wce] => *wce == 1,
            _ => true,
        };
        self.wce.store(wce, Ordering::Release);
    }

    /// Parser limits for the current negotiation.
    pub fn limits(
        &self,
        capacity: u64,
        block_size: u32,
        read_only: bool,
        queue_size: u16,
    ) -> Limits {
        Limits {
            capacity,
            block_size,
            read_only,
            seg_max: seg_max(queue_size),
            discard: self.has(VIRTIO_BLK_F_DISCARD),
            write_zeroes: self.has(VIRTIO_BLK_F_WRITE_ZEROES),
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: MAX_DISCARD_SEG,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: MAX_DISCARD_SEG,
        }
    }
}

/// Builds `struct virtio_blk_config` (little endian) for a volume of `capacity` bytes.
pub fn config_space(
    capacity: u64,
    block_size: u32,
    queues: u16,
    queue_size: u16,
    writeback: bool,
) -> Vec<u8> {
    let mut c = vec![0u8; CONFIG_SPACE_SIZE];
    let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
    put(0, &(capacity / SECTOR_SIZE).to_le_bytes());
    put(8, &SIZE_MAX.to_le_bytes());
    put(12, &seg_max(queue_size).to_le_bytes());
    // 16..20: geometry, not offered.
    put(20, &block_size.to_le_bytes());
    let block = block_size.max(1);
    let physical = PHYSICAL_BLOCK_SIZE.max(block);
    let exp = (physical / block).trailing_zeros() as u8;
    put(24, &[exp, 0]);
    // min_io_size and opt_io_size count logical blocks.
    put(26, &((physical / block) as u16).to_le_bytes());
    put(28, &0u32.to_le_bytes());
    put(WRITEBACK_OFFSET as usize, &[u8::from(writeback)]);
    put(34, &queues.to_le_bytes());
    let block_sectors = (u64::from(block) / SECTOR_SIZE).max(1) as u32;
    put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(40, &MAX_DISCARD_SEG.to_le_bytes());
    put(44, &block_sectors.to_le_bytes());
    put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(52, &MAX_DISCARD_SEG.to_le_bytes());
    put(56, &[1]);
    c
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_blk::virtio_blk_config;

    use super::*;

    #[test]
    fn config_space_matches_the_virtio_layout() {
        assert_eq!(std::mem::size_of::<virtio_blk_config>(), CONFIG_SPACE_SIZE);
        assert_eq!(
            std::mem::offset_of!(virtio_blk_config, wce),
            WRITEBACK_OFFSET as usize
        );
        assert_eq!(std::mem::offset_of!(virtio_blk_config, num_queues), 34);
        assert_eq!(
            std::mem::offset_of!(virtio_blk_config, max_discard_sectors),
            36
        );
        assert_eq!(
            std::mem::offset_of!(virtio_blk_config, write_zeroes_may_unmap),
            56
        );
        let c = config_space(10 << 30, 512, 4, 256, true);
        let u32_at = |o: usize| u32::from_le_bytes(c[o..o + 4].try_into().unwrap());
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (10 << 30) / 512
        );
        assert_eq!(u32_at(8), SIZE_MAX);
        assert_eq!(u32_at(12), 254);
        assert_eq!(u32_at(20), 512);
        assert_eq!(
            c[24], 3,
            "4 KiB physical blocks over 512-byte logical blocks"
        );
        assert_eq!(u16::from_le_bytes([c[26], c[27]]), 8);
        assert_eq!(c[32], 1);
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 4);
        assert_eq!(u32_at(44), 1);
        let c = config_space(1 << 20, 4096, 1, 128, false);
        assert_eq!(c[24], 0);
        assert_eq!(c[32], 0);
        assert_eq!(u32_at_of(&c, 44), 8);
    }

    fn u32_at_of(c: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(c[o..o + 4].try_into().unwrap())
    }

    #[test]
    fn cache_mode_follows_the_spec() {
        let s = BlkSettings::default();
        // CONFIG_WCE negotiated: the byte decides, default write-back.
        s.set_acked(bit(VIRTIO_BLK_F_CONFIG_WCE) | bit(VIRTIO_BLK_F_FLUSH));
        assert!(s.writeback());
        s.set_writeback(0).unwrap();
        assert!(s.write_through());
        assert!(s.set_writeback(2).is_err());
        s.set_writeback(1).unwrap();
        assert!(!s.write_through());
        // No CONFIG_WCE: write-back iff FLUSH.
        s.set_acked(bit(VIRTIO_BLK_F_FLUSH));
        assert!(s.writeback());
        assert!(s.set_writeback(0).is_err());
        s.set_acked(bit(VIRTIO_F_VERSION_1));
        assert!(s.write_through());
    }

    #[test]
    fn the_cache_choice_is_saved_and_a_fresh_device_starts_write_back() {
        let s = BlkSettings::default();
        s.set_acked(bit(VIRTIO_BLK_F_CONFIG_WCE) | bit(VIRTIO_BLK_F_FLUSH));
        s.set_writeback(0).unwrap();
        let saved = s.saved_state();
        // A restarted process: defaults, then the saved state.
        let restarted = BlkSettings::default();
        restarted.set_acked(bit(VIRTIO_BLK_F_CONFIG_WCE) | bit(VIRTIO_BLK_F_FLUSH));
        assert!(restarted.writeback());
        restarted.restore_state(&saved);
        assert!(restarted.write_through());
        // A reset device (empty state) and unknown state both go back to write-back.
        restarted.restore_state(&[]);
        assert!(restarted.writeback());
        restarted.set_writeback(0).unwrap();
        restarted.restore_state(&[9, 0]);
        assert!(restarted.writeback());
    }

    #[test]
    fn read_only_volumes_advertise_ro() {
        assert_ne!(features(true) & bit(VIRTIO_BLK_F_RO), 0);
        assert_eq!(features(false) & bit(VIRTIO_BLK_F_RO), 0);
    }
}
