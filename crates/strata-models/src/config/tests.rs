//! Tests for config.json parsing: representative configs of each family in both RoPE
//! spellings, the per-family defaults, and the errors.

use serde_json::{Value, json};

use super::*;

/// `base` with top-level keys set (`Value::Null` writes an explicit null) and others removed.
fn patched(base: &Value, set: &[(&str, Value)], remove: &[&str]) -> String {
    let mut v = base.clone();
    let obj = v.as_object_mut().unwrap();
    for (k, val) in set {
        obj.insert((*k).to_owned(), val.clone());
    }
    for k in remove {
        obj.remove(*k);
    }
    v.to_string()
}

fn parse_ok(json: &str) -> ModelConfig {
    ModelConfig::from_json_str(json).unwrap_or_else(|e| panic!("{e}\n{json}"))
}

fn parse_err(json: &str) -> ConfigError {
    ModelConfig::from_json_str(json).expect_err("config must be rejected")
}

/// Llama 3.2 1B as saved by transformers 4.x: legacy `rope_theta` + `rope_scaling`.
fn llama32_legacy() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": false,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "max_position_embeddings": 131072,
        "mlp_bias": false,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 16,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3"
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": true,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0",
        "use_cache": true,
        "vocab_size": 128256
    })
}

/// The same model as transformers 5 writes it: `rope_parameters`, `dtype`.
fn llama32_v5() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": false,
        "bos_token_id": 128000,
        "dtype": "bfloat16",
        "eos_token_id": [128001, 128008, 128009],
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "max_position_embeddings": 131072,
        "mlp_bias": false,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 16,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_parameters": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_theta": 500000.0,
            "rope_type": "llama3"
        },
        "tie_word_embeddings": true,
        "transformers_version": "5.0.0",
        "use_cache": true,
        "vocab_size": 128256
    })
}

/// Mistral 7B v0.1 (legacy spelling, 4096-token sliding window).
fn mistral_v01() -> Value {
    json!({
        "architectures": ["MistralForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "model_type": "mistral",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "vocab_size": 32000
    })
}

/// Qwen2.5 0.5B (legacy spelling; sliding window configured but disabled).
fn qwen25() -> Value {
    json!({
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": 896,
        "initializer_range": 0.02,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "max_window_layers": 21,
        "model_type": "qwen2",
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": null,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": true,
        "torch_dtype": "bfloat16",
        "use_cache": true,
        "use_sliding_window": false,
        "vocab_size": 151936
    })
}

/// Qwen3 0.6B as transformers 5 writes it: head_dim 128 != 1024 / 16.
fn qwen3_v5() -> Value {
    json!({
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "dtype": "bfloat16",
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "layer_types": ["full_attention", "full_attention", "full_attention", "full_attention"],
        "max_position_embeddings": 40960,
        "max_window_layers": 28,
        "model_type": "qwen3",
        "num_attention_heads": 16,
        "num_hidden_layers": 4,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "sliding_window": null,
        "tie_word_embeddings": true,
        "use_cache": true,
        "use_sliding_window": false,
        "vocab_size": 151936
    })
}

#[test]
fn llama32_legacy_spelling() {
    let c = parse_ok(&llama32_legacy().to_string());
    assert_eq!(c.family, Family::Llama);
    assert_eq!((c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers), (128256, 2048, 8192, 16));
    assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim), (32, 8, 64));
    assert_eq!((c.kv_group_size(), c.q_dim(), c.kv_dim()), (4, 2048, 512));
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.attention_bias, AttentionBias { qkv: false, o: false });
    assert!(!c.mlp_bias && !c.qk_norm);
    assert_eq!(c.sliding_windows, vec![None; 16]);
    assert_eq!(c.max_position_embeddings, 131072);
    assert_eq!(c.dtype, Some(DType::BF16));
    assert_eq!(c.bos_token_id, Some(128000));
    assert_eq!(c.eos_token_ids, [128001, 128008, 128009]);
    assert_eq!(c.hidden_act, "silu");
    assert_eq!(
        c.rope,
        RopeConfig {
            theta: 500000.0,
            partial_rotary_factor: 1.0,
            scaling: RopeScaling::Llama3 {
                factor: 32.0,
                original_max_position_embeddings: 8192,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0
            }
        }
    );
    assert_eq!(c.moe, MoeConfig::default());
}

#[test]
fn llama32_both_spellings_agree() {
    assert_eq!(parse_ok(&llama32_legacy().to_string()), parse_ok(&llama32_v5().to_string()));
}

#[test]
fn llama_defaults_and_biases() {
    // TinyLlama-like: no head_dim, one eos id, default RoPE, biases switched on.
    let json = patched(
        &llama32_legacy(),
        &[
            ("hidden_size", json!(2048)),
            ("num_attention_heads", json!(32)),
            ("num_key_value_heads", json!(4)),
            ("eos_token_id", json!(2)),
            ("attention_bias", json!(true)),
            ("mlp_bias", json!(true)),
            ("rope_scaling", Value::Null),
            ("rope_theta", json!(10000.0)),
        ],
        &["head_dim", "tie_word_embeddings", "torch_dtype", "max_position_embeddings", "rms_norm_eps"],
    );
    let c = parse_ok(&json);
    assert_eq!(c.head_dim, 64);
    assert_eq!(c.eos_token_ids, [2]);
    assert_eq!(c.attention_bias, AttentionBias { qkv: true, o: true });
    assert!(c.mlp_bias);
    assert!(!c.tie_word_embeddings, "LlamaConfig defaults tie_word_embeddings to false");
    assert_eq!(c.dtype, None);
    assert_eq!(c.max_position_embeddings, 2048);
    assert_eq!(c.rms_norm_eps, 1e-6);
    assert_eq!(c.rope, RopeConfig { theta: 10000.0, partial_rotary_factor: 1.0, scaling: RopeScaling::Default });

    // Absent special tokens take LlamaConfig's defaults; explicit nulls mean none.
    let c = parse_ok(&patched(&llama32_legacy(), &[], &["bos_token_id", "eos_token_id", "num_key_value_heads"]));
    assert_eq!((c.bos_token_id, c.eos_token_ids.as_slice(), c.num_key_value_heads), (Some(1), &[2u32][..], 32));
    let c = parse_ok(&patched(&llama32_legacy(), &[("bos_token_id", Value::Null), ("eos_token_id", Value::Null)], &[]));
    assert_eq!((c.bos_token_id, c.eos_token_ids.as_slice()), (None, &[][..]));
    // A null head_dim means "derive it"; so does a missing one.
    let c = parse_ok(&patched(&llama32_legacy(), &[("head_dim", Value::Null)], &[]));
    assert_eq!(c.head_dim, 64);
    // Only model_type or architectures is needed.
    let c = parse_ok(&patched(&llama32_legacy(), &[], &["model_type"]));
    assert_eq!((c.family, c.model_type.as_str()), (Family::Llama, ""));
}

#[test]
fn mistral_sliding_window() {
    let c = parse_ok(&mistral_v01().to_string());
    assert_eq!(c.family, Family::Mistral);
    assert_eq!(c.sliding_windows, vec![Some(4096); 32]);
    assert_eq!(c.attention_bias, AttentionBias::default());
    assert_eq!((c.head_dim, c.bos_token_id, c.eos_token_ids.as_slice()), (128, Some(1), &[2u32][..]));

    // Mistral v0.3 disables the window with an explicit null.
    let c = parse_ok(&patched(&mistral_v01(), &[("sliding_window", Value::Null)], &[]));
    assert_eq!(c.sliding_windows, vec![None; 32]);
    // MistralConfig's default window applies when the key is absent.
    let c = parse_ok(&patched(&mistral_v01(), &[], &["sliding_window", "max_position_embeddings"]));
    assert_eq!(c.sliding_windows, vec![Some(4096); 32]);
    assert_eq!(c.max_position_embeddings, 131072);
    // Mistral's attention has no biases whatever the config says.
    let c = parse_ok(&patched(&mistral_v01(), &[("attention_bias", json!(true))], &[]));
    assert_eq!(c.attention_bias, AttentionBias::default());

    // The same model in transformers 5 spelling.
    let v5 = patched(
        &mistral_v01(),
        &[("rope_parameters", json!({"rope_type": "default", "rope_theta": 10000.0})), ("dtype", json!("bfloat16"))],
        &["rope_theta", "torch_dtype"],
    );
    assert_eq!(parse_ok(&v5), parse_ok(&mistral_v01().to_string()));
}

#[test]
fn qwen2_biases_and_windows() {
    let c = parse_ok(&qwen25().to_string());
    assert_eq!(c.family, Family::Qwen2);
    assert_eq!(c.attention_bias, AttentionBias { qkv: true, o: false });
    assert_eq!((c.head_dim, c.num_key_value_heads), (64, 2));
    assert!(c.tie_word_embeddings);
    assert_eq!(c.sliding_windows, vec![None; 24], "use_sliding_window is false");
    assert_eq!(c.rope.theta, 1e6);
    assert_eq!(c.rope.scaling, RopeScaling::Default);
    assert_eq!((c.bos_token_id, c.eos_token_ids.as_slice()), (Some(151643), &[151645u32][..]));

    // With use_sliding_window, layers from max_window_layers on slide.
    let json = patched(
        &qwen25(),
        &[
            ("use_sliding_window", json!(true)),
            ("sliding_window", json!(64)),
            ("max_window_layers", json!(2)),
            ("num_hidden_layers", json!(4)),
        ],
        &[],
    );
    assert_eq!(parse_ok(&json).sliding_windows, [None, None, Some(64), Some(64)]);

    // transformers 5 writes layer_types explicitly, and they win over max_window_layers.
    let json = patched(
        &qwen25(),
        &[
            ("use_sliding_window", json!(true)),
            ("sliding_window", json!(64)),
            ("num_hidden_layers", json!(3)),
            ("layer_types", json!(["sliding_attention", "full_attention", "sliding_attention"])),
        ],
        &[],
    );
    assert_eq!(parse_ok(&json).sliding_windows, [Some(64), None, Some(64)]);
    // But without use_sliding_window there is no window to apply.
    let json = patched(
        &qwen25(),
        &[
            ("num_hidden_layers", json!(2)),
            ("layer_types", json!(["sliding_attention", "full_attention"])),
            ("sliding_window", json!(64)),
        ],
        &[],
    );
    assert_eq!(parse_ok(&json).sliding_windows, [None, None]);

    let err = parse_err(&patched(&qwen25(), &[("layer_types", json!(["full_attention"]))], &[]));
    assert!(matches!(err, ConfigError::InvalidField { field: "layer_types", .. }), "{err}");
    let err = parse_err(&patched(
        &qwen25(),
        &[("num_hidden_layers", json!(1)), ("layer_types", json!(["chunked_attention"]))],
        &[],
    ));
    assert!(err.to_string().contains("chunked_attention"), "{err}");
}

#[test]
fn qwen3_head_dim_and_qk_norm() {
    let c = parse_ok(&qwen3_v5().to_string());
    assert_eq!(c.family, Family::Qwen3);
    assert_eq!((c.hidden_size, c.num_attention_heads, c.head_dim), (1024, 16, 128));
    assert_eq!((c.q_dim(), c.kv_dim()), (2048, 1024));
    assert!(c.qk_norm);
    assert_eq!(c.attention_bias, AttentionBias { qkv: false, o: false });
    assert_eq!(c.sliding_windows, vec![None; 4]);
    assert_eq!(c.rope, RopeConfig { theta: 1e6, partial_rotary_factor: 1.0, scaling: RopeScaling::Default });
    assert_eq!(c.dtype, Some(DType::BF16));

    // Qwen3Config's head_dim default is 128, not hidden / heads.
    let c = parse_ok(&patched(&qwen3_v5(), &[("hidden_size", json!(512))], &["head_dim"]));
    assert_eq!(c.head_dim, 128);
    // attention_bias covers all four projections.
    let c = parse_ok(&patched(&qwen3_v5(), &[("attention_bias", json!(true))], &[]));
    assert_eq!(c.attention_bias, AttentionBias { qkv: true, o: true });

    // The legacy spelling of the same model.
    let legacy = patched(
        &qwen3_v5(),
        &[("rope_theta", json!(1000000.0)), ("rope_scaling", Value::Null), ("torch_dtype", json!("bfloat16"))],
        &["rope_parameters", "dtype", "layer_types"],
    );
    assert_eq!(parse_ok(&legacy), parse_ok(&qwen3_v5().to_string()));
}

/// Parses `rope` (a legacy `rope_scaling` dict with `theta` beside it, or a transformers 5
/// `rope_parameters` dict holding `rope_theta`) on a Llama base, and checks both give `want`.
fn check_rope(scaling: Value, theta: f64, want: RopeScaling) {
    let legacy = patched(&llama32_legacy(), &[("rope_scaling", scaling.clone()), ("rope_theta", json!(theta))], &[]);
    let mut params = scaling.clone();
    let obj = params.as_object_mut().unwrap();
    if let Some(t) = obj.remove("type") {
        obj.insert("rope_type".into(), t);
    }
    obj.insert("rope_theta".into(), json!(theta));
    let v5 = patched(&llama32_v5(), &[("rope_parameters", params)], &[]);
    for json in [legacy, v5] {
        let c = parse_ok(&json);
        assert_eq!(c.rope.theta, theta);
        assert_eq!(c.rope.scaling, want, "{json}");
        assert_eq!(c.rope.scaling.rope_type(), want.rope_type());
    }
}

#[test]
fn rope_types_in_both_spellings() {
    check_rope(json!({"type": "linear", "factor": 2.0}), 10000.0, RopeScaling::Linear { factor: 2.0 });
    check_rope(json!({"rope_type": "dynamic", "factor": 4}), 10000.0, RopeScaling::Dynamic { factor: 4.0 });
    check_rope(json!({"type": "default"}), 20000.0, RopeScaling::Default);
    // YaRN with defaults: original_max_position_embeddings falls back to
    // max_position_embeddings (131072 in the base), betas to 32 and 1, truncate to true.
    check_rope(
        json!({"type": "yarn", "factor": 4.0}),
        1e6,
        RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: 131072,
            attention_factor: None,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: None,
            mscale_all_dim: None,
            truncate: true,
        },
    );
    check_rope(
        json!({
            "rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
            "attention_factor": 1.2, "beta_fast": 16, "beta_slow": 2, "mscale": 1.0,
            "mscale_all_dim": 0.707, "truncate": false
        }),
        10000.0,
        RopeScaling::Yarn {
            factor: 40.0,
            original_max_position_embeddings: 4096,
            attention_factor: Some(1.2),
            beta_fast: 16.0,
            beta_slow: 2.0,
            mscale: Some(1.0),
            mscale_all_dim: Some(0.707),
            truncate: false,
        },
    );
    check_rope(
        json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}),
        500000.0,
        RopeScaling::Llama3 {
            factor: 8.0,
            original_max_position_embeddings: 8192,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
        },
    );
    check_rope(
        json!({"type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2, 3.5],
               "original_max_position_embeddings": 4096}),
        10000.0,
        RopeScaling::LongRope {
            short_factor: vec![1.0, 1.5],
            long_factor: vec![2.0, 3.5],
            factor: None,
            original_max_position_embeddings: 4096,
            attention_factor: None,
        },
    );
}

#[test]
fn rope_normalisation_rules() {
    // No RoPE keys at all: default RoPE with transformers' default theta.
    let c = parse_ok(&patched(&llama32_legacy(), &[], &["rope_scaling", "rope_theta"]));
    assert_eq!(c.rope, RopeConfig { theta: 10000.0, partial_rotary_factor: 1.0, scaling: RopeScaling::Default });

    // A non-empty legacy rope_scaling wins over rope_parameters, as in transformers 5.
    let both = patched(&llama32_v5(), &[("rope_scaling", json!({"type": "linear", "factor": 2.0}))], &[]);
    let c = parse_ok(&both);
    assert_eq!(c.rope.scaling, RopeScaling::Linear { factor: 2.0 });
    assert_eq!(c.rope.theta, 10000.0, "the winning dict has no rope_theta and the config no top-level one");

    // A top-level original_max_position_embeddings takes priority (Phi-3 style).
    let json = patched(&llama32_legacy(), &[("original_max_position_embeddings", json!(4096))], &[]);
    assert!(matches!(parse_ok(&json).rope.scaling, RopeScaling::Llama3 { original_max_position_embeddings: 4096, .. }));

    // partial_rotary_factor, in the dict or at the top level.
    let json = patched(&llama32_legacy(), &[("partial_rotary_factor", json!(0.5))], &[]);
    let c = parse_ok(&json);
    assert_eq!((c.rope.partial_rotary_factor, c.rope.rotary_dim(c.head_dim)), (0.5, 32));
    let json = patched(
        &llama32_v5(),
        &[("rope_parameters", json!({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}))],
        &[],
    );
    assert_eq!(parse_ok(&json).rope.rotary_dim(64), 16);
}

#[test]
fn yarn_null_factor_is_the_ratio_of_the_context_lengths() {
    // transformers' `_compute_yarn_parameters`: factor None -> max_position_embeddings / original
    // (DeepSeek-V3 style); an absent factor stays an error (see rope_errors).
    let rope = json!({"rope_type": "yarn", "factor": null, "original_max_position_embeddings": 8192});
    let json = patched(&llama32_legacy(), &[("rope_scaling", rope)], &[]);
    match parse_ok(&json).rope.scaling {
        RopeScaling::Yarn { factor, original_max_position_embeddings: 8192, .. } => assert_eq!(factor, 16.0),
        other => panic!("expected yarn, got {other:?}"),
    }
}

#[test]
fn rope_errors() {
    let check = |rope: Value, want: &str| {
        let legacy = patched(&llama32_legacy(), &[("rope_scaling", rope.clone())], &[]);
        let v5 = patched(&llama32_v5(), &[("rope_parameters", rope)], &["rope_scaling"]);
        for json in [legacy, v5] {
            let err = parse_err(&json);
            assert!(matches!(err, ConfigError::Rope { .. }), "{err:?}");
            assert!(err.to_string().contains(want), "{err} does not contain {want:?}");
        }
    };
    check(json!({"type": "linear"}), "missing required parameter `factor`");
    check(json!({"rope_type": "dynamic", "factor": null}), "missing required parameter `factor`");
    check(json!({"rope_type": "yarn"}), "missing required parameter `factor`");
    check(json!({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}), "`low_freq_factor`");
    check(json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}), "`high_freq_factor`");
    check(json!({"rope_type": "longrope", "long_factor": [1.0]}), "`short_factor`");
    check(json!({"rope_type": "longrope", "short_factor": [1.0], "long_factor": "x"}), "list of numbers");
    check(json!({"rope_type": "linear", "factor": "2"}), "expected a number");
    check(json!({"rope_type": "linear", "factor": 0}), "must be positive");
    check(json!({"rope_type": "yarn", "factor": 2, "truncate": 1}), "expected a boolean");
    check(json!({"rope_type": "su", "factor": 2}), "unknown rope_type; known: default, linear, dynamic");
    check(json!({"rope_type": 3}), "rope_type is not a string");
    check(json!({"rope_type": "default", "rope_theta": 0.5}), "rope_theta");
    check(json!({"rope_type": "default", "partial_rotary_factor": 1.5}), "partial_rotary_factor");
    check(json!({"full_attention": {"rope_type": "default"}}), "per-layer-type");
}

#[test]
fn unsupported_architectures_are_named() {
    let err = parse_err(&patched(
        &llama32_legacy(),
        &[("model_type", json!("gemma2")), ("architectures", json!(["Gemma2ForCausalLM"]))],
        &[],
    ));
    assert_eq!(
        err,
        ConfigError::UnsupportedArchitecture {
            found: "model_type \"gemma2\" (architectures: Gemma2ForCausalLM)".into(),
            supported: vec!["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe"],
        }
    );
    assert_eq!(
        err.to_string(),
        "unsupported architecture model_type \"gemma2\" (architectures: Gemma2ForCausalLM); \
         supported: llama, mistral, qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe"
    );
    // MoE families are supported.
    let c = ModelConfig::from_json_str(&patched(&mistral_v01(), &[("model_type", json!("mixtral"))], &[])).unwrap();
    assert_eq!(c.family, Family::Mixtral);
    // Neither key.
    let err = parse_err(&patched(&llama32_legacy(), &[], &["model_type", "architectures"]));
    assert!(err.to_string().contains("no model_type"), "{err}");
    assert!(Family::ALL.iter().all(|f| f.is_supported()));
}

#[test]
fn moe_fields_are_parsed() {
    let mixtral = patched(
        &mistral_v01(),
        &[
            ("model_type", json!("mixtral")),
            ("architectures", json!(["MixtralForCausalLM"])),
            ("num_local_experts", json!(8)),
            ("num_experts_per_tok", json!(2)),
            ("router_aux_loss_coef", json!(0.02)),
            ("router_jitter_noise", json!(0.0)),
            ("sliding_window", Value::Null),
        ],
        &[],
    );
    let c = parse(&mixtral, &Family::ALL).unwrap();
    assert_eq!(c.family, Family::Mixtral);
    assert!(c.family.is_moe() && c.family.is_supported());
    assert_eq!((c.moe.num_experts, c.moe.num_experts_per_tok), (Some(8), Some(2)));
    assert_eq!((c.moe.router_aux_loss_coef, c.moe.router_jitter_noise), (Some(0.02), Some(0.0)));
    assert_eq!(c.sliding_windows, vec![None; 32]);

    let qwen2_moe = patched(
        &qwen25(),
        &[
            ("model_type", json!("qwen2_moe")),
            ("architectures", json!(["Qwen2MoeForCausalLM"])),
            ("num_experts", json!(60)),
            ("num_experts_per_tok", json!(4)),
            ("moe_intermediate_size", json!(1408)),
            ("shared_expert_intermediate_size", json!(5632)),
            ("decoder_sparse_step", json!(1)),
            ("mlp_only_layers", json!([])),
            ("norm_topk_prob", json!(false)),
        ],
        &[],
    );
    let c = parse(&qwen2_moe, &Family::ALL).unwrap();
    assert_eq!(c.family, Family::Qwen2Moe);
    assert_eq!(c.attention_bias, AttentionBias { qkv: true, o: false });
    assert_eq!(
        c.moe,
        MoeConfig {
            num_experts: Some(60),
            num_experts_per_tok: Some(4),
            moe_intermediate_size: Some(1408),
            shared_expert_intermediate_size: Some(5632),
            decoder_sparse_step: Some(1),
            mlp_only_layers: vec![],
            norm_topk_prob: Some(false),
            router_aux_loss_coef: None,
            router_jitter_noise: None,
        }
    );

    let qwen3_moe = patched(
        &qwen3_v5(),
        &[
            ("model_type", json!("qwen3_moe")),
            ("num_experts", json!(128)),
            ("num_experts_per_tok", json!(8)),
            ("moe_intermediate_size", json!(768)),
            ("mlp_only_layers", json!([0, 3])),
            ("norm_topk_prob", json!(true)),
        ],
        &[],
    );
    let c = parse(&qwen3_moe, &Family::ALL).unwrap();
    assert_eq!(c.family, Family::Qwen3Moe);
    assert!(c.qk_norm);
    assert_eq!((c.moe.num_experts, c.moe.mlp_only_layers.as_slice()), (Some(128), &[0usize, 3][..]));
}

#[test]
fn field_errors() {
    let err = parse_err(&patched(&llama32_legacy(), &[], &["vocab_size"]));
    assert_eq!(err, ConfigError::MissingField { field: "vocab_size" });
    let err = parse_err(&patched(&llama32_legacy(), &[("hidden_size", Value::Null)], &[]));
    assert_eq!(err, ConfigError::MissingField { field: "hidden_size" });
    let err = parse_err(&patched(&llama32_legacy(), &[("num_key_value_heads", json!(5))], &[]));
    assert!(matches!(err, ConfigError::InvalidField { field: "num_key_value_heads", .. }), "{err}");
    let err = parse_err(&patched(&llama32_legacy(), &[("hidden_size", json!(100))], &["head_dim"]));
    assert!(matches!(err, ConfigError::InvalidField { field: "head_dim", .. }), "{err}");
    let err = parse_err(&patched(&llama32_legacy(), &[("torch_dtype", json!("float8"))], &[]));
    assert!(matches!(err, ConfigError::InvalidField { field: "torch_dtype", .. }), "{err}");
    let err = parse_err(&patched(&llama32_legacy(), &[("num_hidden_layers", json!(0))], &[]));
    assert!(matches!(err, ConfigError::InvalidField { field: "num_hidden_layers", .. }), "{err}");
    let err = parse_err(&patched(&llama32_legacy(), &[("vocab_size", json!("many"))], &[]));
    assert!(matches!(&err, ConfigError::InvalidJson { what } if what.contains("line")), "{err}");
    assert!(matches!(parse_err("{"), ConfigError::InvalidJson { .. }));
    assert!(matches!(parse_err("[]"), ConfigError::InvalidJson { .. }));
}

#[test]
fn reading_a_file_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, qwen3_v5().to_string()).unwrap();
    assert_eq!(ModelConfig::from_dir(dir.path()).unwrap().family, Family::Qwen3);

    std::fs::write(&path, patched(&qwen3_v5(), &[("model_type", json!("gpt2"))], &[])).unwrap();
    let err = ModelConfig::from_file(&path).unwrap_err();
    assert!(matches!(&err, Error::Config { path: p, .. } if p == &path));
    assert!(err.to_string().starts_with(&path.display().to_string()), "{err}");

    let err = ModelConfig::from_dir(dir.path().join("missing")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
}
