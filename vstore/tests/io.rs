//! Volume I/O through IoQueue on file-backed disks: persistence, thin allocation, discard,
//! pool exhaustion, slot reuse, concurrency and growth.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use vstore::{IoError, IoQueue, IoRequest, LocalPool, StoreError, VolumeLayout};

#[test]
fn restart_keeps_every_allocation_and_byte() {
    let dir = test_dir();
    let size = 20 * MIB;
    let mut model = vec![0u8; size as usize];
    let (paths, volume_layout, on_disk, allocated) = {
        let pool = pool();
        let a = add_file_disk(&pool, dir.path(), "a", 16 * MIB);
        let b = add_file_disk(&pool, dir.path(), "b", 16 * MIB);
        let volume = pool.open_volume(layout(size)).unwrap();
        let mut queue = IoQueue::new(16).unwrap();
        // Scattered writes, some spanning an extent boundary.
        for (i, offset) in [
            0,
            3 * MIB - 4096,
            5 * MIB + 512,
            9 * MIB,
            13 * MIB - 512,
            19 * MIB,
        ]
        .into_iter()
        .enumerate()
        {
            let data = pattern(i as u8, 64 * 1024);
            write(&mut queue, &volume, offset, &data).unwrap();
            model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        }
        run(&mut queue, &volume, IoRequest::Flush).unwrap();
        // Placement spreads extents: each disk got some.
        let disks = pool.disks();
        assert!(disks.iter().all(|d| d.slots_used >= 3), "{disks:?}");
        (
            vec![a, b],
            volume.layout(),
            pool.volumes_on_disk(),
            volume.allocated_bytes(),
        )
    };
    assert_eq!(on_disk, vec![(volume_layout.id, 8)]);
    assert_eq!(allocated, 8 * MIB);

    let pool = pool();
    for path in paths.iter().rev() {
        reopen_disk(&pool, path);
    }
    assert_eq!(pool.volumes_on_disk(), on_disk);
    let volume = pool.open_volume(volume_layout).unwrap();
    assert_eq!(volume.allocated_bytes(), allocated);
    let mut queue = IoQueue::new(16).unwrap();
    assert!(
        read(&mut queue, &volume, 0, size as usize).unwrap() == model,
        "data differs after restart"
    );
}

#[test]
fn unallocated_extents_read_zero_and_cost_nothing() {
    let OneDisk {
        dir: _dir,
        pool,
        volume,
    } = one_disk_volume(16 * MIB, 64 * MIB);
    let mut queue = IoQueue::new(8).unwrap();
    assert!(
        read(&mut queue, &volume, 0, 3 * MIB as usize)
            .unwrap()
            .iter()
            .all(|&b| b == 0)
    );
    assert_eq!(volume.allocated_bytes(), 0);
    assert_eq!(pool.disks()[0].slots_used, 0);
    // Thin: a 64 MiB volume on 15 MiB of disk is fine until it is written.
    write(&mut queue, &volume, 40 * MIB, &pattern(3, 4096)).unwrap();
    assert_eq!(volume.allocated_bytes(), MIB);
    let back = read(&mut queue, &volume, 40 * MIB - 4096, 3 * 4096).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0));
    assert_eq!(&back[4096..8192], &pattern(3, 4096)[..]);
    assert!(back[8192..].iter().all(|&b| b == 0));
}

#[test]
fn ranges_and_alignment_are_checked() {
    let OneDisk {
        dir: _dir,
        pool: _pool,
        volume,
    } = one_disk_volume(16 * MIB, 4 * MIB);
    let mut queue = IoQueue::new(8).unwrap();
    let err = write(&mut queue, &volume, 4 * MIB - 512, &[1; 1024]).unwrap_err();
    assert!(
        matches!(err, IoError::OutOfRange { offset, len: 1024, size, .. } if offset == 4 * MIB - 512 && size == 4 * MIB),
        "{err:?}"
    );
    assert!(matches!(
        read(&mut queue, &volume, u64::MAX - 511, 512).unwrap_err(),
        IoError::OutOfRange { .. }
    ));
    assert!(matches!(
        write(&mut queue, &volume, 100, &[1; 512]).unwrap_err(),
        IoError::Misaligned {
            block_size: 512,
            ..
        }
    ));
    assert!(matches!(
        write(&mut queue, &volume, 0, &[1; 100]).unwrap_err(),
        IoError::Misaligned { .. }
    ));
    let err = run(
        &mut queue,
        &volume,
        IoRequest::Discard {
            offset: 3 * MIB,
            len: 2 * MIB,
        },
    )
    .unwrap_err();
    assert!(matches!(err, IoError::OutOfRange { .. }), "{err:?}");
    let err = run(
        &mut queue,
        &volume,
        IoRequest::WriteZeroes {
            offset: 512,
            len: 100,
            may_unmap: true,
        },
    )
    .unwrap_err();
    assert!(matches!(err, IoError::Misaligned { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&volume.layout().id.to_string()),
        "{err}"
    );
    assert_eq!(
        volume.allocated_bytes(),
        0,
        "refused requests allocate nothing"
    );
    // Empty requests are fine.
    write(&mut queue, &volume, 4 * MIB, &[]).unwrap();
    run(
        &mut queue,
        &volume,
        IoRequest::Discard {
            offset: 4 * MIB,
            len: 0,
        },
    )
    .unwrap();
}

#[test]
fn full_pool_fails_writes_with_no_space_and_delete_reuses_space_without_leaking() {
    let dir = test_dir();
    let pool = pool();
    add_file_disk(&pool, dir.path(), "d0", 5 * MIB); // 4 slots
    let first = pool.open_volume(layout(8 * MIB)).unwrap();
    let first_id = first.layout().id;
    let mut queue = IoQueue::new(8).unwrap();
    let secret = vec![0xaa; MIB as usize];
    for extent in 0..4 {
        write(&mut queue, &first, extent * MIB, &secret).unwrap();
    }
    let err = write(&mut queue, &first, 4 * MIB, &[1; 4096]).unwrap_err();
    assert!(matches!(err, IoError::NoSpace { extent: 4, .. }), "{err:?}");
    assert_eq!(first.stats().snapshot().no_space_errors, 1);
    // Writes to allocated extents and reads still work on a full pool.
    write(&mut queue, &first, 512, &[0xab; 512]).unwrap();
    assert_eq!(read(&mut queue, &first, 512, 512).unwrap(), vec![0xab; 512]);

    let err = pool.delete_volume(first_id).unwrap_err();
    assert!(matches!(err, StoreError::VolumeBusy { .. }), "{err:?}");
    assert!(err.to_string().contains("detach"), "{err}");
    drop(first);
    assert_eq!(pool.delete_volume(first_id).unwrap(), 4);
    assert_eq!(pool.disks()[0].slots_used, 0);
    assert!(pool.volumes_on_disk().is_empty());
    assert_eq!(pool.delete_volume(first_id).unwrap(), 0);

    // Another volume gets the same four slots and sees none of the old bytes.
    let second = pool.open_volume(layout(4 * MIB)).unwrap();
    for extent in 0..4 {
        write(&mut queue, &second, extent * MIB + 8192, &[0x11; 4096]).unwrap();
    }
    assert_eq!(pool.disks()[0].slots_used, 4);
    let data = read(&mut queue, &second, 0, 4 * MIB as usize).unwrap();
    for (i, chunk) in data.chunks(MIB as usize).enumerate() {
        assert!(
            chunk[..8192].iter().all(|&b| b == 0),
            "extent {i} leaks old data before the write"
        );
        assert!(chunk[8192..12288].iter().all(|&b| b == 0x11));
        assert!(
            chunk[12288..].iter().all(|&b| b == 0),
            "extent {i} leaks old data after the write"
        );
    }
}

#[test]
fn discard_frees_whole_extents_and_zeroes_the_rest() {
    // 3.5 MiB: the last extent is half in the volume.
    let OneDisk { dir, pool, volume } = one_disk_volume(16 * MIB, 3 * MIB + MIB / 2);
    let mut queue = IoQueue::new(8).unwrap();
    let mut model = pattern(9, (3 * MIB + MIB / 2) as usize);
    write(&mut queue, &volume, 0, &model).unwrap();
    assert_eq!(volume.allocated_bytes(), 4 * MIB);

    // Covers extent 1 whole, the ends of extents 0 and 2 partly.
    run(
        &mut queue,
        &volume,
        IoRequest::Discard {
            offset: MIB / 2,
            len: 2 * MIB,
        },
    )
    .unwrap();
    model[(MIB / 2) as usize..(MIB / 2 + 2 * MIB) as usize].fill(0);
    assert_eq!(volume.allocated_bytes(), 3 * MIB);
    assert_eq!(pool.disks()[0].slots_used, 3);
    assert!(read(&mut queue, &volume, 0, model.len()).unwrap() == model);

    // Write-zeroes without unmap keeps the space.
    run(
        &mut queue,
        &volume,
        IoRequest::WriteZeroes {
            offset: 0,
            len: MIB,
            may_unmap: false,
        },
    )
    .unwrap();
    model[..MIB as usize].fill(0);
    assert_eq!(volume.allocated_bytes(), 3 * MIB);
    // Reaching the end of the volume covers the last, partial extent whole.
    run(
        &mut queue,
        &volume,
        IoRequest::WriteZeroes {
            offset: 3 * MIB,
            len: MIB / 2,
            may_unmap: true,
        },
    )
    .unwrap();
    model[3 * MIB as usize..].fill(0);
    assert_eq!(volume.allocated_bytes(), 2 * MIB);
    assert!(read(&mut queue, &volume, 0, model.len()).unwrap() == model);

    // Discarding unallocated space is a no-op, and a freed extent can be written again.
    run(
        &mut queue,
        &volume,
        IoRequest::Discard {
            offset: MIB,
            len: MIB,
        },
    )
    .unwrap();
    write(&mut queue, &volume, MIB + 4096, &pattern(4, 4096)).unwrap();
    model[(MIB + 4096) as usize..(MIB + 8192) as usize].copy_from_slice(&pattern(4, 4096));
    assert!(read(&mut queue, &volume, 0, model.len()).unwrap() == model);

    // Discards are durable: they survive a restart.
    let volume_layout = volume.layout();
    drop((volume, queue, pool));
    let pool = common::pool();
    reopen_disk(&pool, &dir.path().join("d0"));
    let volume = pool.open_volume(volume_layout).unwrap();
    let mut queue = IoQueue::new(8).unwrap();
    assert!(read(&mut queue, &volume, 0, model.len()).unwrap() == model);
    assert_eq!(volume.allocated_bytes(), 3 * MIB);
}

/// The invariant of the volume module: a freed slot is not handed out while I/O that looked up
/// the old mapping is still in flight, and when it is, the new owner reads zeroes.
#[test]
fn freed_slot_is_not_reused_while_old_io_is_in_flight() {
    let dir = test_dir();
    let pool = pool();
    add_file_disk(&pool, dir.path(), "d0", 2 * MIB); // exactly one slot
    let owner = pool.open_volume(layout(MIB)).unwrap();
    let other = pool.open_volume(layout(MIB)).unwrap();
    let mut owner_queue = IoQueue::new(8).unwrap();
    let mut discard_queue = IoQueue::new(8).unwrap();
    let mut other_queue = IoQueue::new(8).unwrap();
    write(&mut owner_queue, &owner, 0, &vec![0xaa; MIB as usize]).unwrap();

    // A read of the owner's extent is in flight (submitted, not yet reaped) ...
    let mut in_flight = GuestBuf::new(MIB as usize, 0);
    let segments = in_flight.segments(&[]);
    // SAFETY: `in_flight` outlives the request, which is reaped below before it is dropped.
    unsafe {
        owner_queue.submit(
            &owner,
            IoRequest::Read {
                offset: 0,
                segments: &segments,
            },
            7,
        )
    };
    owner_queue.commit().unwrap();

    // ... while the extent is discarded from another queue.
    run(
        &mut discard_queue,
        &owner,
        IoRequest::Discard {
            offset: 0,
            len: MIB,
        },
    )
    .unwrap();
    assert_eq!(owner.allocated_bytes(), 0);
    assert_eq!(
        pool.disks()[0].slots_used,
        1,
        "the slot is still pinned by the in-flight read"
    );
    let err = write(&mut other_queue, &other, 4096, &[0x22; 4096]).unwrap_err();
    assert!(matches!(err, IoError::NoSpace { .. }), "{err:?}");

    // The read finishes with the old data, and only its reaping frees the slot.
    let mut reaped = Vec::new();
    while reaped.is_empty() {
        owner_queue.wait().unwrap();
        owner_queue.reap(|tag, result| reaped.push((tag, result.is_ok())));
    }
    assert_eq!(reaped, vec![(7, true)]);
    assert!(in_flight.as_slice().iter().all(|&b| b == 0xaa));
    assert_eq!(pool.disks()[0].slots_used, 0);

    write(&mut other_queue, &other, 4096, &[0x22; 4096]).unwrap();
    let data = read(&mut other_queue, &other, 0, MIB as usize).unwrap();
    assert!(data[..4096].iter().all(|&b| b == 0));
    assert!(data[4096..8192].iter().all(|&b| b == 0x22));
    assert!(
        data[8192..].iter().all(|&b| b == 0),
        "the other volume sees the freed extent's old bytes"
    );
    assert!(
        read(&mut owner_queue, &owner, 0, MIB as usize)
            .unwrap()
            .iter()
            .all(|&b| b == 0)
    );
}

#[test]
fn concurrent_first_writes_to_one_extent_allocate_it_once() {
    let dir = test_dir();
    let pool = pool();
    add_file_disk(&pool, dir.path(), "a", 32 * MIB);
    add_file_disk(&pool, dir.path(), "b", 32 * MIB);
    let volume = pool.open_volume(layout(16 * MIB)).unwrap();
    let threads = 4;
    std::thread::scope(|scope| {
        for t in 0..threads {
            let volume = volume.clone();
            scope.spawn(move || {
                let mut queue = IoQueue::new(8).unwrap();
                for extent in 0..16u64 {
                    // Each thread writes its own 4 KiB block of every extent.
                    write(
                        &mut queue,
                        &volume,
                        extent * MIB + t * 4096,
                        &pattern((extent * 10 + t) as u8, 4096),
                    )
                    .unwrap();
                }
            });
        }
    });
    assert_eq!(pool.volumes_on_disk(), vec![(volume.layout().id, 16)]);
    assert_eq!(pool.disks().iter().map(|d| d.slots_used).sum::<u64>(), 16);
    let mut queue = IoQueue::new(8).unwrap();
    for extent in 0..16u64 {
        let data = read(&mut queue, &volume, extent * MIB, (threads * 4096) as usize).unwrap();
        for t in 0..threads {
            let block = &data[(t * 4096) as usize..((t + 1) * 4096) as usize];
            assert_eq!(
                block,
                &pattern((extent * 10 + t) as u8, 4096)[..],
                "extent {extent} block {t}"
            );
        }
    }
}

#[test]
fn grow_while_io_runs() {
    let OneDisk {
        dir: _dir,
        pool: _pool,
        volume,
    } = one_disk_volume(64 * MIB, 2 * MIB);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let worker = scope.spawn(|| {
            let mut queue = IoQueue::new(8).unwrap();
            let mut rounds = 0u32;
            while !stop.load(Ordering::Relaxed) || rounds < 10 {
                let data = pattern(rounds as u8, 8192);
                let offset = u64::from(rounds % 200) * 8192;
                write(&mut queue, &volume, offset, &data).unwrap();
                assert_eq!(read(&mut queue, &volume, offset, 8192).unwrap(), data);
                rounds += 1;
            }
            rounds
        });
        let mut queue = IoQueue::new(8).unwrap();
        for step in 1..=30u64 {
            let new_size = 2 * MIB + step * (MIB + 512);
            volume.grow(new_size).unwrap();
            assert_eq!(volume.layout().size, new_size);
            // The new end is usable at once and reads zero until written.
            assert!(
                read(&mut queue, &volume, new_size - 4096, 4096)
                    .unwrap()
                    .iter()
                    .all(|&b| b == 0)
            );
            write(&mut queue, &volume, new_size - 512, &[step as u8 | 1; 512]).unwrap();
            assert_eq!(
                read(&mut queue, &volume, new_size - 512, 512).unwrap(),
                vec![step as u8 | 1; 512]
            );
        }
        stop.store(true, Ordering::Relaxed);
        assert!(worker.join().unwrap() >= 10);
    });
    let size = volume.layout().size;
    assert!(matches!(
        volume.grow(size - 512).unwrap_err(),
        StoreError::ShrinkRefused { .. }
    ));
    assert!(matches!(
        volume.grow(size + 100).unwrap_err(),
        StoreError::SizeNotBlockMultiple { .. }
    ));
    assert!(matches!(
        volume.grow(u64::MAX - 511).unwrap_err(),
        StoreError::VolumeTooLarge { .. }
    ));
}

#[test]
fn unaligned_and_fragmented_segments_round_trip() {
    let OneDisk {
        dir: _dir,
        pool: _pool,
        volume,
    } = one_disk_volume(16 * MIB, 8 * MIB);
    let mut queue = IoQueue::new(8).unwrap();
    let len = 3 * MIB as usize;
    let offset = MIB / 2 + 512; // spans four extents
    let data = pattern(5, len);
    // Aligned buffers go zero-copy, whatever the segment boundaries.
    let mut aligned = GuestBuf::from_bytes(&data, 0);
    let segments = aligned.segments(&[4096, 512, 65536, 1024]);
    run(
        &mut queue,
        &volume,
        IoRequest::Write {
            offset,
            segments: &segments,
            write_through: false,
        },
    )
    .unwrap();
    assert_eq!(queue.bounced_bytes(), 0);

    // Odd-sized segments at an odd address: the bounce path, split over extents.
    let mut buf = GuestBuf::from_bytes(&data, 3);
    let lens: Vec<usize> = (0..500).map(|i| 100 + i * 7 % 3000).collect();
    let segments = buf.segments(&lens);
    run(
        &mut queue,
        &volume,
        IoRequest::Write {
            offset,
            segments: &segments,
            write_through: true,
        },
    )
    .unwrap();

    assert_eq!(queue.bounced_bytes(), len as u64);

    // More segments than one readv takes (IOV_MAX), each aligned: bounced for that reason
    // alone. Only the first piece (1023 blocks up to the extent boundary) goes direct.
    let mut many = GuestBuf::new(len, 0);
    let segments = many.segments(&vec![512; len / 512]);
    assert_eq!(segments.len(), len / 512);
    run(
        &mut queue,
        &volume,
        IoRequest::Read {
            offset,
            segments: &segments,
        },
    )
    .unwrap();
    assert!(many.as_slice() == data.as_slice());

    let bounced = 2 * len as u64 - (MIB / 2 - 512);
    assert_eq!(queue.bounced_bytes(), bounced);

    // Aligned segments read it back zero-copy.
    assert!(read(&mut queue, &volume, offset, len).unwrap() == data);
    assert_eq!(queue.bounced_bytes(), bounced);
    // And odd ones again, through the bounce path on the read side.
    let mut odd = GuestBuf::new(len, 1);
    let segments = odd.segments(&[4095, 1, 77777, 3]);
    run(
        &mut queue,
        &volume,
        IoRequest::Read {
            offset,
            segments: &segments,
        },
    )
    .unwrap();
    assert!(odd.as_slice() == data.as_slice());
}

#[test]
fn batched_requests_complete_with_their_tags() {
    let OneDisk {
        dir: _dir,
        pool,
        volume,
    } = one_disk_volume(16 * MIB, 8 * MIB);
    let mut queue = IoQueue::new(32).unwrap();
    let count = 100u64; // more than the ring's depth
    let mut bufs: Vec<GuestBuf> = (0..count)
        .map(|i| GuestBuf::from_bytes(&pattern(i as u8, 4096), 0))
        .collect();
    let segments: Vec<_> = bufs.iter_mut().map(|b| b.segments(&[])).collect();
    for i in 0..count {
        // SAFETY: the buffers outlive the requests, which are all reaped below.
        unsafe {
            queue.submit(
                &volume,
                IoRequest::Write {
                    offset: i * 69632,
                    segments: &segments[i as usize],
                    write_through: false,
                },
                1000 + i,
            )
        };
    }
    queue.commit().unwrap();
    let mut done = vec![false; count as usize];
    while queue.in_flight() > 0 {
        queue.wait().unwrap();
        queue.reap(|tag, result| {
            result.unwrap();
            assert!(
                !std::mem::replace(&mut done[(tag - 1000) as usize], true),
                "tag {tag} reported twice"
            );
        });
    }
    assert!(done.iter().all(|&d| d));
    for i in 0..count {
        assert_eq!(
            read(&mut queue, &volume, i * 69632, 4096).unwrap(),
            pattern(i as u8, 4096)
        );
    }
    // A flush covers the disk the volume has data on; on a volume without data it is immediate.
    run(&mut queue, &volume, IoRequest::Flush).unwrap();
    let empty = pool.open_volume(layout(MIB)).unwrap();
    run(&mut queue, &empty, IoRequest::Flush).unwrap();
}

#[test]
fn immediate_completion_signals_the_eventfd() {
    let OneDisk {
        dir: _dir,
        pool: _pool,
        volume,
    } = one_disk_volume(16 * MIB, 8 * MIB);
    let mut queue = IoQueue::new(8).unwrap();
    let readable = |fd| {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 1000) == 1 }
    };
    let mut buf = GuestBuf::new(4096, 0);
    buf.as_mut_slice().fill(9);
    let segments = buf.segments(&[]);
    // SAFETY: `buf` outlives the request, reaped below.
    unsafe {
        queue.submit(
            &volume,
            IoRequest::Read {
                offset: 0,
                segments: &segments,
            },
            5,
        )
    };
    assert!(
        readable(queue.completion_fd()),
        "an unallocated read completes without I/O and must wake the worker"
    );
    let mut got = None;
    queue.reap(|tag, result| got = Some((tag, result.is_ok())));
    assert_eq!(got, Some((5, true)));
    assert!(buf.as_slice().iter().all(|&b| b == 0));

    // A real write signals through io_uring's registered eventfd.
    let mut data = GuestBuf::from_bytes(&[3; 4096], 0);
    let segments = data.segments(&[]);
    // SAFETY: `data` outlives the request, reaped below.
    unsafe {
        queue.submit(
            &volume,
            IoRequest::Write {
                offset: 0,
                segments: &segments,
                write_through: false,
            },
            6,
        )
    };
    queue.commit().unwrap();
    assert!(readable(queue.completion_fd()));
    let mut got = None;
    while got.is_none() {
        queue.reap(|tag, result| got = Some((tag, result.is_ok())));
    }
    assert_eq!(got, Some((6, true)));
    assert_eq!(queue.in_flight(), 0);
}

#[test]
fn dropping_a_queue_waits_for_its_io() {
    let OneDisk {
        dir: _dir,
        pool,
        volume,
    } = one_disk_volume(16 * MIB, 8 * MIB);
    let data = GuestBuf::from_bytes(&pattern(8, 4 * MIB as usize), 0);
    {
        let mut queue = IoQueue::new(8).unwrap();
        let segments = [vstore::Segment {
            addr: data.as_slice().as_ptr().cast_mut(),
            len: data.as_slice().len(),
        }];
        // SAFETY: `data` outlives the queue, whose drop waits for the request.
        unsafe {
            queue.submit(
                &volume,
                IoRequest::Write {
                    offset: 0,
                    segments: &segments,
                    write_through: false,
                },
                1,
            )
        };
        queue.commit().unwrap();
    }
    let mut queue = IoQueue::new(8).unwrap();
    assert!(read(&mut queue, &volume, 0, 4 * MIB as usize).unwrap() == data.as_slice());
    // The dropped queue's request no longer holds the volume.
    let id = volume.layout().id;
    drop(volume);
    assert_eq!(pool.delete_volume(id).unwrap(), 4);
}

#[test]
fn open_volume_shares_one_instance_and_checks_its_layout() {
    let dir = test_dir();
    let pool = pool();
    add_file_disk(&pool, dir.path(), "d0", 16 * MIB);
    let base = layout(4 * MIB);
    let a = pool.open_volume(base).unwrap();
    let b = pool.open_volume(base).unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    let c = pool
        .open_volume(VolumeLayout {
            size: 6 * MIB,
            ..base
        })
        .unwrap();
    assert!(Arc::ptr_eq(&a, &c));
    assert_eq!(
        a.layout().size,
        6 * MIB,
        "opening with a larger size grows it"
    );
    let err = pool
        .open_volume(VolumeLayout {
            block_size: 4096,
            ..base
        })
        .unwrap_err();
    assert!(
        matches!(err, StoreError::VolumeLayoutMismatch { .. }),
        "{err:?}"
    );
    let err = pool
        .open_volume(VolumeLayout {
            extent_size: 2 * MIB,
            ..layout(MIB)
        })
        .unwrap_err();
    assert!(
        matches!(err, StoreError::VolumeExtentSizeMismatch { .. }),
        "{err:?}"
    );
    for block_size in [256, 1000, 8192] {
        let err = pool
            .open_volume(VolumeLayout {
                block_size,
                ..layout(MIB)
            })
            .unwrap_err();
        assert!(
            matches!(err, StoreError::BlockSizeUnsupported { .. }),
            "{block_size}: {err:?}"
        );
    }
    let err = pool
        .open_volume(VolumeLayout {
            size: MIB + 100,
            ..layout(0)
        })
        .unwrap_err();
    assert!(
        matches!(err, StoreError::SizeNotBlockMultiple { .. }),
        "{err:?}"
    );
    // A 4 KiB-block volume works on the same disks.
    let big = pool
        .open_volume(VolumeLayout {
            block_size: 4096,
            ..layout(4 * MIB)
        })
        .unwrap();
    let mut queue = IoQueue::new(8).unwrap();
    write(&mut queue, &big, 8192, &pattern(2, 4096)).unwrap();
    assert!(matches!(
        write(&mut queue, &big, 512, &[1; 512]).unwrap_err(),
        IoError::Misaligned {
            block_size: 4096,
            ..
        }
    ));
    drop((a, b, c));
    // After the last user is gone the volume can be deleted, and reopening starts afresh.
    let id = base.id;
    assert_eq!(pool.delete_volume(id).unwrap(), 0);
    let _ = LocalPool::extent_size(&pool);
}

/// The slot-reuse invariant under real concurrency: two volumes fight over a four-slot pool
/// while a third thread keeps discarding their extents. Each volume only ever writes its own
/// byte value, so any other non-zero byte read back is a leak between volumes.
#[test]
fn volumes_never_see_each_others_bytes_under_concurrent_discards() {
    let dir = test_dir();
    let pool = pool();
    add_file_disk(&pool, dir.path(), "d0", 5 * MIB);
    let volumes = [
        pool.open_volume(layout(4 * MIB)).unwrap(),
        pool.open_volume(layout(4 * MIB)).unwrap(),
    ];
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let mut workers = Vec::new();
        for (i, volume) in volumes.iter().enumerate() {
            let own = [0xa1u8, 0xb2][i];
            let stop = &stop;
            workers.push(scope.spawn(move || {
                let mut queue = IoQueue::new(8).unwrap();
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ i as u64;
                let mut next = move || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                let (mut writes, mut full) = (0u32, 0u32);
                while !stop.load(Ordering::Relaxed) || writes < 50 {
                    let offset = next() % (4 * MIB / 4096) * 4096;
                    let len = (1 + next() % 64) as usize * 4096;
                    let len = len.min((4 * MIB - offset) as usize);
                    match write(&mut queue, volume, offset, &vec![own; len]) {
                        Ok(()) => writes += 1,
                        Err(IoError::NoSpace { .. }) => full += 1,
                        Err(e) => panic!("write failed: {e}"),
                    }
                    let data = read(&mut queue, volume, offset, len).unwrap();
                    if let Some(bad) = data.iter().position(|&b| b != 0 && b != own) {
                        panic!(
                            "volume {i} read {:#x} at {}",
                            data[bad],
                            offset + bad as u64
                        );
                    }
                }
                (writes, full)
            }));
        }
        let discarder = scope.spawn(|| {
            let mut queue = IoQueue::new(8).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
            let mut round = 0u64;
            while std::time::Instant::now() < deadline {
                let volume = &volumes[(round % 2) as usize];
                let extent = round / 2 % 4;
                run(
                    &mut queue,
                    volume,
                    IoRequest::Discard {
                        offset: extent * MIB,
                        len: MIB,
                    },
                )
                .unwrap();
                round += 1;
            }
        });
        discarder.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        for worker in workers {
            let (writes, _full) = worker.join().unwrap();
            assert!(writes >= 50);
        }
    });
    // All slots are accounted for: the volumes' allocations plus nothing leaked in release.
    let allocated: u64 = volumes.iter().map(|v| v.allocated_bytes()).sum();
    assert_eq!(pool.disks()[0].slots_used * MIB, allocated);
}

/// The device's pattern: sleep on the completion fd (as its epoll would), reap, submit more,
/// commit — never `wait`. Every completion must arrive through the fd, or the worker hangs.
#[test]
fn completion_fd_drives_a_worker_loop_without_wait() {
    let OneDisk {
        dir: _dir,
        pool: _pool,
        volume,
    } = one_disk_volume(16 * MIB, 8 * MIB);
    // Created here, used only by the worker thread: the queue is handed over before first use.
    let mut queue = IoQueue::new(16).unwrap();
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                let depth = 16usize;
                let total = 2000u64;
                let mut bufs: Vec<GuestBuf> = (0..depth).map(|_| GuestBuf::new(4096, 0)).collect();
                let segments: Vec<_> = bufs.iter_mut().map(|b| b.segments(&[])).collect();
                let (mut submitted, mut completed) = (0u64, 0u64);
                let submit = |queue: &mut IoQueue, slot: usize, n: u64| {
                    let offset = n * 7 % 2048 * 4096;
                    let request = if n.is_multiple_of(3) {
                        IoRequest::Read {
                            offset,
                            segments: &segments[slot],
                        }
                    } else {
                        IoRequest::Write {
                            offset,
                            segments: &segments[slot],
                            write_through: false,
                        }
                    };
                    // SAFETY: slot buffers outlive the queue's use here; a slot is reused only
                    // after its request was reaped.
                    unsafe { queue.submit(&volume, request, slot as u64) };
                };
                for slot in 0..depth {
                    submit(&mut queue, slot, submitted);
                    submitted += 1;
                }
                queue.commit().unwrap();
                while completed < total {
                    let mut pfd = libc::pollfd {
                        fd: queue.completion_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    let ready = unsafe { libc::poll(&mut pfd, 1, 5000) };
                    assert_eq!(
                        ready,
                        1,
                        "no completion signalled with {} requests in flight",
                        queue.in_flight()
                    );
                    let mut done = Vec::new();
                    queue.reap(|tag, result| {
                        result.unwrap();
                        done.push(tag as usize);
                    });
                    completed += done.len() as u64;
                    for slot in done {
                        if submitted < total {
                            submit(&mut queue, slot, submitted);
                            submitted += 1;
                        }
                    }
                    queue.commit().unwrap();
                }
                assert_eq!(queue.in_flight(), 0);
            })
            .join()
            .unwrap();
    });
}
