//! The offload pack: a checkpoint repacked into one file of 4 KiB-aligned units.
//!
//! The first run with offloading copies the checkpoint's weights, grouped into units by the
//! caller (a layer's attention block, a layer's dense FFN, one expert), into
//! `offload_dir/<digest>/pack.bin`, optionally converting 2-D tensors to a block-quantized
//! dtype, and writes `manifest.json` beside it with every unit's and tensor's offset, length,
//! dtype and shape and a CRC-32 per unit. The directory's name is the digest of a
//! [`SourceKey`] (the checkpoint files' paths, lengths and modification times), so a changed
//! checkpoint gets a new pack, and [`ensure_pack`] removes the packs of its older versions.
//!
//! Crash safety: the data file is written to `pack.bin.tmp`, synced and renamed, then the
//! manifest is written, synced and renamed the same way, and the directory is synced after
//! each rename. A manifest whose key and layout match, next to a data file of exactly the
//! length it names, is the only thing that counts as a pack; anything else (a leftover
//! `.tmp`, a missing manifest, a truncated data file) is rebuilt. A lock file (`flock`)
//! keeps two processes from building the same pack at once.
//!
//! The pack knows nothing of model tensor names: units and tensors are whatever the caller
//! passes. Reads here are plain `pread`s ([`Pack::read_unit`]); the streamer reads
//! [`Pack::data_path`] itself and checks what it read with [`Pack::verify`].

mod build;
mod key;
mod lock;
mod manifest;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use strata_tensor::{AlignedBytes, DType};

pub use key::{SourceFile, SourceKey};
pub use manifest::{FORMAT_VERSION, PackManifest, PackTensor, PackUnit, target_dtype};

use crate::{Error, Result};
use lock::LockFile;

/// Every unit starts at a multiple of this many bytes in the data file (the `O_DIRECT` unit).
pub const UNIT_ALIGN: u64 = 4096;
/// Every tensor starts at a multiple of this many bytes within its unit (one cache line).
pub const TENSOR_ALIGN: u64 = 64;

/// The data file's name inside the pack directory.
pub const DATA_FILE: &str = "pack.bin";
/// The manifest's name inside the pack directory.
pub const MANIFEST_FILE: &str = "manifest.json";
const DATA_TMP: &str = "pack.bin.tmp";
const MANIFEST_TMP: &str = "manifest.json.tmp";
const LOCK_FILE: &str = "lock";

// Offsets and lengths are u64 on disk and index memory as usize.
const _: () = assert!(usize::BITS >= 64, "the offload pack needs a 64-bit target");

/// One tensor handed to the packer.
#[derive(Clone, Debug)]
pub struct TensorSpec<'a> {
    /// The tensor's name, unique within its unit.
    pub name: String,
    /// The stored dtype of `data`.
    pub dtype: DType,
    /// The shape; for 2-D tensors `[rows, row_len]`.
    pub shape: Vec<usize>,
    /// The stored bytes, usually a window of the memory-mapped checkpoint.
    pub data: &'a [u8],
}

/// One unit handed to the packer: tensors that are always loaded together.
#[derive(Clone, Debug)]
pub struct UnitSpec<'a> {
    /// The unit's name, unique within the pack, such as `layers.3.attention`.
    pub name: String,
    /// The unit's tensors, in the order they are stored.
    pub tensors: Vec<TensorSpec<'a>>,
}

/// How to pack.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackOptions {
    /// Converts every 2-D tensor whose row length is a whole number of blocks of this dtype (and
    /// of its own) to it, row by row through f32. 1-D tensors (norms, biases) and tensors with
    /// other row lengths stay as they are. Must equal the [`SourceKey`]'s conversion dtype.
    pub convert: Option<DType>,
}

/// Where a build stands, passed to the progress callback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the data file written so far.
    pub done_bytes: u64,
    /// Bytes the data file will have.
    pub total_bytes: u64,
    /// The unit being written.
    pub unit: String,
}

/// Why there is no usable pack for a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InvalidPack {
    /// Nothing was ever built there.
    Absent,
    /// A build was interrupted or is running: temporary files, a missing manifest or data
    /// file, or a data file of the wrong length.
    Incomplete {
        /// What was found.
        detail: String,
    },
    /// A complete pack for something else: another format version, key or unit layout.
    Stale {
        /// What differs.
        detail: String,
    },
    /// A manifest that does not parse or whose layout is inconsistent.
    Corrupt {
        /// What is wrong.
        detail: String,
    },
}

impl fmt::Display for InvalidPack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidPack::Absent => f.write_str("no pack was built"),
            InvalidPack::Incomplete { detail } => write!(f, "incomplete: {detail}"),
            InvalidPack::Stale { detail } => write!(f, "stale: {detail}"),
            InvalidPack::Corrupt { detail } => write!(f, "corrupt: {detail}"),
        }
    }
}

/// The result of looking for a pack.
#[derive(Debug)]
pub enum PackStatus {
    /// A complete pack for the key.
    Valid(Pack),
    /// No usable pack, and why.
    Invalid(InvalidPack),
}

/// How an opened [`Pack`] came to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PackOrigin {
    /// It existed already and was opened as it is.
    Opened,
    /// It was built by this call, because of `reason`.
    Built {
        /// Why the existing pack (if any) could not be used.
        reason: InvalidPack,
    },
}

/// An opened, validated pack: its manifest is loaded and consistent with the key, and its data
/// file has the length the manifest names. The data file stays open, so a later rebuild by
/// another process (which replaces the file) does not change what this handle reads.
#[derive(Debug)]
pub struct Pack {
    dir: PathBuf,
    data_path: PathBuf,
    manifest: PackManifest,
    index: HashMap<String, usize>,
    file: File,
    origin: PackOrigin,
}

/// Bytes per read when [`Pack::map_unit`] checks a unit.
const MAP_CHECK_CHUNK: usize = 4 << 20;

/// A unit of the data file mapped read-only ([`Pack::map_unit`]).
pub struct MappedUnit(memmap2::Mmap);

impl strata_tensor::ByteSource for MappedUnit {
    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Builds the pack for `key` under `offload_dir/<key.digest()>/`, or opens the existing one if
/// it is complete and holds exactly `units` (same names, dtypes after conversion, shapes and
/// offsets). Every unit is validated before anything is written. While building, `progress` is
/// called after every tensor and every unit. Packs of older versions of the same checkpoint
/// (same paths, other lengths or times) in `offload_dir` are removed before a build.
pub fn ensure_pack(
    offload_dir: &Path,
    key: &SourceKey,
    units: &[UnitSpec<'_>],
    options: &PackOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Pack> {
    if options.convert != key.convert() {
        return Err(Error::ConvertMismatch { key: key.convert(), options: options.convert });
    }
    let (planned, data_len) = manifest::plan(units, options.convert)?;
    let dir = offload_dir.join(key.digest());
    fs::create_dir_all(&dir).map_err(Error::io("create directory", &dir))?;
    let _lock = LockFile::exclusive(&dir.join(LOCK_FILE))?;
    let reason = match inspect(&dir, key)? {
        Ok((manifest, file)) if manifest::same_layout(&manifest.units, &planned) => {
            return Ok(Pack::new(dir, manifest, file, PackOrigin::Opened));
        }
        Ok(_) => InvalidPack::Stale { detail: "the pack's units differ from the ones asked for".to_owned() },
        Err(reason) => reason,
    };
    remove_stale_packs(offload_dir, key)?;
    let manifest = PackManifest { format_version: FORMAT_VERSION, key: key.clone(), units: planned, data_len };
    build::build(&dir, manifest, units, progress)?;
    match inspect(&dir, key)? {
        Ok((manifest, file)) => Ok(Pack::new(dir, manifest, file, PackOrigin::Built { reason })),
        Err(why) => Err(Error::BuildCheck { path: dir, reason: why.to_string() }),
    }
}

/// Removes the packs in `offload_dir` built from an older version of `key`'s checkpoint: the
/// same file paths with other lengths or modification times. Packs of the same files with
/// another conversion or extra string are kept, and so are packs another process holds locked
/// and directories that are not readable packs. Returns the directories removed.
pub fn remove_stale_packs(offload_dir: &Path, key: &SourceKey) -> Result<Vec<PathBuf>> {
    let digest = key.digest();
    let mut removed = Vec::new();
    let entries = match fs::read_dir(offload_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(Error::io("list", offload_dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(Error::io("list", offload_dir))?;
        let name = PathBuf::from(entry.file_name());
        if !SourceKey::is_digest_name(&name) || name.as_os_str() == digest.as_str() {
            continue;
        }
        let dir = entry.path();
        // Anything that is not a readable pack of ours is left alone.
        let Ok(text) = fs::read(dir.join(MANIFEST_FILE)) else { continue };
        let Ok(other) = serde_json::from_slice::<PackManifest>(&text) else { continue };
        if !other.key.same_paths(key) || other.key.files() == key.files() {
            continue;
        }
        // A pack in use, or one this process may not lock, is left for a later run.
        let Ok(Some(_lock)) = LockFile::try_exclusive(&dir.join(LOCK_FILE)) else { continue };
        // The manifest goes first, so that an interrupted removal leaves an incomplete pack.
        let manifest_path = dir.join(MANIFEST_FILE);
        fs::remove_file(&manifest_path).map_err(Error::io("remove", &manifest_path))?;
        fs::remove_dir_all(&dir).map_err(Error::io("remove", &dir))?;
        removed.push(dir);
    }
    Ok(removed)
}

impl Pack {
    /// Opens the pack for `key` if a complete one exists; `None` if it is absent, incomplete,
    /// stale or corrupt ([`Pack::probe`] says which). Does not wait for a build in progress.
    pub fn open(offload_dir: &Path, key: &SourceKey) -> Result<Option<Pack>> {
        Ok(match Pack::probe(offload_dir, key)? {
            PackStatus::Valid(pack) => Some(pack),
            PackStatus::Invalid(_) => None,
        })
    }

    /// Looks for the pack for `key`: the opened pack, or why there is none. A build in progress
    /// in another process is reported as incomplete, without waiting for it. Only I/O errors
    /// other than missing files are errors.
    pub fn probe(offload_dir: &Path, key: &SourceKey) -> Result<PackStatus> {
        let dir = offload_dir.join(key.digest());
        if !dir.is_dir() {
            return Ok(PackStatus::Invalid(InvalidPack::Absent));
        }
        let Some(_lock) = LockFile::try_shared(&dir.join(LOCK_FILE))? else {
            let detail = "another process holds the pack's lock (a build is running)".to_owned();
            return Ok(PackStatus::Invalid(InvalidPack::Incomplete { detail }));
        };
        Ok(match inspect(&dir, key)? {
            Ok((manifest, file)) => PackStatus::Valid(Pack::new(dir, manifest, file, PackOrigin::Opened)),
            Err(reason) => PackStatus::Invalid(reason),
        })
    }

    fn new(dir: PathBuf, manifest: PackManifest, file: File, origin: PackOrigin) -> Pack {
        let index = manifest.units.iter().enumerate().map(|(i, u)| (u.name.clone(), i)).collect();
        Pack { data_path: dir.join(DATA_FILE), dir, manifest, index, file, origin }
    }

    /// The pack's directory, `offload_dir/<digest>`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The data file, which the streamer opens.
    pub fn data_path(&self) -> &Path {
        &self.data_path
    }

    /// The manifest.
    pub fn manifest(&self) -> &PackManifest {
        &self.manifest
    }

    /// Whether this handle opened an existing pack or built it, and why.
    pub fn origin(&self) -> &PackOrigin {
        &self.origin
    }

    /// The index of the unit called `name`.
    pub fn unit_index(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// The unit at `unit`, or [`Error::UnitIndex`].
    pub fn unit(&self, unit: usize) -> Result<&PackUnit> {
        self.manifest.units.get(unit).ok_or(Error::UnitIndex { index: unit, count: self.manifest.units.len() })
    }

    /// Reads the unit's padded range from the data file into a 64-byte-aligned buffer and
    /// verifies its checksum. Tensor `t` is at `t.range()` of the result.
    pub fn read_unit(&self, unit: usize) -> Result<AlignedBytes> {
        let u = self.unit(unit)?;
        let mut buf = AlignedBytes::zeroed(u.padded_len() as usize);
        self.file.read_exact_at(buf.as_mut_slice(), u.offset).map_err(Error::io("read", &self.data_path))?;
        self.verify(unit, buf.as_slice())?;
        Ok(buf)
    }

    /// Maps unit `unit` of the data file read-only, after checking its checksum: the map holds
    /// only the pages touched since, read from disk on first touch. The check reads the unit in
    /// chunks through one small buffer, so it does not leave the unit in this process's memory.
    pub fn map_unit(&self, unit: usize) -> Result<MappedUnit> {
        let u = self.unit(unit)?;
        let mut hasher = crc32fast::Hasher::new();
        let mut chunk = vec![0u8; MAP_CHECK_CHUNK.min(u.len as usize)];
        let mut done = 0u64;
        while done < u.len {
            let n = (u.len - done).min(chunk.len() as u64) as usize;
            self.file.read_exact_at(&mut chunk[..n], u.offset + done).map_err(Error::io("read", &self.data_path))?;
            hasher.update(&chunk[..n]);
            done += n as u64;
        }
        self.check_crc(u, hasher.finalize())?;
        // SAFETY: the pack's data file is only written through a temporary file renamed into
        // place under the pack's lock; a complete pack is never modified in place, so the
        // mapped bytes do not change while the map lives.
        let map = unsafe { memmap2::MmapOptions::new().offset(u.offset).len(u.len as usize).map(&self.file) }
            .map_err(Error::io("map", &self.data_path))?;
        Ok(MappedUnit(map))
    }

    /// Verifies the checksum of a unit read elsewhere. `bytes` starts at the unit's offset and
    /// holds at least its `len` bytes (the padded range is fine; the padding is not checked).
    pub fn verify(&self, unit: usize, bytes: &[u8]) -> Result<()> {
        let u = self.unit(unit)?;
        let Some(covered) = bytes.get(..u.len as usize) else {
            return Err(Error::UnitLength {
                unit: u.name.clone(),
                path: self.data_path.clone(),
                expected: u.len,
                got: bytes.len() as u64,
            });
        };
        self.check_crc(u, crc32fast::hash(covered))
    }

    /// The [`Error::Checksum`] naming unit `u` unless `actual` is its recorded CRC-32.
    fn check_crc(&self, u: &PackUnit, actual: u32) -> Result<()> {
        if actual == u.crc32 {
            return Ok(());
        }
        Err(Error::Checksum { unit: u.name.clone(), path: self.data_path.clone(), expected: u.crc32, actual })
    }
}

/// Looks at the pack directory `dir` (with its lock held): the manifest and the open data file
/// if they form a complete pack for `key`, or why they do not.
fn inspect(dir: &Path, key: &SourceKey) -> Result<Result<(PackManifest, File), InvalidPack>> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let data_path = dir.join(DATA_FILE);
    let text = match fs::read(&manifest_path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let found: Vec<&str> =
                [DATA_FILE, DATA_TMP, MANIFEST_TMP].into_iter().filter(|f| dir.join(f).exists()).collect();
            return Ok(Err(if found.is_empty() {
                InvalidPack::Absent
            } else {
                InvalidPack::Incomplete { detail: format!("no {MANIFEST_FILE}, found {}", found.join(", ")) }
            }));
        }
        Err(e) => return Err(Error::io("read", manifest_path)(e)),
    };
    let manifest: PackManifest = match serde_json::from_slice(&text) {
        Ok(m) => m,
        Err(e) => return Ok(Err(InvalidPack::Corrupt { detail: format!("{MANIFEST_FILE} does not parse: {e}") })),
    };
    if manifest.format_version != FORMAT_VERSION {
        let detail = format!("format version {}, this strata uses {FORMAT_VERSION}", manifest.format_version);
        return Ok(Err(InvalidPack::Stale { detail }));
    }
    if manifest.key != *key {
        return Ok(Err(InvalidPack::Stale { detail: "built from another source key".to_owned() }));
    }
    if let Err(detail) = manifest.check() {
        return Ok(Err(InvalidPack::Corrupt { detail }));
    }
    let file = match File::open(&data_path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Err(InvalidPack::Incomplete {
                detail: format!("{MANIFEST_FILE} present, {DATA_FILE} missing"),
            }));
        }
        Err(e) => return Err(Error::io("open", data_path)(e)),
    };
    let len = file.metadata().map_err(Error::io("stat", &data_path))?.len();
    if len != manifest.data_len {
        let detail = format!("{DATA_FILE} has {len} bytes, the manifest says {}", manifest.data_len);
        return Ok(Err(InvalidPack::Incomplete { detail }));
    }
    Ok(Ok((manifest, file)))
}
