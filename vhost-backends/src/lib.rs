//! Vessel's vhost-user devices.
//!
//! Two layers, kept apart so both devices share the first:
//!
//! - the protocol, device agnostic: [`server`] (socket, one frontend at a time, reconnects,
//!   config-change messages), [`handler`] (the vhost-user request handler on the `vhost`
//!   crate's traits: features, memory table, rings, lifecycle), [`memory`], [`inflight`]
//!   (INFLIGHT_SHMFD crash recovery), [`vring`] and [`chain`] (what a queue worker uses);
//!   a device plugs in through [`device::VhostUserDevice`];
//! - the devices: [`blk`], a `vstore` volume as vhost-user-blk; [`net`], a guest NIC as
//!   vhost-user-net, whose frames go to a switch through [`net::NetPort`] and
//!   [`net::RxQueue`].
//!
//! Invariant across both: nothing a guest or frontend sends can make this crate panic or touch
//! memory outside the guest's regions; bad requests get a virtio error status or close the
//! connection. See ARCHITECTURE.md for threads and invariants.

pub mod blk;
pub mod chain;
pub mod device;
pub mod handler;
pub mod inflight;
pub mod memory;
pub mod net;
pub mod server;
pub mod vring;

pub use blk::{BlkConfig, BlkDevice, DeviceError};
pub use device::VhostUserDevice;
pub use net::{NetConfig, NetDevice, NetDeviceError, NetPort, NetStats, RxQueue, VirtioNetHeader};
pub use server::{ServerError, SocketOptions, VhostUserServer};
