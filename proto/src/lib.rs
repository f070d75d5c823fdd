//! Vessel's wire formats.
//!
//! - [`admin`]: the admin API (gRPC), served by every node and used by the `vessel` CLI.
//! - [`raft`]: Raft RPCs between voters, carried on the same gRPC stack as the admin API.
//! - [`frame`]: the data-path frame replicas exchange (fixed header with CRC32C, raw payload).
//! - [`size`]: the byte sizes users type (`10G`, `512M`), shared by the CLI and the daemon's config.
//! - [`net`]: the subnets and MACs users type (`10.0.0.0/24`, `52:54:00:12:34:56`), shared by the CLI and the
//!   control plane.
//! - [`virtio_net`]: the virtio-net header before every frame on a guest's rings and a tap's queues, shared by the
//!   vhost-user-net device and the switch.
//! - [`checksum`]: the Internet checksum, and completing one a virtio-net header marks partial
//!   (`FLAG_NEEDS_CSUM`), shared by the same two.

pub mod checksum;
pub mod frame;
pub mod net;
pub mod size;
pub mod virtio_net;

/// The admin API, generated from `admin.proto`.
pub mod admin {
    tonic::include_proto!("vessel.admin.v1");
}

/// Raft RPCs, generated from `raft.proto`.
pub mod raft {
    tonic::include_proto!("vessel.raft.v1");
}
