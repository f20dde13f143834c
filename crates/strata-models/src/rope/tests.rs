//! RoPE tables against transformers' own numbers, and the per-request scaling's tables.
//!
//! The expected tables were printed by transformers 5.24's `ROPE_INIT_FUNCTIONS` (with the
//! sequence length as a tensor for `dynamic`, as its forward passes it) for a Llama config with
//! head_dim 16; see `xtask/fixtures/gen_fixtures.py` for the same computations on whole models.
//! They are kept as printed (f64 renderings of f32 values), hence the allowed precision lint.
#![allow(clippy::excessive_precision)]

use super::*;
use crate::config::RopeConfig;

/// A scheme with 16 rotated dimensions.
fn scheme(theta: f64, scaling: RopeScaling, max_position_embeddings: usize) -> RopeScheme {
    let cfg = RopeConfig { theta, partial_rotary_factor: 1.0, scaling };
    RopeScheme::new(&cfg, 16, max_position_embeddings).unwrap()
}

/// Asserts a table equals transformers' within a couple of f32 ulps (libm's and torch's `pow`
/// may round differently).
#[track_caller]
fn check(got: &RopeTable, inv_freq: &[f32], attention_factor: f64) {
    assert_eq!(got.inv_freq.len(), inv_freq.len());
    for (i, (g, w)) in got.inv_freq.iter().zip(inv_freq).enumerate() {
        assert!((g - w).abs() <= w.abs() * 3e-7, "inv_freq[{i}]: {g} vs transformers {w}\n{:?}", got.inv_freq);
    }
    assert_eq!(got.attention_factor, attention_factor as f32);
}

/// YaRN with the default betas, attention factor and truncation.
fn yarn(factor: f64, original: usize) -> RopeScaling {
    yarn_with(factor, original, |_| {})
}

/// YaRN with `edit` applied to the defaults.
fn yarn_with(factor: f64, original: usize, edit: impl FnOnce(&mut YarnParams)) -> RopeScaling {
    let mut p = YarnParams {
        attention_factor: None,
        beta_fast: 32.0,
        beta_slow: 1.0,
        mscale: None,
        mscale_all_dim: None,
        truncate: true,
    };
    edit(&mut p);
    RopeScaling::Yarn {
        factor,
        original_max_position_embeddings: original,
        attention_factor: p.attention_factor,
        beta_fast: p.beta_fast,
        beta_slow: p.beta_slow,
        mscale: p.mscale,
        mscale_all_dim: p.mscale_all_dim,
        truncate: p.truncate,
    }
}

/// The optional YaRN parameters.
struct YarnParams {
    attention_factor: Option<f64>,
    beta_fast: f64,
    beta_slow: f64,
    mscale: Option<f64>,
    mscale_all_dim: Option<f64>,
    truncate: bool,
}

fn betas(p: &mut YarnParams) {
    (p.beta_fast, p.beta_slow) = (4.0, 0.25);
}

#[test]
fn linear_matches_transformers() {
    let s = scheme(10000.0, RopeScaling::Linear { factor: 2.5 }, 32);
    #[rustfmt::skip]
    let want = [0.4000000059604645, 0.12649109959602356, 0.03999999910593033, 0.012649111449718475,
        0.003999999724328518, 0.0012649111449718475, 0.0004000000189989805, 0.0001264911115868017];
    check(&s.table(5), &want, 1.0);
    assert!(!s.is_length_dependent());
}

#[test]
fn dynamic_ntk_matches_transformers_and_keeps_short_sequences_plain() {
    let s = scheme(10000.0, RopeScaling::Dynamic { factor: 2.0 }, 32);
    #[rustfmt::skip]
    let want = [1.0, 0.2864149510860443, 0.08203353732824326, 0.023495633155107498, 0.00672950129956007,
        0.001927429810166359, 0.000552044773939997, 0.00015811389312148094];
    check(&s.table(48), &want, 1.0);
    assert_eq!(s.table(32), s.table(1));
    assert_eq!(s.table(1).inv_freq, default_inv_freq(10000.0, 16));
    assert!(s.is_length_dependent());

    let s = scheme(500.0, RopeScaling::Dynamic { factor: 3.0 }, 32);
    #[rustfmt::skip]
    let want = [1.0, 0.3456708490848541, 0.11948832124471664, 0.04130363091826439, 0.014277460984885693,
        0.004935301840305328, 0.0017059899400919676, 0.0005897109513171017];
    check(&s.table(100), &want, 1.0);
}

#[test]
fn yarn_matches_transformers() {
    let betas = yarn_with(3.0, 16, betas);
    #[rustfmt::skip]
    let want = [1.0, 0.24595491588115692, 0.0555555559694767, 0.010540924966335297, 0.0033333334140479565,
        0.0010540926596149802, 0.00033333332976326346, 0.00010540925723034889];
    check(&scheme(10000.0, betas, 64).table(3), &want, 1.109861228866811);

    let mscale = yarn_with(4.0, 16, |p| {
        (p.mscale, p.mscale_all_dim, p.truncate) = (Some(0.8), Some(0.6), false);
    });
    #[rustfmt::skip]
    let want = [1.0, 0.20976001024246216, 0.06007028743624687, 0.02944554202258587, 0.014433755539357662,
        0.007075208239257336, 0.0034681595861911774, 0.0017000391380861402];
    check(&scheme(300.0, mscale, 64).table(3), &want, 1.0255968048489137);

    let explicit = yarn_with(2.0, 32, |p| p.attention_factor = Some(1.3));
    #[rustfmt::skip]
    let want = [1.0, 0.23717081546783447, 0.05000000074505806, 0.015811389312148094, 0.004999999888241291,
        0.0015811389312148094, 0.0005000000237487257, 0.00015811389312148094];
    check(&scheme(10000.0, explicit, 64).table(3), &want, 1.3);
}

#[test]
fn llama3_matches_transformers() {
    let s = scheme(
        10000.0,
        RopeScaling::Llama3 {
            factor: 4.0,
            original_max_position_embeddings: 16,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
        },
        64,
    );
    #[rustfmt::skip]
    let want = [0.6366197466850281, 0.07905694097280502, 0.02500000037252903, 0.007905694656074047,
        0.0024999999441206455, 0.0007905694656074047, 0.0002500000118743628, 7.905694656074047e-05];
    check(&s.table(1000), &want, 1.0);
    assert_eq!(s.trained_context(), 16);
}

#[test]
fn longrope_picks_factors_by_length_and_matches_transformers() {
    let s = scheme(
        10000.0,
        RopeScaling::LongRope {
            short_factor: (0..8).map(|i| 1.0 + 0.1 * i as f64).collect(),
            long_factor: (0..8).map(|i| 1.0 + 0.5 * i as f64).collect(),
            factor: None,
            original_max_position_embeddings: 16,
            attention_factor: None,
        },
        64,
    );
    // factor = 64 / 16 = 4, attention factor sqrt(1 + ln 4 / ln 16) at every length.
    let af = 1.224744871391589;
    #[rustfmt::skip]
    let short = [1.0, 0.2874797582626343, 0.0833333358168602, 0.024325214326381683, 0.0071428571827709675,
        0.0021081853192299604, 0.0006249999860301614, 0.0001860163320088759];
    #[rustfmt::skip]
    let long = [1.0, 0.21081849932670593, 0.05000000074505806, 0.012649111449718475, 0.0033333334140479565,
        0.0009035079274326563, 0.0002500000118743628, 7.027283572824672e-05];
    check(&s.table(1), &short, af);
    check(&s.table(16), &short, af);
    check(&s.table(17), &long, af);
    assert!(s.is_length_dependent());
}

#[test]
fn bad_factor_lists_are_refused() {
    let cfg = RopeConfig {
        theta: 10000.0,
        partial_rotary_factor: 1.0,
        scaling: RopeScaling::LongRope {
            short_factor: vec![1.0; 7],
            long_factor: vec![1.0; 8],
            factor: None,
            original_max_position_embeddings: 16,
            attention_factor: None,
        },
    };
    let err = RopeScheme::new(&cfg, 16, 64).unwrap_err().to_string();
    assert!(err.contains("short_factor has 7 entries for 8"), "{err}");
    let divisors = RopeConfig { scaling: RopeScaling::FreqDivisors { divisors: vec![1.0, 0.0] }, ..cfg.clone() };
    assert!(RopeScheme::new(&divisors, 4, 64).is_err());
    let dynamic = RopeConfig { scaling: RopeScaling::Dynamic { factor: 2.0 }, ..cfg };
    assert!(RopeScheme::new(&dynamic, 2, 64).is_err());
}

#[test]
fn freq_divisors_divide_the_default_table() {
    let s = scheme(10000.0, RopeScaling::FreqDivisors { divisors: vec![1.0, 2.0, 4.0, 8.0, 1.0, 1.0, 1.0, 3.0] }, 64);
    let plain = default_inv_freq(10000.0, 16);
    let t = s.table(7);
    assert_eq!(t.inv_freq[0], plain[0]);
    assert_eq!(t.inv_freq[3], plain[3] / 8.0);
    assert_eq!(t.inv_freq[7], plain[7] / 3.0);
}

#[test]
fn context_scaling_is_plain_within_base_capacity() {
    let checkpoint = scheme(10000.0, RopeScaling::Linear { factor: 4.0 }, 32);
    let plain = RopeTable { inv_freq: default_inv_freq(10000.0, 16), attention_factor: 1.0 };
    for algorithm in ScalingAlgorithm::ALL {
        let s = checkpoint.with_context_scaling(Some(ContextScaling::new(algorithm, 32, 128))).unwrap();
        if algorithm.is_dynamic() || algorithm == ScalingAlgorithm::None {
            assert_eq!(s.table(1), plain, "{algorithm}");
            assert_eq!(s.table(32), plain, "{algorithm}");
        }
        if algorithm != ScalingAlgorithm::None {
            assert_ne!(s.table(128), plain, "{algorithm}");
        }
        assert_eq!(s.is_length_dependent(), algorithm.is_dynamic(), "{algorithm}");
        assert_eq!(s.max_capacity(), Some(128));
    }
    // Dropping the override gives the checkpoint's scaling back.
    let back = checkpoint.with_context_scaling(None).unwrap();
    assert_eq!(back, checkpoint);
}

#[test]
fn context_scaling_equals_the_transformers_type_it_names() {
    let checkpoint = scheme(10000.0, RopeScaling::Default, 32);
    let with = |algorithm, max| checkpoint.with_context_scaling(Some(ContextScaling::new(algorithm, 32, max))).unwrap();

    // Static yarn to 3x: transformers' yarn with factor 3 and original 32.
    let want = scheme(10000.0, yarn(3.0, 32), 32).table(5);
    assert_eq!(with(ScalingAlgorithm::Yarn, 96).table(5), want);
    // yarn-dynamic at 80 tokens: factor 2.5.
    let want = scheme(10000.0, yarn(2.5, 32), 32).table(80);
    assert_eq!(with(ScalingAlgorithm::YarnDynamic, 1000).table(80), want);
    // ntk-dynamic at 80 tokens: transformers' dynamic with factor 1 and max_position_embeddings 32.
    let want = scheme(10000.0, RopeScaling::Dynamic { factor: 1.0 }, 32).table(80);
    assert_eq!(with(ScalingAlgorithm::NtkDynamic, 1000).table(80), want);
    // Linear to 2x, and llama3 to 4x with Meta's frequency factors.
    let want = scheme(10000.0, RopeScaling::Linear { factor: 2.0 }, 32).table(1);
    assert_eq!(with(ScalingAlgorithm::Linear, 64).table(1), want);
    let llama3 = RopeScaling::Llama3 {
        factor: 4.0,
        original_max_position_embeddings: 32,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
    };
    assert_eq!(with(ScalingAlgorithm::Llama3, 128).table(1), scheme(10000.0, llama3, 32).table(1));
}

#[test]
fn context_yarn_keeps_the_checkpoints_yarn_parameters() {
    let checkpoint = scheme(10000.0, yarn_with(8.0, 16, betas), 128);
    assert_eq!(checkpoint.trained_context(), 16);
    let s = checkpoint.with_context_scaling(Some(ContextScaling::new(ScalingAlgorithm::YarnDynamic, 16, 64))).unwrap();
    let want = scheme(10000.0, yarn_with(2.0, 16, betas), 128);
    assert_eq!(s.table(32), want.table(32));
}

#[test]
fn capacities_are_enforced() {
    let s = scheme(10000.0, RopeScaling::Default, 32);
    assert!(s.check_fits(1 << 40).is_ok());
    let bad = s.with_context_scaling(Some(ContextScaling::new(ScalingAlgorithm::Linear, 64, 32)));
    assert!(matches!(bad, Err(Error::InvalidContextScaling { .. })));
    let s = s.with_context_scaling(Some(ContextScaling::new(ScalingAlgorithm::YarnDynamic, 32, 100))).unwrap();
    assert!(s.check_fits(100).is_ok());
    assert!(matches!(s.check_fits(101), Err(Error::ContextTooLong { tokens: 101, max_capacity: 100 })));
}

#[test]
fn rerotation_between_equal_tables_is_the_identity() {
    let t = scheme(10000.0, yarn(2.0, 16), 64).table(1);
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    rerotation(&t, &t, 0..50, &mut cos, &mut sin);
    assert_eq!(cos.len(), 50 * 8);
    assert!(cos.iter().all(|&c| c == 1.0) && sin.iter().all(|&s| s == 0.0));
}
