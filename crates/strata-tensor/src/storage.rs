//! Tensor storage: a closed enum over devices.
//!
//! CPU storage is a shared, immutable byte range: either an owned 64-byte-aligned buffer or a
//! window into a byte source owned elsewhere (a memory-mapped checkpoint), so weights are used
//! in place without a copy.

use std::alloc::{self, Layout};
use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::Device;

/// Something that owns bytes for the lifetime of the tensors that view it: an [`AlignedBytes`]
/// buffer, a `Vec<u8>`, or a memory map held by a checkpoint reader.
pub trait ByteSource: Send + Sync {
    /// The bytes.
    fn bytes(&self) -> &[u8];
}

impl ByteSource for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// The alignment of [`AlignedBytes`]: one cache line, enough for every SIMD load.
pub const ALIGNMENT: usize = 64;

/// An owned, zero-initialised byte buffer aligned to [`ALIGNMENT`] bytes.
pub struct AlignedBytes {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: `AlignedBytes` owns its allocation exclusively, like a `Box<[u8]>`; shared access only
// hands out `&[u8]`, and mutation needs `&mut self`.
unsafe impl Send for AlignedBytes {}
// SAFETY: as above: `&AlignedBytes` only gives read access.
unsafe impl Sync for AlignedBytes {}

impl AlignedBytes {
    /// A zeroed buffer of `len` bytes.
    pub fn zeroed(len: usize) -> AlignedBytes {
        if len == 0 {
            // A dangling pointer aligned to ALIGNMENT is valid for zero-length slices.
            let ptr = NonNull::new(ALIGNMENT as *mut u8).expect("ALIGNMENT is non-zero");
            return AlignedBytes { ptr, len };
        }
        let layout = Layout::from_size_align(len, ALIGNMENT).expect("buffer size overflows isize");
        // SAFETY: `layout` has a non-zero size, checked above.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBytes { ptr, len }
    }

    /// A buffer holding a copy of `bytes`.
    pub fn copy_from(bytes: &[u8]) -> AlignedBytes {
        let mut b = AlignedBytes::zeroed(bytes.len());
        b.as_mut_slice().copy_from_slice(bytes);
        b
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` initialised (zeroed at allocation) bytes, or dangling
        // and aligned with `len == 0`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AlignedBytes {
    fn drop(&mut self) {
        if self.len != 0 {
            let layout = Layout::from_size_align(self.len, ALIGNMENT).expect("checked at allocation");
            // SAFETY: `ptr` came from `alloc_zeroed` with this same layout and is freed once.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

impl ByteSource for AlignedBytes {
    fn bytes(&self) -> &[u8] {
        self.as_slice()
    }
}

impl fmt::Debug for AlignedBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AlignedBytes({} bytes)", self.len)
    }
}

/// A tensor's bytes in host memory: a window `[offset, offset + len)` into a shared source.
#[derive(Clone)]
pub struct CpuStorage {
    source: Arc<dyn ByteSource>,
    offset: usize,
    len: usize,
}

impl CpuStorage {
    /// Storage owning a fresh aligned buffer.
    pub fn owned(bytes: AlignedBytes) -> CpuStorage {
        let len = bytes.len();
        CpuStorage { source: Arc::new(bytes), offset: 0, len }
    }

    /// A view of `len` bytes at `offset` in `source`, or `None` when the range is outside it.
    pub fn view(source: Arc<dyn ByteSource>, offset: usize, len: usize) -> Option<CpuStorage> {
        let end = offset.checked_add(len)?;
        if end > source.bytes().len() {
            return None;
        }
        Some(CpuStorage { source, offset, len })
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.source.bytes()[self.offset..self.offset + self.len]
    }
}

impl fmt::Debug for CpuStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuStorage({} bytes at offset {})", self.len, self.offset)
    }
}

/// A tensor's bytes in CUDA device memory. The kernels that use it live in `strata-kernels`,
/// which also allocates it; this crate only carries it.
#[cfg(feature = "cuda")]
#[derive(Clone)]
pub struct CudaStorage {
    /// The device ordinal.
    pub ordinal: usize,
    /// The allocation, owned by the backend in `strata-kernels`.
    pub buffer: Arc<dyn std::any::Any + Send + Sync>,
    /// The length in bytes.
    pub len: usize,
}

#[cfg(feature = "cuda")]
impl fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaStorage({} bytes on cuda:{})", self.len, self.ordinal)
    }
}

/// Where a tensor's bytes are. Closed over the devices this build supports: the `Cuda` variant
/// exists only with the `cuda` feature, and asking for CUDA without it is
/// [`crate::Error::CudaNotCompiled`].
#[derive(Clone, Debug)]
pub enum Storage {
    /// Host memory.
    Cpu(CpuStorage),
    /// CUDA device memory.
    #[cfg(feature = "cuda")]
    Cuda(CudaStorage),
}

impl Storage {
    /// The device holding the bytes.
    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => Device::Cuda(c.ordinal),
        }
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Storage::Cpu(c) => c.len,
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => c.len,
        }
    }

    /// Whether the storage holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Asks the kernel to reclaim the whole pages of `bytes` (those entirely inside it), so that
/// memory read once, such as a tensor of a memory-mapped file that was repacked or copied
/// elsewhere, stops counting in the process's resident set. `MADV_PAGEOUT` never changes
/// memory contents: file pages are read again if touched, anonymous pages stay or go to swap.
/// Does nothing where the kernel does not support it.
pub fn release_pages(bytes: &[u8]) {
    const PAGE: usize = 4096;
    let start = (bytes.as_ptr() as usize).next_multiple_of(PAGE);
    let end = (bytes.as_ptr() as usize + bytes.len()) / PAGE * PAGE;
    if end > start {
        // SAFETY: [start, end) lies within `bytes`, memory this process has mapped for the
        // borrow's lifetime; MADV_PAGEOUT is advice that never alters the memory's contents.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_bytes_are_aligned_and_zeroed() {
        for len in [0, 1, 63, 64, 1000] {
            let b = AlignedBytes::zeroed(len);
            assert_eq!(b.as_slice().as_ptr() as usize % ALIGNMENT, 0);
            assert_eq!(b.len(), len);
            assert!(b.as_slice().iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn views_stay_inside_the_source() {
        let src: Arc<dyn ByteSource> = Arc::new((0u8..100).collect::<Vec<u8>>());
        let v = CpuStorage::view(src.clone(), 10, 5).unwrap();
        assert_eq!(v.bytes(), &[10, 11, 12, 13, 14]);
        assert!(CpuStorage::view(src.clone(), 96, 5).is_none());
        assert!(CpuStorage::view(src, usize::MAX, 2).is_none());
    }
}
