//! The seam between the vhost-user-net device and whatever switches its frames.
//!
//! The device knows nothing of the switch (vhost-backends does not depend on vnet); the switch
//! side plugs in with two things per device:
//!
//! - a [`NetPort`] the device calls with every frame the guest transmits, from the queue pair's
//!   worker thread, in ring order, followed by [`NetPort::flush`] at the end of each batch;
//! - one [`RxQueue`] per queue pair that the switch side pushes frames for the guest into, from
//!   any thread. A push wakes the pair's worker, which copies queued frames into the guest's
//!   receive buffers as the guest provides them.
//!
//! Offloads: a frame pushed into an [`RxQueue`] carries a [`VirtioNetHeader`]. The device
//! completes a partial checksum (`FLAG_NEEDS_CSUM`) in software for a guest without
//! GUEST_CSUM, but it does not segment: a GSO frame the guest did not negotiate (see
//! [`crate::net::GuestOffloads`]) is dropped and counted. The pusher segments such frames
//! itself, before pushing.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

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

/// A frame waiting for the guest's receive buffers.
#[derive(Debug)]
pub(crate) struct RxFrame {
    pub(crate) header: VirtioNetHeader,
    pub(crate) frame: Vec<u8>,
}

/// Why [`RxQueue::push`] refused a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    Full,
    TooBig,
    Closed,
}

/// Frames on their way into one queue pair's receiveq: bounded, filled by the switch side,
/// drained by the pair's worker.
///
/// A queue is *open* from the first start of its pair's worker on a connection until the
/// frontend disconnects. While closed (no guest, or the guest's link is down because the
/// frontend went away), pushes are refused; when the frontend disconnects, frames still queued
/// are dropped and counted, so a reconnected guest never receives stale frames.
#[derive(Debug)]
pub struct RxQueue {
    frames: Mutex<VecDeque<RxFrame>>,
    capacity: usize,
    open: AtomicBool,
    wake: EventFd,
    refused_full: AtomicU64,
    refused_too_big: AtomicU64,
    refused_closed: AtomicU64,
}

impl RxQueue {
    /// An empty, closed queue holding at most `capacity` frames (at least 1).
    pub fn new(capacity: usize) -> io::Result<RxQueue> {
        Ok(RxQueue {
            frames: Mutex::new(VecDeque::with_capacity(capacity.clamp(1, 1024))),
            capacity: capacity.max(1),
            open: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            refused_full: AtomicU64::new(0),
            refused_too_big: AtomicU64::new(0),
            refused_closed: AtomicU64::new(0),
        })
    }

    /// Queues a copy of `frame` with `header` for the guest. `false` (counted in the device's
    /// stats, and to be counted as a drop by the caller) when the queue is full (the guest is
    /// not taking frames fast enough), the frame is longer than [`MAX_FRAME_LEN`] or shorter
    /// than an Ethernet header, or the queue is closed. Any thread; never blocks on the guest.
    pub fn push(&self, header: &VirtioNetHeader, frame: &[u8]) -> bool {
        match self.try_push(header, frame) {
            Ok(()) => true,
            Err(refusal) => {
                let counter = match refusal {
                    Refusal::Full => &self.refused_full,
                    Refusal::TooBig => &self.refused_too_big,
                    Refusal::Closed => &self.refused_closed,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    fn try_push(&self, header: &VirtioNetHeader, frame: &[u8]) -> Result<(), Refusal> {
        if frame.len() > MAX_FRAME_LEN || frame.len() < 14 {
            return Err(Refusal::TooBig);
        }
        if !self.is_open() {
            return Err(Refusal::Closed);
        }
        let was_empty = {
            let mut frames = self.lock();
            if frames.len() >= self.capacity {
                return Err(Refusal::Full);
            }
            frames.push_back(RxFrame {
                header: *header,
                frame: frame.to_vec(),
            });
            frames.len() == 1
        };
        if was_empty {
            // The worker drains until empty, so only the first frame needs to wake it. A full
            // counter (cannot happen with one write per drain) would mean it is awake anyway.
            let _ = self.wake.write(1);
        }
        Ok(())
    }

    /// Frames waiting.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no frame is waiting.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Whether the queue accepts frames (its pair runs or ran on the current connection); a
    /// switch spreading flows over queue pairs picks among the open ones.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Largest number of frames held.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// (full, too big or runt, closed) refusals so far.
    pub(crate) fn refusals(&self) -> (u64, u64, u64) {
        (
            self.refused_full.load(Ordering::Relaxed),
            self.refused_too_big.load(Ordering::Relaxed),
            self.refused_closed.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// Consumes a wake-up (the worker then drains).
    pub(crate) fn consume_wake(&self) {
        let _ = self.wake.read();
    }

    pub(crate) fn open(&self) {
        self.open.store(true, Ordering::Release);
    }

    /// Closes the queue and drops what it holds; returns how many frames were dropped.
    pub(crate) fn close(&self) -> usize {
        self.open.store(false, Ordering::Release);
        let mut frames = self.lock();
        let dropped = frames.len();
        frames.clear();
        dropped
    }

    pub(crate) fn pop(&self) -> Option<RxFrame> {
        self.lock().pop_front()
    }

    /// Puts back a frame the guest had no room for yet; it stays first in line.
    pub(crate) fn unpop(&self, frame: RxFrame) {
        self.lock().push_front(frame);
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<RxFrame>> {
        match self.frames.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_wakes_once_and_refuses_when_closed() {
        let q = RxQueue::new(2).unwrap();
        let h = VirtioNetHeader::PLAIN;
        assert!(!q.push(&h, &[0; 60]), "closed before the pair starts");
        q.open();
        assert!(q.push(&h, &[1; 60]));
        assert!(q.push(&h, &[2; 60]));
        assert!(!q.push(&h, &[3; 60]), "full");
        assert!(!q.push(&h, &[0; 13]), "runt");
        assert!(!q.push(&h, &vec![0; MAX_FRAME_LEN + 1]), "too big");
        assert_eq!(q.wake.read().unwrap(), 1, "one wake-up for the first frame");
        assert_eq!(q.pop().unwrap().frame[0], 1);
        let second = q.pop().unwrap();
        q.unpop(second);
        assert_eq!(q.len(), 1);
        assert_eq!(q.close(), 1);
        assert!(q.is_empty());
        assert!(!q.push(&h, &[0; 60]));
        assert_eq!(q.refusals(), (1, 2, 2));
    }
}
