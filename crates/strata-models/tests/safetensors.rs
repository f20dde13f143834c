//! Tests for the safetensors reader: well-formed single and sharded checkpoints, one test per
//! malformed-input failure (each must give its typed error naming the file and tensor, never a
//! panic), and a property test that the header parser is total.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use strata_models::safetensors::{self, Checkpoint, SafeDType, SafetensorsFile, parse_header};
use strata_models::{ByteCount, Error, HeaderError};
use strata_tensor::DType;

/// A safetensors file from raw header text and data bytes, without any validation, so tests
/// can write malformed files.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// One tensor for [`well_formed`]: name, dtype string, shape, little-endian bytes.
type Entry<'a> = (&'a str, &'a str, &'a [usize], Vec<u8>);

/// A well-formed file: tensors laid out back to back in the given order, the header padded
/// with spaces so that the data section starts at `8 + header_len` with `header_len % 8 ==
/// pad_to_remainder` (0 for the usual 8-byte alignment).
fn well_formed(entries: &[Entry<'_>], metadata: Option<&str>, pad_to_remainder: usize) -> Vec<u8> {
    let mut fields = Vec::new();
    if let Some(m) = metadata {
        fields.push(format!("\"__metadata__\":{m}"));
    }
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in entries {
        let begin = data.len();
        data.extend_from_slice(bytes);
        fields.push(format!(
            "\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":{shape:?},\"data_offsets\":[{begin},{}]}}",
            data.len()
        ));
    }
    let mut header = format!("{{{}}}", fields.join(","));
    while header.len() % 8 != pad_to_remainder {
        header.push(' ');
    }
    raw_file(&header, &data)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u16_bytes(v: &[u16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes `bytes` to `dir/name` and returns the path.
fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Opens `bytes` as `model.safetensors` in a fresh directory and returns the error, checking
/// that its message names the file.
fn open_error(bytes: &[u8]) -> Error {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "model.safetensors", bytes);
    let err = Checkpoint::open(dir.path()).expect_err("malformed file must not open");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "error does not name the file: {msg}");
    err
}

/// The header error of a malformed file, through both the pure parser and the file reader.
fn header_error(bytes: &[u8]) -> HeaderError {
    let pure = parse_header(bytes).expect_err("malformed header must not parse");
    match open_error(bytes) {
        Error::Header { error, .. } => {
            assert_eq!(error, pure);
            error
        }
        other => panic!("expected a header error, got {other:?}"),
    }
}

fn sample_entries() -> Vec<Entry<'static>> {
    vec![
        ("a.f32", "F32", &[2, 3], f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])),
        // f16: 1.0, 2.0, -0.5
        ("b.f16", "F16", &[3], u16_bytes(&[0x3C00, 0x4000, 0xB800])),
        // bf16: 1.0, 0.5
        ("c.bf16", "BF16", &[1, 2], u16_bytes(&[0x3F80, 0x3F00])),
        ("d.i64", "I64", &[2], [7i64, -1].iter().flat_map(|x| x.to_le_bytes()).collect()),
    ]
}

#[test]
fn single_file_checkpoint_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let meta = r#"{"format":"pt"}"#;
    write(dir.path(), "model.safetensors", &well_formed(&sample_entries(), Some(meta), 0));
    let ckpt = Checkpoint::open(dir.path()).unwrap();

    assert_eq!(ckpt.path(), dir.path());
    assert_eq!(ckpt.tensor_names().collect::<Vec<_>>(), ["a.f32", "b.f16", "c.bf16", "d.i64"]);
    assert_eq!(ckpt.files().len(), 1);
    assert_eq!(ckpt.files()[0].header().metadata().get("format").map(String::as_str), Some("pt"));

    let a = ckpt.tensor("a.f32").unwrap();
    assert_eq!(a.dtype(), DType::F32);
    assert_eq!(a.shape().dims(), &[2, 3]);
    assert_eq!(a.as_f32().unwrap(), &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);

    let b = ckpt.tensor("b.f16").unwrap();
    assert_eq!(b.dtype(), DType::F16);
    assert_eq!(b.to_f32_vec().unwrap(), [1.0, 2.0, -0.5]);
    assert_eq!(ckpt.tensor_f32_vec("c.bf16").unwrap(), [1.0, 0.5]);

    let info = ckpt.info("d.i64").unwrap();
    assert_eq!((info.dtype, info.shape.as_slice(), info.byte_len()), (SafeDType::I64, &[2usize][..], 16));
    assert_eq!(ckpt.files()[0].tensor_bytes("d.i64").unwrap().len(), 16);
}

#[test]
fn tensors_are_views_of_the_mapped_file() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "model.safetensors", &well_formed(&sample_entries(), None, 0));
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let first = ckpt.tensor("a.f32").unwrap();
    let second = ckpt.tensor("a.f32").unwrap();
    assert_eq!(first.cpu_bytes().unwrap().as_ptr(), second.cpu_bytes().unwrap().as_ptr());
    // The aligned accessor returns the same view when it is already aligned.
    let aligned = ckpt.tensor_aligned("a.f32").unwrap();
    assert_eq!(aligned.cpu_bytes().unwrap().as_ptr(), first.cpu_bytes().unwrap().as_ptr());
}

#[test]
fn misaligned_f32_tensors_have_an_aligned_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let values = [1.5f32, -2.0, 3.25, 4.0];
    // The data section starts at 8 + header_len with header_len % 8 == 2: not 4-aligned.
    let entries = vec![("w", "F32", &[2usize, 2][..], f32_bytes(&values))];
    write(dir.path(), "model.safetensors", &well_formed(&entries, None, 2));
    let ckpt = Checkpoint::open(dir.path()).unwrap();

    let view = ckpt.tensor("w").unwrap();
    assert!(view.as_f32().is_err(), "a misaligned view cannot be read as &[f32] in place");
    let aligned = ckpt.tensor_aligned("w").unwrap();
    assert_eq!(aligned.as_f32().unwrap(), &values);
    assert_eq!(ckpt.tensor_f32_vec("w").unwrap(), values);
}

#[test]
fn known_but_unsupported_dtype_fails_only_when_requested() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "model.safetensors", &well_formed(&sample_entries(), None, 0));
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert!(ckpt.tensor("a.f32").is_ok());
    let err = ckpt.tensor("d.i64").unwrap_err();
    match &err {
        Error::UnsupportedDType { path: p, tensor, dtype } => {
            assert_eq!((p, tensor.as_str(), *dtype), (&path, "d.i64", SafeDType::I64));
        }
        other => panic!("expected UnsupportedDType, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("d.i64") && msg.contains("I64") && msg.contains(&path.display().to_string()), "{msg}");
}

#[test]
fn truncated_file() {
    for len in [0, 1, 7] {
        assert_eq!(header_error(&vec![0u8; len]), HeaderError::Truncated { len });
    }
}

#[test]
fn header_length_past_eof() {
    let mut bytes = raw_file("{}", &[]);
    bytes[..8].copy_from_slice(&3u64.to_le_bytes());
    assert_eq!(header_error(&bytes), HeaderError::HeaderPastEof { header_len: 3, file_len: 10 });

    let mut huge = raw_file("{}", &[]);
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(header_error(&huge), HeaderError::HeaderTooLarge { header_len: u64::MAX, .. }));
}

#[test]
fn invalid_json() {
    for header in ["{\"a\": ", "not json", "[1, 2]", "{\"a\": {}} trailing", "\"string\""] {
        assert!(matches!(header_error(&raw_file(header, &[])), HeaderError::InvalidJson { .. }), "{header}");
    }
    // Invalid UTF-8 inside a string.
    let mut bytes = raw_file("{\"\u{e9}\":1}", &[]);
    bytes[10] = 0xFF;
    assert!(matches!(header_error(&bytes), HeaderError::InvalidJson { .. }));
}

#[test]
fn offsets_outside_the_data_section() {
    let header = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    let err = header_error(&raw_file(header, &[0u8; 8]));
    assert_eq!(
        err,
        HeaderError::OutOfBounds { tensor: "w".into(), begin: 4, end: 12, data_len: 8, data_start: 8 + header.len() }
    );
    assert!(err.to_string().contains("tensor w"));

    let header = r#"{"w":{"dtype":"F32","shape":[],"data_offsets":[18446744073709551615,18446744073709551615]}}"#;
    assert!(matches!(header_error(&raw_file(header, &[0u8; 4])), HeaderError::OutOfBounds { .. }));
}

#[test]
fn begin_after_end() {
    let header = r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#;
    assert_eq!(
        header_error(&raw_file(header, &[0u8; 8])),
        HeaderError::BeginAfterEnd { tensor: "w".into(), begin: 4, end: 0 }
    );
}

#[test]
fn overlapping_tensors() {
    let header = r#"{
        "a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
        "b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}
    }"#;
    let err = header_error(&raw_file(header, &[0u8; 12]));
    assert_eq!(
        err,
        HeaderError::Overlap { tensor: "b".into(), begin: 4, end: 12, other: "a".into(), other_begin: 0, other_end: 8 }
    );

    // A tensor nested inside a longer one, listed after a third that starts later.
    let header = r#"{
        "big":{"dtype":"U8","shape":[10],"data_offsets":[0,10]},
        "inner":{"dtype":"U8","shape":[2],"data_offsets":[6,8]},
        "mid":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}
    }"#;
    let err = header_error(&raw_file(header, &[0u8; 10]));
    assert!(matches!(&err, HeaderError::Overlap { tensor, other, .. } if tensor == "mid" && other == "big"), "{err}");

    // Empty tensors overlap nothing, even at the same offset as another tensor.
    let header = r#"{
        "a":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},
        "b":{"dtype":"F32","shape":[1, 0],"data_offsets":[4,4]},
        "c":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}
    }"#;
    let header = parse_header(&raw_file(header, &[0u8; 8])).unwrap();
    assert_eq!(header.len(), 3);
}

#[test]
fn unknown_dtype() {
    for dtype in ["F31", "f32", "Q4_0", ""] {
        let header = format!(r#"{{"w":{{"dtype":"{dtype}","shape":[1],"data_offsets":[0,4]}}}}"#);
        assert_eq!(
            header_error(&raw_file(&header, &[0u8; 4])),
            HeaderError::UnknownDType { tensor: "w".into(), dtype: dtype.into() }
        );
    }
}

#[test]
fn shape_times_dtype_size_mismatch() {
    let header = r#"{"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,8]}}"#;
    assert_eq!(
        header_error(&raw_file(header, &[0u8; 8])),
        HeaderError::SizeMismatch {
            tensor: "w".into(),
            shape: vec![2, 3],
            dtype: SafeDType::BF16,
            expected: ByteCount::Exact(12),
            got: 8
        }
    );
    // Sub-byte dtypes need a whole number of bytes.
    let header = r#"{"w":{"dtype":"F4","shape":[3],"data_offsets":[0,1]}}"#;
    let err = header_error(&raw_file(header, &[0u8; 1]));
    assert!(matches!(err, HeaderError::SizeMismatch { expected: ByteCount::Fractional, .. }), "{err}");
    // Element counts that overflow are rejected, zero dimension or not.
    let dims = "[4294967296,4294967296,4294967296]";
    let header = format!(r#"{{"w":{{"dtype":"U8","shape":{dims},"data_offsets":[0,0]}}}}"#);
    assert!(matches!(header_error(&raw_file(&header, &[])), HeaderError::InvalidEntry { .. }));
    let header = format!(r#"{{"w":{{"dtype":"U8","shape":[0,{}],"data_offsets":[0,0]}}}}"#, &dims[1..dims.len() - 1]);
    assert!(matches!(header_error(&raw_file(&header, &[])), HeaderError::InvalidEntry { .. }));
}

#[test]
fn malformed_entries_and_metadata() {
    let check = |header: &str, want: &str| {
        let err = header_error(&raw_file(header, &[0u8; 4]));
        assert!(err.to_string().contains(want), "{header}: {err}");
        err
    };
    check(r#"{"w":{"shape":[1],"data_offsets":[0,4]}}"#, "missing dtype");
    check(r#"{"w":{"dtype":"F32","data_offsets":[0,4]}}"#, "missing shape");
    check(r#"{"w":{"dtype":"F32","shape":[1]}}"#, "missing data_offsets");
    check(r#"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#, "not a non-negative integer");
    check(r#"{"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}}"#, "not a non-negative integer");
    check(r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}}"#, "expected 2");
    check(r#"{"w":{"dtype":7,"shape":[1],"data_offsets":[0,4]}}"#, "expected a string");
    check(r#"{"w":[1]}"#, "expected an object");
    let err = check(r#"{"__metadata__":{"k":1}}"#, "__metadata__");
    assert!(matches!(err, HeaderError::InvalidMetadata { .. }));
    let err = check(
        r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
        "duplicate",
    );
    assert_eq!(err, HeaderError::DuplicateEntry { name: "w".into() });
    assert_eq!(err.tensor(), Some("w"));
}

#[test]
fn missing_tensor() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "model.safetensors", &well_formed(&sample_entries(), None, 0));
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let err = ckpt.tensor("model.norm.weight").unwrap_err();
    assert!(matches!(&err, Error::TensorNotFound { tensor, .. } if tensor == "model.norm.weight"));
    assert_eq!(err.to_string(), format!("tensor model.norm.weight not found in checkpoint {}", dir.path().display()));
    assert!(!ckpt.contains("model.norm.weight"));
}

/// A sharded checkpoint: `a` and `b` in shard 1, `c` in shard 2.
fn write_sharded(dir: &Path, index: &str) {
    let one = vec![("a", "F32", &[2usize][..], f32_bytes(&[1.0, 2.0])), ("b", "F32", &[1usize][..], f32_bytes(&[3.0]))];
    let two = vec![("c", "BF16", &[2usize][..], u16_bytes(&[0x3F80, 0x4000]))];
    write(dir, "model-00001-of-00002.safetensors", &well_formed(&one, None, 0));
    write(dir, "model-00002-of-00002.safetensors", &well_formed(&two, None, 0));
    write(dir, safetensors::INDEX_FILE, index.as_bytes());
}

const INDEX: &str = r#"{
    "metadata": {"total_size": 16},
    "weight_map": {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00001-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors"
    }
}"#;

#[test]
fn sharded_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    write_sharded(dir.path(), INDEX);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ckpt.files().len(), 2);
    assert_eq!(ckpt.index_path(), Some(dir.path().join(safetensors::INDEX_FILE).as_path()));
    assert_eq!(ckpt.tensor_names().collect::<Vec<_>>(), ["a", "b", "c"]);
    assert_eq!(ckpt.tensor_f32_vec("a").unwrap(), [1.0, 2.0]);
    assert_eq!(ckpt.tensor("b").unwrap().as_f32().unwrap(), &[3.0]);
    assert_eq!(ckpt.tensor_f32_vec("c").unwrap(), [1.0, 2.0]);
    assert!(ckpt.file_of("c").unwrap().path().ends_with("model-00002-of-00002.safetensors"));
    let err = ckpt.tensor("d").unwrap_err();
    assert_eq!(err.to_string(), format!("tensor d not found in checkpoint {}", dir.path().display()));
}

#[test]
fn sharded_index_pointing_to_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let index = INDEX.replace("model-00002-of-00002", "model-00002-of-00003");
    write_sharded(dir.path(), &index);
    let err = Checkpoint::open(dir.path()).unwrap_err();
    match &err {
        Error::MissingShard { index, shard, tensor } => {
            assert_eq!(index, &dir.path().join(safetensors::INDEX_FILE));
            assert_eq!(shard, &dir.path().join("model-00002-of-00003.safetensors"));
            assert_eq!(tensor, "c");
        }
        other => panic!("expected MissingShard, got {other:?}"),
    }
    assert!(err.to_string().contains("model-00002-of-00003.safetensors"), "{err}");
}

#[test]
fn sharded_index_listing_a_tensor_absent_from_its_shard() {
    let dir = tempfile::tempdir().unwrap();
    let index = INDEX.replace(r#""c": "model-00002"#, r#""z": "model-00002"#).replace(r#""b": "#, r#""c": "#);
    write_sharded(dir.path(), &index);
    let err = Checkpoint::open(dir.path()).unwrap_err();
    match &err {
        Error::TensorNotInShard { shard, tensor, .. } => {
            assert!(shard.ends_with("model-00001-of-00002.safetensors"));
            assert_eq!(tensor, "c");
        }
        other => panic!("expected TensorNotInShard, got {other:?}"),
    }
}

#[test]
fn malformed_shard_index() {
    let check = |index: &str, want: &str| {
        let dir = tempfile::tempdir().unwrap();
        write_sharded(dir.path(), index);
        let err = Checkpoint::open(dir.path()).unwrap_err();
        assert!(matches!(err, Error::Index { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(safetensors::INDEX_FILE) && msg.contains(want), "{msg}");
    };
    check("{", "not valid JSON");
    check(r#"{"metadata": {}}"#, "missing weight_map");
    check(r#"{"weight_map": []}"#, "expected an object");
    check(r#"{"weight_map": {"a": 3}}"#, "tensor a");
    check(r#"{"weight_map": {"a": "../model-00001-of-00002.safetensors"}}"#, "not a file name");
    check(r#"{"weight_map": {"a": "/etc/passwd"}}"#, "not a file name");
}

#[test]
fn a_broken_shard_names_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    write_sharded(dir.path(), INDEX);
    let shard = write(dir.path(), "model-00002-of-00002.safetensors", &[1, 2, 3]);
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(&err, Error::Header { path, error: HeaderError::Truncated { len: 3 } } if path == &shard));
}

#[test]
fn directories_without_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(&err, Error::NoCheckpoint { dir: d } if d == dir.path()), "{err:?}");
    let err = Checkpoint::open(dir.path().join("nope")).unwrap_err();
    assert!(matches!(&err, Error::Io { .. }), "{err:?}");
}

#[test]
fn a_single_file_opens_directly() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "weights.safetensors", &well_formed(&sample_entries(), None, 0));
    let file = SafetensorsFile::open(&path).unwrap();
    assert_eq!(file.header().len(), 4);
    let ckpt = Checkpoint::open(&path).unwrap();
    assert_eq!(ckpt.path(), path);
    let err = ckpt.tensor("x").unwrap_err();
    assert_eq!(err.to_string(), format!("tensor x not found in checkpoint {}", path.display()));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any mutation of a valid file parses or fails cleanly, and a header that parses upholds
    /// the invariants tensor reads rely on.
    #[test]
    fn parse_header_is_total(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = well_formed(&sample_entries(), Some(r#"{"k":"v"}"#), 0);
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        if let Ok(header) = parse_header(&bytes) {
            prop_assert_eq!(header.data_start() + header.data_len(), bytes.len());
            let mut ranges = Vec::new();
            for t in header.tensors() {
                prop_assert!(t.begin <= t.end && t.end <= header.data_len());
                prop_assert_eq!(t.dtype.bytes_for(t.numel() as u64), ByteCount::Exact(t.byte_len() as u64));
                if t.begin < t.end {
                    ranges.push((t.begin, t.end));
                }
            }
            ranges.sort();
            for w in ranges.windows(2) {
                prop_assert!(w[0].1 <= w[1].0);
            }
        }
    }
}
