//! A `BlkDevice` driven by an independent vhost-user-blk frontend: libblkio's Rust library
//! (`blkio` crate, driver "virtio-blk-vhost-user"). Everything goes through the real socket,
//! the real handler and the real vstore volume.

mod common;

use std::mem::MaybeUninit;
use std::sync::Arc;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vhost_backends::{BlkConfig, BlkDevice};

const KIB: u64 = 1024;

/// One libblkio connection with a mapped buffer region.
struct Client {
    blkio: Blkio,
    queues: Vec<Blkioq>,
    region: MemoryRegion,
}

impl Client {
    fn connect(socket: &std::path::Path, queues: i32, buffer: usize) -> blkio::Result<Client> {
        Self::connect_with(socket, queues, buffer, false)
    }

    fn connect_with(
        socket: &std::path::Path,
        queues: i32,
        buffer: usize,
        read_only: bool,
    ) -> blkio::Result<Client> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", socket.to_str().unwrap())?;
        blkio.set_bool("read-only", read_only)?;
        blkio.connect()?;
        blkio.set_i32("num-queues", queues)?;
        let queues = blkio.start()?.queues;
        let region = blkio.alloc_mem_region(buffer)?;
        blkio.map_mem_region(&region)?;
        Ok(Client {
            blkio,
            queues,
            region,
        })
    }

    fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").unwrap()
    }

    fn buf(&mut self, offset: usize, len: usize) -> &mut [u8] {
        assert!(offset + len <= self.region.len);
        // SAFETY: the region is a live mapping of `region.len` bytes owned by this client; tests
        // never hold two overlapping slices, and the device only touches a slice while the
        // request using it is in flight, during which the test does not look at it.
        unsafe { std::slice::from_raw_parts_mut((self.region.addr + offset) as *mut u8, len) }
    }

    fn ptr(&self, offset: usize) -> *mut u8 {
        (self.region.addr + offset) as *mut u8
    }

    /// Waits for `n` completions on queue `q`; returns (user_data, ret) pairs.
    fn wait(&mut self, q: usize, n: usize) -> Vec<(usize, i32)> {
        let mut out = Vec::with_capacity(n);
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..n.max(1)).map(|_| MaybeUninit::uninit()).collect();
        while out.len() < n {
            let want = n - out.len();
            let mut timeout = Duration::from_secs(30);
            let got = self.queues[q]
                .do_io(&mut completions[..want], want, Some(&mut timeout), None)
                .unwrap();
            assert!(got > 0, "no completion within 30 s on queue {q}");
            for c in &completions[..got] {
                // SAFETY: do_io initialised the first `got` entries.
                let c = unsafe { c.assume_init_read() };
                out.push((c.user_data, c.ret));
            }
        }
        out
    }

    fn write_sync(&mut self, q: usize, offset: u64, buf_off: usize, len: usize) -> i32 {
        let ptr = self.ptr(buf_off);
        self.queues[q].write(offset, ptr, len, 0, ReqFlags::empty());
        self.wait(q, 1)[0].1
    }

    fn read_sync(&mut self, q: usize, offset: u64, buf_off: usize, len: usize) -> i32 {
        let ptr = self.ptr(buf_off);
        self.queues[q].read(offset, ptr, len, 0, ReqFlags::empty());
        self.wait(q, 1)[0].1
    }
}

fn start(vol: &TestVolume, queues: u16, read_only: bool) -> BlkDevice {
    let mut config = BlkConfig::new(vol.socket("blk.sock"));
    config.queues = queues;
    config.read_only = read_only;
    BlkDevice::start(Arc::clone(&vol.volume), config).expect("start device")
}

#[test]
fn multiqueue_random_workload_verifies_every_read() {
    const VOLUME: u64 = 32 * MIB;
    const SLOT: u64 = 64 * KIB;
    const DEPTH: usize = 16;
    const QUEUES: usize = 2;
    let vol = volume(VOLUME);
    let device = start(&vol, QUEUES as u16, false);
    let mut client =
        Client::connect(&vol.socket("blk.sock"), QUEUES as i32, 2 * MIB as usize).unwrap();
    assert!(device.connected());
    assert_eq!(client.capacity(), VOLUME);

    let mut model = vec![0u8; VOLUME as usize];
    let mut rng = StdRng::seed_from_u64(0x7e55e1);
    let slots_per_queue = VOLUME / SLOT / QUEUES as u64;
    let mut generation = 0u64;
    let (mut reads, mut writes) = (0u64, 0u64);
    for _round in 0..60 {
        // Each queue works on its half of the volume, DEPTH requests on distinct slots at once,
        // so no two requests in flight overlap and the model stays exact.
        let mut batches = Vec::new();
        for q in 0..QUEUES {
            let mut slots: Vec<u64> = Vec::new();
            while slots.len() < DEPTH {
                let s = rng.random_range(0..slots_per_queue) + q as u64 * slots_per_queue;
                if !slots.contains(&s) {
                    slots.push(s);
                }
            }
            let mut ops = Vec::new();
            for (i, &slot) in slots.iter().enumerate() {
                // 512-byte granularity: some requests and buffers are not 4 KiB aligned, which
                // exercises vstore's bounce path as well as the zero-copy one.
                let sectors = rng.random_range(1..=(SLOT / 512));
                let len = sectors * 512;
                let within = rng.random_range(0..=(SLOT - len) / 512) * 512;
                let offset = slot * SLOT + within;
                let buf_off = (q * DEPTH + i) * SLOT as usize;
                let is_write = rng.random_bool(0.5);
                if is_write {
                    generation += 1;
                    let buf = client.buf(buf_off, len as usize);
                    pattern(buf, offset, generation);
                    model[offset as usize..(offset + len) as usize].copy_from_slice(buf);
                    let ptr = client.ptr(buf_off);
                    client.queues[q].write(offset, ptr, len as usize, i, ReqFlags::empty());
                    writes += 1;
                } else {
                    client.buf(buf_off, len as usize).fill(0xa5);
                    let ptr = client.ptr(buf_off);
                    client.queues[q].read(offset, ptr, len as usize, i, ReqFlags::empty());
                    reads += 1;
                }
                ops.push((offset, len, buf_off, is_write));
            }
            batches.push(ops);
        }
        for (q, ops) in batches.iter().enumerate() {
            for (i, ret) in client.wait(q, ops.len()) {
                assert_eq!(ret, 0, "request {i} on queue {q} failed");
                let (offset, len, buf_off, is_write) = ops[i];
                if !is_write {
                    let got = client.buf(buf_off, len as usize);
                    assert!(
                        got == &model[offset as usize..(offset + len) as usize],
                        "queue {q}: read of {len} bytes at {offset} returned wrong data"
                    );
                }
            }
        }
    }
    assert!(reads > 500 && writes > 500);

    // Everything, read back through one queue in 1 MiB pieces.
    for chunk in 0..VOLUME / MIB {
        assert_eq!(client.read_sync(0, chunk * MIB, 0, MIB as usize), 0);
        assert!(
            client.buf(0, MIB as usize)
                == &model[(chunk * MIB) as usize..((chunk + 1) * MIB) as usize]
        );
    }
    let stats = vol.volume.stats().snapshot();
    assert_eq!(stats.errors, 0);
    assert!(stats.writes >= writes && stats.reads >= reads + VOLUME / MIB);
    drop(client);
    device.stop();
    assert!(!vol.socket("blk.sock").exists(), "stop removes the socket");
}

#[test]
fn discard_write_zeroes_and_flush() {
    let vol = volume(16 * MIB);
    let device = start(&vol, 1, false);
    let mut client = Client::connect(&vol.socket("blk.sock"), 1, 4 * MIB as usize).unwrap();
    pattern(client.buf(0, 4 * MIB as usize), 0, 1);
    let expected = client.buf(0, 4 * MIB as usize).to_vec();
    assert_eq!(client.write_sync(0, 0, 0, 4 * MIB as usize), 0);
    let allocated = vol.volume.allocated_bytes();
    assert!(allocated >= 4 * MIB);

    // Discard a whole extent plus 64 KiB of the next; zero 8 KiB in the fourth.
    client.queues[0].discard(MIB, MIB + 64 * KIB, 1, ReqFlags::empty());
    client.queues[0].write_zeroes(3 * MIB + 4 * KIB, 8 * KIB, 2, ReqFlags::empty());
    client.queues[0].flush(3, ReqFlags::empty());
    let mut done = client.wait(0, 3);
    done.sort();
    assert_eq!(done, vec![(1, 0), (2, 0), (3, 0)]);
    assert!(
        vol.volume.allocated_bytes() < allocated,
        "a fully discarded extent gives its space back"
    );

    client.buf(0, 4 * MIB as usize).fill(0xcc);
    assert_eq!(client.read_sync(0, 0, 0, 4 * MIB as usize), 0);
    let got = client.buf(0, 4 * MIB as usize).to_vec();
    for (pos, (&g, &e)) in got.iter().zip(&expected).enumerate() {
        let pos = pos as u64;
        let zero = (MIB..2 * MIB + 64 * KIB).contains(&pos)
            || (3 * MIB + 4 * KIB..3 * MIB + 12 * KIB).contains(&pos);
        assert_eq!(g, if zero { 0 } else { e }, "byte {pos}");
    }
    let stats = vol.volume.stats().snapshot();
    assert_eq!(
        (stats.discards, stats.write_zeroes, stats.flushes),
        (1, 1, 1)
    );
    drop(client);
    device.stop();
}

#[test]
fn client_disconnects_and_reconnects() {
    let vol = volume(8 * MIB);
    let device = start(&vol, 2, false);
    let socket = vol.socket("blk.sock");
    let mut first = Client::connect(&socket, 2, MIB as usize).unwrap();
    pattern(first.buf(0, 256 * KIB as usize), 4 * MIB, 7);
    let data = first.buf(0, 256 * KIB as usize).to_vec();
    assert_eq!(first.write_sync(1, 4 * MIB, 0, 256 * KIB as usize), 0);
    drop(first);
    assert!(
        wait_until(Duration::from_secs(5), || !device.connected()),
        "disconnect noticed"
    );

    // A new frontend on the same socket sees the data; then a third one, to be sure the
    // device keeps accepting.
    for round in 0..2 {
        let mut client = Client::connect(&socket, 1, MIB as usize).unwrap();
        client.buf(0, 256 * KIB as usize).fill(0);
        assert_eq!(client.read_sync(0, 4 * MIB, 0, 256 * KIB as usize), 0);
        assert!(
            client.buf(0, 256 * KIB as usize) == &data[..],
            "round {round}"
        );
        drop(client);
        assert!(wait_until(Duration::from_secs(5), || !device.connected()));
    }
    assert_eq!(device.connections(), 3);
    device.stop();
}

#[test]
fn read_only_device_refuses_writes() {
    let vol = volume(8 * MIB);
    let device = start(&vol, 1, true);
    let socket = vol.socket("blk.sock");
    // libblkio refuses a writable open of a device that offers VIRTIO_BLK_F_RO.
    let err = Client::connect(&socket, 1, MIB as usize)
        .err()
        .expect("writable open refused");
    assert_eq!(err.errno(), blkio::Errno::ROFS, "{err:?}");
    assert!(wait_until(Duration::from_secs(5), || !device.connected()));
    let mut client = Client::connect_with(&socket, 1, MIB as usize, true).unwrap();
    assert_eq!(client.read_sync(0, 0, 0, 4096), 0);
    assert_eq!(vol.volume.allocated_bytes(), 0);
    drop(client);
    device.stop();
}

#[test]
fn grown_volume_shows_its_new_capacity() {
    let vol = volume(8 * MIB);
    let device = start(&vol, 1, false);
    let socket = vol.socket("blk.sock");
    let client = Client::connect(&socket, 1, MIB as usize).unwrap();
    assert_eq!(client.capacity(), 8 * MIB);
    vol.volume.grow(24 * MIB).unwrap();
    // libblkio sets up no backend request channel, so the change cannot be pushed to it; that
    // is not an error, and the next connection reads the new size.
    device
        .resize()
        .expect("nothing to deliver is not a failure");
    drop(client);
    assert!(wait_until(Duration::from_secs(5), || !device.connected()));
    device.resize().expect("no frontend: nothing to notify");
    let mut client = Client::connect(&socket, 1, MIB as usize).unwrap();
    assert_eq!(client.capacity(), 24 * MIB);
    // The new space is usable.
    pattern(client.buf(0, 4096), 20 * MIB, 1);
    assert_eq!(client.write_sync(0, 20 * MIB, 0, 4096), 0);
    drop(client);
    device.stop();
}

#[test]
fn stop_while_a_client_is_connected() {
    let vol = volume(8 * MIB);
    let device = start(&vol, 2, false);
    let socket = vol.socket("blk.sock");
    let mut client = Client::connect(&socket, 2, MIB as usize).unwrap();
    assert_eq!(client.write_sync(0, 0, 0, 64 * KIB as usize), 0);
    device.stop();
    assert!(!socket.exists());
    // The client's next request fails instead of hanging forever.
    let ptr = client.ptr(0);
    client.queues[0].read(0, ptr, 4096, 9, ReqFlags::empty());
    let mut completions = [MaybeUninit::<Completion>::uninit(); 1];
    let mut timeout = Duration::from_secs(2);
    let got = client.queues[0].do_io(&mut completions, 1, Some(&mut timeout), None);
    assert!(
        got.map(|n| n == 0).unwrap_or(true),
        "no completion from a stopped device"
    );
    // A second device can take the same socket path.
    let again = start(&vol, 1, false);
    drop(client);
    let mut fresh = Client::connect(&socket, 1, MIB as usize).unwrap();
    assert_eq!(fresh.read_sync(0, 0, 0, 4096), 0);
    drop(fresh);
    again.stop();
}

#[test]
fn socket_is_created_with_the_requested_mode() {
    use std::os::unix::fs::PermissionsExt;
    let vol = volume(8 * MIB);
    let mut config = BlkConfig::new(vol.socket("mode.sock"));
    config.socket_mode = 0o660;
    let device = BlkDevice::start(Arc::clone(&vol.volume), config.clone()).unwrap();
    let mode = std::fs::metadata(vol.socket("mode.sock"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660);
    // A second device on the same live socket is refused, naming the volume.
    let err = BlkDevice::start(Arc::clone(&vol.volume), config.clone()).unwrap_err();
    assert!(
        err.to_string()
            .contains(&vol.volume.layout().id.to_string()),
        "{err}"
    );
    assert!(err.to_string().contains("in use"), "{err}");
    device.stop();
    config.socket_mode = 0o666;
    let err = BlkDevice::start(Arc::clone(&vol.volume), config).unwrap_err();
    assert!(err.to_string().contains("world-writable"), "{err}");
}
