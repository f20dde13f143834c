//! Fuzzes `strata_models::safetensors::parse_header`, which must return an error rather than
//! panic on any bytes, and must uphold the invariants tensor reads rely on whenever it accepts.
//!
//! Each input is tried twice: as a whole file, and as header JSON wrapped in a correct 8-byte
//! length prefix with a 64-byte data section behind it, so that mutations reach the JSON
//! validation instead of mostly failing the length check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_models::ByteCount;
use strata_models::safetensors::parse_header;

/// The data section length given to wrapped inputs.
const DATA_LEN: usize = 64;

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut file = (data.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(data);
    file.resize(file.len() + DATA_LEN, 0);
    check(&file);
});

/// Parses `bytes`; when the header is accepted, checks its invariants.
fn check(bytes: &[u8]) {
    let Ok(header) = parse_header(bytes) else { return };
    assert_eq!(header.data_start() + header.data_len(), bytes.len());
    let mut ranges = Vec::new();
    for t in header.tensors() {
        assert!(t.begin <= t.end && t.end <= header.data_len(), "{t:?}");
        assert_eq!(t.dtype.bytes_for(t.numel() as u64), ByteCount::Exact(t.byte_len() as u64), "{t:?}");
        if t.begin < t.end {
            ranges.push((t.begin, t.end));
        }
    }
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        assert!(w[0].1 <= w[1].0, "overlapping ranges accepted: {w:?}");
    }
}
