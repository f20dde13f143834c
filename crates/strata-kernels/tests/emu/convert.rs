//! `kernels/convert.cu`: dequantization and the embedding gather of every dtype, bit for bit
//! against `Tensor::to_f32_vec` (the CPU's `dequantize_row`), into aligned and unaligned outputs,
//! with an out-of-range id giving a row of NaNs.

use strata_tensor::{DType, Tensor};

use crate::driver::{Arg, build, f32_bytes, f32s, launch, random_f32};

/// `ops::{dequantize, embedding}`'s kernel for `dtype` and rows of `k`, and its elements per
/// thread.
fn kernel(dtype: DType, k: usize) -> (String, usize) {
    let scalar = !dtype.is_quantized() && !k.is_multiple_of(4);
    (format!("convert_{}{}", dtype.name(), if scalar { "_scalar" } else { "" }), if scalar { 1 } else { 4 })
}

/// ConvertParams as C lays it out: u64 rows, u32 cols (+4), u64 row_bytes, u64 vocab, u32 gather
/// (+4).
fn params(rows: usize, cols: usize, row_bytes: usize, vocab: usize, gather: bool) -> Vec<u8> {
    [
        &(rows as u64).to_le_bytes()[..],
        &(cols as u32).to_le_bytes(),
        &[0; 4],
        &(row_bytes as u64).to_le_bytes(),
        &(vocab as u64).to_le_bytes(),
        &u32::from(gather).to_le_bytes(),
        &[0; 4],
    ]
    .concat()
}

#[test]
fn emulated_dequantize_and_embedding_are_bit_exact() {
    let Some(emu) = build("emu_convert.cpp") else { return };
    for (i, dtype) in DType::ALL.into_iter().enumerate() {
        let bl = dtype.block_len();
        // Block dtypes: whole blocks; float ones also a row length that is not a multiple of 4.
        let shapes: &[(usize, usize)] =
            if dtype.is_quantized() { &[(5, 2 * bl), (3, 768)] } else { &[(4, 36), (3, 37)] };
        for &(n, k) in shapes {
            let w = Tensor::from_f32_as(&random_f32(n * k, (i * 131 + k) as u64, 3.0), [n, k], dtype).unwrap();
            let want = w.to_f32_vec().unwrap();
            let (name, per_thread) = kernel(dtype, k);
            // At most two blocks, so that the grid-stride loop takes several turns.
            let blocks = (n * k / per_thread).div_ceil(256).clamp(1, 2) as u32;
            let what = format!("{name} {n}x{k}");

            // Dequantize, into an output that starts 4 bytes into its buffer (no float4 stores)
            // and one that is 16-byte aligned.
            for offset in [0usize, 4] {
                let mut wb = w.cpu_bytes().unwrap().to_vec();
                let mut out = f32_bytes(&vec![-7f32; n * k + 2]);
                let p = params(n, k, w.row_bytes(), n, false);
                launch(
                    &emu,
                    &name,
                    [blocks, 1, 1],
                    256,
                    0,
                    &p,
                    &mut [Arg::Buf(&mut wb, 0), Arg::Null, Arg::Buf(&mut out, offset)],
                );
                let got = f32s(&out);
                let got = &got[offset / 4..offset / 4 + n * k];
                for (j, (g, v)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g.to_bits(), v.to_bits(), "{what} at byte {offset}: out[{j}] = {g}, want {v}");
                }
                assert!(f32s(&out)[offset / 4 + n * k..].iter().all(|&v| v == -7.0), "{what}: wrote past the output");
            }

            // Embedding: rows picked by id, repeated, and one id past the table (a NaN row).
            let ids: Vec<u32> = vec![(n - 1) as u32, 0, n as u32, 1, (n - 1) as u32];
            let rows = ids.len();
            let mut wb = w.cpu_bytes().unwrap().to_vec();
            let mut idb: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
            let mut out = f32_bytes(&vec![-7f32; rows * k]);
            let p = params(rows, k, w.row_bytes(), n, true);
            let blocks = (rows * k / per_thread).div_ceil(256).clamp(1, 2) as u32;
            launch(
                &emu,
                &name,
                [blocks, 1, 1],
                256,
                0,
                &p,
                &mut [Arg::Buf(&mut wb, 0), Arg::Buf(&mut idb, 0), Arg::Buf(&mut out, 0)],
            );
            let got = f32s(&out);
            for (r, &id) in ids.iter().enumerate() {
                let row = &got[r * k..(r + 1) * k];
                if id as usize >= n {
                    assert!(row.iter().all(|v| v.is_nan()), "{what}: id {id} past the table gave {row:?}");
                } else {
                    let want_row = &want[id as usize * k..(id as usize + 1) * k];
                    assert!(
                        row.iter().zip(want_row).all(|(g, v)| g.to_bits() == v.to_bits()),
                        "{what}: row of id {id}"
                    );
                }
            }
        }
    }
}
