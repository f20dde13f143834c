//! `AlignedBuf`: an owned, zero-initialised allocation whose start and capacity are multiples of
//! [`ALIGN`], as `O_DIRECT` requires of the memory it reads into.
//!
//! The pool keeps its buffers as `AlignedBuf`s and lets reads write into them through
//! [`AlignedBuf::as_ptr`], a raw pointer, so that a buffer being filled by the kernel is never
//! aliased by a Rust reference.

use std::alloc::{self, Layout};
use std::fmt;
use std::ptr::NonNull;

use crate::ALIGN;

/// An owned byte buffer aligned to [`ALIGN`] whose capacity is a multiple of [`ALIGN`].
///
/// The bytes are zeroed at allocation. `len` is the size the caller asked for; the capacity
/// behind it is `len` rounded up to [`ALIGN`] (at least one block), so a direct read may fill
/// a whole block past `len`.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
}

// SAFETY: an `AlignedBuf` owns its allocation outright (like a `Box<[u8]>`); nothing in it is
// tied to a thread.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only read through `as_slice`; writes need `&mut self` (or a raw
// pointer whose exclusive use the pool arranges).
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes at a 4096-byte-aligned address.
    ///
    /// # Panics
    ///
    /// Like `Vec::with_capacity`: if `len` rounded up to [`ALIGN`] overflows `isize`, or the
    /// allocation fails (through `handle_alloc_error`).
    pub fn zeroed(len: usize) -> AlignedBuf {
        let capacity = len.max(1).checked_next_multiple_of(ALIGN).expect("AlignedBuf capacity overflows usize");
        let layout = Layout::from_size_align(capacity, ALIGN).expect("AlignedBuf capacity overflows isize");
        // SAFETY: the layout's size is at least `ALIGN`, so it is non-zero.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        AlignedBuf { ptr, len, capacity }
    }

    /// The number of bytes asked for at allocation.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The allocated size: `len` rounded up to [`ALIGN`], at least [`ALIGN`].
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The first `len` bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `capacity >= len` initialised (zeroed at allocation) bytes that
        // live as long as `self`; `&self` rules out a `&mut` to them through this buffer.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The first `len` bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The start of the allocation, for I/O that writes into it. The caller must make sure no
    /// reference to the bytes it writes is alive while it writes.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout (checked at allocation).
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Layout::from_size_align_unchecked(self.capacity, ALIGN)) }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len).field("capacity", &self.capacity).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_capacity_and_zeroing() {
        for len in [0, 1, 4095, 4096, 4097, 3 * 4096 + 17] {
            let mut buf = AlignedBuf::zeroed(len);
            assert_eq!(buf.as_ptr() as usize % ALIGN, 0, "len {len}");
            assert_eq!(buf.len(), len);
            assert_eq!(buf.is_empty(), len == 0);
            assert_eq!(buf.capacity() % ALIGN, 0);
            assert!(buf.capacity() >= len.max(1));
            assert!(buf.as_slice().iter().all(|&b| b == 0));
            buf.as_mut_slice().iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
            assert!(buf.as_slice().iter().enumerate().all(|(i, &b)| b == i as u8));
        }
    }
}
