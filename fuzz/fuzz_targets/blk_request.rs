//! Fuzzes virtio-blk request parsing: arbitrary bytes become guest memory (holding the
//! descriptor table, indirect tables, headers and payloads), a ring size, a head index and the
//! negotiated features. The chain walker and the request parser must never panic, and every
//! host buffer they hand on must lie inside a guest memory region.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_backends::blk::request::{Limits, Parsed, Request, parse};
use vhost_backends::chain::read_chain;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

/// Two adjacent regions (a buffer may straddle them) and one past a hole.
const REGIONS: [(u64, usize); 3] = [(0, 0x8000), (0x8000, 0x8000), (0x20000, 0x4000)];
const CONTROL: usize = 16;

fuzz_target!(|data: &[u8]| {
    if data.len() < CONTROL {
        return;
    }
    let (control, contents) = data.split_at(CONTROL);
    let ranges: Vec<(GuestAddress, usize)> =
        REGIONS.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).expect("anonymous guest memory");
    // Lay the input over guest memory, region after region.
    let mut rest = contents;
    for &(addr, len) in &REGIONS {
        let n = rest.len().min(len);
        mem.write_slice(&rest[..n], GuestAddress(addr)).unwrap();
        rest = &rest[n..];
    }

    let queue_size = 1u16 << (control[0] % 9);
    let head = u16::from_le_bytes([control[1], control[2]]);
    let flags = control[3];
    let table = GuestAddress(u64::from(u16::from_le_bytes([control[4], control[5]]) % 0x2000) * 16);
    if flags & 0x80 != 0 {
        // Compact mode: rewrite the table from 6-byte records (address in 8-byte units, length,
        // flags, next) so that most chains point into guest memory and reach the parser.
        for (i, rec) in contents
            .chunks_exact(6)
            .take(usize::from(queue_size))
            .enumerate()
        {
            let addr = u64::from(u16::from_le_bytes([rec[0], rec[1]])) * 8;
            let len = u32::from(u16::from_le_bytes([rec[2], rec[3]]));
            let desc_flags = u16::from(rec[4] & 7);
            let next = u16::from(rec[5]) % queue_size.max(1);
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&desc_flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            let _ = mem.write_slice(&raw, table.unchecked_add(16 * i as u64));
        }
    }
    let limits = Limits {
        capacity: u64::from(u32::from_le_bytes([
            control[6], control[7], control[8], control[9],
        ])) * 512,
        block_size: if flags & 2 != 0 { 4096 } else { 512 },
        read_only: flags & 4 != 0,
        seg_max: u32::from(control[10]) + 1,
        discard: flags & 8 != 0,
        write_zeroes: flags & 16 != 0,
        max_discard_sectors: u32::from(u16::from_le_bytes([control[11], control[12]])),
        max_discard_seg: u32::from(control[13] % 64) + 1,
        max_write_zeroes_sectors: u32::from(u16::from_le_bytes([control[11], control[12]])),
        max_write_zeroes_seg: u32::from(control[14] % 64) + 1,
    };

    let mut descs = Vec::new();
    let chain = read_chain(&mem, table, queue_size, head, flags & 1 != 0, &mut descs);
    assert!(chain.is_err() || descs.len() <= usize::from(queue_size) + 1024);
    let parsed = parse(&mem, chain.map(|()| &descs[..]), &limits);

    // Host ranges of the regions, to check every segment against.
    let hosts: Vec<(usize, usize)> = mem
        .iter()
        .map(|r| {
            (
                r.get_host_address(MemoryRegionAddress(0)).unwrap() as usize,
                r.len() as usize,
            )
        })
        .collect();
    let inside = |addr: *mut u8, len: usize| {
        let a = addr as usize;
        hosts.iter().any(|&(base, size)| {
            a >= base && a.checked_add(len).is_some_and(|end| end <= base + size)
        })
    };
    match parsed {
        Parsed::NoStatus(_) => {}
        Parsed::Reject { status_addr, .. } => {
            assert!(
                mem.write_obj(1u8, status_addr).is_ok(),
                "status byte outside guest memory"
            );
        }
        Parsed::Ready {
            status_addr,
            request,
        } => {
            assert!(
                mem.write_obj(0u8, status_addr).is_ok(),
                "status byte outside guest memory"
            );
            match request {
                Request::Read {
                    offset,
                    len,
                    segments,
                }
                | Request::Write {
                    offset,
                    len,
                    segments,
                } => {
                    assert!(offset + len <= limits.capacity);
                    assert_eq!(segments.iter().map(|s| s.len as u64).sum::<u64>(), len);
                    for s in &segments {
                        assert!(inside(s.addr, s.len), "segment outside guest memory");
                    }
                }
                Request::GetId { dest } => {
                    assert!(dest.iter().map(|d| d.1).sum::<usize>() <= 20);
                    for (gpa, len) in dest {
                        assert!(mem.check_range(gpa, len), "id buffer outside guest memory");
                        assert!(gpa.checked_add(len as u64).is_some());
                    }
                }
                Request::Discard { ranges } | Request::WriteZeroes { ranges, .. } => {
                    for r in ranges {
                        assert!(r.offset + r.len <= limits.capacity);
                        assert!(r.len > 0 && r.offset % u64::from(limits.block_size) == 0);
                    }
                }
                Request::Flush => {}
            }
        }
    }
});
