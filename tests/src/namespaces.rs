//! Network namespaces for switch tests and benchmarks: "guest" namespaces stand for VMs (the kernel
//! side of a tap, or of a veth, with an address), "node" namespaces for hosts. Needs root.
//!
//! Every [`Netns`] is deleted when dropped, also when the test fails, which removes the interfaces
//! in it and ends the processes started with [`Netns::spawn`] (they are killed by the guard they
//! return).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

/// Whether this process is root; if not, says that the caller is skipped.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipped: needs root (network namespaces, tap devices); CI runs it as root");
    }
    root
}

/// Runs a command; fails with its output unless it succeeds; returns its stdout.
pub fn run(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("cannot run {args:?}"))?;
    if !output.status.success() {
        bail!(
            "{args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A network namespace with its loopback up and IPv6 off (no autoconfiguration chatter).
#[derive(Debug)]
pub struct Netns(pub String, Owned);

/// Whether dropping a [`Netns`] deletes the namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owned {
    Yes,
    No,
}

impl Netns {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let _ = Command::new("ip").args(["netns", "delete", name]).output();
        run(&["ip", "netns", "add", name])?;
        let netns = Netns(name.to_owned(), Owned::Yes);
        netns.ip(&["link", "set", "lo", "up"])?;
        netns.exec(&[
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ])?;
        Ok(netns)
    }

    /// A namespace someone else made (e.g. a node of `deploy/netns-cluster`): used, never deleted.
    pub fn existing(name: &str) -> Self {
        Netns(name.to_owned(), Owned::No)
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        run(&[&["ip", "-n", &self.0], args].concat())
    }

    /// Runs a program in the namespace and waits for it.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        run(&[&["ip", "netns", "exec", &self.0], args].concat())
    }

    /// The body of an HTTP GET of `url` from inside the namespace (busybox wget), e.g. a daemon's `/metrics`.
    pub fn http_get(&self, url: &str) -> anyhow::Result<String> {
        self.exec(&["busybox", "wget", "-q", "-O", "-", url])
    }

    /// Starts a program in the namespace; it is killed when the returned guard drops.
    pub fn spawn(&self, args: &[&str]) -> anyhow::Result<Spawned> {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {args:?}"))?;
        Ok(Spawned(child))
    }

    /// Runs `f` on a thread inside this namespace: sockets and taps it creates live here.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        let path = format!("/run/netns/{}", self.0);
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns takes an open namespace fd and a flag; it changes only this
                    // thread's network namespace, and this thread ends with the scope.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        bail!("setns into {path}: {}", std::io::Error::last_os_error());
                    }
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("a thread in namespace {} panicked", self.0))?
        })
    }

    /// Moves interface `ifname` of this namespace into `to`.
    pub fn give(&self, ifname: &str, to: &Netns) -> anyhow::Result<()> {
        self.ip(&["link", "set", ifname, "netns", &to.0]).map(drop)
    }

    /// Gives `ifname` (in this namespace) `address` (CIDR), an MTU and a MAC if asked, and brings
    /// it up.
    pub fn configure(
        &self,
        ifname: &str,
        address: &str,
        mtu: u16,
        mac: Option<&str>,
    ) -> anyhow::Result<()> {
        let mtu = mtu.to_string();
        let mut link = vec!["link", "set", ifname, "mtu", &mtu];
        if let Some(mac) = mac {
            link.extend(["address", mac]);
        }
        link.push("up");
        self.ip(&link)?;
        self.ip(&["addr", "add", address, "dev", ifname]).map(drop)
    }

    /// Mean ICMP round trip to `ip` in µs, over `count` pings sent back to back.
    pub fn ping_mean_us(&self, ip: &str, count: u32) -> anyhow::Result<f64> {
        let count = count.to_string();
        let out = self.exec(&["busybox", "ping", "-A", "-q", "-c", &count, ip])?;
        // "round-trip min/avg/max = 0.031/0.046/0.293 ms"
        let figures = out
            .lines()
            .find_map(|line| line.split_once("min/avg/max = "))
            .with_context(|| format!("no round-trip line in {out}"))?
            .1;
        let mean: f64 = figures
            .split('/')
            .nth(1)
            .and_then(|avg| avg.trim().parse().ok())
            .with_context(|| format!("no mean in {figures}"))?;
        Ok(mean * 1000.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.1 == Owned::Yes {
            let _ = Command::new("ip")
                .args(["netns", "delete", &self.0])
                .output();
        }
    }
}

/// A process started in a namespace; killed when dropped.
#[derive(Debug)]
pub struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        // `ip netns exec` execs the program, so this is the program's own pid.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connects namespaces `a` and `b` with a veth pair named `a_if` / `b_if`.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> anyhow::Result<()> {
    a.ip(&[
        "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.0,
    ])
    .map(drop)
}

/// Sends `bytes` over TCP from namespace `from` to `to_ip`:`port` in namespace `to`; panics unless they arrive
/// intact.
pub fn tcp_transfer(from: &Netns, to: &Netns, to_ip: &str, port: u16, bytes: usize) {
    let listener = to
        .enter(|| TcpListener::bind((to_ip, port)).expect("listen"))
        .unwrap();
    let data: Vec<u8> = (0..bytes).map(|i| (i * 7 + i / 4096) as u8).collect();
    let address: SocketAddr = format!("{to_ip}:{port}").parse().unwrap();
    std::thread::scope(|scope| {
        let receiver = scope.spawn(|| {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut received = Vec::new();
            stream.read_to_end(&mut received).expect("receive");
            received
        });
        from.enter(|| {
            let mut stream =
                TcpStream::connect_timeout(&address, Duration::from_secs(5)).expect("connect");
            stream.write_all(&data).expect("send");
        })
        .unwrap();
        let received = receiver.join().unwrap();
        assert!(
            received == data,
            "{} of {bytes} bytes arrived, or different ones",
            received.len()
        );
    });
}

/// The rx packet count of interface `ifname` in namespace `ns`.
pub fn rx_packets(ns: &Netns, ifname: &str) -> u64 {
    ns.exec(&[
        "cat",
        &format!("/sys/class/net/{ifname}/statistics/rx_packets"),
    ])
    .unwrap()
    .trim()
    .parse()
    .unwrap()
}
