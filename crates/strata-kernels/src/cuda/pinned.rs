//! Page-locked host buffers and asynchronous uploads on the copy stream.
//!
//! This is the interface the store uses to prefetch into GPU memory: fill a [`Pinned`] buffer
//! (from disk or RAM), start [`Cuda::upload_async`] into a device buffer, and before a kernel
//! reads that buffer make the compute stream wait on the returned [`Upload`]. The copy runs
//! on its own stream, so the transfer of unit i+1 overlaps compute on unit i.
//!
//! A pinned buffer stays owned by its in-flight copy: [`Pinned::as_mut_slice`] waits for the last
//! copy out of it to finish before handing the bytes back to the host.

use cudarc::driver::{CudaEvent, CudaSlice, DevicePtr, PinnedHostSlice};

use crate::{Error, Result};

use super::{Cuda, driver};

/// A page-locked host buffer.
pub struct Pinned {
    slice: PinnedHostSlice<u8>,
}

impl Pinned {
    /// A page-locked buffer of `len` bytes (write-combined: fast to fill and to copy to the
    /// device, slow for the host to read back).
    pub fn new(cuda: &Cuda, len: usize) -> Result<Pinned> {
        // SAFETY: the bytes are plain u8, and the buffer is only written through as_mut_slice.
        let slice = unsafe { cuda.context().alloc_pinned::<u8>(len.max(1)) }.map_err(driver("alloc_pinned"))?;
        Ok(Pinned { slice })
    }

    /// A page-locked buffer of `len` bytes that the host reads back at memory speed (not
    /// write-combined): for data checked on the host after it lands, as layer images read from
    /// disk are. Allocations are page-aligned, so `O_DIRECT` reads can land in it.
    pub fn new_readable(cuda: &Cuda, len: usize) -> Result<Pinned> {
        // SAFETY: as in `new`; flags 0 asks for plain cacheable page-locked memory.
        let slice =
            unsafe { cuda.context().alloc_pinned_with_flags::<u8>(len.max(1), 0) }.map_err(driver("alloc_pinned"))?;
        Ok(Pinned { slice })
    }

    /// The size in bytes.
    pub fn len(&self) -> usize {
        self.slice.len()
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.slice.is_empty()
    }

    /// The bytes, for the host to fill; waits for any copy still reading them.
    pub fn as_mut_slice(&mut self) -> Result<&mut [u8]> {
        self.slice.as_mut_slice().map_err(driver("pinned"))
    }
}

/// An upload in flight on the copy stream.
pub struct Upload {
    done: CudaEvent,
}

impl Upload {
    /// Whether the copy has finished.
    pub fn is_complete(&self) -> bool {
        self.done.is_complete()
    }
}

impl Cuda {
    /// Copies the first `len` bytes of `src` into `dst` on the copy stream, after the work
    /// already queued on the compute stream (which may still be reading `dst`'s old contents).
    /// `dst` must outlive the copy ([`Cuda::wait_upload`] or a copy stream synchronisation).
    pub fn upload_async(&self, src: &Pinned, len: usize, dst: &mut CudaSlice<u8>) -> Result<Upload> {
        self.upload_async_shared(src, len, dst)
    }

    /// [`Cuda::upload_async`] into a buffer that device tensors share ([`region_tensor`]: a
    /// streamed layer's weights): the copy starts after the work already queued on the compute
    /// stream, and whatever reads the new bytes must wait for the returned upload
    /// ([`Cuda::wait_upload`]). The caller keeps `dst` alive until the copy completes (a copy
    /// stream synchronisation before it is freed).
    ///
    /// [`region_tensor`]: crate::cuda::tensor::region_tensor
    pub fn upload_async_shared(&self, src: &Pinned, len: usize, dst: &CudaSlice<u8>) -> Result<Upload> {
        if len > src.len() || len > dst.len() {
            return Err(Error::invalid(
                "upload_async_shared",
                format!("{len} bytes from a {}-byte buffer into {} bytes", src.len(), dst.len()),
            ));
        }
        let op = driver("upload_async_shared");
        let compute_done = self.stream().record_event(None).map_err(driver("upload_async_shared"))?;
        self.copy_stream().wait(&compute_done).map_err(op)?;
        let (dst_ptr, _sync) = dst.device_ptr(self.copy_stream());
        let host = &src.slice;
        // SAFETY: `host` is page-locked and outlives its copy: the pinned slice's event, recorded
        // on the copy stream when `_record` drops, is waited on before it is freed or handed back
        // to the host (PinnedHostSlice's drop and as_mut_slice); `dst`
        // holds `len` bytes, the compute stream's readers of its old bytes finish first (the
        // wait above), and its readers of the new ones wait for the returned event.
        unsafe {
            let (host_bytes, _record) = cudarc::driver::HostSlice::stream_synced_slice(host, self.copy_stream());
            cudarc::driver::result::memcpy_htod_async(dst_ptr, &host_bytes[..len], self.copy_stream().cu_stream())
                .map_err(driver("upload_async_shared"))?;
        }
        let done = self.copy_stream().record_event(None).map_err(driver("upload_async_shared"))?;
        Ok(Upload { done })
    }

    /// Makes the compute stream wait for `upload` before running what is queued next.
    pub fn wait_upload(&self, upload: &Upload) -> Result<()> {
        self.stream().wait(&upload.done).map_err(driver("wait_upload"))
    }
}
