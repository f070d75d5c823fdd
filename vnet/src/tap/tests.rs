use std::io::{Read, Write};
use std::net::UdpSocket;
use std::process::Command;
use std::time::{Duration, Instant};

use super::*;
use crate::frame::{self, ETHERTYPE_ARP};
use crate::{Mac, arp};

#[test]
fn refuses_bad_names_and_queue_counts_before_touching_the_kernel() {
    for name in ["", "a/b", "a:b", "tap%d", "has space", "sixteen-bytes-xx"] {
        assert!(
            matches!(Tap::open(name, 1), Err(TapError::BadName(ref n)) if n == name),
            "{name:?}"
        );
    }
    for queues in [0, MAX_QUEUES + 1] {
        let error = Tap::open("vnet-unused", queues).unwrap_err();
        assert!(matches!(error, TapError::BadQueueCount { .. }), "{error}");
    }
}

#[test]
fn offload_flags_are_the_kernels() {
    assert_eq!(Offloads::default().flags(), 0);
    assert_eq!(Offloads::ALL.flags(), 0x0f);
    assert_eq!(
        Offloads {
            csum: true,
            tso6: true,
            ..Offloads::default()
        }
        .flags(),
        0x05
    );
}

/// Runs `body` on a thread of its own in a fresh network namespace. A tap it makes never appears
/// in the host's namespace, and goes away with the namespace when the thread ends, pass or fail.
/// Returns false (after saying so) when not root.
fn in_fresh_netns(body: impl FnOnce() + Send + 'static) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: creating tap devices in a network namespace needs root");
        return false;
    }
    let thread = std::thread::spawn(move || {
        // SAFETY: unshare takes no pointers; CLONE_NEWNET moves only this thread (and the
        // processes it spawns) into the new namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            io::Error::last_os_error()
        );
        body();
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
    true
}

/// rx and tx packets of interface `name` in this thread's namespace (/sys/class/net would show
/// the namespace /sys was mounted in, not this thread's).
fn packet_counts(name: &str) -> Option<(u64, u64)> {
    let table = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
    table.lines().find_map(|line| {
        let (interface, fields) = line.split_once(':')?;
        if interface.trim() != name {
            return None;
        }
        let fields: Vec<u64> = fields
            .split_whitespace()
            .map(|f| f.parse().unwrap())
            .collect();
        Some((fields[1], fields[9]))
    })
}

/// The next frame (virtio-net header included) the kernel sends out of any queue of `tap`.
fn next_frame(tap: &Tap, deadline: Instant) -> Option<Vec<u8>> {
    let mut polled: Vec<libc::pollfd> = tap
        .queues()
        .iter()
        .map(|queue| libc::pollfd {
            fd: queue.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let timeout = deadline
        .saturating_duration_since(Instant::now())
        .as_millis();
    let timeout = c_int::try_from(timeout).unwrap_or(c_int::MAX);
    // SAFETY: `polled` is a live array of as many pollfd as the count passed.
    let ready = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, timeout) };
    if ready <= 0 {
        return None;
    }
    let queue = polled.iter().position(|p| p.revents & libc::POLLIN != 0)?;
    let mut buffer = vec![0u8; VNET_HDR_LEN + 65536];
    let len = (&tap.queues()[queue]).read(&mut buffer).unwrap();
    buffer.truncate(len);
    Some(buffer)
}

#[test]
fn creates_adopts_and_carries_frames_both_ways() {
    in_fresh_netns(|| {
        let name = "vnet-test0";
        let tap = Tap::open(name, 2).unwrap();
        assert_eq!((tap.name(), tap.queues().len()), (name, 2));
        assert!(packet_counts(name).is_some(), "the tap was created");
        tap.set_persistent(true).unwrap();
        drop(tap);
        assert!(
            packet_counts(name).is_some(),
            "a persistent tap outlives its queues"
        );

        // Adopt it by name, as a restarted daemon does.
        let tap = Tap::open(name, 2).unwrap();
        let offloads = Offloads {
            csum: true,
            tso4: true,
            tso6: true,
            tso_ecn: false,
        };
        tap.set_offloads(offloads).unwrap();
        tap.set_up(true).unwrap();

        // A frame written to a queue (behind a virtio-net header with no offload) is one the
        // interface receives.
        let (rx_before, _) = packet_counts(name).unwrap();
        let mut written = vec![0u8; VNET_HDR_LEN];
        written.extend(frame::tests::frame(
            Mac::BROADCAST,
            Mac([2, 0, 0, 0, 0, 1]),
            0x88b5,
            46,
        ));
        assert_eq!((&tap.queues()[1]).write(&written).unwrap(), written.len());
        assert_eq!(packet_counts(name).unwrap().0, rx_before + 1);

        // A packet the kernel routes into the interface arrives as a readable frame: sending to a
        // neighbour makes the kernel ask for its MAC first.
        let address = Command::new("ip")
            .args(["address", "add", "10.199.0.1/24", "dev", name])
            .status()
            .expect("running ip (iproute2)");
        assert!(address.success());
        let socket = UdpSocket::bind("10.199.0.1:0").unwrap();
        socket.send_to(b"hello", "10.199.0.2:9").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let (header, request) = loop {
            let read = next_frame(&tap, deadline).expect("no ARP request came out of the tap");
            let (vnet, bytes) = read.split_at(VNET_HDR_LEN);
            let Ok(header) = frame::parse(bytes, 1500) else {
                continue;
            };
            if header.ethertype != ETHERTYPE_ARP {
                continue; // IPv6 neighbour discovery and such
            }
            assert_eq!(vnet[1], 0, "an ARP is not segmented (gso_type NONE)");
            break (header, arp::parse(&bytes[header.len..]).unwrap());
        };
        assert!(header.dst.is_broadcast());
        assert!(request.is_request);
        assert_eq!(request.sender_mac, header.src);
        assert_eq!(request.sender_ip, std::net::Ipv4Addr::new(10, 199, 0, 1));
        assert_eq!(request.target_ip, std::net::Ipv4Addr::new(10, 199, 0, 2));
        assert!(packet_counts(name).unwrap().1 >= 1);

        tap.set_persistent(false).unwrap();
        drop(tap);
        assert!(
            packet_counts(name).is_none(),
            "gone with its last queue once not persistent"
        );
    });
}

#[test]
fn will_not_adopt_an_interface_that_is_not_a_tap() {
    in_fresh_netns(|| {
        let error = Tap::open("lo", 1).unwrap_err();
        assert!(
            matches!(error, TapError::Attach { queue: 0, .. }),
            "{error}"
        );
        assert!(error.to_string().contains("'lo'"), "{error}");
    });
}

#[test]
fn reads_a_taps_mac_and_deletes_it_through_a_handle() {
    in_fresh_netns(|| {
        assert_eq!(interface_mac("vnet-none").unwrap(), None);
        let tap = Tap::open("vnet-h", 1).unwrap();
        let mac = Mac([0x02, 0, 0, 0, 0, 0x09]);
        tap.set_mac(mac).unwrap();
        assert_eq!(interface_mac("vnet-h").unwrap(), Some(mac));
        tap.set_persistent(true).unwrap();
        let handle = tap.handle().unwrap();
        drop(tap);
        assert_eq!(interface_mac("vnet-h").unwrap(), Some(mac), "persistent");
        handle.set_persistent(false).unwrap();
        drop(handle);
        assert_eq!(
            interface_mac("vnet-h").unwrap(),
            None,
            "gone with the handle, its last queue"
        );
    });
}
