//! The seam between the vhost-user-net device and whatever switches its frames.
//!
//! The device knows nothing of the switch (vhost-backends does not depend on vnet); the switch
//! side plugs in with two things per device:
//!
//! - a [`NetPort`] the device calls with the frames the guest transmits, in batches
//!   ([`TxBatch`]), from the queue pair's worker thread, in ring order, followed by
//!   [`NetPort::flush`] at the end of each pass;
//! - one [`RxQueue`](super::RxQueue) per queue pair that the switch side pushes frames for the
//!   guest into, from any thread: each is copied into the guest's receive buffers on the
//!   pusher's thread (see [`super::rx`]).

use std::ops::Range;

use super::header::{HEADER_LEN, VirtioNetHeader};

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

    /// The frames of `batch`, in order, as [`NetPort::transmit`] would take them one by one
    /// (which is what this does unless the port does better, e.g. takes its locks once).
    fn transmit_batch(&self, queue_pair: u16, batch: &TxBatch) -> Taken {
        let mut taken = Taken::default();
        for (header, frame) in batch.iter() {
            if self.transmit(queue_pair, header, frame) {
                taken.add(frame.len());
            }
        }
        taken
    }

    /// End of a batch of [`NetPort::transmit`] calls on `queue_pair`: a good moment to send
    /// what was collected.
    fn flush(&self, _queue_pair: u16) {}
}

/// What a port took of a [`TxBatch`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Taken {
    /// Frames taken (the others are counted as refused).
    pub frames: u64,
    /// Their bytes (Ethernet frames, without the virtio-net header).
    pub bytes: u64,
}

impl Taken {
    /// Counts one more frame of `len` bytes.
    pub fn add(&mut self, len: usize) {
        self.frames += 1;
        self.bytes += len as u64;
    }
}

/// Frames one queue pair's guest transmitted, gathered for one [`NetPort::transmit_batch`]
/// call: each with its checked header (as for [`NetPort::transmit`]).
#[derive(Debug, Default)]
pub struct TxBatch {
    /// Each frame's header and frame, back to back.
    data: Vec<u8>,
    /// Each frame's header and the range of its Ethernet frame in `data`.
    frames: Vec<(VirtioNetHeader, Range<usize>)>,
}

impl TxBatch {
    /// Frames in the batch.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether the batch holds no frame.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// The frames with their headers, in ring order.
    pub fn iter(&self) -> impl Iterator<Item = (&VirtioNetHeader, &[u8])> {
        self.frames
            .iter()
            .map(|(header, range)| (header, &self.data[range.clone()]))
    }

    /// Where the next frame (its header, then the frame) is read to: the end of the data.
    pub(crate) fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.data
    }

    /// Records the frame just appended to the data by a read of `len` bytes (header included).
    pub(crate) fn push(&mut self, header: VirtioNetHeader, len: usize) {
        let end = self.data.len();
        self.frames.push((header, end - len + HEADER_LEN..end));
    }

    /// Empties the batch, keeping its buffers.
    pub(crate) fn clear(&mut self) {
        self.data.clear();
        self.frames.clear();
    }
}
