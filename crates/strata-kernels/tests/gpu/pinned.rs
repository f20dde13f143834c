//! Page-locked buffers and asynchronous uploads on the copy stream, ordered by events.
#![cfg(feature = "cuda")]

use strata_kernels::cuda::ops;
use strata_kernels::cuda::pinned::Pinned;
use strata_kernels::cuda::testing::{assert_close, device_or_skip, random_f32};

fn to_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn double_buffered_uploads_arrive_before_the_kernels_that_read_them() {
    let Some(cuda) = device_or_skip("double_buffered_uploads_arrive_before_the_kernels_that_read_them") else {
        return;
    };
    // Units of 4 MiB through two pinned staging buffers into two device buffers, as the store
    // prefetches: unit i+1 is copied while unit i is normalised.
    let (rows, cols) = (1024usize, 1024usize);
    let bytes = rows * cols * 4;
    let w = cuda.upload(&random_f32(cols, 99, 1.0)).unwrap();
    let mut staging = [Pinned::new(&cuda, bytes).unwrap(), Pinned::new(&cuda, bytes).unwrap()];
    let mut device = [cuda.zeros::<u8>(bytes).unwrap(), cuda.zeros::<u8>(bytes).unwrap()];
    let mut out = cuda.zeros::<f32>(rows * cols).unwrap();
    let units: Vec<Vec<f32>> = (0..6).map(|u| random_f32(rows * cols, u, 3.0)).collect();

    let mut pending: Option<(usize, strata_kernels::cuda::pinned::Upload, usize)> = None;
    for (u, data) in units.iter().enumerate() {
        let slot = u % 2;
        staging[slot].as_mut_slice().unwrap()[..bytes].copy_from_slice(&to_bytes(data));
        let upload = cuda.upload_async(&staging[slot], bytes, &mut device[slot]).unwrap();
        if let Some((prev_slot, prev_upload, prev_unit)) = pending.take() {
            check_unit(&cuda, &device[prev_slot], &w, &prev_upload, units[prev_unit].as_slice(), rows, &mut out);
        }
        pending = Some((slot, upload, u));
    }
    let (slot, upload, u) = pending.unwrap();
    check_unit(&cuda, &device[slot], &w, &upload, units[u].as_slice(), rows, &mut out);
}

fn check_unit(
    cuda: &strata_kernels::Cuda,
    unit: &strata_kernels::cuda::CudaSlice<u8>,
    w: &strata_kernels::cuda::CudaSlice<f32>,
    upload: &strata_kernels::cuda::pinned::Upload,
    data: &[f32],
    rows: usize,
    out: &mut strata_kernels::cuda::CudaSlice<f32>,
) {
    cuda.wait_upload(upload).unwrap();
    // SAFETY: the unit holds rows * cols f32 values as little-endian bytes, 4-byte aligned.
    let x = unsafe { unit.transmute::<f32>(data.len()) }.unwrap();
    ops::rms_norm(cuda, &x, w, 1e-5, rows, out).unwrap();
    let mut want = vec![0f32; data.len()];
    let wh = cuda.download(w).unwrap();
    strata_tensor::cpu::reference::rms_norm(data, &wh, 1e-5, &mut want).unwrap();
    assert_close("unit", &cuda.download(out).unwrap(), &want, 1e-5, 1e-5);
}

#[test]
fn an_upload_larger_than_its_buffers_is_refused() {
    let Some(cuda) = device_or_skip("an_upload_larger_than_its_buffers_is_refused") else { return };
    let src = Pinned::new(&cuda, 16).unwrap();
    let mut dst = cuda.zeros::<u8>(8).unwrap();
    let err = cuda.upload_async(&src, 16, &mut dst).err().expect("16 bytes do not fit in 8");
    assert!(err.to_string().contains("16 bytes"), "{err}");
}
