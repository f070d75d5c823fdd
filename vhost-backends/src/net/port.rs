//! The seam between the vhost-user-net device and whatever switches its frames.
//!
//! The device knows nothing of the switch (vhost-backends does not depend on vnet); the switch
//! side plugs in with two things per device:
//!
//! - a [`NetPort`] the device calls with every frame the guest transmits, from the queue pair's
//!   worker thread, in ring order, followed by [`NetPort::flush`] at the end of each batch;
//! - one [`RxQueue`](super::RxQueue) per queue pair that the switch side pushes frames for the
//!   guest into, from any thread: each is copied into the guest's receive buffers on the
//!   pusher's thread (see [`super::rx`]).

use super::header::VirtioNetHeader;

/// Largest frame (without the virtio-net header) either direction carries: an Ethernet header,
/// a VLAN tag and the largest IP packet, which is what a TSO frame can reach.
pub const MAX_FRAME_LEN: usize = 14 + 4 + 65535;

/// Frames the guest transmits go here. Called on the queue pair's worker thread; an
/// implementation must not block for long (it stalls that queue pair's transmit and receive).
pub trait NetPort: Send + Sync + 'static {
    /// One frame the guest sent on `queue_pair`'s transmitq, in ring order. `header` is the
    /// guest's virtio-net header, already checked against the offloads the guest negotiated
    /// (HOST_CSUM / HOST_TSO4 / HOST_TSO6 / HOST_ECN) and with `num_buffers` zero; `frame` is
    /// the Ethernet frame, at least 14 bytes. Returns whether the frame was taken (a `false`
    /// is counted as a drop). `frame` is only valid during the call.
    fn transmit(&self, queue_pair: u16, header: &VirtioNetHeader, frame: &[u8]) -> bool;

    /// End of a batch of [`NetPort::transmit`] calls on `queue_pair`: a good moment to send
    /// what was collected.
    fn flush(&self, _queue_pair: u16) {}
}
