//! Tests of the offload pack: round trips, reuse, invalidation, damage, conversion, locking and
//! a build killed midway by SIGKILL.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use strata_tensor::DType;
use strata_tensor::quant::{dequantize_row, quantize_row};

use super::lock::LockFile;
use super::*;

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Values in [-1, 1).
    fn f32s(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0).collect()
    }
}

/// A tensor that owns its bytes, from which the borrowed specs are made.
struct Owned {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    data: Vec<u8>,
}

struct OwnedUnit {
    name: String,
    tensors: Vec<Owned>,
}

fn tensor(name: &str, dtype: DType, shape: &[usize], data: Vec<u8>) -> Owned {
    Owned { name: name.to_owned(), dtype, shape: shape.to_vec(), data }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn specs(units: &[OwnedUnit]) -> Vec<UnitSpec<'_>> {
    units
        .iter()
        .map(|u| UnitSpec {
            name: u.name.clone(),
            tensors: u
                .tensors
                .iter()
                .map(|t| TensorSpec { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone(), data: &t.data })
                .collect(),
        })
        .collect()
}

/// Units with a mix of dtypes and awkward sizes, so that every alignment gap is exercised.
fn mixed_units(seed: u64, n: usize) -> Vec<OwnedUnit> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|i| OwnedUnit {
            name: format!("layers.{i}.attention"),
            tensors: vec![
                tensor("norm", DType::F32, &[33], rng.bytes(33 * 4)),
                tensor("wq", DType::BF16, &[16, 40 + i], rng.bytes(16 * (40 + i) * 2)),
                tensor("wk", DType::Q4K, &[2, 256], rng.bytes(2 * 144)),
                tensor("bias", DType::F16, &[3], rng.bytes(6)),
            ],
        })
        .collect()
}

/// `n` units of `rows` x 256 f32 values each (`rows` KiB per unit).
fn big_units(seed: u64, n: usize, rows: usize) -> Vec<OwnedUnit> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|i| OwnedUnit {
            name: format!("layers.{i}.mlp"),
            tensors: vec![
                tensor("up", DType::F32, &[rows / 2, 256], rng.bytes(rows / 2 * 1024)),
                tensor("down", DType::F32, &[rows - rows / 2, 256], rng.bytes((rows - rows / 2) * 1024)),
            ],
        })
        .collect()
}

/// A stand-in checkpoint file in `dir` (the key reads only its path, length and time).
fn checkpoint(dir: &Path) -> PathBuf {
    let path = dir.join("model.safetensors");
    fs::write(&path, b"not really a checkpoint").unwrap();
    path
}

fn key_for(file: &Path, convert: Option<DType>) -> SourceKey {
    SourceKey::for_files(&[file.to_owned()], "test-layout", convert).unwrap()
}

fn no_progress(_: &Progress) {}

/// Checks that `pack` holds exactly `units`, byte for byte, with zero padding.
fn assert_holds(pack: &Pack, units: &[OwnedUnit]) {
    assert_eq!(pack.manifest().units.len(), units.len());
    for (i, u) in units.iter().enumerate() {
        assert_eq!(pack.unit_index(&u.name), Some(i));
        let pu = &pack.manifest().units[i];
        let bytes = pack.read_unit(i).unwrap();
        assert_eq!(bytes.len() as u64, pu.padded_len());
        assert_eq!(pu.tensors.len(), u.tensors.len());
        for t in &u.tensors {
            let pt = pu.tensor(&t.name).unwrap();
            assert_eq!(pt.dtype, t.dtype.name(), "{}.{}", u.name, t.name);
            assert_eq!(pt.shape, t.shape);
            assert!(bytes.as_slice()[pt.range()] == t.data[..], "{}.{} differs", u.name, t.name);
        }
        assert!(bytes.as_slice()[pu.len as usize..].iter().all(|&b| b == 0), "{}: padding is not zero", u.name);
    }
    // The open handle, which outlives a removal of the file by a rebuild.
    assert_eq!(pack.file.metadata().unwrap().len(), pack.manifest().data_len);
}

fn assert_aligned(manifest: &PackManifest) {
    for u in &manifest.units {
        assert_eq!(u.offset % UNIT_ALIGN, 0, "unit {}", u.name);
        for t in &u.tensors {
            assert_eq!(t.offset % TENSOR_ALIGN, 0, "{}.{}", u.name, t.name);
        }
    }
    assert_eq!(manifest.check(), Ok(()));
}

#[test]
fn build_open_and_read_back_every_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let key = key_for(&checkpoint(tmp.path()), None);
    let offload = tmp.path().join("offload");
    let units = mixed_units(1, 5);
    let mut calls = Vec::new();
    let pack =
        ensure_pack(&offload, &key, &specs(&units), &PackOptions::default(), &mut |p| calls.push(p.clone())).unwrap();
    assert_eq!(pack.origin(), &PackOrigin::Built { reason: InvalidPack::Absent });
    assert_eq!(pack.dir(), offload.join(key.digest()));
    assert_eq!(pack.data_path(), offload.join(key.digest()).join(DATA_FILE));
    assert_aligned(pack.manifest());
    assert_holds(&pack, &units);
    assert_eq!(pack.unit_index("layers.9.attention"), None);
    assert!(matches!(pack.read_unit(5), Err(Error::UnitIndex { index: 5, count: 5 })));

    // Progress: every unit reported, never backwards, ending at the total.
    let total = pack.manifest().data_len;
    for u in &units {
        assert!(calls.iter().any(|p| p.unit == u.name), "no progress for {}", u.name);
    }
    assert!(calls.windows(2).all(|w| w[0].done_bytes <= w[1].done_bytes));
    assert!(calls.iter().all(|p| p.total_bytes == total));
    assert_eq!(calls.last().unwrap().done_bytes, total);

    // A second handle through `open` sees the same pack, and no temporary files are left.
    let reopened = Pack::open(&offload, &key).unwrap().unwrap();
    assert_eq!(reopened.manifest(), pack.manifest());
    assert_eq!(reopened.origin(), &PackOrigin::Opened);
    assert_holds(&reopened, &units);
    assert!(!pack.dir().join(DATA_TMP).exists() && !pack.dir().join(MANIFEST_TMP).exists());
}

#[test]
fn an_existing_pack_is_reused_without_rewriting() {
    let tmp = tempfile::tempdir().unwrap();
    let key = key_for(&checkpoint(tmp.path()), None);
    let units = mixed_units(2, 3);
    let first = ensure_pack(tmp.path(), &key, &specs(&units), &PackOptions::default(), &mut no_progress).unwrap();
    let before = fs::metadata(first.data_path()).unwrap();
    let manifest_before = fs::metadata(first.dir().join(MANIFEST_FILE)).unwrap();

    let mut calls = 0;
    let second = ensure_pack(tmp.path(), &key, &specs(&units), &PackOptions::default(), &mut |_| calls += 1).unwrap();
    assert_eq!(second.origin(), &PackOrigin::Opened);
    assert_eq!(calls, 0);
    let after = fs::metadata(second.data_path()).unwrap();
    assert_eq!((after.ino(), after.mtime(), after.mtime_nsec()), (before.ino(), before.mtime(), before.mtime_nsec()));
    let manifest_after = fs::metadata(second.dir().join(MANIFEST_FILE)).unwrap();
    assert_eq!(manifest_after.ino(), manifest_before.ino());
    assert_holds(&second, &units);
}

#[test]
fn the_digest_follows_the_source() {
    let tmp = tempfile::tempdir().unwrap();
    let file = checkpoint(tmp.path());
    let other = tmp.path().join("model-2.safetensors");
    fs::write(&other, b"shard two").unwrap();
    let key = key_for(&file, None);
    let digest = key.digest();
    assert_eq!(digest.len(), 32);
    assert!(SourceKey::is_digest_name(Path::new(&digest)));

    // The same inputs give the same digest; the order of the files does not matter.
    assert_eq!(key_for(&file, None).digest(), digest);
    let ab = SourceKey::for_files(&[file.clone(), other.clone()], "x", None).unwrap();
    let ba = SourceKey::for_files(&[other.clone(), file.clone()], "x", None).unwrap();
    assert_eq!(ab.digest(), ba.digest());
    assert_eq!(ab.files().len(), 2);

    // Every component of the key changes it.
    assert_ne!(SourceKey::for_files(std::slice::from_ref(&file), "other", None).unwrap().digest(), digest);
    assert_ne!(key_for(&file, Some(DType::Q8_0)).digest(), digest);
    assert_ne!(ab.digest(), digest);
    let old_mtime = fs::metadata(&file).unwrap().modified().unwrap();
    fs::File::options().write(true).open(&file).unwrap().set_modified(old_mtime - Duration::from_secs(60)).unwrap();
    let touched = key_for(&file, None);
    assert_ne!(touched.digest(), digest);
    fs::write(&file, b"not really a checkpoint, longer").unwrap();
    fs::File::options().write(true).open(&file).unwrap().set_modified(old_mtime - Duration::from_secs(60)).unwrap();
    let longer = key_for(&file, None);
    assert_ne!(longer.digest(), touched.digest());
    assert_eq!(longer.files()[0].len, 31);

    assert!(matches!(SourceKey::for_files(&[], "", None), Err(Error::NoSourceFiles)));
    assert!(matches!(SourceKey::for_files(&[tmp.path().join("missing")], "", None), Err(Error::Io { .. })));
}

#[test]
fn a_changed_checkpoint_gets_a_new_pack_and_the_old_one_goes() {
    let tmp = tempfile::tempdir().unwrap();
    let file = checkpoint(tmp.path());
    let offload = tmp.path().join("offload");
    let units = mixed_units(3, 2);
    let old = ensure_pack(&offload, &key_for(&file, None), &specs(&units), &PackOptions::default(), &mut no_progress)
        .unwrap();
    let converted_key = key_for(&file, Some(DType::Q8_0));
    let converted = PackOptions { convert: Some(DType::Q8_0) };
    let kept = ensure_pack(&offload, &converted_key, &specs(&units), &converted, &mut no_progress).unwrap();

    fs::write(&file, b"a new version of the checkpoint").unwrap();
    let new_key = key_for(&file, None);
    // The old pack is not valid for the new key.
    assert!(Pack::open(&offload, &new_key).unwrap().is_none());
    // A pack whose lock another process holds (here: this test) is skipped, not waited for.
    let held = LockFile::exclusive(&kept.dir().join(LOCK_FILE)).unwrap();
    let new = ensure_pack(&offload, &new_key, &specs(&units), &PackOptions::default(), &mut no_progress).unwrap();
    assert_ne!(new.dir(), old.dir());
    assert_eq!(new.origin(), &PackOrigin::Built { reason: InvalidPack::Absent });
    assert!(!old.dir().exists(), "the pack of the old checkpoint is removed");
    assert!(kept.dir().join(MANIFEST_FILE).exists());
    // Once unlocked, the pack of the old checkpoint with another conversion goes too: same
    // paths, other lengths. A pack of other paths would be kept.
    drop(held);
    assert_eq!(remove_stale_packs(&offload, &new_key).unwrap(), vec![kept.dir().to_owned()]);
    assert!(!kept.dir().exists());
    assert_eq!(remove_stale_packs(&offload, &new_key).unwrap(), Vec::<PathBuf>::new());
    // The handles opened before the removal still read their (now unlinked) files.
    assert_holds(&old, &units);
    assert_holds(&new, &units);
}

#[test]
fn packs_of_the_same_files_with_another_conversion_are_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let file = checkpoint(tmp.path());
    let units = mixed_units(4, 2);
    let plain =
        ensure_pack(tmp.path(), &key_for(&file, None), &specs(&units), &PackOptions::default(), &mut no_progress)
            .unwrap();
    let q8 = PackOptions { convert: Some(DType::Q8_0) };
    let converted =
        ensure_pack(tmp.path(), &key_for(&file, q8.convert), &specs(&units), &q8, &mut no_progress).unwrap();
    assert!(plain.dir().join(MANIFEST_FILE).exists());
    assert_ne!(plain.dir(), converted.dir());
    assert_eq!(remove_stale_packs(tmp.path(), &key_for(&file, None)).unwrap(), Vec::<PathBuf>::new());
}

/// Damages a built pack with `damage`, checks that `probe` reports `expected` and that
/// `ensure_pack` rebuilds it for that reason.
fn check_damage(damage: impl FnOnce(&Path), expected: fn(&InvalidPack) -> bool) {
    let tmp = tempfile::tempdir().unwrap();
    let key = key_for(&checkpoint(tmp.path()), None);
    let units = mixed_units(5, 4);
    let built = ensure_pack(tmp.path(), &key, &specs(&units), &PackOptions::default(), &mut no_progress).unwrap();
    let dir = built.dir().to_owned();
    drop(built);
    damage(&dir);
    let reason = match Pack::probe(tmp.path(), &key).unwrap() {
        PackStatus::Valid(_) => panic!("a damaged pack opened"),
        PackStatus::Invalid(reason) => reason,
    };
    assert!(expected(&reason), "unexpected reason: {reason}");
    assert!(Pack::open(tmp.path(), &key).unwrap().is_none());
    let rebuilt = ensure_pack(tmp.path(), &key, &specs(&units), &PackOptions::default(), &mut no_progress).unwrap();
    assert_eq!(rebuilt.origin(), &PackOrigin::Built { reason });
    assert!(!dir.join(DATA_TMP).exists() && !dir.join(MANIFEST_TMP).exists());
    assert_holds(&rebuilt, &units);
}

fn incomplete(r: &InvalidPack) -> bool {
    matches!(r, InvalidPack::Incomplete { .. })
}

#[test]
fn a_leftover_tmp_without_manifest_is_rebuilt() {
    check_damage(
        |dir| {
            fs::remove_file(dir.join(MANIFEST_FILE)).unwrap();
            fs::rename(dir.join(DATA_FILE), dir.join(DATA_TMP)).unwrap();
        },
        incomplete,
    );
    // Killed while writing the manifest: the data file is in place, the manifest is not.
    check_damage(
        |dir| {
            fs::rename(dir.join(MANIFEST_FILE), dir.join(MANIFEST_TMP)).unwrap();
            let f = OpenOptions::new().write(true).open(dir.join(MANIFEST_TMP)).unwrap();
            f.set_len(f.metadata().unwrap().len() / 2).unwrap();
        },
        incomplete,
    );
}

#[test]
fn a_missing_manifest_is_rebuilt() {
    check_damage(|dir| fs::remove_file(dir.join(MANIFEST_FILE)).unwrap(), incomplete);
}

#[test]
fn a_truncated_or_missing_data_file_is_rebuilt() {
    let truncate = |dir: &Path| {
        let f = OpenOptions::new().write(true).open(dir.join(DATA_FILE)).unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len - UNIT_ALIGN).unwrap();
    };
    check_damage(truncate, incomplete);
    check_damage(|dir| fs::remove_file(dir.join(DATA_FILE)).unwrap(), incomplete);
}

#[test]
fn a_corrupt_or_foreign_manifest_is_rebuilt() {
    check_damage(
        |dir| fs::write(dir.join(MANIFEST_FILE), b"{ not json").unwrap(),
        |r| matches!(r, InvalidPack::Corrupt { .. }),
    );
    let edit = |f: fn(&mut PackManifest)| {
        move |dir: &Path| {
            let path = dir.join(MANIFEST_FILE);
            let mut m: PackManifest = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
            f(&mut m);
            fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
        }
    };
    let stale = |r: &InvalidPack| matches!(r, InvalidPack::Stale { .. });
    let corrupt = |r: &InvalidPack| matches!(r, InvalidPack::Corrupt { .. });
    check_damage(edit(|m| m.format_version += 1), stale);
    check_damage(
        |dir: &Path| {
            let path = dir.join(MANIFEST_FILE);
            let mut m: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
            m["key"]["extra"] = "another layout".into();
            fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
        },
        stale,
    );
    check_damage(edit(|m| m.units[1].offset += 64), corrupt);
    check_damage(edit(|m| m.units[0].tensors[1].offset = 8), corrupt);
    check_damage(edit(|m| m.units[2].tensors[0].len += 4), corrupt);
    check_damage(edit(|m| m.units[3].tensors[2].dtype = "q5_k".to_owned()), corrupt);
    check_damage(edit(|m| m.units[1].name = m.units[0].name.clone()), corrupt);
}

#[test]
fn other_units_under_the_same_key_rebuild_the_pack() {
    let tmp = tempfile::tempdir().unwrap();
    let key = key_for(&checkpoint(tmp.path()), None);
    ensure_pack(tmp.path(), &key, &specs(&mixed_units(6, 3)), &PackOptions::default(), &mut no_progress).unwrap();
    let units = mixed_units(6, 4);
    let pack = ensure_pack(tmp.path(), &key, &specs(&units), &PackOptions::default(), &mut no_progress).unwrap();
    assert!(matches!(pack.origin(), PackOrigin::Built { reason: InvalidPack::Stale { .. } }));
    assert_holds(&pack, &units);
}

#[test]
fn a_flipped_byte_is_a_checksum_error_naming_the_unit() {
    let tmp = tempfile::tempdir().unwrap();
    let key = key_for(&checkpoint(tmp.path()), None);
    let units = mixed_units(7, 4);
    let pack = ensure_pack(tmp.path(), &key, &specs(&units), &PackOptions::default(), &mut no_progress).unwrap();
    let target = &pack.manifest().units[2];
    let at = target.offset + target.tensors[1].offset + 5;
    let file = OpenOptions::new().read(true).write(true).open(pack.data_path()).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x10], at).unwrap();
    drop(file);

    // The length is right, so the pack opens; the damaged unit fails on read, the others do not.
    let reopened = Pack::open(tmp.path(), &key).unwrap().unwrap();
    for p in [&pack, &reopened] {
        let err = p.read_unit(2).unwrap_err();
        let Error::Checksum { unit, path, expected, actual } = &err else { panic!("not a checksum error: {err}") };
        assert_eq!(unit, "layers.2.attention");
        assert_eq!(path, p.data_path());
        assert_eq!(*expected, p.manifest().units[2].crc32);
        assert_ne!(expected, actual);
        let message = err.to_string();
        assert!(message.contains("layers.2.attention") && message.contains("pack.bin"), "{message}");
        for i in [0, 1, 3] {
            p.read_unit(i).unwrap();
        }
    }

    // `verify` checks bytes read elsewhere: exact or padded length, not shorter.
    let u = &pack.manifest().units[1];
    let mut bytes = vec![0u8; u.padded_len() as usize];
    fs::File::open(pack.data_path()).unwrap().read_exact_at(&mut bytes, u.offset).unwrap();
    pack.verify(1, &bytes).unwrap();
    pack.verify(1, &bytes[..u.len as usize]).unwrap();
    assert!(matches!(pack.verify(1, &bytes[..u.len as usize - 1]), Err(Error::UnitLength { .. })));
    bytes[0] ^= 1;
    assert!(matches!(pack.verify(1, &bytes), Err(Error::Checksum { .. })));
    assert!(matches!(pack.verify(4, &bytes), Err(Error::UnitIndex { index: 4, count: 4 })));
}

/// The q8_0 error bound of one block of `src`: half a step of the scale, plus the error of
/// storing the scale as f16 (11 bits) multiplied by the largest quantized value.
fn q8_0_bound(src: &[f32]) -> f32 {
    let d = src.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
    d * (0.5 + 127.0 / 2048.0) + 1e-7
}

#[test]
fn conversion_to_q8_0_stays_within_its_error() {
    let tmp = tempfile::tempdir().unwrap();
    let options = PackOptions { convert: Some(DType::Q8_0) };
    let key = key_for(&checkpoint(tmp.path()), options.convert);
    let mut rng = Rng(8);
    let w = rng.f32s(8 * 64);
    let scaled: Vec<f32> = rng.f32s(4 * 96).iter().map(|x| x * 3.0).collect();
    let mut bf16 = vec![0u8; scaled.len() * 2];
    quantize_row(DType::BF16, &scaled, &mut bf16).unwrap();
    let norm = rng.f32s(64);
    let odd = rng.f32s(4 * 48);
    let q8 = {
        let mut q = vec![0u8; DType::Q8_0.bytes_for(2 * 64).unwrap()];
        quantize_row(DType::Q8_0, &rng.f32s(2 * 64), &mut q).unwrap();
        q
    };
    let units = vec![OwnedUnit {
        name: "layers.0.mlp".to_owned(),
        tensors: vec![
            tensor("w", DType::F32, &[8, 64], f32_bytes(&w)),
            tensor("b16", DType::BF16, &[4, 96], bf16.clone()),
            tensor("norm", DType::F32, &[64], f32_bytes(&norm)),
            tensor("odd", DType::F32, &[4, 48], f32_bytes(&odd)),
            tensor("q8", DType::Q8_0, &[2, 64], q8.clone()),
        ],
    }];
    let pack = ensure_pack(tmp.path(), &key, &specs(&units), &options, &mut no_progress).unwrap();
    assert_aligned(pack.manifest());
    let unit = &pack.manifest().units[0];
    let bytes = pack.read_unit(0).unwrap();
    let stored = |name: &str| {
        let t = unit.tensor(name).unwrap();
        (t.dtype().unwrap(), &bytes.as_slice()[t.range()])
    };

    // Converted 2-D tensors: exactly what quantize_row makes of the (dequantized) source, and
    // within q8_0's error of it.
    for (name, source, cols) in [("w", w.clone(), 64), ("b16", dequantized(DType::BF16, &bf16, 96), 96)] {
        let (dtype, data) = stored(name);
        assert_eq!(dtype, DType::Q8_0, "{name}");
        let mut expected = vec![0u8; DType::Q8_0.bytes_for(source.len()).unwrap()];
        quantize_row(DType::Q8_0, &source, &mut expected).unwrap();
        assert!(data == expected, "{name}: not the reference quantization");
        let back = dequantized(DType::Q8_0, data, cols);
        for (block, (x, y)) in source.chunks(32).zip(back.chunks(32)).enumerate() {
            let bound = q8_0_bound(x);
            for (a, b) in x.iter().zip(y) {
                assert!((a - b).abs() <= bound, "{name} block {block}: {a} vs {b} (bound {bound})");
            }
        }
    }
    // 1-D tensors, rows that are not whole blocks, and tensors already in the dtype stay as they are.
    assert_eq!(stored("norm"), (DType::F32, &f32_bytes(&norm)[..]));
    assert_eq!(stored("odd"), (DType::F32, &f32_bytes(&odd)[..]));
    assert_eq!(stored("q8"), (DType::Q8_0, &q8[..]));
}

fn dequantized(dtype: DType, bytes: &[u8], cols: usize) -> Vec<f32> {
    let row_bytes = dtype.bytes_for(cols).unwrap();
    let mut out = vec![0f32; bytes.len() / row_bytes * cols];
    for (src, dst) in bytes.chunks(row_bytes).zip(out.chunks_mut(cols)) {
        dequantize_row(dtype, src, dst).unwrap();
    }
    out
}

#[test]
fn invalid_units_are_errors_naming_the_unit_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let key = key_for(&checkpoint(tmp.path()), None);
    let offload = tmp.path().join("offload");
    let check = |units: Vec<OwnedUnit>, expected: fn(&Error) -> bool| {
        let err = ensure_pack(&offload, &key, &specs(&units), &PackOptions::default(), &mut no_progress).unwrap_err();
        assert!(expected(&err), "unexpected error: {err}");
        // Nothing is written for invalid input.
        assert!(!offload.exists());
    };
    let unit = |name: &str, tensors: Vec<Owned>| OwnedUnit { name: name.to_owned(), tensors };
    check(
        vec![unit("u", vec![tensor("t", DType::F32, &[2, 3], vec![0; 20])])],
        |e| matches!(e, Error::TensorBytes { unit, tensor, expected: 24, got: 20, .. } if unit == "u" && tensor == "t"),
    );
    check(
        vec![unit("u", vec![tensor("t", DType::Q8_0, &[33], vec![0; 34])])],
        |e| matches!(e, Error::BadShape { unit, tensor, block: 32, .. } if unit == "u" && tensor == "t"),
    );
    check(vec![unit("u", vec![tensor("t", DType::F32, &[usize::MAX, 2], vec![])])], |e| {
        matches!(e, Error::BadShape { .. })
    });
    check(vec![unit("u", vec![]), unit("u", vec![])], |e| matches!(e, Error::DuplicateUnit { unit } if unit == "u"));
    check(vec![unit("", vec![])], |e| matches!(e, Error::DuplicateUnit { .. }));
    check(
        vec![unit("u", vec![tensor("t", DType::F32, &[1], vec![0; 4]), tensor("t", DType::F32, &[1], vec![0; 4])])],
        |e| matches!(e, Error::DuplicateTensor { unit, tensor } if unit == "u" && tensor == "t"),
    );
    let err =
        ensure_pack(&offload, &key, &[], &PackOptions { convert: Some(DType::Q4K) }, &mut no_progress).unwrap_err();
    assert!(matches!(err, Error::ConvertMismatch { key: None, options: Some(DType::Q4K) }));
}

#[test]
fn empty_units_and_an_empty_pack_work() {
    let tmp = tempfile::tempdir().unwrap();
    let key = key_for(&checkpoint(tmp.path()), None);
    let empty = ensure_pack(tmp.path(), &key, &[], &PackOptions::default(), &mut no_progress).unwrap();
    assert_eq!(empty.manifest().data_len, 0);
    let units = vec![
        OwnedUnit { name: "a".to_owned(), tensors: vec![] },
        OwnedUnit { name: "b".to_owned(), tensors: vec![tensor("x", DType::F32, &[1], vec![1, 2, 3, 4])] },
    ];
    let pack = ensure_pack(tmp.path(), &key, &specs(&units), &PackOptions::default(), &mut no_progress).unwrap();
    assert_eq!(pack.manifest().units[0].padded_len(), 0);
    assert_eq!(pack.manifest().units[1].offset, 0);
    assert_holds(&pack, &units);
}

#[test]
fn probe_does_not_wait_for_a_running_build() {
    let tmp = tempfile::tempdir().unwrap();
    let key = key_for(&checkpoint(tmp.path()), None);
    let units = mixed_units(9, 2);
    let pack = ensure_pack(tmp.path(), &key, &specs(&units), &PackOptions::default(), &mut no_progress).unwrap();
    let held = LockFile::exclusive(&pack.dir().join(LOCK_FILE)).unwrap();
    let status = Pack::probe(tmp.path(), &key).unwrap();
    assert!(matches!(status, PackStatus::Invalid(InvalidPack::Incomplete { .. })), "{status:?}");
    drop(held);
    assert!(Pack::open(tmp.path(), &key).unwrap().is_some());
}

#[test]
fn concurrent_builders_build_once() {
    let tmp = tempfile::tempdir().unwrap();
    let key = key_for(&checkpoint(tmp.path()), None);
    let units = big_units(10, 8, 64);
    let origins: Vec<PackOrigin> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    let slow = &mut |_: &Progress| std::thread::sleep(Duration::from_millis(2));
                    let pack = ensure_pack(tmp.path(), &key, &specs(&units), &PackOptions::default(), slow).unwrap();
                    assert_holds(&pack, &units);
                    pack.origin().clone()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(origins.iter().filter(|o| matches!(o, PackOrigin::Built { .. })).count(), 1, "{origins:?}");
    assert_eq!(origins.iter().filter(|o| **o == PackOrigin::Opened).count(), 2);
}

/// Set in the child process of the kill test: the directory to pack into.
const KILL_CHILD_DIR: &str = "STRATA_PACK_TEST_KILL_CHILD_DIR";
/// The kill test's units: 32 units of 256 KiB, 8 MiB in all.
fn kill_test_units() -> Vec<OwnedUnit> {
    big_units(11, 32, 256)
}

/// The kill test kills its child once this much is written: more than the write buffer holds,
/// so that part of the data file is on disk.
const KILL_AFTER: u64 = build::WRITE_BUFFER as u64 + (1 << 20);

/// The child's part: a slow build that signals once it has written [`KILL_AFTER`] bytes.
fn slow_build_until_killed(dir: &Path) {
    let key = key_for(&dir.join("model.safetensors"), None);
    let units = kill_test_units();
    let marker = dir.join("killable");
    let mut progress = |p: &Progress| {
        if p.done_bytes >= KILL_AFTER && !marker.exists() {
            fs::write(&marker, b"").unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    ensure_pack(&dir.join("offload"), &key, &specs(&units), &PackOptions::default(), &mut progress).unwrap();
}

#[test]
fn a_build_killed_midway_is_detected_and_rebuilt() {
    if let Some(dir) = std::env::var_os(KILL_CHILD_DIR) {
        slow_build_until_killed(Path::new(&dir));
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let key = key_for(&checkpoint(tmp.path()), None);
    let offload = tmp.path().join("offload");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "pack::tests::a_build_killed_midway_is_detected_and_rebuilt", "--test-threads=1"])
        .env(KILL_CHILD_DIR, tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !tmp.path().join("killable").exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the child ended before it was killed: {status}");
        }
        assert!(start.elapsed() < Duration::from_secs(60), "the child never got far enough");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL: no destructor, no cleanup.
    child.wait().unwrap();

    let dir = offload.join(key.digest());
    let partial = fs::metadata(dir.join(DATA_TMP)).unwrap().len();
    let units = kill_test_units();
    let total: u64 = 32 * 256 * 1024;
    assert!(KILL_AFTER < total);
    assert!(partial > 0 && partial < total, "partial data file of {partial} bytes");
    assert!(!dir.join(MANIFEST_FILE).exists());
    let status = Pack::probe(&offload, &key).unwrap();
    assert!(matches!(status, PackStatus::Invalid(InvalidPack::Incomplete { .. })), "{status:?}");

    let started = SystemTime::now();
    let pack = ensure_pack(&offload, &key, &specs(&units), &PackOptions::default(), &mut no_progress).unwrap();
    assert!(matches!(pack.origin(), PackOrigin::Built { reason: InvalidPack::Incomplete { .. } }));
    assert!(fs::metadata(pack.data_path()).unwrap().modified().unwrap() >= started);
    assert_eq!(pack.manifest().data_len, total);
    assert!(!dir.join(DATA_TMP).exists());
    assert_holds(&pack, &units);
}
