//! The real SmolLM2-135M-Instruct.Q4_1.gguf with one-digit activations (`--act-quant int8`,
//! [`strata::ActQuant::Int8`]) against transformers, on the prompts of `smollm2.rs`.
//!
//! One 8-bit digit per value is the rounding llama.cpp uses, and it moves SmolLM2's logits past
//! the 0.999 cosine that the default two digits keep: the fixture records that transformers
//! itself, with every linear layer's input rounded the same way, drifts to a minimum cosine of
//! 0.9968 (`checks.q8_activation_emulation` in expected.json), and strata's kernels, rounding the
//! same way, reach 0.9921 at their worst position (the chat prompt, decode path; 0.9989 and 0.9981
//! on the others). Which positions suffer most depends on where values fall near a rounding
//! boundary, so the emulation and the kernels, each one realization of the rounding, differ by as
//! much as their distance from 1. This mode is held to [`MIN_COSINE_INT8`] at every position, on
//! both paths, with the same argmax at the last position and " Paris" after "The capital of France
//! is". Its greedy continuations are printed, not checked: the rounding moves logits by about 1,
//! more than some of the reference's top-2 margins.
//!
//! The activation quantization is a process-wide choice, so these tests live in their own binary
//! (every test of it sets the same value). They skip, saying so, when the model is absent.

use strata::{ActQuant, LogitsMode, Model};
use strata_tests::smollm2::{self, Prompt, compare_logits, greedy};

/// The bound for one-digit activations: ten times the two-digit bound's distance from 1.
const MIN_COSINE_INT8: f64 = 0.99;

/// The model with one-digit activations in force (see `strata_tests::smollm2::model`).
fn model(test: &str) -> Option<(&'static Model, Vec<Prompt>)> {
    strata::set_act_quant(ActQuant::Int8);
    smollm2::model(test)
}

#[test]
fn int8_logits_stay_near_transformers() {
    let Some((model, prompts)) = model("int8_logits_stay_near_transformers") else { return };
    let failures: Vec<String> = prompts
        .iter()
        .flat_map(|p| {
            let mut f = compare_logits(model, p, LogitsMode::OnePass, MIN_COSINE_INT8);
            f.extend(compare_logits(model, p, LogitsMode::Decode, MIN_COSINE_INT8));
            f
        })
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn int8_still_knows_the_capital_of_france() {
    let Some((model, prompts)) = model("int8_still_knows_the_capital_of_france") else { return };
    let tok = model.tokenizer().unwrap();
    let prompt = tok.encode("The capital of France is", true).unwrap();
    let text = tok.decode(&greedy(model, &prompt, 8)).unwrap();
    assert!(text.starts_with(" Paris"), "greedy continuation {text:?}");
    for p in &prompts {
        let got = greedy(model, &p.ids, p.greedy_ids.len());
        let agree = got.iter().zip(&p.greedy_ids).take_while(|(a, b)| a == b).count();
        println!("{:>5}: greedy {:?}, {agree}/{} tokens as transformers", p.name, tok.decode(&got).unwrap(), got.len());
    }
}
