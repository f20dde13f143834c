//! Benchmarks of the weight-reading kernels: the dequantizing matvec of every dtype at 1 and 8
//! tokens (block-quantized weights with both kinds of activations: the default integer path, and
//! `f32-acts`), dequantization, the linear layer's GEMM path at 128 tokens, and the products of a
//! TinyLlama decode step, of a Mixtral MoE block's chosen experts and of an 8B model's FFN at one
//! token.
//!
//! Weights are `[16384, 8192]` (128 MiB of q4_0 to 512 MiB of f32), four copies of each timed in
//! turn so that no call finds its weight in the 50-60 MB L2. Their bytes are random, with every
//! block's scales set to a small finite f16, so no value is NaN or infinite.

use std::cell::Cell;

use strata_kernels::Cuda;
use strata_kernels::cuda::ops::{self, LinearScratch, MatvecActs};
use strata_kernels::cuda::tensor::upload_tensor;
use strata_kernels::cuda::testing::random_f32;
use strata_tensor::{AlignedBytes, CpuStorage, DType, Tensor};

use crate::bench::Bench;

type R<T> = Result<T, Box<dyn std::error::Error>>;

/// Weight rows and columns.
const N: usize = 16384;
const K: usize = 8192;
/// Copies of each weight timed in turn.
const COPIES: usize = 4;

/// A `[n, k]` host tensor of `dtype` with random bytes and finite values: float exponents are
/// kept small, block scales are set to 2^-7.
fn random_weight(dtype: DType, n: usize, k: usize, seed: u64) -> R<Tensor> {
    let len = dtype.bytes_for(n * k).ok_or("k is not a whole number of blocks")?;
    let mut bytes = AlignedBytes::zeroed(len);
    let b = bytes.as_mut_slice();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in b.chunks_mut(8) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        chunk.copy_from_slice(&s.to_le_bytes()[..chunk.len()]);
    }
    const SCALE: [u8; 2] = [0x00, 0x20]; // f16 2^-7
    let patch = |b: &mut [u8], offsets: &[usize]| {
        for block in b.chunks_exact_mut(dtype.block_bytes()) {
            for &o in offsets {
                block[o..o + 2].copy_from_slice(&SCALE);
            }
        }
    };
    match dtype {
        // Clear the top exponent bit: |v| < 2, never NaN or infinite.
        DType::F32 => b.chunks_exact_mut(4).for_each(|v| v[3] &= 0xbf),
        DType::F16 => b.chunks_exact_mut(2).for_each(|v| v[1] &= 0xbb),
        DType::BF16 => b.chunks_exact_mut(2).for_each(|v| v[1] &= 0xbf),
        DType::Q8_0 | DType::Q4_0 => patch(b, &[0]),
        DType::Q4_1 | DType::Q4K => patch(b, &[0, 2]),
        DType::Q6K => patch(b, &[208]),
    }
    Ok(Tensor::from_storage(CpuStorage::owned(bytes), dtype, [n, k])?)
}

/// `COPIES` device copies of a random `[n, k]` weight of `dtype`.
fn device_weights(cuda: &Cuda, dtype: DType, n: usize, k: usize) -> R<Vec<Tensor>> {
    device_copies(cuda, dtype, n, k, COPIES)
}

/// `copies` device copies of a random `[n, k]` weight of `dtype`.
fn device_copies(cuda: &Cuda, dtype: DType, n: usize, k: usize, copies: usize) -> R<Vec<Tensor>> {
    let host = random_weight(dtype, n, k, dtype as u64 + 1)?;
    (0..copies).map(|_| Ok(upload_tensor(cuda, &host)?)).collect()
}

/// The activation paths to time for `dtype`: both for block-quantized weights, one for floats.
fn acts_of(dtype: DType) -> &'static [MatvecActs] {
    if dtype.is_quantized() { &MatvecActs::ALL } else { &[MatvecActs::TwoDigits] }
}

/// The name suffix of a non-default activation path.
fn acts_suffix(acts: MatvecActs) -> &'static str {
    match acts {
        MatvecActs::TwoDigits => "",
        MatvecActs::F32 => " f32-acts",
    }
}

/// Runs this module's benchmarks.
pub fn run(b: &mut Bench) -> R<()> {
    let cuda = b.cuda.clone();
    let x = cuda.upload(&random_f32(128 * K, 7, 1.0))?;
    let mut y = cuda.zeros::<f32>(128 * N)?;
    let mut out = cuda.zeros::<f32>(N * K)?;
    let mut scratch = LinearScratch::new();
    for dtype in DType::ALL {
        let ws = device_weights(&cuda, dtype, N, K)?;
        let next = Cell::new(0usize);
        let pick = || {
            next.set(next.get() + 1);
            &ws[next.get() % COPIES]
        };
        let wbytes = ws[0].byte_len() as f64;
        for tokens in [1, 8] {
            let bytes = wbytes + (tokens * (K + N) * 4) as f64;
            for &acts in acts_of(dtype) {
                let name = format!("matvec {dtype} t{tokens}{}", acts_suffix(acts));
                b.measure(&name, &format!("{N}x{K} x{COPIES}"), bytes, 30, || {
                    ops::matvec_as(&cuda, pick(), &x, &mut y, tokens, acts)?;
                    Ok(())
                })?;
            }
        }
        b.measure(
            &format!("dequantize {dtype}"),
            &format!("{N}x{K} x{COPIES}"),
            wbytes + (N * K * 4) as f64,
            10,
            || {
                ops::dequantize(&cuda, pick(), &mut out)?;
                Ok(())
            },
        )?;
        if matches!(dtype, DType::F32 | DType::F16 | DType::Q4K | DType::Q8_0)
            && b.wants(&format!("linear {dtype} gemm"), "t128")
        {
            let tokens = 128;
            let flops = 2.0 * (tokens * N * K) as f64;
            let ms = crate::bench::time_ms(&cuda, 5, || {
                ops::linear(&cuda, pick(), &x, &mut y, tokens, &mut scratch)?;
                Ok(())
            })?;
            let shape = format!("t{tokens} {N}x{K} {:.1} TFLOP/s", flops / (ms / 1e3) / 1e12);
            b.measure(&format!("linear {dtype} gemm"), &shape, wbytes + (tokens * (K + N) * 4) as f64, 5, || {
                ops::linear(&cuda, pick(), &x, &mut y, tokens, &mut scratch)?;
                Ok(())
            })?;
        }
    }
    // A TinyLlama-1.1B decode step's products, 1 token, as the CUDA decoder runs them: q/k/v
    // stacked (2048 + 2 x 256 rows), the output and down projections added to the residual, gate
    // and up paired with SwiGLU (2 x 5632 rows, 5632 outputs). Small products: their times say
    // how close a layer comes to its bytes over the copy peak, launch latency included. Copies
    // of at least 240 MB in all rotate, as the whole model streams through a real decode step.
    // The qkv and gate/up products of block-quantized weights take the activations the RMSNorm
    // before them quantized (`rms_norm_actq`, made once here), as the decoder does with separate
    // norms; their `normed` rows normalise the activations in the product, as it does by default.
    let mut resid = cuda.zeros::<f32>(N)?;
    let norm = cuda.upload(&random_f32(2048, 8, 1.0))?;
    let mut xq = cuda.zeros::<u8>(ops::actq_bytes(1, 2048))?;
    ops::quantize_acts(&cuda, &x.slice(..2048), &mut xq, 1, 2048)?;
    for dtype in [DType::BF16, DType::Q4_0, DType::Q4K] {
        for (what, n, k) in
            [("qkv", 2560, 2048), ("o add", 2048, 2048), ("gate/up swiglu", 11264, 2048), ("down add", 2048, 5632)]
        {
            let copies = (240_000_000 / (n * k / dtype.block_len() * dtype.block_bytes())).max(COPIES);
            let ws = device_copies(&cuda, dtype, n, k, copies)?;
            let next = Cell::new(0usize);
            let outputs = if what.ends_with("swiglu") { n / 2 } else { n };
            let bytes = ws[0].byte_len() as f64 + ((k + outputs) * 4) as f64;
            let mut launch = || -> R<()> {
                next.set(next.get() + 1);
                let w = &ws[next.get() % copies];
                let quantized = dtype.is_quantized();
                match what {
                    "qkv" if quantized => ops::matvec_actq(&cuda, w, &xq, &mut y, 1, ops::MatvecStore::Write)?,
                    "qkv" => ops::matvec(&cuda, w, &x, &mut y, 1)?,
                    "gate/up swiglu" if quantized => {
                        ops::matvec_actq(&cuda, w, &xq, &mut y, 1, ops::MatvecStore::Swiglu)?
                    }
                    "gate/up swiglu" => ops::matvec_swiglu(&cuda, w, &x, &mut y, 1)?,
                    _ => ops::matvec_add(&cuda, w, &x, &mut resid, 1)?,
                }
                Ok(())
            };
            let (name, shape) = (format!("tinyllama {what} {dtype} t1"), format!("{n}x{k} x{copies}"));
            b.measure(&name, &shape, bytes, 30, &mut launch)?;
            // The same launches back to back, as a decode step queues them: the device's time per
            // product without a launch's latency, and the host's time to queue one.
            b.measure_chain(&name, &shape, bytes, 64, &mut launch)?;
            // The products after an RMSNorm, normalising their activations themselves (the
            // decoder's default): against the row above plus the `rms_norm_actq` decode row, what
            // the fusion saves.
            if what == "qkv" || what == "gate/up swiglu" {
                let store = if what == "qkv" { ops::MatvecStore::Write } else { ops::MatvecStore::Swiglu };
                let name = format!("tinyllama {what} normed {dtype} t1");
                b.measure(&name, &format!("{n}x{k} x{copies}"), bytes, 30, || {
                    next.set(next.get() + 1);
                    let w = &ws[next.get() % copies];
                    ops::matvec_normed(&cuda, w, &x.slice(..k), &norm, 1e-5, &mut y, 1, store)?;
                    Ok(())
                })?;
            }
        }
    }
    // A Mixtral-8x7B MoE block's experts at one token, routed on the device: 8 experts of paired
    // gate/up [2 x 14336, 4096] and down [4096, 14336], 2 chosen per token (a different pair each
    // call), each product of the two chosen experts one launch (`matvec_experts`), against the
    // same products as one launch per expert (the host path's dispatch). Bytes: the two chosen
    // experts' weights.
    for dtype in [DType::Q4_0, DType::Q4K] {
        let (inter, hidden, experts) = (14336, 4096, 8);
        let gate_up = device_copies(&cuda, dtype, 2 * inter, hidden, experts)?;
        let down = device_copies(&cuda, dtype, hidden, inter, experts)?;
        let (gu_table, down_table) =
            (ops::ExpertWeights::new(&cuda, &gate_up)?, ops::ExpertWeights::new(&cuda, &down)?);
        let pairs: Vec<[u32; 2]> = (0..experts as u32).map(|e| [e, (e + 3) % experts as u32]).collect();
        let ids = pairs.iter().map(|p| Ok(cuda.upload(p)?)).collect::<R<Vec<_>>>()?;
        let mut act = cuda.zeros::<f32>(2 * inter)?;
        let mut ys = cuda.zeros::<f32>(2 * hidden)?;
        let next = Cell::new(0usize);
        let turn = || {
            next.set(next.get() + 1);
            next.get() % experts
        };
        let gu_bytes = 2.0 * gate_up[0].byte_len() as f64;
        let down_bytes = 2.0 * down[0].byte_len() as f64;
        let shape = format!("2 of {experts} x {}x{hidden}", 2 * inter);
        b.measure(&format!("moe gate/up experts {dtype} k2"), &shape, gu_bytes, 30, || {
            ops::matvec_experts(
                &cuda,
                &gu_table,
                &ids[turn()],
                &x.slice(..hidden),
                true,
                &mut act,
                ops::MatvecStore::Swiglu,
            )?;
            Ok(())
        })?;
        b.measure(&format!("moe gate/up per expert {dtype} k2"), &shape, gu_bytes, 30, || {
            let i = turn();
            for (slot, &e) in pairs[i].iter().enumerate() {
                let mut a = act.slice_mut(slot * inter..(slot + 1) * inter);
                ops::matvec_swiglu(&cuda, &gate_up[e as usize], &x.slice(..hidden), &mut a, 1)?;
            }
            Ok(())
        })?;
        let shape = format!("2 of {experts} x {hidden}x{inter}");
        b.measure(&format!("moe down experts {dtype} k2"), &shape, down_bytes, 30, || {
            ops::matvec_experts(
                &cuda,
                &down_table,
                &ids[turn()],
                &x.slice(..2 * inter),
                false,
                &mut ys,
                ops::MatvecStore::Write,
            )?;
            Ok(())
        })?;
    }
    // Decode shapes of an 8B model (FFN down and up), 1 token.
    for (n, k) in [(4096, 14336), (14336, 4096)] {
        for dtype in [DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4K, DType::Q6K] {
            let ws = device_weights(&cuda, dtype, n, k)?;
            let next = Cell::new(0usize);
            let bytes = ws[0].byte_len() as f64 + ((k + n) * 4) as f64;
            for &acts in acts_of(dtype) {
                let name = format!("matvec {dtype} t1{}", acts_suffix(acts));
                b.measure(&name, &format!("{n}x{k} x{COPIES}"), bytes, 30, || {
                    next.set(next.get() + 1);
                    ops::matvec_as(&cuda, &ws[next.get() % COPIES], &x, &mut y, 1, acts)?;
                    Ok(())
                })?;
            }
        }
    }
    Ok(())
}
