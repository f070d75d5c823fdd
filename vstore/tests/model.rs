//! Property test: random writes, reads, discards, write-zeroes and flushes on a volume agree
//! byte for byte with an in-memory model, on aligned (zero-copy) and unaligned (bounce)
//! segments and across extent boundaries — and still agree after the pool is re-opened.

mod common;

use common::*;
use proptest::prelude::*;
use vstore::{IoQueue, IoRequest};

const BLOCK: u64 = 512;
/// Six extents, the last one partial.
const SIZE: u64 = 5 * MIB + 3 * BLOCK;
const BLOCKS: u64 = SIZE / BLOCK;
/// Requests up to 2.5 MiB: every one can span three extents.
const MAX_BLOCKS: u64 = 5 * 1024;

#[derive(Clone, Debug)]
struct Buffers {
    /// Start of the buffer past a 4 KiB boundary: 0 keeps it aligned.
    misalign: usize,
    /// Segment lengths (the last segment takes the rest).
    cuts: Vec<usize>,
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        at: u64,
        blocks: u64,
        seed: u8,
        write_through: bool,
        buffers: Buffers,
    },
    Read {
        at: u64,
        blocks: u64,
        buffers: Buffers,
    },
    Discard {
        at: u64,
        blocks: u64,
    },
    WriteZeroes {
        at: u64,
        blocks: u64,
        may_unmap: bool,
    },
    Flush,
}

fn buffers() -> impl Strategy<Value = Buffers> {
    let misalign = prop_oneof![3 => Just(0usize), 1 => 1usize..4096];
    let cuts = prop_oneof![
        2 => Just(Vec::new()),
        // Block-sized segments: zero-copy when the buffer is aligned.
        2 => prop::collection::vec((1usize..64).prop_map(|n| n * 512), 1..8),
        // Arbitrary lengths: always through the bounce buffer.
        1 => prop::collection::vec(1usize..40_000, 1..8),
    ];
    (misalign, cuts).prop_map(|(misalign, cuts)| Buffers { misalign, cuts })
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..BLOCKS, 1..=MAX_BLOCKS);
    prop_oneof![
        4 => (range.clone(), any::<u8>(), any::<bool>(), buffers())
            .prop_map(|((at, blocks), seed, write_through, buffers)| Op::Write { at, blocks, seed, write_through, buffers }),
        3 => (range.clone(), buffers()).prop_map(|((at, blocks), buffers)| Op::Read { at, blocks, buffers }),
        1 => range.clone().prop_map(|(at, blocks)| Op::Discard { at, blocks }),
        1 => (range, any::<bool>()).prop_map(|((at, blocks), may_unmap)| Op::WriteZeroes { at, blocks, may_unmap }),
        1 => Just(Op::Flush),
    ]
}

/// Byte range of a request, clamped to the volume.
fn span(at: u64, blocks: u64) -> (u64, usize) {
    let blocks = blocks.min(BLOCKS - at);
    (at * BLOCK, (blocks * BLOCK) as usize)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn volume_matches_model(ops in prop::collection::vec(op(), 1..40)) {
        let dir = test_dir();
        let pool = pool();
        let disk_a = add_file_disk(&pool, dir.path(), "a", 4 * MIB);
        let disk_b = add_file_disk(&pool, dir.path(), "b", 4 * MIB);
        let volume = pool.open_volume(layout(SIZE)).unwrap();
        let mut queue = IoQueue::new(16).unwrap();
        let mut model = vec![0u8; SIZE as usize];

        for op in &ops {
            match op {
                Op::Write { at, blocks, seed, write_through, buffers } => {
                    let (offset, len) = span(*at, *blocks);
                    let data = pattern(*seed, len);
                    let mut buf = GuestBuf::from_bytes(&data, buffers.misalign);
                    let segments = buf.segments(&buffers.cuts);
                    run(&mut queue, &volume, IoRequest::Write { offset, segments: &segments, write_through: *write_through }).unwrap();
                    model[offset as usize..offset as usize + len].copy_from_slice(&data);
                }
                Op::Read { at, blocks, buffers } => {
                    let (offset, len) = span(*at, *blocks);
                    let mut buf = GuestBuf::new(len, buffers.misalign);
                    buf.as_mut_slice().fill(0xee);
                    let segments = buf.segments(&buffers.cuts);
                    run(&mut queue, &volume, IoRequest::Read { offset, segments: &segments }).unwrap();
                    prop_assert!(buf.as_slice() == &model[offset as usize..offset as usize + len], "read at {offset} len {len} differs from model");
                }
                Op::Discard { at, blocks } => {
                    let (offset, len) = span(*at, *blocks);
                    run(&mut queue, &volume, IoRequest::Discard { offset, len: len as u64 }).unwrap();
                    model[offset as usize..offset as usize + len].fill(0);
                }
                Op::WriteZeroes { at, blocks, may_unmap } => {
                    let (offset, len) = span(*at, *blocks);
                    run(&mut queue, &volume, IoRequest::WriteZeroes { offset, len: len as u64, may_unmap: *may_unmap }).unwrap();
                    model[offset as usize..offset as usize + len].fill(0);
                }
                Op::Flush => run(&mut queue, &volume, IoRequest::Flush).unwrap(),
            }
        }

        // Every extent holding non-zero bytes is allocated; space accounting agrees with the disks.
        let dirty_extents = model.chunks(EXTENT as usize).filter(|c| c.iter().any(|&b| b != 0)).count() as u64;
        prop_assert!(volume.allocated_bytes() >= dirty_extents * EXTENT);
        let slots_used: u64 = pool.disks().iter().map(|d| d.slots_used).sum();
        prop_assert_eq!(slots_used * EXTENT, volume.allocated_bytes());
        prop_assert!(read(&mut queue, &volume, 0, SIZE as usize).unwrap() == model);

        // And the same after a restart.
        let volume_layout = volume.layout();
        drop((queue, volume, pool));
        let pool = common::pool();
        reopen_disk(&pool, &disk_a);
        reopen_disk(&pool, &disk_b);
        let volume = pool.open_volume(volume_layout).unwrap();
        let mut queue = IoQueue::new(16).unwrap();
        prop_assert!(read(&mut queue, &volume, 0, SIZE as usize).unwrap() == model, "data differs after re-opening the pool");
    }
}
