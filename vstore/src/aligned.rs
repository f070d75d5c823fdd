//! Heap buffers aligned for O_DIRECT: metadata blocks and the bounce buffers of unaligned
//! guest segments.
//!
//! Owns its allocation like a `Vec<u8>`; the address never moves, so a pointer into it may be
//! handed to the kernel for as long as the buffer lives.

use std::alloc::{self, Layout};
use std::io;
use std::ptr::NonNull;

/// Alignment of every buffer: a page, which satisfies every O_DIRECT memory alignment a disk
/// reports (a logical block is at most 4 KiB; larger disks are refused when opened).
pub(crate) const BUF_ALIGN: usize = 4096;

pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Vec<u8>); no aliasing handle exists.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`, which is sound to share between threads.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zero-filled buffer of `len` bytes (at least one). Fails with ENOMEM instead of aborting
    /// so that a request of absurd size costs the requester, not the process.
    pub fn zeroed(len: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len.max(1), BUF_ALIGN)
            .map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(Self { ptr, layout })
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() initialised bytes (zeroed at allocation, written
        // only through &mut self or by the kernel while no reference exists).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with exactly this layout and is freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("ptr", &self.ptr)
            .field("len", &self.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_refuses_absurd_sizes() {
        let mut buf = AlignedBuf::zeroed(8192).unwrap();
        assert_eq!(buf.as_ptr() as usize % BUF_ALIGN, 0);
        assert!(buf.as_slice().iter().all(|&b| b == 0));
        buf.as_mut_slice()[8191] = 7;
        assert_eq!(buf.as_slice()[8191], 7);
        assert_eq!(AlignedBuf::zeroed(0).unwrap().len(), 1);
        assert!(AlignedBuf::zeroed(usize::MAX - 10).is_err());
    }
}
