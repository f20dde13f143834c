//! Fuzz target: `strata_models::gguf::parse_header` on arbitrary bytes.
//!
//! The parser must never panic, never allocate from an unchecked count, and whatever it accepts
//! must be consistent: every tensor of a known type lies inside the input, shapes agree with the
//! GGUF dimensions, the data section is aligned, and every metadata key finds its own value.
//! Each tensor of a supported dtype is then built over the input the way `GgufFile::tensor`
//! does, which must succeed.
//! Seed corpus: the small GGUF files in tests/fixtures/gguf_tokenizer/.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use strata_models::gguf::parse_header;
use strata_tensor::{ByteSource, Tensor};

fuzz_target!(|data: &[u8]| {
    let Ok(header) = parse_header(data) else { return };
    assert!(header.alignment().is_power_of_two());
    assert_eq!(header.data_offset() % header.alignment(), 0);
    for info in header.tensors() {
        assert!((1..=4).contains(&info.dims().len()));
        let shape = info.shape();
        assert_eq!(shape.iter().map(|&d| d as u64).product::<u64>(), info.numel());
        assert_eq!(header.tensor_info(info.name()), Some(info));
        let start = header.data_offset() + info.offset();
        assert!(start <= data.len() as u64);
        if let Some(len) = info.byte_len() {
            assert!(start + len <= data.len() as u64);
        }
    }
    let source: Arc<dyn ByteSource> = Arc::new(data.to_vec());
    for info in header.tensors() {
        let (Some(dtype), Some(len)) = (info.dtype(), info.byte_len()) else { continue };
        let start = (header.data_offset() + info.offset()) as usize;
        let tensor = Tensor::from_source(source.clone(), start, len as usize, dtype, info.shape()).unwrap();
        assert_eq!(tensor.cpu_bytes().unwrap().len() as u64, len);
    }
    let metadata = header.metadata();
    for (key, value) in metadata.entries() {
        // By identity: a float value may be NaN, which equals nothing.
        assert!(metadata.get(key).is_some_and(|found| std::ptr::eq(found, value)));
    }
});
