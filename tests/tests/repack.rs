//! Weights the CPU kernels read repacked (q4_0 and q4_k, `Decoder::repack_for_cpu`, which the
//! facade applies to every CPU model loaded from its checkpoint) give the same logits, bit for
//! bit, as the GGUF blocks they come from: one pass, token by token, and through the facade.

use strata::{LoadOptions, LogitsMode, Model};
use strata_models::tensor::DType;
use strata_models::{Decoder, Logits};
use strata_tests::{Fixture, GgufDtypes, write_gguf};

fn logits(d: &Decoder, ids: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let mut cache = d.new_cache();
    let one_pass = d.forward(ids, &mut cache, Logits::All).unwrap();
    let mut cache = d.new_cache();
    let decode = ids.iter().flat_map(|&id| d.forward(&[id], &mut cache, Logits::Last).unwrap()).collect();
    (one_pass, decode)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn repacked_q4_0_weights_give_the_same_logits_bit_for_bit() {
    // llama_untied: hidden 64, so every projection but down (intermediate 48) is in q4_0 (q4_k's
    // blocks of 256 are too long for these rows).
    let f = Fixture::load("llama_untied");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model-q4_0.gguf");
    write_gguf(&f, GgufDtypes::Uniform(DType::Q4_0), |_| {}, &path);
    let spec = path.to_string_lossy().to_string();
    let plain = strata_models::load(&spec).unwrap().decoder;
    let mut repacked = strata_models::load(&spec).unwrap().decoder;
    // q, k, v, o, gate and up of both layers.
    assert_eq!(repacked.repack_for_cpu().unwrap(), 12);
    // A prompt long enough for the quantized GEMM (16 rows and more) as well as the matvecs.
    let ids: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 128).collect();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let (want, got) = pool.install(|| (logits(&plain, &ids), logits(&repacked, &ids)));
    assert_eq!(bits(&want.0), bits(&got.0), "one pass");
    assert_eq!(bits(&want.1), bits(&got.1), "token by token");

    // The facade repacks on load: the same logits again.
    let model = Model::from_pretrained(&path, LoadOptions { threads: Some(2), ..LoadOptions::default() }).unwrap();
    assert_eq!(bits(&model.logits(&ids, LogitsMode::OnePass).unwrap()), bits(&want.0));
}
