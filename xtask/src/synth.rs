//! `cargo xtask synth-model`: random-weight checkpoints with the shapes of real models, for
//! benchmarks. Fast and without Python: weights come from a xorshift generator and are streamed
//! either to a safetensors file next to a config.json that transformers and strata both read, or
//! to one GGUF file (llama architecture, a synthetic vocabulary) that strata, llama.cpp and
//! mistral.rs all load, in a float or a ggml block dtype. Mixture-of-Experts shapes (Mixtral)
//! write one tensor per expert in safetensors (`block_sparse_moe.experts.N.w1/w2/w3`, as
//! `save_pretrained` does) and llama.cpp's stacked `ffn_{gate,up,down}_exps` in GGUF.

mod gguf;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use rayon::prelude::*;
use strata_tensor::DType;

use gguf::{TensorInfo, Value};

/// The shape of a real model.
#[derive(Clone, Debug)]
pub struct ModelShape {
    /// The name given on the command line.
    pub name: &'static str,
    vocab: usize,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    rope_theta: f64,
    max_positions: usize,
    tie: bool,
    /// Mixture-of-Experts: (experts per layer, experts per token); `None` for a dense model.
    experts: Option<(usize, usize)>,
}

/// The shapes `--shape` accepts.
pub const SHAPES: &[ModelShape] = &[
    ModelShape {
        name: "tinyllama-1.1b",
        vocab: 32000,
        hidden: 2048,
        intermediate: 5632,
        layers: 22,
        heads: 32,
        kv_heads: 4,
        rope_theta: 10000.0,
        max_positions: 2048,
        tie: false,
        experts: None,
    },
    ModelShape {
        name: "llama-3-8b",
        vocab: 128256,
        hidden: 4096,
        intermediate: 14336,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        rope_theta: 500000.0,
        max_positions: 8192,
        tie: false,
        experts: None,
    },
    ModelShape {
        name: "smollm2-135m",
        vocab: 49152,
        hidden: 576,
        intermediate: 1536,
        layers: 30,
        heads: 9,
        kv_heads: 3,
        rope_theta: 100000.0,
        max_positions: 8192,
        tie: true,
        experts: None,
    },
    ModelShape {
        name: "mixtral-8x7b",
        vocab: 32000,
        hidden: 4096,
        intermediate: 14336,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        rope_theta: 1e6,
        max_positions: 32768,
        tie: false,
        experts: Some((8, 2)),
    },
];

/// The file format `synth-model` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A directory with `model.safetensors` and `config.json`.
    Safetensors,
    /// One `.gguf` file.
    Gguf,
}

impl Format {
    /// Parses `--format`: `safetensors` or `gguf`.
    pub fn from_name(name: &str) -> Result<Format> {
        match name {
            "safetensors" => Ok(Format::Safetensors),
            "gguf" => Ok(Format::Gguf),
            other => bail!("unknown --format {other:?}: expected safetensors or gguf"),
        }
    }
}

/// Writes a checkpoint of `shape` (optionally with only `layers` layers) in `dtype` to `out`
/// and returns the path of the weights file.
///
/// The format is `format`, or when not given GGUF if `out` ends in `.gguf` and safetensors
/// otherwise. Safetensors: `out` is a directory, dtypes f32, f16 and bf16. GGUF: `out` is the
/// file, or a directory that receives `<shape>-<dtype>.gguf`; every dtype strata knows (f32,
/// f16, bf16, q8_0, q4_0, q4_1, q4_k, q6_k) for the matrices, f32 for the norm weights.
pub fn run(shape: &str, dtype: &str, layers: Option<usize>, format: Option<Format>, out: &Path) -> Result<PathBuf> {
    let Some(base) = SHAPES.iter().find(|s| s.name == shape) else {
        let names: Vec<&str> = SHAPES.iter().map(|s| s.name).collect();
        bail!("unknown shape {shape:?}: expected one of {}", names.join(", "));
    };
    let mut s = base.clone();
    if let Some(n) = layers {
        ensure!(n > 0, "--layers must be at least 1");
        s.layers = n;
    }
    let is_gguf_path = out.extension().is_some_and(|e| e == "gguf");
    match format.unwrap_or(if is_gguf_path { Format::Gguf } else { Format::Safetensors }) {
        Format::Safetensors => write_safetensors(&s, dtype, out),
        Format::Gguf => {
            let path = if is_gguf_path {
                out.to_path_buf()
            } else {
                let layers = layers.map(|n| format!("-{n}l")).unwrap_or_default();
                out.join(format!("{}{layers}-{dtype}.gguf", s.name))
            };
            write_gguf(&s, dtype, &path)?;
            Ok(path)
        }
    }
}

/// How a MoE shape's experts are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Experts {
    /// One tensor per expert and projection (`block_sparse_moe.experts.N.w1/w2/w3`).
    PerExpert,
    /// One `[E, rows, cols]` stack per projection (`block_sparse_moe.experts.{gate,up,down}_proj`,
    /// strata's names for GGUF's `ffn_{gate,up,down}_exps`).
    Stacked,
}

/// The model's tensors with their Hugging Face names and shapes, in checkpoint order.
fn hf_tensors(s: &ModelShape, layout: Experts) -> Vec<(String, Vec<usize>)> {
    let head_dim = s.hidden / s.heads;
    let mut tensors: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![s.vocab, s.hidden])];
    for i in 0..s.layers {
        let p = format!("model.layers.{i}");
        tensors.push((format!("{p}.input_layernorm.weight"), vec![s.hidden]));
        tensors.push((format!("{p}.self_attn.q_proj.weight"), vec![s.heads * head_dim, s.hidden]));
        tensors.push((format!("{p}.self_attn.k_proj.weight"), vec![s.kv_heads * head_dim, s.hidden]));
        tensors.push((format!("{p}.self_attn.v_proj.weight"), vec![s.kv_heads * head_dim, s.hidden]));
        tensors.push((format!("{p}.self_attn.o_proj.weight"), vec![s.hidden, s.heads * head_dim]));
        tensors.push((format!("{p}.post_attention_layernorm.weight"), vec![s.hidden]));
        let (h, f) = (s.hidden, s.intermediate);
        match (s.experts, layout) {
            (None, _) => {
                tensors.push((format!("{p}.mlp.gate_proj.weight"), vec![f, h]));
                tensors.push((format!("{p}.mlp.up_proj.weight"), vec![f, h]));
                tensors.push((format!("{p}.mlp.down_proj.weight"), vec![h, f]));
            }
            (Some((e, _)), Experts::PerExpert) => {
                tensors.push((format!("{p}.block_sparse_moe.gate.weight"), vec![e, h]));
                for x in 0..e {
                    let q = format!("{p}.block_sparse_moe.experts.{x}");
                    tensors.push((format!("{q}.w1.weight"), vec![f, h]));
                    tensors.push((format!("{q}.w2.weight"), vec![h, f]));
                    tensors.push((format!("{q}.w3.weight"), vec![f, h]));
                }
            }
            (Some((e, _)), Experts::Stacked) => {
                tensors.push((format!("{p}.block_sparse_moe.gate.weight"), vec![e, h]));
                let q = format!("{p}.block_sparse_moe.experts");
                tensors.push((format!("{q}.gate_proj.weight"), vec![e, f, h]));
                tensors.push((format!("{q}.up_proj.weight"), vec![e, f, h]));
                tensors.push((format!("{q}.down_proj.weight"), vec![e, h, f]));
            }
        }
    }
    tensors.push(("model.norm.weight".into(), vec![s.hidden]));
    if !s.tie {
        tensors.push(("lm_head.weight".into(), vec![s.vocab, s.hidden]));
    }
    tensors
}

/// The name llama.cpp's converter gives the Hugging Face tensor `hf`.
fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").expect("every other tensor is in a layer");
    let (layer, module) = rest.split_once('.').expect("a layer index, then the module");
    let module = match module {
        "input_layernorm.weight" => "attn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "post_attention_layernorm.weight" => "ffn_norm",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        "block_sparse_moe.gate.weight" => "ffn_gate_inp",
        "block_sparse_moe.experts.gate_proj.weight" => "ffn_gate_exps",
        "block_sparse_moe.experts.up_proj.weight" => "ffn_up_exps",
        "block_sparse_moe.experts.down_proj.weight" => "ffn_down_exps",
        other => unreachable!("hf_tensors lists no module {other}"),
    };
    format!("blk.{layer}.{module}.weight")
}

/// The weights' magnitude: uniform on `[-A, A]` has the variance of N(0, 0.02^2).
const WEIGHT_RANGE: f32 = 0.0346;

/// One step of the xorshift64 generator, mapped to a weight in `[-WEIGHT_RANGE, WEIGHT_RANGE)`.
fn next_weight(rng: &mut u64) -> f32 {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    ((*rng >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * WEIGHT_RANGE
}

/// The progress of writing a synthetic weights file, on stderr: a line naming the file, its
/// size and shape, then the percentage written, updated every 256 MiB on one line.
struct Progress {
    total: usize,
    written: usize,
    last_report: usize,
}

impl Progress {
    /// Prints `writing PATH (x GB, n layers, dtype)` and counts toward `total` bytes.
    fn start(path: &Path, total: usize, layers: usize, dtype: impl std::fmt::Display) -> Progress {
        eprintln!("writing {} ({:.2} GB, {layers} layers, {dtype})", path.display(), total as f64 / 1e9);
        Progress { total, written: 0, last_report: 0 }
    }

    /// Counts `bytes` more written, printing the percentage when 256 MiB more are done since
    /// the last print.
    fn add(&mut self, bytes: usize) {
        self.written += bytes;
        if self.written - self.last_report >= 256 << 20 {
            self.last_report = self.written;
            eprint!("\r  {:>5.1}%", 100.0 * self.written as f64 / self.total as f64);
        }
    }

    /// Flushes `w` and syncs its file to disk, then prints `100.0%`.
    fn finish(self, w: BufWriter<File>) -> Result<()> {
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        eprintln!("\r  100.0%");
        Ok(())
    }
}

/// Writes model.safetensors and config.json into the directory `out`.
fn write_safetensors(s: &ModelShape, dtype: &str, out: &Path) -> Result<PathBuf> {
    let (st_dtype, elem) = match dtype {
        "f32" => ("F32", 4),
        "f16" => ("F16", 2),
        "bf16" => ("BF16", 2),
        other => bail!("unsupported --dtype {other:?} for safetensors: expected f32, f16 or bf16 (or --format gguf)"),
    };
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;

    let head_dim = s.hidden / s.heads;
    let tensors = hf_tensors(s, Experts::PerExpert);

    // The header: every tensor's dtype, shape and byte range, padded to 8 bytes.
    let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\",\"generator\":\"strata xtask synth-model\"}");
    let mut offset = 0usize;
    for (name, dims) in &tensors {
        let bytes = dims.iter().product::<usize>() * elem;
        let dims_s: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
        header.push_str(&format!(
            ",\"{name}\":{{\"dtype\":\"{st_dtype}\",\"shape\":[{}],\"data_offsets\":[{offset},{}]}}",
            dims_s.join(","),
            offset + bytes
        ));
        offset += bytes;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }

    let path = out.join("model.safetensors");
    let tmp = out.join("model.safetensors.tmp");
    let file = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut w = BufWriter::with_capacity(8 << 20, file);
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    let mut progress = Progress::start(&path, offset, s.layers, dtype);
    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (s.hidden as u64);
    let mut buf = Vec::with_capacity(8 << 20);
    for (name, dims) in &tensors {
        let n: usize = dims.iter().product();
        // Norm weights are ones; matrices are uniform with the variance of N(0, 0.02^2).
        let is_norm = name.ends_with("norm.weight");
        let mut left = n;
        while left > 0 {
            let m = left.min(1 << 20);
            buf.clear();
            for _ in 0..m {
                let x = if is_norm { 1.0f32 } else { next_weight(&mut rng) };
                match elem {
                    4 => buf.extend_from_slice(&x.to_le_bytes()),
                    _ if st_dtype == "BF16" => buf.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                    _ => buf.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()),
                }
            }
            w.write_all(&buf)?;
            left -= m;
            progress.add(m * elem);
        }
    }
    progress.finish(w)?;
    std::fs::rename(&tmp, &path)?;

    let (architecture, model_type, moe) = match s.experts {
        None => ("LlamaForCausalLM", "llama", String::new()),
        Some((e, k)) => (
            "MixtralForCausalLM",
            "mixtral",
            format!("\n  \"num_local_experts\": {e},\n  \"num_experts_per_tok\": {k},"),
        ),
    };
    let config = format!(
        r#"{{
  "architectures": ["{architecture}"],
  "model_type": "{model_type}",{moe}
  "vocab_size": {vocab},
  "hidden_size": {hidden},
  "intermediate_size": {inter},
  "num_hidden_layers": {layers},
  "num_attention_heads": {heads},
  "num_key_value_heads": {kv},
  "head_dim": {head_dim},
  "hidden_act": "silu",
  "max_position_embeddings": {maxpos},
  "rms_norm_eps": 1e-05,
  "rope_theta": {theta:.1},
  "rope_scaling": null,
  "tie_word_embeddings": {tie},
  "attention_bias": false,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "dtype": "{torch_dtype}"
}}
"#,
        vocab = s.vocab,
        hidden = s.hidden,
        inter = s.intermediate,
        layers = s.layers,
        heads = s.heads,
        kv = s.kv_heads,
        maxpos = s.max_positions,
        theta = s.rope_theta,
        tie = s.tie,
        torch_dtype = match dtype {
            "f32" => "float32",
            "f16" => "float16",
            _ => "bfloat16",
        },
    );
    std::fs::write(out.join("config.json"), config)?;
    eprintln!("wrote {} and config.json", path.display());
    Ok(path)
}

/// `general.file_type` (llama.cpp's `llama_ftype`) of a file whose matrices are all `dtype`.
fn file_type(dtype: DType) -> u32 {
    match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::Q4_0 => 2,
        DType::Q4_1 => 3,
        DType::Q8_0 => 7,
        // All-q4_k matrices are what llama.cpp calls Q4_K_S.
        DType::Q4K => 14,
        DType::Q6K => 18,
        DType::BF16 => 32,
    }
}

/// The seed of row `row` of tensor `tensor`: rows are generated independently (in parallel)
/// and the file is the same whatever the thread count.
fn row_seed(tensor: usize, row: usize) -> u64 {
    // splitmix64 of the pair, so that neighbouring rows get unrelated xorshift states.
    let mut z = ((tensor as u64) << 32 | row as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) | 1
}

/// Writes a llama-architecture GGUF of shape `s` with its matrices in `dtype` to `path`
/// (through `path.partial`, renamed when complete).
fn write_gguf(s: &ModelShape, dtype_name: &str, path: &Path) -> Result<()> {
    let Some(dtype) = DType::from_name(dtype_name) else {
        let names: Vec<&str> = DType::ALL.iter().map(|d| d.name()).collect();
        bail!("unsupported --dtype {dtype_name:?} for GGUF: expected one of {}", names.join(", "));
    };
    let infos: Vec<TensorInfo> = hf_tensors(s, Experts::Stacked)
        .into_iter()
        .map(|(hf, shape)| {
            let dtype = if shape.len() == 1 { DType::F32 } else { dtype };
            TensorInfo { name: gguf_name(&hf), shape, dtype }
        })
        .collect();
    for t in &infos {
        let k = t.shape[t.shape.len() - 1];
        ensure!(
            k.is_multiple_of(t.dtype.block_len()),
            "{}: rows of {k} elements are not whole {} blocks of {} (shape {} cannot be written as {})",
            t.name,
            t.dtype,
            t.dtype.block_len(),
            s.name,
            t.dtype
        );
    }

    let head_dim = s.hidden / s.heads;
    let vocab = gguf::vocab(s.vocab)?;
    let u32_of = |n: usize| Value::U32(u32::try_from(n).expect("model dimensions fit in u32"));
    let mut metadata = vec![
        ("general.architecture", Value::Str("llama".into())),
        ("general.name", Value::Str(format!("strata synth-model {} {dtype}", s.name))),
        ("general.file_type", Value::U32(file_type(dtype))),
        ("llama.vocab_size", u32_of(s.vocab)),
        ("llama.context_length", u32_of(s.max_positions)),
        ("llama.embedding_length", u32_of(s.hidden)),
        ("llama.block_count", u32_of(s.layers)),
        ("llama.feed_forward_length", u32_of(s.intermediate)),
        ("llama.attention.head_count", u32_of(s.heads)),
        ("llama.attention.head_count_kv", u32_of(s.kv_heads)),
        ("llama.rope.dimension_count", u32_of(head_dim)),
        ("llama.rope.freq_base", Value::F32(s.rope_theta as f32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", Value::Str("llama".into())),
        ("tokenizer.ggml.tokens", Value::StrArray(vocab.tokens)),
        ("tokenizer.ggml.scores", Value::F32Array(vocab.scores)),
        ("tokenizer.ggml.token_type", Value::I32Array(vocab.types)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
        ("tokenizer.ggml.add_eos_token", Value::Bool(false)),
    ];
    if let Some((e, k)) = s.experts {
        metadata.push(("llama.expert_count", u32_of(e)));
        metadata.push(("llama.expert_used_count", u32_of(k)));
    }

    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut tmp_name = path.file_name().context("the GGUF path names a file")?.to_owned();
    tmp_name.push(".partial");
    let tmp = path.with_file_name(tmp_name);
    let file = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut w = BufWriter::with_capacity(8 << 20, file);
    w.write_all(&gguf::header(&metadata, &infos))?;

    let mut progress = Progress::start(path, infos.iter().map(TensorInfo::bytes).sum(), s.layers, dtype);
    for (index, t) in infos.iter().enumerate() {
        let k = t.shape[t.shape.len() - 1];
        let rows = t.shape.iter().product::<usize>() / k;
        let row_bytes = t.bytes() / rows;
        if t.shape.len() == 1 {
            // Norm weights are ones, as in a freshly initialised model.
            let ones: Vec<u8> = std::iter::repeat_n(1f32.to_le_bytes(), k).flatten().collect();
            w.write_all(&ones)?;
        } else {
            // Rows in batches of about 16 MiB, each batch generated and quantized in parallel.
            let batch_rows = ((16 << 20) / row_bytes).max(1);
            let mut buf = Vec::new();
            for first in (0..rows).step_by(batch_rows) {
                let n = batch_rows.min(rows - first);
                buf.resize(n * row_bytes, 0);
                buf.par_chunks_mut(row_bytes).enumerate().try_for_each_init(
                    || vec![0f32; k],
                    |row, (i, dst)| {
                        let mut rng = row_seed(index, first + i);
                        row.iter_mut().for_each(|x| *x = next_weight(&mut rng));
                        strata_tensor::quant::quantize_row(t.dtype, row, dst)
                    },
                )?;
                w.write_all(&buf)?;
            }
        }
        gguf::pad(&mut w, t.bytes())?;
        progress.add(t.bytes());
    }
    progress.finish(w)?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixtral_shape_lists_experts_per_layout() {
        let mut s = SHAPES.iter().find(|s| s.name == "mixtral-8x7b").unwrap().clone();
        s.layers = 1;
        let stacked = hf_tensors(&s, Experts::Stacked);
        let names: Vec<String> = stacked.iter().map(|(n, _)| gguf_name(n)).collect();
        for want in ["blk.0.ffn_gate_inp.weight", "blk.0.ffn_gate_exps.weight", "blk.0.ffn_down_exps.weight"] {
            assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
        }
        let down = stacked.iter().find(|(n, _)| n.ends_with("experts.down_proj.weight")).unwrap();
        assert_eq!(down.1, [8, 4096, 14336]);
        let per_expert = hf_tensors(&s, Experts::PerExpert);
        assert_eq!(per_expert.iter().filter(|(n, _)| n.contains(".experts.")).count(), 24);
        assert!(per_expert.iter().any(|(n, _)| n == "model.layers.0.block_sparse_moe.experts.7.w2.weight"));
    }
}
