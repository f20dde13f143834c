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

/// The size of a transparent huge page on x86-64: [`AlignedBytes::zeroed_huge`] maps buffers of
/// at least this many bytes on their own, aligned to it.
pub const HUGE_PAGE: usize = 2 << 20;

/// An owned, zero-initialised byte buffer aligned to `ALIGNMENT` bytes (see
/// [`AlignedBytes::zeroed_huge`] for buffers that live long and are streamed).
pub struct AlignedBytes {
    ptr: NonNull<u8>,
    len: usize,
    /// The length of the mapping that holds the buffer (whole 4 KiB pages), or 0 when the buffer
    /// came from the global allocator.
    mapped: usize,
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
            return AlignedBytes { ptr, len, mapped: 0 };
        }
        let layout = Layout::from_size_align(len, ALIGNMENT).expect("buffer size overflows isize");
        // SAFETY: `layout` has a non-zero size, checked above.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBytes { ptr, len, mapped: 0 }
    }

    /// A zeroed buffer of `len` bytes for data that stays for the model's lifetime and is read
    /// from memory, start to end, once per token (repacked weights). From [`HUGE_PAGE`] bytes
    /// on, it is a private anonymous mapping aligned to `HUGE_PAGE` and advised `MADV_HUGEPAGE`
    /// before its first touch, so that the kernel can back it with 2 MiB pages where transparent
    /// huge pages are enabled (`always` or `madvise`). With 4 KiB pages, streaming costs a TLB
    /// miss every 4 KiB and the hardware prefetcher's streams stop at every page boundary: on the
    /// development machine (Zen 4), TinyLlama-shape `Q4_K` decode ran 12-18% faster with them.
    /// Smaller buffers, and any whose mapping fails, come from the allocator as in
    /// [`AlignedBytes::zeroed`]. Not for temporaries: each mapping costs a system call and page
    /// faults that the allocator's reuse avoids.
    pub fn zeroed_huge(len: usize) -> AlignedBytes {
        if len >= HUGE_PAGE
            && let Some((ptr, mapped)) = map_huge(len)
        {
            return AlignedBytes { ptr, len, mapped };
        }
        AlignedBytes::zeroed(len)
    }

    /// Whether the buffer is a mapping of its own aligned to [`HUGE_PAGE`] (see
    /// [`AlignedBytes::zeroed_huge`]).
    pub fn is_huge_mapped(&self) -> bool {
        self.mapped != 0
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
        if self.mapped != 0 {
            // SAFETY: `ptr` starts the mapping of `mapped` bytes made by `map_huge`, unmapped once.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.mapped) };
        } else if self.len != 0 {
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

/// Maps `len` zeroed bytes (rounded up to whole 4 KiB pages) at an address aligned to
/// [`HUGE_PAGE`], advised `MADV_HUGEPAGE` on Linux before any page is touched, so the kernel can
/// back each whole 2 MiB of it with a huge page where transparent huge pages are enabled (`always`
/// or `madvise`). The last, partial 2 MiB stays in 4 KiB pages: a huge page there would make up
/// to 2 MiB per weight resident that holds nothing (about 200 MB for TinyLlama's 154
/// projections). Returns the start and the mapping's length, or `None` if the mapping fails (the
/// caller then uses the allocator).
fn map_huge(len: usize) -> Option<(NonNull<u8>, usize)> {
    const PAGE: usize = 4096;
    let mapped = len.checked_next_multiple_of(PAGE)?;
    let reserve = mapped.checked_add(HUGE_PAGE)?;
    // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return None;
    }
    let base = raw as usize;
    let start = base.next_multiple_of(HUGE_PAGE);
    let (head, tail) = (start - base, base + reserve - (start + mapped));
    // SAFETY: the head [base, start) and the tail after start + mapped are pages of the mapping
    // made above (mmap and HUGE_PAGE are page-aligned), unused and returned once; the range
    // [start, start + mapped) stays mapped, and MADV_HUGEPAGE is advice that never alters memory.
    unsafe {
        if head != 0 {
            libc::munmap(raw, head);
        }
        if tail != 0 {
            libc::munmap((start + mapped) as *mut libc::c_void, tail);
        }
        #[cfg(target_os = "linux")]
        libc::madvise(start as *mut libc::c_void, mapped, libc::MADV_HUGEPAGE);
    }
    NonNull::new(start as *mut u8).map(|ptr| (ptr, mapped))
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
    fn large_buffers_are_mapped_on_huge_page_boundaries() {
        assert!(!AlignedBytes::zeroed_huge(HUGE_PAGE - 1).is_huge_mapped());
        assert!(!AlignedBytes::zeroed(HUGE_PAGE).is_huge_mapped());
        for len in [HUGE_PAGE, HUGE_PAGE + 1, 3 * HUGE_PAGE + 4096 + 7] {
            let mut b = AlignedBytes::zeroed_huge(len);
            assert!(b.is_huge_mapped(), "{len} bytes");
            // Whole 4 KiB pages: a partial last 2 MiB gets no huge page, whose unused part would
            // be resident.
            assert_eq!(b.mapped, len.next_multiple_of(4096));
            assert_eq!(b.as_slice().as_ptr() as usize % HUGE_PAGE, 0);
            assert_eq!(b.len(), len);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            // Every byte, the last included, is writable and reads back.
            for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
                *x = i as u8;
            }
            assert!(b.as_slice().iter().enumerate().all(|(i, &x)| x == i as u8));
            let copy = AlignedBytes::copy_from(b.as_slice());
            assert_eq!(copy.as_slice(), b.as_slice());
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
