//! The vhost-user-blk device: a `vstore` volume served to one frontend at a time.
//!
//! [`BlkDevice`] is what the daemon holds per attached volume. Underneath, a [`BlkBackend`]
//! implements [`VhostUserDevice`] (features, config space, cache mode) and runs one
//! `worker::QueueWorker` per virtqueue; the generic [`crate::server::VhostUserServer`] owns the
//! socket and the protocol. Requests are parsed by [`request`], which is independent of the
//! block store so it can be tested and fuzzed on its own.
//!
//! Every log line of a device is recorded inside a span carrying `volume = <uuid>`.

pub mod config;
pub mod request;
pub mod worker;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;
use vstore::{LocalVolume, VolumeId};

use crate::device::VhostUserDevice;
use crate::server::{ServerError, SocketOptions, VhostUserServer};
use crate::vring::Vring;
use config::{BlkSettings, WRITEBACK_OFFSET};
use worker::{QueueWorker, WorkerError};

/// Default ring size limit.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Default socket permissions: owner only.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;
/// Most queues a device may have.
pub const MAX_QUEUES: u16 = 64;
/// Largest ring size accepted (QEMU's and Linux's virtio-blk limit).
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// How a volume is exposed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// Socket path the frontend connects to (Vessel is the server).
    pub socket: PathBuf,
    /// Number of virtqueues, one worker thread each (1..=64). QEMU needs `num-queues=` equal
    /// or lower.
    pub queues: u16,
    /// Largest ring size the frontend may configure: a power of two up to 1024 (default 256).
    pub queue_size: u16,
    /// Refuse writes (VIRTIO_BLK_F_RO).
    pub read_only: bool,
    /// Socket permission bits (default 0o600); world-writable modes are refused.
    pub socket_mode: u32,
    /// `(uid, gid)` to own the socket, e.g. the QEMU user.
    pub socket_owner: Option<(u32, u32)>,
}

impl BlkConfig {
    /// One queue of 256 entries, writable, socket mode 0o600 owned by the daemon.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        BlkConfig {
            socket: socket.into(),
            queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
            read_only: false,
            socket_mode: DEFAULT_SOCKET_MODE,
            socket_owner: None,
        }
    }
}

/// Why a device could not be started or changed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The configuration is unusable.
    #[error("volume {volume}: {reason}")]
    InvalidConfig { volume: VolumeId, reason: String },
    /// The socket could not be created or served.
    #[error("volume {volume}: {source}")]
    Socket {
        volume: VolumeId,
        #[source]
        source: ServerError,
    },
}

/// Failures inside the device model (reported to the frontend as refused requests).
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// SET_CONFIG outside the `writeback` byte, or refused by the cache mode rules.
    #[error("only the writeback byte (offset {WRITEBACK_OFFSET}, 1 byte) is writable: {0}")]
    ConfigWrite(String),
    /// A queue worker failed.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// The handler grouped rings differently from what the device asked for.
    #[error("a blk queue worker serves one ring, not {0}")]
    WorkerRings(usize),
}

/// The device model behind the socket.
#[derive(Debug)]
pub struct BlkBackend {
    volume: Arc<LocalVolume>,
    id: VolumeId,
    block_size: u32,
    read_only: bool,
    queues: u16,
    queue_size: u16,
    settings: BlkSettings,
    serial: [u8; request::ID_BYTES],
}

impl BlkBackend {
    /// A device model for `volume`; `config` supplies queues, ring size and read-only.
    pub fn new(volume: Arc<LocalVolume>, config: &BlkConfig) -> Self {
        let layout = volume.layout();
        BlkBackend {
            id: layout.id,
            block_size: layout.block_size,
            read_only: config.read_only,
            queues: config.queues,
            queue_size: config.queue_size,
            settings: BlkSettings::default(),
            serial: serial_of(layout.id),
            volume,
        }
    }

    /// The GET_ID answer: the first 20 hex digits of the volume's uuid.
    pub fn serial(&self) -> [u8; request::ID_BYTES] {
        self.serial
    }

    /// Negotiated features and cache mode.
    pub fn settings(&self) -> &BlkSettings {
        &self.settings
    }

    /// The volume served.
    pub fn volume(&self) -> &Arc<LocalVolume> {
        &self.volume
    }
}

/// The id reported by GET_ID: the uuid's first 20 hex digits, so `/sys/block/vdX/serial` and
/// `/dev/disk/by-id/virtio-<serial>` let an operator find the volume.
pub fn serial_of(id: VolumeId) -> [u8; request::ID_BYTES] {
    let hex = id.simple().to_string();
    let mut serial = [0u8; request::ID_BYTES];
    serial.copy_from_slice(&hex.as_bytes()[..request::ID_BYTES]);
    serial
}

impl VhostUserDevice for BlkBackend {
    type Error = BlkError;

    fn span(&self) -> tracing::Span {
        tracing::info_span!(parent: None, "vhost-user-blk", volume = %self.id)
    }

    fn num_queues(&self) -> u16 {
        self.queues
    }

    fn max_queue_size(&self) -> u16 {
        self.queue_size
    }

    fn features(&self) -> u64 {
        config::features(self.read_only)
    }

    fn set_acked_features(&self, features: u64) {
        self.settings.set_acked(features);
    }

    fn config_space(&self) -> Vec<u8> {
        config::config_space(
            self.volume.layout().size,
            self.block_size,
            self.queues,
            self.queue_size,
            self.settings.writeback(),
        )
    }

    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), BlkError> {
        match (offset, data) {
            (WRITEBACK_OFFSET, [value]) => {
                self.settings
                    .set_writeback(*value)
                    .map_err(|e| BlkError::ConfigWrite(e.to_string()))?;
                tracing::info!(
                    writeback = *value == 1,
                    "guest changed the write cache mode"
                );
                Ok(())
            }
            _ => Err(BlkError::ConfigWrite(format!(
                "{} bytes at offset {offset}",
                data.len()
            ))),
        }
    }

    fn saved_state(&self) -> Vec<u8> {
        self.settings.saved_state()
    }

    fn restore_state(&self, state: &[u8]) {
        self.settings.restore_state(state);
    }

    fn run_worker(&self, vrings: &mut Vec<Vring>, stop: &EventFd) -> Result<(), BlkError> {
        // rings_per_worker is 1: the handler hands exactly one ring.
        let [vring] = vrings.as_mut_slice() else {
            return Err(BlkError::WorkerRings(vrings.len()));
        };
        let mut worker = QueueWorker::new(self, vring)?;
        worker.run(vring, stop)?;
        Ok(())
    }
}

/// A running vhost-user-blk device: a listener thread serving one frontend at a time,
/// re-accepting after a disconnect.
#[derive(Debug)]
pub struct BlkDevice {
    backend: Arc<BlkBackend>,
    server: VhostUserServer,
}

impl BlkDevice {
    /// Creates the socket (replacing a stale one) and starts serving `volume`.
    pub fn start(volume: Arc<LocalVolume>, config: BlkConfig) -> Result<BlkDevice, DeviceError> {
        let id = volume.layout().id;
        let invalid = |reason: String| DeviceError::InvalidConfig { volume: id, reason };
        if config.queues == 0 || config.queues > MAX_QUEUES {
            return Err(invalid(format!(
                "{} queues requested; use 1 to {MAX_QUEUES}",
                config.queues
            )));
        }
        if !config.queue_size.is_power_of_two() || config.queue_size > MAX_QUEUE_SIZE {
            return Err(invalid(format!(
                "queue size {} is not a power of two up to {MAX_QUEUE_SIZE}",
                config.queue_size
            )));
        }
        let backend = Arc::new(BlkBackend::new(volume, &config));
        let options = SocketOptions {
            path: config.socket.clone(),
            mode: config.socket_mode,
            owner: config.socket_owner,
        };
        let server = VhostUserServer::start(Arc::clone(&backend), &options)
            .map_err(|source| DeviceError::Socket { volume: id, source })?;
        tracing::info!(
            volume = %id,
            socket = %config.socket.display(),
            queues = config.queues,
            read_only = config.read_only,
            "vhost-user-blk device listening"
        );
        Ok(BlkDevice { backend, server })
    }

    /// The volume grew: the next GET_CONFIG shows the new capacity, and a connected frontend is
    /// told with a config-change message on its backend request channel. A frontend without that
    /// channel (libblkio sets none up) cannot be told; it reads the new size when it re-reads the
    /// config, so that is logged, not an error. Errors mean a channel existed but the message
    /// could not be delivered or the frontend rejected it.
    pub fn resize(&self) -> Result<(), DeviceError> {
        let size = self.backend.volume.layout().size;
        let id = self.backend.id;
        match self.server.notify_config_change() {
            Ok(notified) => {
                tracing::info!(volume = %id, size, notified, "capacity change published");
                Ok(())
            }
            Err(ServerError::NoConfigChannel(_)) => {
                tracing::warn!(
                    volume = %id,
                    size,
                    "the frontend has no backend request channel; it sees the new capacity when it re-reads the config"
                );
                Ok(())
            }
            Err(source) => Err(DeviceError::Socket { volume: id, source }),
        }
    }

    /// Whether a frontend is connected.
    pub fn connected(&self) -> bool {
        self.server.connected()
    }

    /// Whether the device runs with a write-back cache (FLUSH makes writes durable) rather than write-through,
    /// as negotiated with (or chosen by) the connected frontend.
    pub fn write_back(&self) -> bool {
        self.backend.settings().writeback()
    }

    /// Frontend connections accepted since start.
    pub fn connections(&self) -> u64 {
        self.server.connections()
    }

    /// The socket path.
    pub fn socket(&self) -> &std::path::Path {
        self.server.path()
    }

    /// The device model (for statistics and tests).
    pub fn backend(&self) -> &Arc<BlkBackend> {
        &self.backend
    }

    /// Disconnects the frontend (requests already taken complete first), joins every thread
    /// and removes the socket.
    pub fn stop(self) {
        let id = self.backend.id;
        self.server.stop();
        tracing::info!(volume = %id, "vhost-user-blk device stopped");
    }
}
