//! The source key: what identifies the checkpoint a pack was built from.
//!
//! A key lists each checkpoint file by canonical path, byte length and modification time, plus
//! a caller-chosen string and the conversion dtype. Its digest (FNV-1a 128 over a fixed,
//! length-prefixed encoding, so it never changes between builds of strata) names the pack's
//! directory; the manifest stores the full key, and a pack opens only when the whole key
//! matches, so a digest collision costs a rebuild, never a wrong pack.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use strata_tensor::DType;

use crate::{Error, Result};

/// One checkpoint file as the key records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    /// The canonical (absolute, symlink-free) path.
    pub path: PathBuf,
    /// The length in bytes.
    pub len: u64,
    /// The modification time: seconds since the Unix epoch.
    pub mtime_s: i64,
    /// The modification time: nanoseconds within the second.
    pub mtime_ns: i64,
}

/// Identifies the source checkpoint of a pack: its files (canonical path, length and
/// modification time of each, sorted by path), a caller-provided string (a digest of the unit
/// layout, the strata version, ...) and the conversion dtype.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceKey {
    files: Vec<SourceFile>,
    extra: String,
    #[serde(with = "dtype_name")]
    convert: Option<DType>,
}

impl SourceKey {
    /// The key for the checkpoint made of `files`. Each file is canonicalized and its metadata
    /// read; the list is sorted and deduplicated, so the order in which shards were found does
    /// not matter.
    pub fn for_files(files: &[PathBuf], extra: &str, convert: Option<DType>) -> Result<SourceKey> {
        if files.is_empty() {
            return Err(Error::NoSourceFiles);
        }
        let mut out = Vec::with_capacity(files.len());
        for file in files {
            let path = fs::canonicalize(file).map_err(Error::io("canonicalize", file))?;
            let meta = fs::metadata(&path).map_err(Error::io("stat", &path))?;
            out.push(SourceFile { path, len: meta.len(), mtime_s: meta.mtime(), mtime_ns: meta.mtime_nsec() });
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out.dedup_by(|a, b| a.path == b.path);
        Ok(SourceKey { files: out, extra: extra.to_owned(), convert })
    }

    /// The checkpoint files, sorted by path.
    pub fn files(&self) -> &[SourceFile] {
        &self.files
    }

    /// The caller-provided string.
    pub fn extra(&self) -> &str {
        &self.extra
    }

    /// The dtype the pack converts 2-D tensors to, if any.
    pub fn convert(&self) -> Option<DType> {
        self.convert
    }

    /// A stable 32-digit lower-case hex digest of the whole key. It names the pack's directory.
    pub fn digest(&self) -> String {
        let mut h = Fnv128::new();
        h.field(b"strata-pack-key-v1");
        h.field(&(self.files.len() as u64).to_le_bytes());
        for f in &self.files {
            h.field(f.path.as_os_str().as_bytes());
            h.field(&f.len.to_le_bytes());
            h.field(&f.mtime_s.to_le_bytes());
            h.field(&f.mtime_ns.to_le_bytes());
        }
        h.field(self.extra.as_bytes());
        h.field(self.convert.map_or("", DType::name).as_bytes());
        format!("{:032x}", h.0)
    }

    /// Whether `other` names the same checkpoint paths (whatever their lengths and times).
    pub fn same_paths(&self, other: &SourceKey) -> bool {
        self.files.len() == other.files.len() && self.files.iter().zip(&other.files).all(|(a, b)| a.path == b.path)
    }

    /// Whether `path` (inside the offload directory) could be a digest-named pack directory.
    pub(crate) fn is_digest_name(name: &Path) -> bool {
        let bytes = name.as_os_str().as_bytes();
        bytes.len() == 32 && bytes.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    }
}

/// FNV-1a with a 128-bit state. Not cryptographic: it only has to spread keys over names.
struct Fnv128(u128);

impl Fnv128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013b;

    fn new() -> Fnv128 {
        Fnv128(Fnv128::OFFSET)
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u128::from(b);
            self.0 = self.0.wrapping_mul(Fnv128::PRIME);
        }
    }

    /// Hashes a field with its length first, so that field boundaries cannot shift.
    fn field(&mut self, bytes: &[u8]) {
        self.bytes(&(bytes.len() as u64).to_le_bytes());
        self.bytes(bytes);
    }
}

/// Serde for an optional dtype as its [`DType::name`].
pub(crate) mod dtype_name {
    use serde::{Deserialize, Deserializer, Serializer, de};
    use strata_tensor::DType;

    pub(crate) fn serialize<S: Serializer>(dtype: &Option<DType>, s: S) -> Result<S::Ok, S::Error> {
        match dtype {
            Some(d) => s.serialize_some(d.name()),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DType>, D::Error> {
        let name = Option::<String>::deserialize(d)?;
        name.map(|n| DType::from_name(&n).ok_or_else(|| de::Error::custom(format!("unknown dtype {n:?}")))).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv128_matches_the_published_vectors() {
        // Reference values of FNV-1a 128 for "" and "a".
        let mut h = Fnv128::new();
        h.bytes(b"");
        assert_eq!(h.0, 0x6c62272e07bb014262b821756295c58d);
        h.bytes(b"a");
        assert_eq!(h.0, 0xd228cb696f1a8caf78912b704e4a8964);
    }

    #[test]
    fn digest_names_are_recognised() {
        assert!(SourceKey::is_digest_name(Path::new("0123456789abcdef0123456789abcdef")));
        assert!(!SourceKey::is_digest_name(Path::new("0123456789abcdef0123456789abcdeF")));
        assert!(!SourceKey::is_digest_name(Path::new("lock")));
    }
}
