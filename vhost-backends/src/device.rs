//! The seam between the vhost-user protocol and a device model.
//!
//! [`crate::handler::VhostUserHandler`] speaks the protocol (features, memory, rings, inflight,
//! config messages) and calls a [`VhostUserDevice`] only for what is device specific: which
//! virtio features and config space it has, and the work loop of its queues. Rings are served
//! in groups of [`VhostUserDevice::rings_per_worker`] (one for blk; a receive/transmit pair
//! for net). The handler starts [`VhostUserDevice::run_worker`] on a thread of its own when
//! every ring of a group is ready and stops it by signalling the stop eventfd; the device must
//! then finish every request it already took from its rings before returning. That contract is what lets GET_VRING_BASE report an exact
//! position and lets a later start continue where this one ended.

use vhost::vhost_user::VhostUserProtocolFeatures;
use vmm_sys_util::eventfd::EventFd;

use crate::vring::Vring;

/// A virtio device served over vhost-user.
pub trait VhostUserDevice: Send + Sync + 'static {
    /// What a queue worker returns when it fails.
    type Error: std::error::Error + Send + 'static;

    /// Span every log line about this device is recorded in (e.g. carrying `volume = %id`).
    /// Make it a root span (`parent: None`): the handler creates it on threads that may already
    /// be inside the device's span, and nesting would repeat the fields on every line.
    fn span(&self) -> tracing::Span;

    /// Number of virtqueues the device has (GET_QUEUE_NUM).
    fn num_queues(&self) -> u16;

    /// Largest ring size accepted (a power of two).
    fn max_queue_size(&self) -> u16;

    /// Virtio feature bits offered; the handler adds VHOST_USER_F_PROTOCOL_FEATURES.
    fn features(&self) -> u64;

    /// Protocol features the device needs beyond the handler's own set.
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::empty()
    }

    /// The frontend acknowledged `features` (SET_FEATURES).
    fn set_acked_features(&self, features: u64);

    /// The current config space (virtio device-specific configuration), from offset 0.
    fn config_space(&self) -> Vec<u8>;

    /// The frontend writes `data` at `offset` of the config space (SET_CONFIG).
    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), Self::Error>;

    /// VHOST_USER_NET_SET_MTU: the MTU the frontend shows the guest (QEMU's `host_mtu=`). The
    /// handler calls it only when the device offers and the frontend acknowledged the MTU
    /// protocol feature (see [`VhostUserDevice::protocol_features`]); an error is NACKed, and
    /// QEMU then refuses to start the NIC.
    fn set_mtu(&self, _mtu: u16) -> Result<(), Self::Error> {
        Ok(())
    }

    /// State to keep across a crash of this process but not across a device reset (e.g. the cache mode the
    /// guest chose); the handler saves it in the frontend-held inflight region after every config write. At most
    /// [`crate::inflight::MAX_DEVICE_STATE`] bytes.
    fn saved_state(&self) -> Vec<u8> {
        Vec::new()
    }

    /// Takes back what [`VhostUserDevice::saved_state`] returned, after a restart of this process; an empty
    /// `state` means the frontend starts the device afresh (first start, or after a reset): back to defaults.
    fn restore_state(&self, _state: &[u8]) {}

    /// Rings one worker thread serves together, consecutive from a multiple of this number
    /// (1: a worker per ring; 2: per queue pair).
    fn rings_per_worker(&self) -> u16 {
        1
    }

    /// Serves `vrings` (one group, in ring order) until `stop` becomes readable, then completes
    /// every request already taken from them and returns. Runs on a thread of its own. It may
    /// move rings out of `vrings` while it runs (e.g. to share one with other threads), but
    /// hands the same rings back, in the same order, before it returns.
    fn run_worker(&self, vrings: &mut Vec<Vring>, stop: &EventFd) -> Result<(), Self::Error>;

    /// The frontend went away (or reset the device); every queue worker has been stopped.
    fn disconnected(&self) {}
}
