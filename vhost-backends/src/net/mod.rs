//! The vhost-user-net device: a guest NIC whose frames go to and come from a switch that this
//! crate does not know.
//!
//! [`NetDevice`] is what the daemon holds per vhost-user port. Underneath, a [`NetBackend`]
//! implements [`VhostUserDevice`] (features, config space, NET_SET_MTU) and runs one
//! `worker::QueuePairWorker` per queue pair (receiveq N = ring 2N, transmitq N = ring
//! 2N+1); the generic [`crate::server::VhostUserServer`] owns the socket and the protocol.
//! Frames are read from and written into descriptor chains by [`frame`], which knows nothing
//! of rings or threads, so it is tested and fuzzed on its own.
//!
//! The seam to the switch is [`port`]: the device calls a [`NetPort`] with the frames the
//! guest transmits, in batches on the pair's worker thread, and the switch side pushes frames
//! for the guest into one [`RxQueue`] per queue pair, which writes them into the guest's
//! receive ring on the pusher's thread ([`rx`]). The switch side must respect
//! [`NetDevice::guest_offloads`] when it pushes (GSO frames the guest did not negotiate are
//! dropped, not segmented, here).
//!
//! Reconnects (QEMU `reconnect=1`): the rings resume where the frontend says (SET_VRING_BASE;
//! the workers leave them at exact positions). Frames queued for the guest when its frontend
//! disconnects are dropped and counted (`rx_dropped_link_down`), and the receive queues refuse
//! frames until a queue pair starts again: QEMU shows the guest its link down meanwhile, and a
//! guest coming back gets no stale frames.
//!
//! Every log line of a device is recorded inside a span carrying `port = <name>`.

pub mod config;
pub mod frame;
pub mod header;
pub mod port;
pub mod rx;
pub mod stats;
pub mod worker;

#[cfg(test)]
mod e2e_tests;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;

use vhost::vhost_user::VhostUserProtocolFeatures;
use vmm_sys_util::eventfd::EventFd;

use crate::device::VhostUserDevice;
use crate::server::{ServerError, SocketOptions, VhostUserServer};
use crate::vring::Vring;
pub use config::{GuestOffloads, HostOffloads, MIN_MTU, NetSettings};
pub use header::VirtioNetHeader;
pub use port::{MAX_FRAME_LEN, NetPort, Taken, TxBatch};
pub use rx::{RxBatch, RxQueue};
use stats::Counters;
pub use stats::NetStats;
use worker::{QueuePairWorker, WorkerError};

/// Default ring size limit (QEMU's default `rx_queue_size`/`tx_queue_size`).
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Largest ring size accepted (QEMU's limit for virtio-net).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Most queue pairs a device may have.
pub const MAX_QUEUE_PAIRS: u16 = 16;
/// Default bound of each receive queue, in frames.
pub const DEFAULT_RX_QUEUE_FRAMES: usize = 1024;
/// Default socket permissions: owner only.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// How a guest NIC is exposed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Name in every log line of the device (e.g. the port's id).
    pub name: String,
    /// Socket path the frontend connects to (Vessel is the server).
    pub socket: PathBuf,
    /// The NIC's MAC address (config space; QEMU needs the same as `mac=`).
    pub mac: [u8; 6],
    /// Queue pairs, one worker thread each (1..=16; QEMU `queues=` equal or lower).
    pub queue_pairs: u16,
    /// Largest ring size the frontend may configure: a power of two up to 1024 (default 256).
    pub queue_size: u16,
    /// The port's MTU, the largest NET_SET_MTU accepts (QEMU `host_mtu=` at most this);
    /// usually the network's MTU. At least [`MIN_MTU`]; default 1500.
    pub mtu: u16,
    /// Frames each receive queue holds while the guest has no buffers (default 1024).
    pub rx_queue_frames: usize,
    /// Socket permission bits (default 0o600); world-writable modes are refused.
    pub socket_mode: u32,
    /// `(uid, gid)` to own the socket, e.g. the QEMU user.
    pub socket_owner: Option<(u32, u32)>,
}

impl NetConfig {
    /// One queue pair of 256-entry rings, MTU 1500, socket mode 0o600 owned by the daemon.
    pub fn new(name: impl Into<String>, socket: impl Into<PathBuf>, mac: [u8; 6]) -> Self {
        NetConfig {
            name: name.into(),
            socket: socket.into(),
            mac,
            queue_pairs: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
            mtu: 1500,
            rx_queue_frames: DEFAULT_RX_QUEUE_FRAMES,
            socket_mode: DEFAULT_SOCKET_MODE,
            socket_owner: None,
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.queue_pairs == 0 || self.queue_pairs > MAX_QUEUE_PAIRS {
            return Err(format!(
                "{} queue pairs requested; use 1 to {MAX_QUEUE_PAIRS}",
                self.queue_pairs
            ));
        }
        if !self.queue_size.is_power_of_two() || self.queue_size > MAX_QUEUE_SIZE {
            return Err(format!(
                "queue size {} is not a power of two up to {MAX_QUEUE_SIZE}",
                self.queue_size
            ));
        }
        if self.mtu < MIN_MTU {
            return Err(format!("MTU {} is below the minimum {MIN_MTU}", self.mtu));
        }
        if self.rx_queue_frames == 0 {
            return Err("a receive queue must hold at least one frame".into());
        }
        Ok(())
    }
}

/// Why a device could not be started.
#[derive(Debug, thiserror::Error)]
pub enum NetDeviceError {
    /// The configuration is unusable.
    #[error("port {port}: {reason}")]
    InvalidConfig { port: String, reason: String },
    /// The socket could not be created or served.
    #[error("port {port}: {source}")]
    Socket {
        port: String,
        #[source]
        source: ServerError,
    },
}

/// Failures inside the device model (reported to the frontend as refused requests).
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The virtio-net config space is read-only for a VERSION_1 driver.
    #[error("the virtio-net config space is read-only ({len} bytes at offset {offset} refused)")]
    ConfigWrite { offset: u32, len: usize },
    /// NET_SET_MTU outside what the port allows.
    #[error("MTU {mtu} is outside {MIN_MTU}..={max} (the port's MTU); lower QEMU's host_mtu")]
    Mtu { mtu: u16, max: u16 },
    /// A queue pair worker failed.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// The handler grouped rings differently from what the device asked for.
    #[error("a net queue pair worker serves a receive and a transmit ring, not {0} rings")]
    WorkerRings(usize),
}

/// One queue pair's receive queue and counters.
#[derive(Debug)]
struct QueuePair {
    rx: Arc<RxQueue>,
    counters: Arc<Counters>,
}

/// The device model behind the socket.
pub struct NetBackend {
    name: String,
    mac: [u8; 6],
    queue_size: u16,
    max_mtu: u16,
    settings: NetSettings,
    port: Arc<dyn NetPort>,
    pairs: Vec<QueuePair>,
}

impl std::fmt::Debug for NetBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetBackend")
            .field("name", &self.name)
            .field("queue_pairs", &self.pairs.len())
            .field("max_mtu", &self.max_mtu)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl NetBackend {
    /// A device model for `config` sending the guest's frames to `port`.
    pub fn new(config: &NetConfig, port: Arc<dyn NetPort>) -> Result<Self, NetDeviceError> {
        config
            .validate()
            .map_err(|reason| NetDeviceError::InvalidConfig {
                port: config.name.clone(),
                reason,
            })?;
        let pairs = (0..config.queue_pairs)
            .map(|_| {
                let counters = Arc::new(Counters::default());
                QueuePair {
                    rx: Arc::new(RxQueue::new(config.rx_queue_frames, Arc::clone(&counters))),
                    counters,
                }
            })
            .collect();
        Ok(NetBackend {
            name: config.name.clone(),
            mac: config.mac,
            queue_size: config.queue_size,
            max_mtu: config.mtu,
            settings: NetSettings::new(config.mtu),
            port,
            pairs,
        })
    }

    /// The receive queue of `queue_pair`, for the switch side to push frames into.
    pub fn rx_queue(&self, queue_pair: u16) -> Option<&Arc<RxQueue>> {
        self.pairs.get(usize::from(queue_pair)).map(|p| &p.rx)
    }

    /// Number of queue pairs.
    pub fn queue_pairs(&self) -> u16 {
        // validate() bounds it by MAX_QUEUE_PAIRS.
        self.pairs.len() as u16
    }

    /// Counters per queue pair.
    pub fn stats(&self) -> Vec<NetStats> {
        self.pairs
            .iter()
            .map(|p| p.counters.snapshot(p.rx.refusals()))
            .collect()
    }

    /// Counters summed over queue pairs.
    pub fn total_stats(&self) -> NetStats {
        self.stats()
            .iter()
            .fold(NetStats::default(), |sum, s| sum.add(s))
    }

    /// Receive offloads the connected guest negotiated (none while no frontend is connected).
    pub fn guest_offloads(&self) -> GuestOffloads {
        self.settings.guest_offloads()
    }

    /// Negotiated features and MTU.
    pub fn settings(&self) -> &NetSettings {
        &self.settings
    }
}

impl VhostUserDevice for NetBackend {
    type Error = NetError;

    fn span(&self) -> tracing::Span {
        tracing::info_span!(parent: None, "vhost-user-net", port = %self.name)
    }

    fn num_queues(&self) -> u16 {
        2 * self.queue_pairs()
    }

    fn max_queue_size(&self) -> u16 {
        self.queue_size
    }

    fn features(&self) -> u64 {
        config::features(self.queue_pairs())
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MTU
    }

    fn set_acked_features(&self, features: u64) {
        self.settings.set_acked(features);
    }

    fn config_space(&self) -> Vec<u8> {
        config::config_space(self.mac, self.queue_pairs(), self.settings.mtu())
    }

    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), NetError> {
        Err(NetError::ConfigWrite {
            offset,
            len: data.len(),
        })
    }

    fn set_mtu(&self, mtu: u16) -> Result<(), NetError> {
        if !(MIN_MTU..=self.max_mtu).contains(&mtu) {
            return Err(NetError::Mtu {
                mtu,
                max: self.max_mtu,
            });
        }
        self.settings.set_mtu(mtu);
        Ok(())
    }

    fn rings_per_worker(&self) -> u16 {
        2
    }

    fn run_worker(&self, vrings: &mut Vec<Vring>, stop: &EventFd) -> Result<(), NetError> {
        let pair = vrings.first().map_or(u16::MAX, |rx| rx.index() / 2);
        if vrings.len() != 2 || usize::from(pair) >= self.pairs.len() {
            return Err(NetError::WorkerRings(vrings.len()));
        }
        let Some(mut tx) = vrings.pop() else {
            return Err(NetError::WorkerRings(0));
        };
        let Some(rx) = vrings.pop() else {
            vrings.push(tx);
            return Err(NetError::WorkerRings(1));
        };
        let (rx, result) = QueuePairWorker::new(self, pair).run(rx, &mut tx, stop);
        vrings.extend([rx, tx]);
        Ok(result?)
    }

    fn disconnected(&self) {
        for qp in &self.pairs {
            qp.rx.close();
        }
        // What was negotiated belongs to the connection: the next frontend negotiates afresh.
        self.settings.set_acked(0);
        self.settings.set_mtu(self.max_mtu);
    }
}

/// A running vhost-user-net device: a listener thread serving one frontend at a time,
/// re-accepting after a disconnect.
#[derive(Debug)]
pub struct NetDevice {
    backend: Arc<NetBackend>,
    server: VhostUserServer,
}

impl NetDevice {
    /// Creates the socket (replacing a stale one) and starts serving the NIC; the guest's
    /// frames go to `port`.
    pub fn start(config: NetConfig, port: Arc<dyn NetPort>) -> Result<NetDevice, NetDeviceError> {
        let backend = Arc::new(NetBackend::new(&config, port)?);
        let options = SocketOptions {
            path: config.socket.clone(),
            mode: config.socket_mode,
            owner: config.socket_owner,
        };
        let server = VhostUserServer::start(Arc::clone(&backend), &options).map_err(|source| {
            NetDeviceError::Socket {
                port: config.name.clone(),
                source,
            }
        })?;
        tracing::info!(
            port = %config.name,
            socket = %config.socket.display(),
            queue_pairs = config.queue_pairs,
            mtu = config.mtu,
            "vhost-user-net device listening"
        );
        Ok(NetDevice { backend, server })
    }

    /// The receive queue of `queue_pair` (see [`RxQueue`]).
    pub fn rx_queue(&self, queue_pair: u16) -> Option<&Arc<RxQueue>> {
        self.backend.rx_queue(queue_pair)
    }

    /// Number of queue pairs.
    pub fn queue_pairs(&self) -> u16 {
        self.backend.queue_pairs()
    }

    /// Counters per queue pair.
    pub fn stats(&self) -> Vec<NetStats> {
        self.backend.stats()
    }

    /// Counters summed over queue pairs.
    pub fn total_stats(&self) -> NetStats {
        self.backend.total_stats()
    }

    /// Receive offloads the guest negotiated: a GSO frame pushed into an [`RxQueue`] must be
    /// one of these, else segment it before pushing.
    pub fn guest_offloads(&self) -> GuestOffloads {
        self.backend.guest_offloads()
    }

    /// The MTU the frontend set (NET_SET_MTU), else the port's.
    pub fn mtu(&self) -> u16 {
        self.backend.settings.mtu()
    }

    /// Whether a frontend is connected.
    pub fn connected(&self) -> bool {
        self.server.connected()
    }

    /// Frontend connections accepted since start.
    pub fn connections(&self) -> u64 {
        self.server.connections()
    }

    /// The socket path.
    pub fn socket(&self) -> &std::path::Path {
        self.server.path()
    }

    /// The device model.
    pub fn backend(&self) -> &Arc<NetBackend> {
        &self.backend
    }

    /// Disconnects the frontend (every chain taken is returned first), joins every thread and
    /// removes the socket.
    pub fn stop(self) {
        let name = self.backend.name.clone();
        self.server.stop();
        tracing::info!(port = %name, "vhost-user-net device stopped");
    }
}
