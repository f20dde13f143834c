//! Benchmarks of the row and element-wise kernels: RMSNorm, RoPE, SwiGLU, add, bias add, the
//! f16/bf16 casts, softmax, argmax and top-k gating.
//!
//! Bytes are the least each kernel must move: every input read once and every output written
//! once (an in-place operand counts twice). Kernels that read an input twice (softmax's two
//! passes) therefore show less than the bandwidth they use.

use half::bf16;
use strata_kernels::cuda::ops::{self, RopeArgs};
use strata_kernels::cuda::testing::random_f32;
use strata_tensor::cpu::RopeLayout;

use crate::bench::Bench;

type R<T> = Result<T, Box<dyn std::error::Error>>;

/// Runs this module's benchmarks.
pub fn run(b: &mut Bench) -> R<()> {
    rms_norm(b)?;
    rope(b)?;
    elementwise(b)?;
    softmax(b)?;
    gating(b)?;
    Ok(())
}

fn rms_norm(b: &mut Bench) -> R<()> {
    let cuda = b.cuda.clone();
    // RMSNorm over 16384 rows of 8192 f32 (512 MiB in, 512 MiB out).
    let (rows, cols) = (16384usize, 8192usize);
    let x = cuda.upload(&random_f32(rows * cols, 1, 1.0))?;
    let w = cuda.upload(&random_f32(cols, 2, 1.0))?;
    let mut out = cuda.zeros::<f32>(rows * cols)?;
    let bytes = 2.0 * (rows * cols * 4) as f64;
    b.measure("rms_norm f32", &format!("{rows}x{cols}"), bytes, 20, || {
        ops::rms_norm(&cuda, &x, &w, 1e-5, rows, &mut out)?;
        Ok(())
    })?;
    // A decode step's norms, one row of TinyLlama's 2048: plain, and quantizing its row for the
    // products after it (`rms_norm_actq`, as the decoder runs it before q/k/v and gate/up). Their
    // time is latency, not bandwidth: the row is 8 KiB.
    let h = 2048usize;
    let mut xq = cuda.zeros::<u8>(ops::actq_bytes(1, h))?;
    let (x1, w1) = (x.slice(..h), w.slice(..h));
    let mut o1 = out.slice_mut(..h);
    let mut norm_row = || -> R<()> {
        ops::rms_norm(&cuda, &x1, &w1, 1e-5, 1, &mut o1)?;
        Ok(())
    };
    b.measure("rms_norm f32 decode row", &format!("1x{h}"), (2 * h * 4) as f64, 50, &mut norm_row)?;
    // Back to back, as a decode step queues its kernels: the floor of a one-block kernel's time
    // on the device, and the host's time to queue one.
    b.measure_chain("rms_norm f32 decode row", &format!("1x{h}"), (2 * h * 4) as f64, 64, &mut norm_row)?;
    let qbytes = (2 * h * 4 + ops::actq_bytes(1, h)) as f64;
    b.measure("rms_norm_actq f32 decode row", &format!("1x{h}"), qbytes, 50, || {
        ops::rms_norm_actq(&cuda, &x1, &w1, 1e-5, 1, &mut o1, &mut xq)?;
        Ok(())
    })
}

fn rope(b: &mut Bench) -> R<()> {
    let cuda = b.cuda.clone();
    // A 16384-token prefill of a Llama-3-8B-shaped layer: 32 query and 8 key heads of 128,
    // q and k rotated in place (f32: 256 + 64 MiB, each read and written once).
    let (tokens, n_heads, n_kv_heads, head_dim) = (16384usize, 32usize, 8usize, 128usize);
    let positions: Vec<u32> = (0..tokens as u32).collect();
    let freqs: Vec<f32> = (0..head_dim / 2).map(|i| 500000f32.powf(-((2 * i) as f32) / head_dim as f32)).collect();
    let pos = cuda.upload(&positions)?;
    let inv_freq = cuda.upload(&freqs)?;
    let elems = tokens * (n_heads + n_kv_heads) * head_dim;
    let shape = format!("{tokens}x({n_heads}+{n_kv_heads})x{head_dim}");
    let small = (tokens * 4 + freqs.len() * 4) as f64;
    for layout in [RopeLayout::RotateHalf, RopeLayout::Interleaved] {
        let args = RopeArgs { tokens, n_heads, n_kv_heads, head_dim, attention_factor: 1.0, layout };
        let mut q = cuda.upload(&random_f32(tokens * n_heads * head_dim, 3, 1.0))?;
        let mut k = cuda.upload(&random_f32(tokens * n_kv_heads * head_dim, 4, 1.0))?;
        let name = format!("rope_qk f32 {}", if layout == RopeLayout::RotateHalf { "half" } else { "interleaved" });
        b.measure(&name, &shape, 2.0 * (elems * 4) as f64 + small, 20, || {
            ops::rope_qk(&cuda, &mut q, &mut k, &pos, &inv_freq, &args)?;
            Ok(())
        })?;
    }
    let args =
        RopeArgs { tokens, n_heads, n_kv_heads, head_dim, attention_factor: 1.0, layout: RopeLayout::RotateHalf };
    let to_bf16 = |v: Vec<f32>| v.into_iter().map(bf16::from_f32).collect::<Vec<_>>();
    let mut q = cuda.upload(&to_bf16(random_f32(tokens * n_heads * head_dim, 3, 1.0)))?;
    let mut k = cuda.upload(&to_bf16(random_f32(tokens * n_kv_heads * head_dim, 4, 1.0)))?;
    b.measure("rope_qk bf16 half", &shape, 2.0 * (elems * 2) as f64 + small, 20, || {
        ops::rope_qk(&cuda, &mut q, &mut k, &pos, &inv_freq, &args)?;
        Ok(())
    })
}

fn elementwise(b: &mut Bench) -> R<()> {
    let cuda = b.cuda.clone();
    // 256M f32 (1 GiB) per operand.
    let n = 1usize << 28;
    let shape = format!("{n}");
    let gate = cuda.upload(&random_f32(n, 5, 4.0))?;
    let up = cuda.upload(&random_f32(n, 6, 1.0))?;
    let mut out = cuda.zeros::<f32>(n)?;
    b.measure("swiglu f32", &shape, 3.0 * (n * 4) as f64, 20, || {
        ops::swiglu(&cuda, &gate, &up, &mut out)?;
        Ok(())
    })?;
    // acc read and written, x read.
    b.measure("add f32", &shape, 3.0 * (n * 4) as f64, 20, || {
        ops::add(&cuda, &mut out, &up)?;
        Ok(())
    })?;
    let mut half_out = cuda.upload(&vec![bf16::ZERO; n])?;
    b.measure("cast f32->bf16", &shape, (n * 4 + n * 2) as f64, 20, || {
        ops::cast_f32_to(&cuda, &gate, &mut half_out)?;
        Ok(())
    })?;
    drop(half_out);
    // A bias over 32768 rows of 8192.
    let cols = 8192usize;
    let rows = n / cols;
    let bias = cuda.upload(&random_f32(cols, 7, 1.0))?;
    b.measure("add_bias f32", &format!("{rows}x{cols}"), (2 * n * 4 + cols * 4) as f64, 20, || {
        ops::add_bias(&cuda, &mut out, &bias, rows)?;
        Ok(())
    })
}

fn softmax(b: &mut Bench) -> R<()> {
    let cuda = b.cuda.clone();
    // 512 rows of Qwen2's vocabulary (297 MiB).
    let (rows, row_len) = (512usize, 151936usize);
    let shape = format!("{rows}x{row_len}");
    let logits = cuda.upload(&random_f32(rows * row_len, 8, 10.0))?;
    let mut x = cuda.zeros::<f32>(rows * row_len)?;
    // In place on its own output: after the first run the rows hold probabilities, which cost
    // the kernel the same as logits.
    cuda.stream().memcpy_dtod(&logits, &mut x).map_err(|e| format!("{e:?}"))?;
    b.measure("softmax f32", &shape, 2.0 * (rows * row_len * 4) as f64, 20, || {
        ops::softmax(&cuda, &mut x, row_len)?;
        Ok(())
    })?;
    let mut out = cuda.zeros::<u32>(rows)?;
    b.measure("argmax f32", &shape, (rows * row_len * 4 + rows * 4) as f64, 20, || {
        ops::argmax(&cuda, &logits, row_len, &mut out)?;
        Ok(())
    })?;
    // Decode-sized: one row of the vocabulary per sequence of a batch of 8.
    let small_rows = 8;
    b.measure("argmax f32", &format!("{small_rows}x{row_len}"), (small_rows * row_len * 4) as f64, 50, || {
        ops::argmax(&cuda, &logits.slice(..small_rows * row_len), row_len, &mut out)?;
        Ok(())
    })
}

fn gating(b: &mut Bench) -> R<()> {
    let cuda = b.cuda.clone();
    let (n_experts, k) = (128usize, 8usize);
    // 65536 tokens (32 MiB of logits, within the L2) and 1M tokens (512 MiB, from DRAM).
    for tokens in [65536usize, 1 << 20] {
        let shape = format!("{tokens}x{n_experts} k={k}");
        let logits = cuda.upload(&random_f32(tokens * n_experts, 9, 4.0))?;
        let mut ids = cuda.zeros::<u32>(tokens * k)?;
        let mut weights = cuda.zeros::<f32>(tokens * k)?;
        let mut counts = cuda.zeros::<u32>(tokens)?;
        let bytes = (tokens * n_experts * 4 + tokens * k * 8) as f64;
        b.measure("topk_gating", &shape, bytes, 20, || {
            ops::topk_gating(&cuda, &logits, n_experts, k, true, &mut ids, &mut weights)?;
            Ok(())
        })?;
        b.measure("topk_gating_dynamic p=0.5", &shape, bytes + (tokens * 4) as f64, 20, || {
            ops::topk_gating_dynamic(&cuda, &logits, n_experts, 1, k, 0.5, true, &mut ids, &mut weights, &mut counts)?;
            Ok(())
        })?;
    }
    Ok(())
}
