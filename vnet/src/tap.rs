//! Tap devices: creating or adopting a multiqueue tap with a virtio-net header, by name.
//!
//! A tap port's frames are exchanged with the kernel through one file descriptor per queue, each
//! frame preceded by a virtio-net header ([`VNET_HDR_LEN`] bytes: the `virtio_net_hdr_v1` layout
//! that vhost-user-net guests use too), so checksum and segmentation offloads pass between a
//! guest and the kernel without being done in software. The device is opened with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE`: the first queue of a name that does not
//! exist creates the device, any other queue (or any queue of a name that exists, such as a
//! persistent tap left by a previous daemon or made by the operator) attaches to it.
//!
//! Only the few ioctls Vessel needs are wrapped (the `tun-tap` crate has none of the multiqueue
//! and virtio-net-header ones). Reading and writing frames is plain `read`/`write` on the queue
//! [`File`]s, which the tap workers own.

use std::ffi::{c_char, c_int, c_uint};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// Bytes of the virtio-net header before each frame (`virtio_net_hdr_v1`, with `num_buffers`).
pub const VNET_HDR_LEN: usize = vessel_proto::virtio_net::HEADER_LEN;
/// The queues a tap may have (the kernel's `MAX_TAP_QUEUES`).
pub const MAX_QUEUES: usize = 256;
const TUN_PATH: &str = "/dev/net/tun";

/// Why a tap device could not be opened or configured.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(
        "'{0}' is not a valid interface name (1 to 15 bytes, none of them '/', ':', '%', NUL or whitespace)"
    )]
    BadName(String),
    #[error("tap '{name}': {queues} queues asked for, but a tap has 1 to {MAX_QUEUES}")]
    BadQueueCount { name: String, queues: usize },
    #[error("cannot open /dev/net/tun (is the tun module loaded, and are we root?): {0}")]
    OpenTun(#[source] io::Error),
    #[error(
        "cannot create or attach queue {queue} of tap '{name}' (if it exists, it must be a \
         multiqueue tap; an interface of another kind cannot have that name): {source}"
    )]
    Attach {
        name: String,
        queue: usize,
        source: io::Error,
    },
    #[error("tap '{name}': {what} failed: {source}")]
    Ioctl {
        name: String,
        what: &'static str,
        source: io::Error,
    },
}

/// Offloads the kernel may hand to (and accept from) the tap's user: set them to what the peer
/// of the port (a guest's virtio-net device) negotiated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offloads {
    /// Partial checksums (`VIRTIO_NET_F_GUEST_CSUM`); every other offload needs it.
    pub csum: bool,
    /// TCP segmentation over IPv4 (`GUEST_TSO4`).
    pub tso4: bool,
    /// TCP segmentation over IPv6 (`GUEST_TSO6`).
    pub tso6: bool,
    /// TSO of segments with ECN set (`GUEST_ECN`).
    pub tso_ecn: bool,
}

impl Offloads {
    /// Every offload a tap can take: what the switch sets on its taps, whose frames may go to
    /// any port (the switch segments or completes for a port that cannot take one).
    pub const ALL: Offloads = Offloads {
        csum: true,
        tso4: true,
        tso6: true,
        tso_ecn: true,
    };

    fn flags(self) -> c_uint {
        [
            (self.csum, libc::TUN_F_CSUM),
            (self.tso4, libc::TUN_F_TSO4),
            (self.tso6, libc::TUN_F_TSO6),
            (self.tso_ecn, libc::TUN_F_TSO_ECN),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .fold(0, |flags, (_, flag)| flags | flag)
    }
}

/// An open tap device: its name and one file per queue.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: Vec<File>,
}

impl Tap {
    /// Opens `queues` queues of the tap `name`, creating the device if it does not exist and
    /// adopting it if it does, with a [`VNET_HDR_LEN`]-byte virtio-net header on every frame.
    ///
    /// A created tap disappears with its last queue unless made persistent
    /// ([`Tap::set_persistent`]).
    pub fn open(name: &str, queues: usize) -> Result<Self, TapError> {
        let request = ifreq(name)?;
        if !(1..=MAX_QUEUES).contains(&queues) {
            return Err(TapError::BadQueueCount {
                name: name.to_owned(),
                queues,
            });
        }
        let mut tap = Tap {
            name: name.to_owned(),
            queues: Vec::with_capacity(queues),
        };
        for queue in 0..queues {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(TUN_PATH)
                .map_err(TapError::OpenTun)?;
            let mut request = request;
            request.ifr_ifru.ifru_flags =
                (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE)
                    as libc::c_short;
            // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `request` is, and it
            // lives across the call; the fd is an open /dev/net/tun.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) };
            if rc < 0 {
                let source = io::Error::last_os_error();
                return Err(TapError::Attach {
                    name: name.to_owned(),
                    queue,
                    source,
                });
            }
            tap.queues.push(file);
        }
        let header_len: c_int = VNET_HDR_LEN as c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points at a live one.
        tap.ioctl("setting the virtio-net header size", |fd| unsafe {
            libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &header_len)
        })?;
        Ok(tap)
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// One file per queue: each frame read or written is a virtio-net header, then the frame.
    pub fn queues(&self) -> &[File] {
        &self.queues
    }

    /// Hands the queues over to the workers that will serve them.
    pub fn into_queues(self) -> Vec<File> {
        self.queues
    }

    /// Keeps the device (with its name, addresses and settings) when its last queue closes, or
    /// no longer.
    pub fn set_persistent(&self, persistent: bool) -> Result<(), TapError> {
        let value = libc::c_ulong::from(persistent);
        // SAFETY: TUNSETPERSIST takes its argument by value; no memory is passed.
        self.ioctl("setting persistence", |fd| unsafe {
            libc::ioctl(fd, libc::TUNSETPERSIST, value)
        })
    }

    /// Sets the offloads the kernel may use in frames it gives us (and so which it accepts).
    pub fn set_offloads(&self, offloads: Offloads) -> Result<(), TapError> {
        let flags = libc::c_ulong::from(offloads.flags());
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        self.ioctl("setting offloads", |fd| unsafe {
            libc::ioctl(fd, libc::TUNSETOFFLOAD, flags)
        })
    }

    /// A socket for link ioctls, in this thread's network namespace (where the device must be).
    fn link_socket(&self) -> Result<OwnedFd, TapError> {
        link_socket(&self.name)
    }

    /// A second handle on the device (its first queue, not a new one): whoever holds it can make the
    /// device non-persistent later (to delete it) wherever the device has moved since, where opening
    /// it by name would find nothing, or another device.
    pub fn handle(&self) -> Result<Tap, TapError> {
        let queue = self.queues[0]
            .try_clone()
            .map_err(|source| TapError::Ioctl {
                name: self.name.clone(),
                what: "duplicating a queue",
                source,
            })?;
        Ok(Tap {
            name: self.name.clone(),
            queues: vec![queue],
        })
    }

    /// Sets the device's MAC address: the source of every frame the kernel sends through it, so
    /// it must be the port's (port security).
    pub fn set_mac(&self, mac: crate::Mac) -> Result<(), TapError> {
        let socket = self.link_socket()?;
        let mut request = ifreq(&self.name)?;
        let mut address = libc::sockaddr {
            sa_family: libc::ARPHRD_ETHER,
            sa_data: [0; 14],
        };
        for (slot, byte) in address.sa_data.iter_mut().zip(mac.0) {
            *slot = byte as c_char;
        }
        request.ifr_ifru.ifru_hwaddr = address;
        // SAFETY: SIOCSIFHWADDR reads one `struct ifreq`, which `request` is.
        let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFHWADDR, &request) };
        if rc < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what: "setting the MAC address",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Sets the device's MTU (the network's, so the kernel sends no frame the switch must drop).
    pub fn set_mtu(&self, mtu: u16) -> Result<(), TapError> {
        let socket = self.link_socket()?;
        let mut request = ifreq(&self.name)?;
        request.ifr_ifru.ifru_mtu = c_int::from(mtu);
        // SAFETY: SIOCSIFMTU reads one `struct ifreq`, which `request` is.
        let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFMTU, &request) };
        if rc < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what: "setting the MTU",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Brings the link up or down (what `ip link set NAME up` does).
    pub fn set_up(&self, up: bool) -> Result<(), TapError> {
        let error = |what, source| TapError::Ioctl {
            name: self.name.clone(),
            what,
            source,
        };
        let socket = self.link_socket()?;
        let mut request = ifreq(&self.name)?;
        // SAFETY: SIOCGIFFLAGS fills the flags of one `struct ifreq`, which `request` is.
        let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) };
        if rc < 0 {
            return Err(error("reading link flags", io::Error::last_os_error()));
        }
        // SAFETY: the kernel has just set `ifru_flags`, a plain integer member of the union.
        let flags = unsafe { request.ifr_ifru.ifru_flags };
        let up_flag = libc::IFF_UP as libc::c_short;
        let flags = if up {
            flags | up_flag
        } else {
            flags & !up_flag
        };
        request.ifr_ifru.ifru_flags = flags;
        // SAFETY: SIOCSIFFLAGS reads one `struct ifreq`, which `request` is.
        let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) };
        if rc < 0 {
            return Err(error("setting link flags", io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Runs a per-device ioctl on the first queue (the settings belong to the device, not the
    /// queue).
    fn ioctl(&self, what: &'static str, call: impl FnOnce(c_int) -> c_int) -> Result<(), TapError> {
        if call(self.queues[0].as_raw_fd()) < 0 {
            let source = io::Error::last_os_error();
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what,
                source,
            });
        }
        Ok(())
    }
}

/// A socket for link ioctls on `name`, in this thread's network namespace.
fn link_socket(name: &str) -> Result<OwnedFd, TapError> {
    // SAFETY: socket() takes no pointers; a negative result is checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(TapError::Ioctl {
            name: name.to_owned(),
            what: "opening a socket for link settings",
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` is a socket we just opened and nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The MAC address of interface `name` in this thread's network namespace; `None` if there is no
/// interface of that name here.
pub fn interface_mac(name: &str) -> Result<Option<crate::Mac>, TapError> {
    let mut request = ifreq(name)?;
    let socket = link_socket(name)?;
    // SAFETY: SIOCGIFHWADDR fills one `struct ifreq`, which `request` is.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFHWADDR, &mut request) };
    if rc < 0 {
        let source = io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::ENODEV) {
            return Ok(None);
        }
        return Err(TapError::Ioctl {
            name: name.to_owned(),
            what: "reading the MAC address",
            source,
        });
    }
    // SAFETY: the kernel has just set `ifru_hwaddr`, a plain struct member of the union.
    let address = unsafe { request.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (byte, slot) in mac.iter_mut().zip(address.sa_data) {
        *byte = slot as u8;
    }
    Ok(Some(crate::Mac(mac)))
}

/// A zeroed `struct ifreq` naming the interface `name`.
fn ifreq(name: &str) -> Result<libc::ifreq, TapError> {
    let valid = (1..libc::IFNAMSIZ).contains(&name.len())
        && !name
            .bytes()
            .any(|b| matches!(b, b'/' | b':' | b'%' | 0) || b.is_ascii_whitespace());
    if !valid {
        return Err(TapError::BadName(name.to_owned()));
    }
    // SAFETY: `ifreq` is plain integers, arrays and a union of those: all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as c_char;
    }
    Ok(request)
}

#[cfg(test)]
mod tests;
