//! The vhost-user socket of one device: listening, serving one frontend at a time, and the
//! backend-to-frontend channel.
//!
//! A listener thread accepts a connection, serves it with the `vhost` crate's
//! `BackendReqHandler` over a fresh [`VhostUserHandler`], and when the frontend goes away stops
//! the rings and accepts the next one (QEMU's `reconnect=` comes back this way). The socket is
//! created in a private directory, given its mode and owner there and only then renamed into
//! place, so no other user can ever connect to it with the wrong permissions; a stale socket
//! file left by a dead process is replaced, a live one is refused.
//!
//! Config-change notifications: vhost 0.18's `Backend` (the backend request channel object the
//! crate builds from SET_BACKEND_REQ_FD) has no way to send VHOST_USER_BACKEND_CONFIG_CHANGE_MSG.
//! So before each request is handed to the crate, the server peeks at its header with
//! `recvmsg(MSG_PEEK)`; for SET_BACKEND_REQ_FD it peeks again with room for ancillary data,
//! which makes Linux install a duplicate of the passed socket without consuming the message.
//! The crate then processes the message as usual, and the server keeps the duplicate to write
//! CONFIG_CHANGE_MSG itself.
//!
//! Invariant: at most one connection is served at a time, and when [`VhostUserServer::stop`]
//! returns, no worker, connection or listener thread of this device is left running.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{debug, info, warn};
use vhost::vhost_user::message::{BackendReq, FrontendReq};
use vhost::vhost_user::{BackendReqHandler, Error as VhostError, VhostUserProtocolFeatures};
use vmm_sys_util::eventfd::EventFd;

use crate::device::VhostUserDevice;
use crate::handler::VhostUserHandler;

/// How long `notify_config_change` waits for the frontend's REPLY_ACK.
const CONFIG_CHANGE_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and how the device socket is created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketOptions {
    /// Path of the Unix socket the frontend connects to.
    pub path: PathBuf,
    /// Permission bits of the socket (e.g. 0o600, or 0o660 with an owner group for QEMU).
    /// World-writable modes are refused.
    pub mode: u32,
    /// `(uid, gid)` to give the socket to, e.g. the user QEMU runs as.
    pub owner: Option<(u32, u32)>,
}

/// Failures creating or running a device socket.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Mode would let any local user drive the device.
    #[error(
        "socket mode {mode:#o} for {path} is world-writable; use e.g. 0o600 or 0o660 with an owner"
    )]
    WorldWritable { path: PathBuf, mode: u32 },
    /// Mode has bits beyond rwx.
    #[error("socket mode {mode:#o} for {path} is not a permission mode (only 0o777 bits allowed)")]
    BadMode { path: PathBuf, mode: u32 },
    /// Another process serves this path.
    #[error(
        "socket {0} is in use by a running process; detach it there first or pick another path"
    )]
    InUse(PathBuf),
    /// Something other than a socket is at the path.
    #[error("{0} exists and is not a socket; remove it or pick another path")]
    NotASocket(PathBuf),
    /// Directory missing, permission denied, name too long...
    #[error("cannot create socket {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    /// chown failed.
    #[error(
        "cannot give socket {path} to uid {uid} gid {gid}: {source} (the daemon must run as root to do that)"
    )]
    Chown {
        path: PathBuf,
        uid: u32,
        gid: u32,
        source: io::Error,
    },
    /// Thread or eventfd creation.
    #[error("cannot start the server of socket {path}: {source}")]
    Start { path: PathBuf, source: io::Error },
    /// The frontend did not negotiate the channel config-change messages need.
    #[error(
        "the frontend connected to {0} did not set up a backend request channel with CONFIG; it sees the change when it re-reads the config"
    )]
    NoConfigChannel(PathBuf),
    /// Writing the notification or reading its reply failed.
    #[error("config-change notification on {path} failed: {source}")]
    Notify { path: PathBuf, source: io::Error },
}

/// The backend-to-frontend socket of the current connection.
#[derive(Debug)]
struct BackendChannel {
    sock: UnixStream,
    reply_ack: bool,
    config: bool,
}

#[derive(Debug, Default)]
struct Shared {
    connected: AtomicBool,
    stopping: AtomicBool,
    /// A clone of the connection socket, to interrupt it on stop.
    connection: Mutex<Option<UnixStream>>,
    channel: Mutex<Option<BackendChannel>>,
    connections: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// A listening vhost-user socket serving one device.
#[derive(Debug)]
pub struct VhostUserServer {
    path: PathBuf,
    span: tracing::Span,
    shared: Arc<Shared>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl VhostUserServer {
    /// Creates the socket and starts the listener thread.
    pub fn start<D: VhostUserDevice>(
        device: Arc<D>,
        options: &SocketOptions,
    ) -> Result<Self, ServerError> {
        let span = device.span();
        let listener = span.in_scope(|| bind_socket(options))?;
        let path = options.path.clone();
        let start_err = |source| ServerError::Start {
            path: path.clone(),
            source,
        };
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(start_err)?;
        let thread_stop = stop.try_clone().map_err(start_err)?;
        let shared = Arc::new(Shared::default());
        let thread_shared = Arc::clone(&shared);
        let thread_span = span.clone();
        let thread = std::thread::Builder::new()
            .name("vhost-listener".into())
            .spawn(move || {
                thread_span.in_scope(|| listen(listener, device, thread_shared, thread_stop))
            })
            .map_err(|e| {
                let _ = fs::remove_file(&options.path);
                start_err(e)
            })?;
        Ok(VhostUserServer {
            path,
            span,
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a frontend is connected right now.
    pub fn connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Acquire)
    }

    /// Tells the frontend the config space changed. `Ok(false)` when no frontend is connected
    /// (it reads the new config when it connects).
    pub fn notify_config_change(&self) -> Result<bool, ServerError> {
        if !self.connected() {
            return Ok(false);
        }
        let mut channel = lock(&self.shared.channel);
        let Some(ch) = channel.as_mut().filter(|c| c.config) else {
            return Err(ServerError::NoConfigChannel(self.path.clone()));
        };
        let notify_err = |source| ServerError::Notify {
            path: self.path.clone(),
            source,
        };
        send_config_change(ch).map_err(notify_err)?;
        Ok(true)
    }

    /// Disconnects the frontend (its rings are stopped after completing what they took),
    /// joins every thread and removes the socket.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        {
            let conn = lock(&self.shared.connection);
            self.shared.stopping.store(true, Ordering::Release);
            if let Some(c) = conn.as_ref() {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        match fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(parent: &self.span, path = %self.path.display(), "cannot remove socket: {e}")
            }
        }
    }
}

impl Drop for VhostUserServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}

fn listen<D: VhostUserDevice>(
    listener: UnixListener,
    device: Arc<D>,
    shared: Arc<Shared>,
    stop: EventFd,
) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of two pollfd for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            warn!("listener poll failed, the socket stops accepting: {e}");
            return;
        }
        if fds[1].revents != 0 || shared.stopping.load(Ordering::Acquire) {
            return;
        }
        if fds[0].revents == 0 {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => serve(stream, &device, &shared),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(e) => {
                warn!("accept failed: {e}");
                // Avoid spinning on a persistent error such as EMFILE.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn serve<D: VhostUserDevice>(stream: UnixStream, device: &Arc<D>, shared: &Shared) {
    let (peek, interrupt) = match (stream.try_clone(), stream.try_clone()) {
        (Ok(p), Ok(i)) => (p, i),
        (Err(e), _) | (_, Err(e)) => {
            warn!("cannot duplicate the connection socket, dropping the frontend: {e}");
            return;
        }
    };
    {
        let mut conn = lock(&shared.connection);
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        *conn = Some(interrupt);
    }
    shared.connected.store(true, Ordering::Release);
    let n = shared.connections.fetch_add(1, Ordering::AcqRel) + 1;
    info!(connection = n, "frontend connected");

    let handler = Arc::new(Mutex::new(VhostUserHandler::new(Arc::clone(device))));
    let mut requests = BackendReqHandler::from_stream(stream, Arc::clone(&handler));
    let set_backend_req_fd = u32::from(FrontendReq::SET_BACKEND_REQ_FD);
    let net_set_mtu = u32::from(FrontendReq::NET_SET_MTU);
    let set_vring_enable = u32::from(FrontendReq::SET_VRING_ENABLE);
    let reason = loop {
        let peeked = match peek_request(&peek) {
            Ok(Some(p)) => p,
            Ok(None) => break "frontend closed the connection".to_string(),
            Err(e) => break format!("connection error: {e}"),
        };
        if peeked.code == Some(set_vring_enable)
            && lock(&handler).acked_features() & PROTOCOL_FEATURES_BIT == 0
        {
            // QEMU's vhost-user-net disables its rings before it acks any feature; the crate would close the
            // connection for a SET_VRING_ENABLE before VHOST_USER_F_PROTOCOL_FEATURES is acked.
            match answer_early_vring_enable(&peek, &handler) {
                Ok(()) => continue,
                Err(e) => break format!("SET_VRING_ENABLE: {e}"),
            }
        }
        if peeked.code == Some(net_set_mtu) {
            // Not dispatched by the `vhost` crate (it would close the connection).
            match answer_net_set_mtu(&peek, &handler) {
                Ok(()) => continue,
                Err(e) => break format!("NET_SET_MTU: {e}"),
            }
        }
        let channel_request = peeked.code == Some(set_backend_req_fd);
        if channel_request {
            // Installed before the crate handles the message: its REPLY_ACK tells the frontend
            // the channel exists, so it must be usable by then. Withdrawn below if refused.
            install_channel(shared, &handler, peeked.fd);
        }
        let result = requests.handle_request();
        if channel_request && result.is_err() {
            *lock(&shared.channel) = None;
        }
        match result {
            Ok(()) => {}
            Err(VhostError::ReqHandlerError(e)) => {
                // Refused (and NACKed when the frontend asked for a reply); the connection
                // stays usable.
                warn!(request = ?peeked.code.and_then(|c| FrontendReq::try_from(c).ok()), "request refused: {e}");
            }
            Err(VhostError::Disconnected | VhostError::PartialMessage) => {
                break "frontend closed the connection".to_string();
            }
            Err(e) => {
                break format!(
                    "closing the connection after {:?}: {e}",
                    peeked.code.and_then(|c| FrontendReq::try_from(c).ok())
                );
            }
        }
    };
    *lock(&shared.channel) = None;
    // Stop every ring before the next frontend may connect.
    lock(&handler).shutdown();
    *lock(&shared.connection) = None;
    shared.connected.store(false, Ordering::Release);
    info!(connection = n, "frontend disconnected: {reason}");
}

fn install_channel<D: VhostUserDevice>(
    shared: &Shared,
    handler: &Mutex<VhostUserHandler<D>>,
    fd: Option<OwnedFd>,
) {
    let Some(fd) = fd else {
        warn!(
            "SET_BACKEND_REQ_FD accepted but its socket could not be duplicated; config changes will not be notified"
        );
        return;
    };
    let acked = lock(handler).acked_protocol_features();
    let sock = UnixStream::from(fd);
    if let Err(e) = sock.set_read_timeout(Some(CONFIG_CHANGE_REPLY_TIMEOUT)) {
        warn!("cannot set a timeout on the backend request channel: {e}");
    }
    debug!("backend request channel set up");
    *lock(&shared.channel) = Some(BackendChannel {
        sock,
        reply_ack: acked.contains(VhostUserProtocolFeatures::REPLY_ACK),
        config: acked.contains(VhostUserProtocolFeatures::CONFIG),
    });
}

fn send_config_change(ch: &mut BackendChannel) -> io::Result<()> {
    const VERSION_1: u32 = 0x1;
    const REPLY: u32 = 0x4;
    const NEED_REPLY: u32 = 0x8;
    let code = u32::from(BackendReq::CONFIG_CHANGE_MSG);
    let flags = VERSION_1 | if ch.reply_ack { NEED_REPLY } else { 0 };
    let mut msg = [0u8; 12];
    msg[0..4].copy_from_slice(&code.to_le_bytes());
    msg[4..8].copy_from_slice(&flags.to_le_bytes());
    ch.sock.write_all(&msg)?;
    if !ch.reply_ack {
        return Ok(());
    }
    let mut reply = [0u8; 20];
    ch.sock.read_exact(&mut reply)?;
    let word = |i: usize| u32::from_le_bytes([reply[i], reply[i + 1], reply[i + 2], reply[i + 3]]);
    if word(0) != code || word(4) & REPLY == 0 || word(8) != 8 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "malformed reply from the frontend",
        ));
    }
    let mut value = [0u8; 8];
    value.copy_from_slice(&reply[12..20]);
    if u64::from_le_bytes(value) != 0 {
        return Err(io::Error::other(
            "the frontend reported a failure handling the config change",
        ));
    }
    Ok(())
}

/// Reads VHOST_USER_NET_SET_MTU (header + u64) off the socket, hands the MTU to the handler and,
/// when the frontend asked for it with REPLY_ACK negotiated, replies 0 (accepted) or 1 (refused:
/// QEMU then fails to start the NIC). An error means the message was malformed or the socket
/// failed: the connection is closed, as the crate does for malformed messages.
fn answer_net_set_mtu<D: VhostUserDevice>(
    sock: &UnixStream,
    handler: &Mutex<VhostUserHandler<D>>,
) -> io::Result<()> {
    answer_itself(sock, handler, FrontendReq::NET_SET_MTU, |handler, body| {
        handler
            .net_set_mtu(u64::from_le_bytes(body))
            .map_err(|e| e.to_string())
    })
}

/// VHOST_USER_F_PROTOCOL_FEATURES, as acked in SET_FEATURES.
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;

/// Reads a SET_VRING_ENABLE (header + ring index + state) that arrived before the frontend acked
/// VHOST_USER_F_PROTOCOL_FEATURES, applies it, and acknowledges it as [`answer_net_set_mtu`]
/// does. QEMU's vhost-user-net sends one per ring (disable) at start-up, as soon as the backend
/// *offers* the feature; the `vhost` crate would close the connection.
fn answer_early_vring_enable<D: VhostUserDevice>(
    sock: &UnixStream,
    handler: &Mutex<VhostUserHandler<D>>,
) -> io::Result<()> {
    answer_itself(
        sock,
        handler,
        FrontendReq::SET_VRING_ENABLE,
        |handler, body| {
            let index = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
            let enable = u32::from_le_bytes([body[4], body[5], body[6], body[7]]) != 0;
            vhost::vhost_user::VhostUserBackendReqHandlerMut::set_vring_enable(
                handler, index, enable,
            )
            .map_err(|e| e.to_string())
        },
    )
}

/// Reads a request with an 8-byte body off the socket (one the `vhost` crate must not see), runs
/// `apply` on it and, when the frontend asked for a reply with REPLY_ACK negotiated, answers 0
/// (done) or 1 (refused). An error means the message was malformed or the socket failed.
fn answer_itself<D: VhostUserDevice>(
    mut sock: &UnixStream,
    handler: &Mutex<VhostUserHandler<D>>,
    request: FrontendReq,
    apply: impl FnOnce(&mut VhostUserHandler<D>, [u8; 8]) -> Result<(), String>,
) -> io::Result<()> {
    const VERSION_1: u32 = 0x1;
    const REPLY: u32 = 0x4;
    const NEED_REPLY: u32 = 0x8;
    let mut header = [0u8; 12];
    sock.read_exact(&mut header)?;
    let word =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (code, flags, size) = (word(0), word(4), word(8));
    if size != 8 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("body of {size} bytes, expected 8"),
        ));
    }
    let mut body = [0u8; 8];
    sock.read_exact(&mut body)?;
    let mut handler = lock(handler);
    let result = apply(&mut handler, body);
    if let Err(e) = &result {
        warn!(?request, "request refused: {e}");
    }
    let reply_ack = handler
        .acked_protocol_features()
        .contains(VhostUserProtocolFeatures::REPLY_ACK);
    drop(handler);
    if flags & NEED_REPLY != 0 && reply_ack {
        let mut reply = [0u8; 20];
        reply[0..4].copy_from_slice(&code.to_le_bytes());
        reply[4..8].copy_from_slice(&(VERSION_1 | REPLY).to_le_bytes());
        reply[8..12].copy_from_slice(&8u32.to_le_bytes());
        reply[12..20].copy_from_slice(&u64::from(result.is_err()).to_le_bytes());
        sock.write_all(&reply)?;
    }
    Ok(())
}

/// The header of the next request, read without consuming it.
#[derive(Debug)]
struct Peeked {
    /// Request code, if a whole header was available.
    code: Option<u32>,
    /// Duplicate of the first fd attached (only fetched for SET_BACKEND_REQ_FD).
    fd: Option<OwnedFd>,
}

/// Blocks until the next request arrives; `Ok(None)` on end of stream.
fn peek_request(sock: &UnixStream) -> io::Result<Option<Peeked>> {
    let (n, header, _) = peek(sock.as_raw_fd(), false)?;
    if n == 0 {
        return Ok(None);
    }
    if n < header.len() {
        // A header split across writes: let the crate read it; no interception this time.
        return Ok(Some(Peeked {
            code: None,
            fd: None,
        }));
    }
    let code = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut fd = None;
    if code == u32::from(FrontendReq::SET_BACKEND_REQ_FD) {
        let (_, _, fds) = peek(sock.as_raw_fd(), true)?;
        fd = fds.into_iter().next();
    }
    Ok(Some(Peeked {
        code: Some(code),
        fd,
    }))
}

/// One `recvmsg(MSG_PEEK)` of up to a header; with `with_fds`, also the attached descriptors
/// (the kernel installs duplicates and leaves the message queued).
fn peek(fd: RawFd, with_fds: bool) -> io::Result<(usize, [u8; 12], Vec<OwnedFd>)> {
    let mut header = [0u8; 12];
    // u64 elements keep the buffer aligned for cmsghdr; room for far more than the 32 fds a
    // vhost-user message may carry.
    let mut control = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: header.len(),
    };
    // SAFETY: msghdr is a plain C struct for which all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if with_fds {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
    }
    let n = loop {
        // SAFETY: msg points at iov/header/control, all alive and correctly sized for the call.
        let r = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_PEEK | libc::MSG_CMSG_CLOEXEC) };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    if with_fds {
        // SAFETY: msg was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR only walk within
        // msg_control/msg_controllen as set by the kernel.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cmsg.is_null() {
            // SAFETY: cmsg is non-null and points at a header inside the control buffer.
            let hdr = unsafe { &*cmsg };
            if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
                // SAFETY: CMSG_LEN(0) is a pure computation.
                let header_len = unsafe { libc::CMSG_LEN(0) } as usize;
                let data_len = (hdr.cmsg_len as usize).saturating_sub(header_len);
                let count = data_len / std::mem::size_of::<RawFd>();
                // SAFETY: CMSG_DATA points at cmsg_len - CMSG_LEN(0) bytes of fds inside the
                // buffer.
                let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
                for i in 0..count {
                    let at = data.wrapping_add(i);
                    // SAFETY: i < count, so `at` is within the data area the kernel filled;
                    // read_unaligned because that area has no alignment guarantee for RawFd.
                    let raw = unsafe { at.read_unaligned() };
                    // SAFETY: the kernel just installed this descriptor for us; nothing else
                    // owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
            // SAFETY: as for CMSG_FIRSTHDR.
            cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
        }
    }
    Ok((n, header, fds))
}

/// Creates the listening socket with its final mode and owner before anyone can reach it.
fn bind_socket(options: &SocketOptions) -> Result<UnixListener, ServerError> {
    let path = &options.path;
    let mode = options.mode;
    if mode & !0o777 != 0 {
        return Err(ServerError::BadMode {
            path: path.clone(),
            mode,
        });
    }
    if mode & 0o002 != 0 {
        return Err(ServerError::WorldWritable {
            path: path.clone(),
            mode,
        });
    }
    let create_err = |source| ServerError::Create {
        path: path.clone(),
        source,
    };
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(ServerError::InUse(path.clone())),
            Err(_) => {
                info!(path = %path.display(), "replacing a stale socket");
                fs::remove_file(path).map_err(create_err)?;
            }
        },
        Ok(_) => return Err(ServerError::NotASocket(path.clone())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(create_err(e)),
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let private = parent.join(format!(
        ".vs{:x}.{:x}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(create_err)?;
    let result = (|| {
        let tmp = private.join("s");
        let listener = UnixListener::bind(&tmp).map_err(create_err)?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(create_err)?;
        if let Some((uid, gid)) = options.owner {
            std::os::unix::fs::chown(&tmp, Some(uid), Some(gid)).map_err(|source| {
                ServerError::Chown {
                    path: path.clone(),
                    uid,
                    gid,
                    source,
                }
            })?;
        }
        fs::rename(&tmp, path).map_err(create_err)?;
        Ok(listener)
    })();
    let _ = fs::remove_file(private.join("s"));
    let _ = fs::remove_dir(&private);
    result
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn opts(dir: &Path, name: &str, mode: u32) -> SocketOptions {
        SocketOptions {
            path: dir.join(name),
            mode,
            owner: None,
        }
    }

    #[test]
    fn socket_gets_its_mode_and_stale_files_are_replaced() {
        let dir = tempfile::tempdir_in("/work").unwrap();
        let o = opts(dir.path(), "a.sock", 0o640);
        let listener = bind_socket(&o).unwrap();
        let meta = fs::metadata(&o.path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o777, 0o640);
        // A live listener is refused.
        assert!(matches!(bind_socket(&o), Err(ServerError::InUse(_))));
        // A dead one is replaced.
        drop(listener);
        let _listener = bind_socket(&o).unwrap();
        // No private directory left behind.
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("a.sock")]);
    }

    #[test]
    fn unsafe_modes_and_non_sockets_are_refused() {
        let dir = tempfile::tempdir_in("/work").unwrap();
        assert!(matches!(
            bind_socket(&opts(dir.path(), "w", 0o666)),
            Err(ServerError::WorldWritable { .. })
        ));
        assert!(matches!(
            bind_socket(&opts(dir.path(), "w", 0o4600)),
            Err(ServerError::BadMode { .. })
        ));
        fs::write(dir.path().join("file"), b"data").unwrap();
        assert!(matches!(
            bind_socket(&opts(dir.path(), "file", 0o600)),
            Err(ServerError::NotASocket(_))
        ));
        assert_eq!(fs::read(dir.path().join("file")).unwrap(), b"data");
    }

    #[test]
    fn owner_is_applied() {
        let dir = tempfile::tempdir_in("/work").unwrap();
        let mut o = opts(dir.path(), "o.sock", 0o660);
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        // SAFETY: getgid has no preconditions.
        let gid = unsafe { libc::getgid() };
        o.owner = Some((uid, gid));
        let _l = bind_socket(&o).unwrap();
        let meta = fs::metadata(&o.path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (uid, gid));
    }

    #[test]
    fn peek_sees_fds_without_consuming_the_message() {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let (a, b) = UnixStream::pair().unwrap();
        let (passed, _keep) = UnixStream::pair().unwrap();
        let mut header = [0u8; 12];
        header[0..4].copy_from_slice(&u32::from(FrontendReq::SET_BACKEND_REQ_FD).to_le_bytes());
        header[4..8].copy_from_slice(&1u32.to_le_bytes());
        header[8..12].copy_from_slice(&8u32.to_le_bytes());
        let mut msg = header.to_vec();
        msg.extend_from_slice(&0u64.to_le_bytes());
        a.send_with_fd(&msg[..], passed.as_raw_fd()).unwrap();

        let p = peek_request(&b).unwrap().unwrap();
        assert_eq!(p.code, Some(u32::from(FrontendReq::SET_BACKEND_REQ_FD)));
        let dup = p.fd.expect("peek returns a duplicate of the passed socket");
        assert_ne!(dup.as_raw_fd(), passed.as_raw_fd());

        // The message and its fd are still there for the real reader.
        let mut buf = [0u8; 20];
        let (n, fd) = b.recv_with_fd(&mut buf[..]).unwrap();
        assert_eq!(n, 20);
        assert_eq!(&buf[..12], &header);
        assert!(fd.is_some());

        // End of stream.
        drop(a);
        assert!(peek_request(&b).unwrap().is_none());
    }
}
