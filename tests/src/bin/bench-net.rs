//! Benchmark: Vessel's switch against the kernel's, with guests in network namespaces.
//!
//! 1. One node: two guests joined by Vessel's switch (taps) beside two guests joined by a Linux
//!    bridge (veths), and beside two guests on taps joined by a bare relay (a thread per
//!    direction that reads a frame from one tap and writes it to the other: the floor of any
//!    user-space switch between taps, whose two copies per frame the bridge does not make).
//! 2. Two nodes: a guest on each, joined by Vessel's switches over its VXLAN underlay, beside the
//!    same joined by Linux bridges and kernel VXLAN devices, and beside a bare UDP tunnel between
//!    the nodes' taps (each frame cut into pieces sent with UDP GSO, received with UDP GRO and put
//!    back together: the floor of any user-space switch joining taps over a UDP underlay). Each
//!    node is a namespace; the underlay is a veth between them.
//!
//! For each: TCP throughput (iperf3, one stream) and ICMP round trip (busybox ping, back to back),
//! Vessel and the reference alternating, several rounds; the program prints the medians and the
//! ratio Vessel / reference (and, for the relay, relay / reference and Vessel / relay). Then the
//! CPU time the switch used while idle.
//!
//! The switch runs in this process (vnet's `Datapath`, as the daemon runs it). Run it as root with
//! a release build:
//!     cargo run --release -p vessel-tests --bin bench-net -- [--seconds 5] [--rounds 3]

use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use vessel_tests::bench::median;
use vessel_tests::namespaces::{Netns, Spawned, is_root, veth};
use vnet::switch::{NetworkConfig, PortConfig, SwitchConfig};
use vnet::tap::Offloads;
use vnet::{Datapath, Mac, NetworkId, PortId, Tap, Vni, underlay};

#[derive(Debug, Parser)]
struct Args {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds per setup (Vessel and the reference alternate).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Pings per round.
    #[arg(long, default_value_t = 2000)]
    pings: u32,
    /// Run one comparison only: "local" (two guests on one node) or "overlay" (two nodes over VXLAN).
    #[arg(long, value_parser = ["local", "overlay"])]
    only: Option<String>,
}

const NET: NetworkId = NetworkId(1);

/// Two guests that can reach each other at 10.9.0.1 and 10.9.0.2, with whatever joins them.
struct Pair {
    /// The iperf3 server in `b` (dropped, so killed, first).
    _server: Spawned,
    a: Netns,
    /// The server's namespace (kept for its lifetime).
    _b: Netns,
    /// What joins them: namespaces, switches (dropped after the guests).
    _joint: Vec<Box<dyn std::any::Any>>,
}

impl Pair {
    fn new(a: Netns, b: Netns, joint: Vec<Box<dyn std::any::Any>>) -> anyhow::Result<Self> {
        let server = b.spawn(&["iperf3", "-s", "-B", "10.9.0.2"])?;
        Ok(Pair {
            _server: server,
            a,
            _b: b,
            _joint: joint,
        })
    }

    /// One iperf3 run from a to b: Gbit/s received.
    fn throughput(&self, seconds: u64) -> anyhow::Result<f64> {
        let seconds = seconds.to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        let out = loop {
            match self
                .a
                .exec(&["iperf3", "-c", "10.9.0.2", "-t", &seconds, "-J"])
            {
                Ok(out) => break out,
                // The server may not listen yet.
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(error) => return Err(error),
            }
        };
        let report: serde_json::Value = serde_json::from_str(&out).context("iperf3's JSON")?;
        let bits = report["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .context("no throughput in iperf3's report")?;
        Ok(bits / 1e9)
    }

    fn ping(&self, count: u32) -> anyhow::Result<f64> {
        self.a.ping_mean_us("10.9.0.2", count)
    }
}

fn mac(last: u8) -> Mac {
    Mac([0x02, 0, 0, 0, 0x09, last])
}

/// A tap made in `node` and moved into `guest`, with the guest's address (10.9.0.`host`), MAC
/// and MTU.
fn guest_tap(node: &Netns, guest: &Netns, ifname: &str, host: u8, mtu: u16) -> anyhow::Result<Tap> {
    let tap = node.enter(|| Tap::open(ifname, 1))??;
    node.give(ifname, guest)?;
    guest.configure(
        ifname,
        &format!("10.9.0.{host}/24"),
        mtu,
        Some(&mac(host).to_string()),
    )?;
    Ok(tap)
}

/// A [`guest_tap`] plugged into `datapath` as port `id`.
fn plug(
    datapath: &Datapath,
    node: &Netns,
    guest: &Netns,
    ifname: &str,
    id: u64,
    host: u8,
    mtu: u16,
) -> anyhow::Result<()> {
    let tap = guest_tap(node, guest, ifname, host, mtu)?;
    datapath.add_tap(
        PortConfig {
            id: PortId(id),
            network: NET,
            mac: mac(host),
            ipv4: Some(format!("10.9.0.{host}").parse()?),
            allow_any_mac: false,
        },
        tap,
    )?;
    Ok(())
}

fn switch_in(node: &Netns, bind: &str, mtu: u16) -> anyhow::Result<Datapath> {
    let socket = node.enter(|| UdpSocket::bind(bind))??;
    let datapath = Datapath::start(socket, SwitchConfig::default())?;
    datapath.configure().add_network(NetworkConfig {
        id: NET,
        vni: Vni::new(100)?,
        mtu,
    })?;
    Ok(datapath)
}

/// One node, Vessel: two guests on taps of one switch.
fn vessel_local() -> anyhow::Result<Pair> {
    let node = Netns::new("vbn-vl-node")?;
    let (a, b) = (Netns::new("vbn-vl-a")?, Netns::new("vbn-vl-b")?);
    let datapath = switch_in(&node, "127.0.0.1:0", 1500)?;
    plug(&datapath, &node, &a, "vbnvla", 1, 1, 1500)?;
    plug(&datapath, &node, &b, "vbnvlb", 2, 2, 1500)?;
    Pair::new(a, b, vec![Box::new(datapath), Box::new(node)])
}

/// Threads that move frames for a floor setup (see [`relay_local`], [`relay_overlay`]); they
/// stop when it is dropped.
#[derive(Default)]
struct Relay {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// How long a relay thread waits for input before it looks at `stop` again.
    const STOP_CHECK_MS: i32 = 100;

    /// Runs `work` on a thread of its own, with the flag that says when to stop.
    fn spawn(&mut self, work: impl FnOnce(&AtomicBool) + Send + 'static) {
        let stop = Arc::clone(&self.stop);
        self.threads.push(std::thread::spawn(move || work(&stop)));
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Waits until `fd` has input: true, or false once `stop` is set.
fn readable(fd: &impl AsRawFd, stop: &AtomicBool) -> bool {
    let mut poll = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `poll` is one valid pollfd for the call; the caller keeps the fd open.
        if unsafe { libc::poll(&mut poll, 1, Relay::STOP_CHECK_MS) } > 0 {
            return true;
        }
    }
    false
}

/// A 64 KiB GSO frame behind its virtio-net header, with room to spare.
const TAP_READ_LEN: usize = 65_536 + 128;

/// Frames from tap `from` to tap `to` until `stop` (or until a tap fails: it was deleted).
fn tap_to_tap(from: &File, to: &File, stop: &AtomicBool) {
    let mut frame = vec![0u8; TAP_READ_LEN];
    while readable(from, stop) {
        let Ok(len) = (&*from).read(&mut frame) else {
            return;
        };
        // A tap takes a frame whole or refuses it (then it is lost, as on a full queue).
        let _ = (&*to).write(&frame[..len]);
    }
}

/// The floor tunnel's datagram header: the frame's number, where the piece lies in it, and the
/// frame's length (each a big-endian u32).
const PIECE_HEADER_LEN: usize = 12;
/// Payload bytes per datagram: what a 1500-byte underlay IPv4 packet holds past the IP and UDP
/// headers and the piece's own.
const PIECE_LEN: usize = 1500 - 20 - 8 - PIECE_HEADER_LEN;

/// Frames from tap `from` to the floor tunnel's peer `to` until `stop`: each frame, virtio-net
/// header and all, cut into pieces sent in runs of one `UDP_SEGMENT` send each.
fn tap_to_tunnel(from: &File, socket: &UdpSocket, to: SocketAddr, stop: &AtomicBool) {
    let mut frame = vec![0u8; TAP_READ_LEN];
    let mut headers = Vec::new();
    let per_run =
        underlay::MAX_SEGMENTS.min(underlay::MAX_SEGMENTS_LEN / (PIECE_HEADER_LEN + PIECE_LEN));
    for number in 0u32.. {
        if !readable(from, stop) {
            return;
        }
        let Ok(len) = (&*from).read(&mut frame) else {
            return;
        };
        let frame = &frame[..len];
        headers.clear();
        for (index, _) in frame.chunks(PIECE_LEN).enumerate() {
            headers.extend_from_slice(&number.to_be_bytes());
            headers.extend_from_slice(&((index * PIECE_LEN) as u32).to_be_bytes());
            headers.extend_from_slice(&(len as u32).to_be_bytes());
        }
        let pieces: Vec<IoSlice<'_>> = headers
            .chunks(PIECE_HEADER_LEN)
            .zip(frame.chunks(PIECE_LEN))
            .flat_map(|(header, piece)| [IoSlice::new(header), IoSlice::new(piece)])
            .collect();
        for run in pieces.chunks(2 * per_run) {
            let size = (run.len() > 2).then_some((PIECE_HEADER_LEN + PIECE_LEN) as u16);
            let _ = underlay::send_segments(socket, to, run, size);
        }
    }
}

/// Frames from the floor tunnel to tap `to` until `stop`: pieces put back together in order (a
/// frame missing a piece is dropped when the next one starts) and written whole.
fn tunnel_to_tap(socket: &UdpSocket, to: &File, stop: &AtomicBool) {
    let mut received = vec![0u8; underlay::RECEIVE_BUFFER_LEN];
    let mut frame = vec![0u8; TAP_READ_LEN];
    let (mut current, mut filled) = (u32::MAX, 0usize);
    while readable(socket, stop) {
        let Ok(read) = underlay::receive(socket, &mut received) else {
            continue;
        };
        let Ok(datagrams) = underlay::datagrams(&received[..read.len], read.segment_size) else {
            continue;
        };
        for datagram in datagrams {
            let Some((header, piece)) = datagram.split_first_chunk::<PIECE_HEADER_LEN>() else {
                continue;
            };
            let field = |at: usize| {
                u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
            };
            let (number, offset, len) = (field(0), field(4) as usize, field(8) as usize);
            if number != current {
                (current, filled) = (number, 0);
            }
            if offset != filled || offset + piece.len() > len.min(frame.len()) {
                continue;
            }
            frame[offset..offset + piece.len()].copy_from_slice(piece);
            filled += piece.len();
            if filled == len {
                let _ = (&*to).write(&frame[..len]);
            }
        }
    }
}

/// A [`guest_tap`] with the offloads the switch sets on its taps, unplugged: its queue.
fn bare_tap(node: &Netns, guest: &Netns, ifname: &str, host: u8, mtu: u16) -> anyhow::Result<File> {
    let tap = guest_tap(node, guest, ifname, host, mtu)?;
    tap.set_offloads(Offloads::ALL)?;
    Ok(tap.into_queues().remove(0))
}

/// One node, the floor of any user-space switch between taps: two guests on taps joined by one
/// thread per direction that reads a frame from one tap and writes it to the other, nothing else
/// (no switch decision, no counters, no epoll).
fn relay_local() -> anyhow::Result<Pair> {
    let node = Netns::new("vbn-rl-node")?;
    let (a, b) = (Netns::new("vbn-rl-a")?, Netns::new("vbn-rl-b")?);
    let tap_a = bare_tap(&node, &a, "vbnrla", 1, 1500)?;
    let tap_b = bare_tap(&node, &b, "vbnrlb", 2, 1500)?;
    let mut relay = Relay::default();
    for (from, to) in [(tap_a.try_clone()?, tap_b.try_clone()?), (tap_b, tap_a)] {
        relay.spawn(move |stop| tap_to_tap(&from, &to, stop));
    }
    Pair::new(a, b, vec![Box::new(relay), Box::new(node)])
}

/// Two nodes, the floor of any user-space switch that joins taps over a UDP underlay: on each
/// node one thread reads the guest's tap and sends each frame, cut into pieces, to the other node
/// with UDP GSO, and one reads pieces (UDP GRO), puts each frame back together and writes it to
/// the tap: the four copies of every byte a VXLAN switch in user space makes, without its work
/// (no VXLAN, no segmenting into TCP segments and merging them again, no checksums, no switch
/// decision).
fn relay_overlay() -> anyhow::Result<Pair> {
    let (n1, n2) = two_nodes("vbn-ro")?;
    let (a, b) = (Netns::new("vbn-ro-a")?, Netns::new("vbn-ro-b")?);
    let mut relay = Relay::default();
    for (node, guest, ifname, host, local, remote) in [
        (&n1, &a, "vbnroa", 1, "10.8.0.1:4789", "10.8.0.2:4789"),
        (&n2, &b, "vbnrob", 2, "10.8.0.2:4789", "10.8.0.1:4789"),
    ] {
        let tap = bare_tap(node, guest, ifname, host, 1450)?;
        let socket = node.enter(|| UdpSocket::bind(local))??;
        underlay::enlarge_buffers(&socket)?;
        underlay::enable_gro(&socket)?;
        let remote: SocketAddr = remote.parse()?;
        let (tap_in, socket_out) = (tap.try_clone()?, socket.try_clone()?);
        relay.spawn(move |stop| tap_to_tunnel(&tap_in, &socket_out, remote, stop));
        relay.spawn(move |stop| tunnel_to_tap(&socket, &tap, stop));
    }
    Pair::new(a, b, vec![Box::new(relay), Box::new(n1), Box::new(n2)])
}

/// One node, reference: two guests on veths of a Linux bridge.
fn bridge_local() -> anyhow::Result<Pair> {
    let hub = Netns::new("vbn-bl-hub")?;
    let (a, b) = (Netns::new("vbn-bl-a")?, Netns::new("vbn-bl-b")?);
    hub.ip(&["link", "add", "br0", "type", "bridge"])?;
    hub.ip(&["link", "set", "br0", "up"])?;
    for (guest, host) in [(&a, 1), (&b, 2)] {
        let port = format!("p{host}");
        veth(&hub, &port, guest, "eth0")?;
        hub.ip(&["link", "set", &port, "master", "br0", "up"])?;
        guest.configure("eth0", &format!("10.9.0.{host}/24"), 1500, None)?;
    }
    Pair::new(a, b, vec![Box::new(hub)])
}

/// Two node namespaces joined by a veth underlay (10.8.0.1 and 10.8.0.2).
fn two_nodes(prefix: &str) -> anyhow::Result<(Netns, Netns)> {
    let n1 = Netns::new(&format!("{prefix}-n1"))?;
    let n2 = Netns::new(&format!("{prefix}-n2"))?;
    veth(&n1, "ul", &n2, "ul")?;
    n1.configure("ul", "10.8.0.1/24", 1500, None)?;
    n2.configure("ul", "10.8.0.2/24", 1500, None)?;
    Ok((n1, n2))
}

/// Two nodes, Vessel: a guest on each node's switch, the switches joined over VXLAN.
fn vessel_overlay() -> anyhow::Result<Pair> {
    let (n1, n2) = two_nodes("vbn-vo")?;
    let (a, b) = (Netns::new("vbn-vo-a")?, Netns::new("vbn-vo-b")?);
    let s1 = switch_in(&n1, "10.8.0.1:4789", 1450)?;
    let s2 = switch_in(&n2, "10.8.0.2:4789", 1450)?;
    s1.configure()
        .set_vteps(NET, vec!["10.8.0.2:4789".parse()?])?;
    s2.configure()
        .set_vteps(NET, vec!["10.8.0.1:4789".parse()?])?;
    plug(&s1, &n1, &a, "vbnvoa", 1, 1, 1450)?;
    plug(&s2, &n2, &b, "vbnvob", 2, 2, 1450)?;
    Pair::new(
        a,
        b,
        vec![Box::new(s1), Box::new(s2), Box::new(n1), Box::new(n2)],
    )
}

/// Two nodes, reference: on each node a Linux bridge joining the guest's veth and a kernel VXLAN
/// device (VNI 100, UDP 4789) whose remote is the other node.
fn kernel_overlay() -> anyhow::Result<Pair> {
    let (n1, n2) = two_nodes("vbn-ko")?;
    let (a, b) = (Netns::new("vbn-ko-a")?, Netns::new("vbn-ko-b")?);
    for (node, guest, local, remote, host) in [
        (&n1, &a, "10.8.0.1", "10.8.0.2", 1),
        (&n2, &b, "10.8.0.2", "10.8.0.1", 2),
    ] {
        node.ip(&["link", "add", "br0", "type", "bridge"])?;
        node.ip(&[
            "link", "add", "vx0", "type", "vxlan", "id", "100", "dstport", "4789", "local", local,
            "remote", remote, "dev", "ul",
        ])?;
        node.ip(&["link", "set", "vx0", "master", "br0", "up"])?;
        node.ip(&["link", "set", "br0", "up"])?;
        veth(node, "p0", guest, "eth0")?;
        node.ip(&["link", "set", "p0", "master", "br0", "up"])?;
        guest.configure("eth0", &format!("10.9.0.{host}/24"), 1450, None)?;
    }
    Pair::new(a, b, vec![Box::new(n1), Box::new(n2)])
}

/// Medians of TCP throughput (Gbit/s) and ping (µs) for each of `pairs`, measured in turns
/// (round by round, each pair in order) so that drift in the machine touches all alike.
fn measure(pairs: &[&Pair], args: &Args) -> anyhow::Result<Vec<(f64, f64)>> {
    let mut tcp = vec![Vec::new(); pairs.len()];
    let mut ping = vec![Vec::new(); pairs.len()];
    for _ in 0..args.rounds {
        for (pair, tcp) in pairs.iter().zip(&mut tcp) {
            tcp.push(pair.throughput(args.seconds)?);
        }
        for (pair, ping) in pairs.iter().zip(&mut ping) {
            ping.push(pair.ping(args.pings)?);
        }
    }
    Ok(tcp
        .iter_mut()
        .zip(&mut ping)
        .map(|(tcp, ping)| (median(tcp), median(ping)))
        .collect())
}

/// Prints one setup's medians beside the reference's, with the ratios.
fn print_rows(
    title: &str,
    ours: &str,
    reference: &str,
    (tcp, ping): (f64, f64),
    (their_tcp, their_ping): (f64, f64),
) {
    println!("{title:<36} {ours:>10} {reference:>14} {:>7}", "ratio");
    println!(
        "{:<36} {tcp:>10.2} {their_tcp:>14.2} {:>7.2}",
        "  TCP, one stream (Gbit/s)",
        tcp / their_tcp
    );
    println!(
        "{:<36} {ping:>10.1} {their_ping:>14.1} {:>7.2}",
        "  ping round trip (µs)",
        ping / their_ping
    );
}

/// Runs Vessel's pair, the reference's and, if given, the floor's in turns; prints the medians
/// and ratios (the floor's against the reference, then Vessel's against the floor). The floor is
/// the least any user-space switch on the same devices must do ([`relay_local`], [`relay_overlay`]).
fn compare(
    title: &str,
    reference: &str,
    vessel: &Pair,
    other: &Pair,
    floor: Option<(&str, &Pair)>,
    args: &Args,
) -> anyhow::Result<()> {
    let mut pairs = vec![vessel, other];
    pairs.extend(floor.map(|(_, pair)| pair));
    let medians = measure(&pairs, args)?;
    print_rows(title, "Vessel", reference, medians[0], medians[1]);
    if let (Some((what, _)), Some(&floor)) = (floor, medians.get(2)) {
        print_rows(what, "relay", reference, floor, medians[1]);
        println!(
            "{:<36} {:>10.2} {:>14.2}",
            "  Vessel / relay (TCP, ping)",
            medians[0].0 / floor.0,
            medians[0].1 / floor.1
        );
    }
    Ok(())
}

/// CPU time this process used over `window` while nothing was sent.
fn idle_cpu(window: Duration) -> anyhow::Result<Duration> {
    let pid = std::process::id();
    let before = vessel_tests::bench::cpu_time(pid)?;
    std::thread::sleep(window);
    Ok(vessel_tests::bench::cpu_time(pid)?.saturating_sub(before))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !is_root() {
        anyhow::bail!("bench-net needs root (network namespaces, taps)");
    }
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; run with --release for meaningful figures");
    }
    println!(
        "iperf3 -t {} (one TCP stream) and {} back-to-back pings per round, {} rounds, medians",
        args.seconds, args.pings, args.rounds
    );
    let runs = |name: &str| args.only.as_deref().is_none_or(|only| only == name);
    if runs("local") {
        let vessel = vessel_local()?;
        let bridge = bridge_local()?;
        let relay = relay_local()?;
        compare(
            "two guests on one node",
            "Linux bridge",
            &vessel,
            &bridge,
            Some(("a bare tap relay (no switch)", &relay)),
            &args,
        )?;
    }
    if runs("overlay") {
        let vessel = vessel_overlay()?;
        let kernel = kernel_overlay()?;
        let relay = relay_overlay()?;
        compare(
            "two guests on two nodes (VXLAN)",
            "kernel VXLAN",
            &vessel,
            &kernel,
            Some(("a bare UDP tunnel relay (no switch)", &relay)),
            &args,
        )?;
        // The relay's threads wake to look for their stop flag: gone before the switches' idle CPU is read.
        drop(relay);
        let idle = idle_cpu(Duration::from_secs(5))?;
        println!(
            "idle: the two switches used {} ms of CPU in 5 s",
            idle.as_millis()
        );
    }
    Ok(())
}
