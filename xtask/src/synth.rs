//! `cargo xtask synth-model`: random-weight checkpoints with the shapes of real models, for
//! benchmarks. Fast and without Python: weights come from a xorshift generator and are streamed
//! to a safetensors file next to a config.json that transformers and strata both read.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};

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
    },
];

/// Writes a checkpoint of `shape` (optionally with only `layers` layers) in `dtype`
/// (f32, f16 or bf16) to `out`.
pub fn run(shape: &str, dtype: &str, layers: Option<usize>, out: &Path) -> Result<()> {
    let Some(base) = SHAPES.iter().find(|s| s.name == shape) else {
        let names: Vec<&str> = SHAPES.iter().map(|s| s.name).collect();
        bail!("unknown shape {shape:?}: expected one of {}", names.join(", "));
    };
    let mut s = base.clone();
    if let Some(n) = layers {
        anyhow::ensure!(n > 0, "--layers must be at least 1");
        s.layers = n;
    }
    let (st_dtype, elem) = match dtype {
        "f32" => ("F32", 4),
        "f16" => ("F16", 2),
        "bf16" => ("BF16", 2),
        other => bail!("unsupported --dtype {other:?} for safetensors: expected f32, f16 or bf16"),
    };
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;

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
        tensors.push((format!("{p}.mlp.gate_proj.weight"), vec![s.intermediate, s.hidden]));
        tensors.push((format!("{p}.mlp.up_proj.weight"), vec![s.intermediate, s.hidden]));
        tensors.push((format!("{p}.mlp.down_proj.weight"), vec![s.hidden, s.intermediate]));
    }
    tensors.push(("model.norm.weight".into(), vec![s.hidden]));
    if !s.tie {
        tensors.push(("lm_head.weight".into(), vec![s.vocab, s.hidden]));
    }

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
    let total = offset;
    eprintln!("writing {} ({:.2} GB, {} layers, {dtype})", path.display(), total as f64 / 1e9, s.layers);
    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (s.hidden as u64);
    let mut written = 0usize;
    let mut last_report = 0usize;
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
                let x = if is_norm {
                    1.0f32
                } else {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    ((rng >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * 0.0346
                };
                match elem {
                    4 => buf.extend_from_slice(&x.to_le_bytes()),
                    _ if st_dtype == "BF16" => buf.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                    _ => buf.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()),
                }
            }
            w.write_all(&buf)?;
            left -= m;
            written += m * elem;
            if written - last_report >= 256 << 20 {
                last_report = written;
                eprint!("\r  {:>5.1}%", 100.0 * written as f64 / total as f64);
            }
        }
    }
    w.flush()?;
    w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    eprintln!("\r  100.0%");
    std::fs::rename(&tmp, &path)?;

    let config = format!(
        r#"{{
  "architectures": ["LlamaForCausalLM"],
  "model_type": "llama",
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
    Ok(())
}
