//! The pack writer: streams units into `pack.bin.tmp`, then syncs and renames into place.
//!
//! Order of operations, each step durable before the next: remove the old manifest (so no
//! later crash can pair it with new data), remove the old data and temporary files, write the
//! data file unit by unit with the checksum computed on the way, sync it, rename it to
//! `pack.bin`, sync the directory, then write, sync and rename the manifest and sync the
//! directory again. Memory stays at one write buffer plus, for a converted tensor, its
//! converted bytes: the source bytes are read straight from the caller's slices.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rayon::prelude::*;
use strata_tensor::DType;
use strata_tensor::quant::{dequantize_row, quantize_row};

use super::{
    DATA_FILE, DATA_TMP, MANIFEST_FILE, MANIFEST_TMP, PackManifest, Progress, TensorSpec, UNIT_ALIGN, UnitSpec,
};
use crate::{Error, Result};

/// Zero bytes for padding; every gap is shorter than one unit alignment.
static ZEROS: [u8; UNIT_ALIGN as usize] = [0; UNIT_ALIGN as usize];

/// The write buffer: large enough that small tensors do not each cost a system call.
pub(super) const WRITE_BUFFER: usize = 4 << 20;

/// How many bytes are written between two syncs that also drop the written pages from the
/// page cache, so that repacking a model larger than RAM does not fill memory with dirty pages
/// (a memory cgroup counts them against the process).
const SYNC_EVERY: u64 = 256 << 20;

/// Builds the pack described by `manifest` (whose checksums are still zero) in `dir` from
/// `units`, which `manifest` was planned from. The caller holds the directory's lock.
pub(super) fn build(
    dir: &Path,
    mut manifest: PackManifest,
    units: &[UnitSpec<'_>],
    progress: &mut dyn FnMut(&Progress),
) -> Result<()> {
    debug_assert_eq!(manifest.units.len(), units.len());
    for name in [MANIFEST_FILE, MANIFEST_TMP, DATA_FILE, DATA_TMP] {
        remove_if_present(&dir.join(name))?;
    }
    sync_dir(dir)?;
    let available = free_bytes(dir).map_err(Error::io("statvfs", dir))?;
    if available < manifest.data_len {
        return Err(Error::NoSpace { path: dir.to_owned(), need: manifest.data_len, available });
    }

    let tmp = dir.join(DATA_TMP);
    let file = File::create(&tmp).map_err(Error::io("create", &tmp))?;
    let mut out = BufWriter::with_capacity(WRITE_BUFFER, file);
    let total_bytes = manifest.data_len;
    let mut done = 0u64;
    let mut synced = 0u64;
    for (unit, spec) in manifest.units.iter_mut().zip(units) {
        debug_assert_eq!(unit.offset, done);
        let mut crc = crc32fast::Hasher::new();
        let mut pos = 0u64;
        for (t, spec_t) in unit.tensors.iter().zip(&spec.tensors) {
            let pad = &ZEROS[..(t.offset - pos) as usize];
            write(&mut out, &tmp, pad)?;
            crc.update(pad);
            let to = t.dtype().unwrap_or(spec_t.dtype);
            if to == spec_t.dtype {
                write(&mut out, &tmp, spec_t.data)?;
                crc.update(spec_t.data);
            } else {
                let converted = convert(&spec.name, spec_t, to)?;
                debug_assert_eq!(converted.len() as u64, t.len);
                write(&mut out, &tmp, &converted)?;
                crc.update(&converted);
            }
            // Reading a memory-mapped checkpoint from start to end must not leave all of it in
            // the resident set: a pack built on first load stays under `--max-ram`.
            strata_tensor::release_pages(spec_t.data);
            pos = t.offset + t.len;
            progress(&Progress { done_bytes: done + pos, total_bytes, unit: unit.name.clone() });
        }
        debug_assert_eq!(pos, unit.len);
        unit.crc32 = crc.finalize();
        write(&mut out, &tmp, &ZEROS[..(unit.padded_len() - unit.len) as usize])?;
        done += unit.padded_len();
        if done - synced >= SYNC_EVERY {
            out.flush().map_err(Error::io("write", &tmp))?;
            out.get_ref().sync_data().map_err(Error::io("sync", &tmp))?;
            drop_cached(out.get_ref(), synced, done - synced);
            synced = done;
        }
        progress(&Progress { done_bytes: done, total_bytes, unit: unit.name.clone() });
    }
    debug_assert_eq!(done, total_bytes);
    let file = out.into_inner().map_err(|e| Error::io("write", &tmp)(e.into_error()))?;
    file.sync_all().map_err(Error::io("sync", &tmp))?;
    drop(file);
    let data = dir.join(DATA_FILE);
    fs::rename(&tmp, &data).map_err(Error::io("rename", &tmp))?;
    sync_dir(dir)?;

    let tmp = dir.join(MANIFEST_TMP);
    let json =
        serde_json::to_vec_pretty(&manifest).map_err(|source| Error::ManifestEncode { path: tmp.clone(), source })?;
    let mut file = File::create(&tmp).map_err(Error::io("create", &tmp))?;
    file.write_all(&json).map_err(Error::io("write", &tmp))?;
    file.sync_all().map_err(Error::io("sync", &tmp))?;
    drop(file);
    fs::rename(&tmp, dir.join(MANIFEST_FILE)).map_err(Error::io("rename", &tmp))?;
    sync_dir(dir)
}

fn write(out: &mut BufWriter<File>, path: &Path, bytes: &[u8]) -> Result<()> {
    out.write_all(bytes).map_err(Error::io("write", path))
}

/// Converts a 2-D tensor to `to` row by row through f32, rows in parallel.
fn convert(unit: &str, t: &TensorSpec<'_>, to: DType) -> Result<Vec<u8>> {
    let cols = t.shape.get(1).copied().unwrap_or(0);
    let err = |source| Error::Convert { unit: unit.to_owned(), tensor: t.name.clone(), from: t.dtype, to, source };
    // Both exist: the planner only converts tensors whose rows are whole blocks of both dtypes.
    let (Some(in_row), Some(out_row)) = (t.dtype.bytes_for(cols), to.bytes_for(cols)) else {
        return Err(err(strata_tensor::Error::NotBlockAligned {
            op: "pack",
            dtype: to,
            len: cols,
            block: to.block_len(),
        }));
    };
    let rows = t.shape.first().copied().unwrap_or(0);
    let mut out = vec![0u8; rows * out_row];
    if cols == 0 || rows == 0 {
        return Ok(out);
    }
    out.par_chunks_exact_mut(out_row)
        .zip(t.data.par_chunks_exact(in_row))
        .try_for_each_init(
            || vec![0f32; cols],
            |row, (dst, src)| {
                dequantize_row(t.dtype, src, row)?;
                quantize_row(to, row, dst)
            },
        )
        .map_err(err)?;
    Ok(out)
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path)(e)),
    }
}

/// Syncs a directory, making the renames and removals in it durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(Error::io("sync directory", dir))
}

/// Advises the kernel that the synced range `offset..offset + len` of `file` will not be read
/// soon. Only advice: an error changes nothing that matters, so it is ignored.
fn drop_cached(file: &File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else { return };
    // SAFETY: the descriptor belongs to `file`, which is open for the whole call; the call reads
    // no memory of ours.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_DONTNEED) };
}

/// The bytes an unprivileged user may still write on the file system holding `dir`.
fn free_bytes(dir: &Path) -> io::Result<u64> {
    let path = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string that outlives the call, and `st` points to
    // writable memory for one `statvfs` struct, which the call fills when it returns 0.
    let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `statvfs` returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    // Both fields are u64 on the 64-bit targets the pack supports.
    let (blocks, block_size): (u64, u64) = (st.f_bavail, st.f_frsize);
    Ok(blocks.saturating_mul(block_size))
}
