//! The underlay socket's segmentation offloads: UDP GSO to send many VXLAN datagrams in one
//! system call, UDP GRO to receive many in one.
//!
//! Send: [`send_segments`] hands the kernel datagrams laid back to back (gathered from pieces, so
//! a datagram's payload need not be copied next to its headers), all of one size but the last,
//! with a `UDP_SEGMENT` control message giving that size; the kernel (or the NIC) cuts them into
//! datagrams with their own UDP and IP headers. [`gso_supported`] says whether the kernel knows
//! the option at all (Linux 4.18); a route or device that refuses it is reported by the send
//! itself (`EIO`, `EINVAL`), and the caller then falls back to one datagram per call.
//!
//! Receive: with [`enable_gro`] (Linux 5.0), the kernel may hand over consecutive datagrams of
//! one sender at once, back to back, with a `UDP_GRO` control message giving their size.
//! [`receive`] reads one such buffer (or a single datagram) with its source and that size, and
//! [`datagrams`] cuts it up again, refusing a size that cannot describe the buffer.

use std::io::{self, IoSlice};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;

/// Most datagrams one `UDP_SEGMENT` send may carry (the kernel's `UDP_MAX_SEGMENTS` before 6.6;
/// later kernels take 128).
pub const MAX_SEGMENTS: usize = 64;
/// Most bytes of datagrams one `UDP_SEGMENT` send may carry: a UDP payload that fits in one
/// 64 KiB IPv6 packet (IPv4 allows 20 bytes more).
pub const MAX_SEGMENTS_LEN: usize = 65_535 - 40 - 8;
/// A receive buffer this large holds any datagram, or any run the kernel coalesces (at most one
/// 64 KiB IP packet's worth).
pub const RECEIVE_BUFFER_LEN: usize = 65_536;

/// Bytes of the kernel's `struct cmsghdr`, and the alignment of what follows it.
const CMSG_HEADER_LEN: usize = size_of::<libc::cmsghdr>();
const CMSG_ALIGN: usize = size_of::<usize>();
/// Room for one control message with up to 8 bytes of data (`CMSG_SPACE(sizeof(u16))` to send).
const SEND_CONTROL_LEN: usize = CMSG_HEADER_LEN + CMSG_ALIGN;
/// Room for the `UDP_GRO` message received, and for others should the socket's owner have asked
/// for some.
const RECEIVE_CONTROL_LEN: usize = 128;
/// Room for a `sockaddr_in6`, the larger of the two addresses.
const SOCKADDR_LEN: usize = size_of::<libc::sockaddr_in6>();

/// Bytes the underlay socket may queue each way (`SO_RCVBUF`, `SO_SNDBUF`). A coalesced run
/// takes 64 KiB of it, so the kernel's default (about 200 KiB) holds only three: a burst from a
/// fast sender overflows it and whole runs are lost. 4 MiB rides out bursts of a few hundred
/// microseconds at 40 Gbit/s. Raised to this unless the socket's owner set more; beyond
/// `net.core.rmem_max`/`wmem_max` only with CAP_NET_ADMIN.
pub const SOCKET_BUFFER_LEN: usize = 4 << 20;

/// A control message buffer, aligned as the kernel lays out `cmsghdr`s.
#[repr(C, align(8))]
struct Control<const N: usize>([u8; N]);

/// Raises the socket's receive and send buffers to [`SOCKET_BUFFER_LEN`] (see there).
pub fn enlarge_buffers(socket: &UdpSocket) -> io::Result<()> {
    for (option, forced) in [
        (libc::SO_RCVBUF, libc::SO_RCVBUFFORCE),
        (libc::SO_SNDBUF, libc::SO_SNDBUFFORCE),
    ] {
        // The kernel reports twice what was set (it counts its own overhead too).
        if get_int_option(socket, libc::SOL_SOCKET, option)? >= (SOCKET_BUFFER_LEN * 2) as i32 {
            continue;
        }
        let len = SOCKET_BUFFER_LEN as libc::c_int;
        if set_int_option(socket, libc::SOL_SOCKET, forced, len).is_err() {
            set_int_option(socket, libc::SOL_SOCKET, option, len)?;
        }
    }
    Ok(())
}

/// Asks the kernel to coalesce received datagrams (`UDP_GRO`).
pub fn enable_gro(socket: &UdpSocket) -> io::Result<()> {
    set_int_option(socket, libc::SOL_UDP, libc::UDP_GRO, 1)
}

/// Whether the kernel knows `UDP_SEGMENT` (asked of the socket's option, which reads 0 unset).
pub fn gso_supported(socket: &UdpSocket) -> bool {
    get_int_option(socket, libc::SOL_UDP, libc::UDP_SEGMENT).is_ok()
}

fn set_int_option(socket: &UdpSocket, level: i32, name: i32, value: libc::c_int) -> io::Result<()> {
    // SAFETY: the option value points to a live int of the length passed; the fd is open.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn get_int_option(socket: &UdpSocket, level: i32, name: i32) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len point to live locals of the sizes given; the fd is open.
    let result = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Sends the bytes of `pieces`, taken in order as one buffer of datagrams laid back to back,
/// to `to` in one call: with `Some(size)`, as datagrams of `size` bytes each but the last (which
/// may be shorter), with `UDP_SEGMENT`; with `None`, as a single datagram. The pieces need not
/// line up with the datagrams (a datagram's headers and its payload may be two pieces, say);
/// there may be at most 1024 of them (`UIO_MAXIOV`), or the send fails with `EMSGSIZE`.
pub fn send_segments(
    socket: &UdpSocket,
    to: SocketAddr,
    pieces: &[IoSlice<'_>],
    size: Option<u16>,
) -> io::Result<()> {
    let mut name = [0u8; SOCKADDR_LEN];
    let name_len = encode_sockaddr(to, &mut name);
    let mut control = Control([0; SEND_CONTROL_LEN]);
    // SAFETY: msghdr is plain data (pointers and integers), for which all zeroes is valid.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_name = name.as_mut_ptr().cast();
    message.msg_namelen = name_len;
    // IoSlice is guaranteed ABI-compatible with the system's iovec.
    message.msg_iov = pieces.as_ptr().cast_mut().cast();
    message.msg_iovlen = pieces.len() as _;
    if let Some(size) = size {
        let data = encode_cmsg_header(
            &mut control.0,
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            size_of::<u16>(),
        );
        control.0[data..data + 2].copy_from_slice(&size.to_ne_bytes());
        message.msg_control = control.0.as_mut_ptr().cast();
        message.msg_controllen = SEND_CONTROL_LEN as _;
    }
    // SAFETY: every pointer in the message refers to a live local or to the pieces' memory, with
    // the lengths given; the kernel only reads them.
    let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &raw const message, 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What [`receive`] read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// Bytes in the buffer.
    pub len: usize,
    pub source: SocketAddr,
    /// The datagrams' size, when the kernel coalesced several (the `UDP_GRO` control message).
    pub segment_size: Option<usize>,
    /// The datagram, or its control message, did not fit: what was read is not all of it.
    pub truncated: bool,
}

/// Reads one datagram, or one run of coalesced datagrams, into `buffer`.
pub fn receive(socket: &UdpSocket, buffer: &mut [u8]) -> io::Result<Received> {
    let mut name = [0u8; SOCKADDR_LEN];
    let mut control = Control([0; RECEIVE_CONTROL_LEN]);
    let mut iov = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    // SAFETY: msghdr is plain data (pointers and integers), for which all zeroes is valid.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_name = name.as_mut_ptr().cast();
    message.msg_namelen = SOCKADDR_LEN as libc::socklen_t;
    message.msg_iov = &raw mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.0.as_mut_ptr().cast();
    message.msg_controllen = RECEIVE_CONTROL_LEN as _;
    // SAFETY: every pointer in the message refers to a live local or to `buffer`, writable for
    // the lengths given, which the kernel does not exceed.
    let len = unsafe { libc::recvmsg(socket.as_raw_fd(), &raw mut message, 0) };
    if len < 0 {
        return Err(io::Error::last_os_error());
    }
    let name_len = (message.msg_namelen as usize).min(SOCKADDR_LEN);
    let source = decode_sockaddr(&name[..name_len]).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "a datagram from an address that is neither IPv4 nor IPv6",
        )
    })?;
    let control_len = (message.msg_controllen as usize).min(RECEIVE_CONTROL_LEN);
    Ok(Received {
        len: len as usize,
        source,
        segment_size: gro_segment_size(&control.0[..control_len]),
        truncated: message.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0,
    })
}

/// Why a received buffer cannot be cut into datagrams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CoalescedError {
    #[error("a coalesced buffer of {len} bytes with a segment size of {size}")]
    BadSegmentSize { len: usize, size: usize },
}

/// The datagrams of a received buffer: `buffer` itself, or, when the kernel coalesced a run,
/// its pieces of `segment_size` bytes (the last may be shorter).
pub fn datagrams(
    buffer: &[u8],
    segment_size: Option<usize>,
) -> Result<Datagrams<'_>, CoalescedError> {
    let size = match segment_size {
        // A size the run cannot have: the kernel reports one only for two datagrams or more.
        Some(size) if size == 0 || size > buffer.len() => {
            return Err(CoalescedError::BadSegmentSize {
                len: buffer.len(),
                size,
            });
        }
        Some(size) => size,
        None => usize::MAX,
    };
    Ok(Datagrams {
        rest: Some(buffer),
        size,
    })
}

/// The datagrams of a received buffer, from [`datagrams`].
#[derive(Clone, Debug)]
pub struct Datagrams<'a> {
    rest: Option<&'a [u8]>,
    size: usize,
}

impl<'a> Iterator for Datagrams<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let rest = self.rest?;
        if rest.len() <= self.size {
            // The last, or only, datagram: even an empty one is a datagram.
            self.rest = None;
            return Some(rest);
        }
        let (datagram, rest) = rest.split_at(self.size);
        self.rest = Some(rest);
        Some(datagram)
    }
}

/// Writes a `cmsghdr` for `data_len` bytes of data at the start of `control`; returns where the
/// data goes.
fn encode_cmsg_header(control: &mut [u8], level: i32, kind: i32, data_len: usize) -> usize {
    let len = CMSG_HEADER_LEN + data_len;
    control[..size_of::<usize>()].copy_from_slice(&len.to_ne_bytes());
    let at = size_of::<usize>();
    control[at..at + 4].copy_from_slice(&level.to_ne_bytes());
    control[at + 4..at + 8].copy_from_slice(&kind.to_ne_bytes());
    CMSG_HEADER_LEN
}

/// The segment size of a `UDP_GRO` control message among `control`'s messages.
fn gro_segment_size(control: &[u8]) -> Option<usize> {
    let mut at = 0;
    while at + CMSG_HEADER_LEN <= control.len() {
        let word = size_of::<usize>();
        let len = usize::from_ne_bytes(control[at..at + word].try_into().ok()?);
        let level = i32::from_ne_bytes(control[at + word..at + word + 4].try_into().ok()?);
        let kind = i32::from_ne_bytes(control[at + word + 4..at + word + 8].try_into().ok()?);
        if len < CMSG_HEADER_LEN || at + len > control.len() {
            return None;
        }
        let data = &control[at + CMSG_HEADER_LEN..at + len];
        if level == libc::SOL_UDP && kind == libc::UDP_GRO && data.len() >= 4 {
            let size = i32::from_ne_bytes(data[..4].try_into().ok()?);
            return Some(usize::try_from(size).unwrap_or(0));
        }
        at += len.next_multiple_of(CMSG_ALIGN);
    }
    None
}

/// Writes `addr` as a `sockaddr_in` or `sockaddr_in6` into `bytes`; returns its length.
fn encode_sockaddr(addr: SocketAddr, bytes: &mut [u8; SOCKADDR_LEN]) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(addr) => {
            bytes[..2].copy_from_slice(&(libc::AF_INET as libc::sa_family_t).to_ne_bytes());
            bytes[2..4].copy_from_slice(&addr.port().to_be_bytes());
            bytes[4..8].copy_from_slice(&addr.ip().octets());
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(addr) => {
            bytes[..2].copy_from_slice(&(libc::AF_INET6 as libc::sa_family_t).to_ne_bytes());
            bytes[2..4].copy_from_slice(&addr.port().to_be_bytes());
            bytes[4..8].copy_from_slice(&addr.flowinfo().to_be_bytes());
            bytes[8..24].copy_from_slice(&addr.ip().octets());
            bytes[24..28].copy_from_slice(&addr.scope_id().to_ne_bytes());
            SOCKADDR_LEN as libc::socklen_t
        }
    }
}

/// Reads a `sockaddr_in` or `sockaddr_in6`.
fn decode_sockaddr(bytes: &[u8]) -> Option<SocketAddr> {
    let family = libc::sa_family_t::from_ne_bytes(bytes.get(..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?);
    match i32::from(family) {
        libc::AF_INET => {
            let ip: [u8; 4] = bytes.get(4..8)?.try_into().ok()?;
            Some(SocketAddrV4::new(Ipv4Addr::from(ip), port).into())
        }
        libc::AF_INET6 => {
            let flowinfo = u32::from_be_bytes(bytes.get(4..8)?.try_into().ok()?);
            let ip: [u8; 16] = bytes.get(8..24)?.try_into().ok()?;
            let scope = u32::from_ne_bytes(bytes.get(24..28)?.try_into().ok()?);
            Some(SocketAddrV6::new(Ipv6Addr::from(ip), port, flowinfo, scope).into())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
