//! Fuzzes the vhost-user-net frame paths: arbitrary bytes become guest memory (holding a
//! descriptor table, headers and frames), a ring size, a head and the negotiated transmit
//! offloads. Walking the chain, reading it as a transmit frame, vetting it as a receive chain
//! and scattering a frame into it must never panic; a frame read must be at least an Ethernet
//! header behind a header the offloads allow, and a frame written must land whole.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vessel_proto::checksum::complete_partial;
use vhost_backends::chain::read_chain;
use vhost_backends::net::frame::{check_rx_chain, read_tx_frame, write_rx_frame};
use vhost_backends::net::header::{HEADER_LEN, VirtioNetHeader};
use vhost_backends::net::HostOffloads;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// Two adjacent regions (a buffer may straddle them) and one past a hole.
const REGIONS: [(u64, usize); 3] = [(0, 0x8000), (0x8000, 0x8000), (0x20000, 0x4000)];
const CONTROL: usize = 12;

fuzz_target!(|data: &[u8]| {
    if data.len() < CONTROL {
        return;
    }
    let (control, contents) = data.split_at(CONTROL);
    let ranges: Vec<(GuestAddress, usize)> =
        REGIONS.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).expect("anonymous guest memory");
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
        // Compact mode: 6-byte records (address in 8-byte units, length, flags, next), so most
        // chains point into guest memory.
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
    let offloads = HostOffloads {
        csum: flags & 1 != 0,
        tso4: flags & 2 != 0,
        tso6: flags & 4 != 0,
        ecn: flags & 8 != 0,
    };

    let mut descs = Vec::new();
    if read_chain(&mem, table, queue_size, head, flags & 0x40 != 0, &mut descs).is_err() {
        return;
    }
    let mut buf = Vec::new();
    if let Ok(header) = read_tx_frame(&mem, &descs, offloads, &mut buf) {
        assert!(buf.len() >= HEADER_LEN + 14);
        assert_eq!(header.num_buffers, 0);
        assert!(!header.is_gso() || offloads.accepts_gso(&header));
        let mut frame = buf[HEADER_LEN..].to_vec();
        if header.needs_csum() {
            assert!(complete_partial(&mut frame, header.csum_start, header.csum_offset));
        }
    }
    let mut frame = contents.to_vec();
    let _ = complete_partial(
        &mut frame,
        u16::from_le_bytes([control[6], control[7]]),
        u16::from_le_bytes([control[8], control[9]]),
    );
    if let Ok(chain) = check_rx_chain(&mem, head, &descs) {
        let len = usize::from(u16::from_le_bytes([control[10], control[11]]))
            .min(frame.len())
            .min(chain.capacity() - HEADER_LEN);
        let mut used = Vec::new();
        let header = VirtioNetHeader {
            num_buffers: 1,
            ..VirtioNetHeader::PLAIN
        };
        write_rx_frame(&mem, &[chain], &header, &frame[..len], &mut used)
            .expect("a vetted chain is writable");
        assert_eq!(used, vec![(head, (HEADER_LEN + len) as u32)]);
    }
});
