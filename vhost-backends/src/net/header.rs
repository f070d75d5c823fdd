//! The virtio-net header (`struct virtio_net_hdr_v1`, virtio 1.2 §5.1.6) that precedes every
//! frame on both rings. A partial checksum for a guest that cannot complete it is completed on the
//! receive side (`net/rx.rs`) by [`vessel_proto::checksum::complete_partial`], the switch's too.
//!
//! The header is [`vessel_proto::virtio_net`]'s, the one the switch side uses too, so it passes
//! between them as it is: the switch side gets it unchanged with every transmitted frame
//! (`num_buffers` zero) and hands one in with every received frame, whose `num_buffers` the
//! receive side sets.

pub use vessel_proto::virtio_net::{
    FLAG_DATA_VALID, FLAG_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP, HEADER_LEN,
    VirtioNetHeader,
};
