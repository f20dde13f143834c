//! Layer images on disk: how the layers a GPU ceiling streams, and the routed experts of a
//! device expert cache, come from the offload directory rather than from page-locked host memory
//! (`--device cuda --max-vram X --offload-dir D`).
//!
//! A streamed layer's matrices are laid out once for the device buffer it runs from (the CUDA
//! decoder's placement: 256-byte boundaries, q/k/v stacked, gate/up rows paired) and written,
//! one image per layer at a 4096-byte boundary, to `D/<digest>-cuda/cuda-layers.bin`, with
//! `cuda-layers.json` beside it: per image its layer, offset, length, layout hash (the offsets,
//! dtypes and shapes of what it holds) and CRC-32. The experts' images, one per expert laid out
//! as a cache slot holds it, are a second such pair in `experts/` there. The directory is named
//! by the digest of the checkpoint's files (paths, lengths, modification times) and this format's
//! tag, so a changed checkpoint gets new images ([`prepare_images_dir`] removes the old ones); a
//! load that lays the layers out alike finds the file valid and reads none of the checkpoint's
//! streamed layers. The data file is written under a temporary name, synced and renamed before
//! the manifest is written (synced, renamed): a manifest names only complete data.
//!
//! [`ImageReader`] reads images on two threads of its own into a ring of staging buffers
//! (page-locked ones on CUDA), with `O_DIRECT` where the file system and the buffer allow: ahead,
//! in the order the passes use them, for streamed layers; on request, for the experts a router
//! picked. Every image is checked against its CRC before it is handed over. A cyclic reader may
//! read some of the images only ([`ImageReader::cycling`]: the streamed layers that have no host
//! copy), and a [`HostTier`] in front of an on-request reader keeps the images read last in
//! buffers of its own (`--max-ram` beyond the staging buffers). None of this needs a GPU: the
//! CUDA decoder supplies the bytes and the buffers.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};
use strata_store::pack::SourceKey;

use crate::store::planner::{ExpertCachePolicy, ExpertSlots};
use crate::{Error, Result};

/// Every image starts, and every read ends, at a multiple of this many bytes (the `O_DIRECT`
/// unit).
pub const IMAGE_ALIGN: usize = 4096;
/// The data file's name in the images' directory.
pub const DATA_FILE: &str = "cuda-layers.bin";
/// The manifest's name in the images' directory.
pub const MANIFEST_FILE: &str = "cuda-layers.json";
/// Bumped whenever the bytes of an image change for the same layout (the layout hash covers
/// offsets, dtypes and shapes, not how rows are arranged within a tensor).
const FORMAT_VERSION: u32 = 1;
/// Staging buffers an [`ImageReader`] reads into on CUDA: one being copied to the device, one
/// read, one ahead.
pub const STAGING_BUFFERS: usize = 3;

/// The key file of an images directory: the checkpoint's files as they were.
const SOURCE_FILE: &str = "source.json";
/// What an images directory's name ends with, after the key's digest.
const DIR_SUFFIX: &str = "-cuda";

fn source_key(checkpoint: &Path) -> Result<SourceKey> {
    let files = crate::offload::checkpoint_files(checkpoint)?;
    Ok(SourceKey::for_files(&files, "cuda-layers", None)?)
}

/// The directory of the layer images of the checkpoint at `checkpoint` (a file or a directory)
/// under `offload_dir`.
pub fn images_dir(offload_dir: &Path, checkpoint: &Path) -> Result<PathBuf> {
    Ok(offload_dir.join(format!("{}{DIR_SUFFIX}", source_key(checkpoint)?.digest())))
}

/// [`images_dir`], made ready for a load: created, with the checkpoint's key in it
/// (`source.json`), and the images directories of older versions of the same checkpoint (the
/// same file paths with other lengths or modification times) removed from `offload_dir`.
/// Returns the directory and the ones removed.
pub fn prepare_images_dir(offload_dir: &Path, checkpoint: &Path) -> Result<(PathBuf, Vec<PathBuf>)> {
    let key = source_key(checkpoint)?;
    let digest = key.digest();
    let dir = offload_dir.join(format!("{digest}{DIR_SUFFIX}"));
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let source = dir.join(SOURCE_FILE);
    if fs::read(&source).ok().and_then(|t| serde_json::from_slice::<SourceKey>(&t).ok()).as_ref() != Some(&key) {
        let json = serde_json::to_vec_pretty(&key).map_err(|e| Error::InvalidInput(e.to_string()))?;
        let tmp = dir.join(format!("{SOURCE_FILE}.tmp.{}", std::process::id()));
        fs::write(&tmp, json).and_then(|()| fs::rename(&tmp, &source)).map_err(io_err(&source))?;
    }
    let mut removed = Vec::new();
    for entry in fs::read_dir(offload_dir).map_err(io_err(offload_dir))? {
        let other = entry.map_err(io_err(offload_dir))?.path();
        let name = other.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !name.ends_with(DIR_SUFFIX) || name == format!("{digest}{DIR_SUFFIX}") {
            continue;
        }
        // Anything without a readable key of ours is left alone.
        let Ok(text) = fs::read(other.join(SOURCE_FILE)) else { continue };
        let Ok(other_key) = serde_json::from_slice::<SourceKey>(&text) else { continue };
        if !other_key.same_paths(&key) || other_key.files() == key.files() {
            continue;
        }
        // The manifest goes first, so that an interrupted removal leaves images that rebuild.
        let _ = fs::remove_file(other.join(MANIFEST_FILE));
        fs::remove_dir_all(&other).map_err(io_err(&other))?;
        removed.push(other);
    }
    Ok((dir, removed))
}

/// A progress callback for [`LayerImages::build`] that prints one line per tenth of the bytes
/// on stderr: "strata: `what` 40%".
pub fn progress_lines(what: &str) -> impl FnMut(u64, u64) + '_ {
    let mut shown = 0u64;
    move |done, total| {
        if done >= shown + total.div_ceil(10).max(1) || (done == total && shown < total) {
            shown = done;
            eprintln!("strata: {what} {:.0}%", 100.0 * done as f64 / total.max(1) as f64);
        }
    }
}

/// One image as the caller lays it out: the layer, its length and its layout hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSpec {
    /// The decoder layer.
    pub layer: usize,
    /// Bytes of the image.
    pub len: u64,
    /// A hash of the image's layout (what the caller places where), to tell a file laid out by
    /// another version of the placement.
    pub layout: u64,
}

/// An image in the data file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageEntry {
    /// What it holds.
    #[serde(flatten)]
    pub spec: ImageSpec,
    /// Where it starts in the data file (a multiple of [`IMAGE_ALIGN`]).
    pub offset: u64,
    /// The CRC-32 of its `len` bytes.
    pub crc32: u32,
}

impl ImageEntry {
    /// Bytes a read of the image takes: its length rounded up to [`IMAGE_ALIGN`].
    pub fn read_len(&self) -> usize {
        (self.spec.len as usize).next_multiple_of(IMAGE_ALIGN)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format_version: u32,
    images: Vec<ImageEntry>,
}

/// The layer images of one placement, opened for reading.
#[derive(Debug)]
pub struct LayerImages {
    path: PathBuf,
    /// The data file opened with `O_DIRECT`, where the file system allows it.
    direct: Option<File>,
    buffered: File,
    images: Vec<ImageEntry>,
}

/// The data file's length and each image's offset for `specs`.
fn layout(specs: &[ImageSpec]) -> (Vec<u64>, u64) {
    let mut at = 0u64;
    let offsets = specs
        .iter()
        .map(|s| {
            let offset = at;
            at += s.len.next_multiple_of(IMAGE_ALIGN as u64);
            offset
        })
        .collect();
    (offsets, at)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |error| Error::Io { path: path.to_path_buf(), error }
}

impl LayerImages {
    /// The images in `dir` if they are complete and exactly `specs` (same layers, lengths and
    /// layouts, in order); `None` when they must be (re)built.
    pub fn open(dir: &Path, specs: &[ImageSpec]) -> Result<Option<LayerImages>> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let json = match fs::read(&manifest_path) {
            Ok(json) => json,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&manifest_path)(e)),
        };
        let Ok(manifest) = serde_json::from_slice::<Manifest>(&json) else { return Ok(None) };
        let (offsets, data_len) = layout(specs);
        let same = manifest.format_version == FORMAT_VERSION
            && manifest.images.len() == specs.len()
            && manifest.images.iter().zip(specs).zip(&offsets).all(|((e, s), o)| e.spec == *s && e.offset == *o);
        if !same {
            return Ok(None);
        }
        let path = dir.join(DATA_FILE);
        match fs::metadata(&path) {
            Ok(m) if m.len() == data_len => {}
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        }
        Ok(Some(LayerImages::open_data(path, manifest.images)?))
    }

    fn open_data(path: PathBuf, images: Vec<ImageEntry>) -> Result<LayerImages> {
        let buffered = File::open(&path).map_err(io_err(&path))?;
        // O_DIRECT is refused by some file systems (tmpfs): reads then go through the page cache.
        let direct = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&path).ok();
        Ok(LayerImages { path, direct, buffered, images })
    }

    /// Writes the images `specs` describe into `dir` (replacing what is there), `fill(i, bytes)`
    /// writing image `i`'s `specs[i].len` bytes (zeroed beforehand), and opens them.
    /// `progress(done, total)` is called after each image.
    pub fn build(
        dir: &Path,
        specs: &[ImageSpec],
        fill: &mut dyn FnMut(usize, &mut [u8]) -> Result<()>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<LayerImages> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let manifest_path = dir.join(MANIFEST_FILE);
        match fs::remove_file(&manifest_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&manifest_path)(e)),
        }
        let (offsets, total) = layout(specs);
        // A name of this process's own: two loads building at once each write a whole file, and
        // the data is the same whichever rename lands last.
        let tmp = dir.join(format!("{DATA_FILE}.tmp.{}", std::process::id()));
        let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
        let images = match write_images(&mut file, &tmp, specs, &offsets, total, fill, progress) {
            Ok(images) => images,
            Err(e) => {
                // Nothing half-written stays behind (a full disk, a failed placement).
                drop(file);
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        file.sync_all().map_err(io_err(&tmp))?;
        drop(file);
        let path = dir.join(DATA_FILE);
        fs::rename(&tmp, &path).map_err(io_err(&tmp))?;
        sync_dir(dir)?;
        let manifest = Manifest { format_version: FORMAT_VERSION, images };
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::InvalidInput(e.to_string()))?;
        let tmp = dir.join(format!("{MANIFEST_FILE}.tmp.{}", std::process::id()));
        let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
        file.write_all(&json).and_then(|()| file.sync_all()).map_err(io_err(&tmp))?;
        drop(file);
        fs::rename(&tmp, &manifest_path).map_err(io_err(&tmp))?;
        sync_dir(dir)?;
        LayerImages::open_data(path, manifest.images)
    }

    /// The images in `dir` if they are exactly `specs` ([`LayerImages::open`]), else written
    /// there first ([`LayerImages::build`]), saying so and showing progress on stderr as `what`
    /// ("layer images"). Says too when reads cannot bypass the page cache.
    pub fn open_or_build(
        dir: &Path,
        specs: &[ImageSpec],
        what: &str,
        fill: &mut dyn FnMut(usize, &mut [u8]) -> Result<()>,
    ) -> Result<LayerImages> {
        let images = match LayerImages::open(dir, specs)? {
            Some(images) => images,
            None => {
                let total: u64 = specs.iter().map(|s| s.len).sum();
                let size = crate::store::planner::format_size(total);
                eprintln!("strata: writing {} {what} ({size}) to {}", specs.len(), dir.display());
                LayerImages::build(dir, specs, fill, &mut progress_lines(what))?
            }
        };
        if !images.direct() {
            eprintln!(
                "strata: {}: no O_DIRECT on this file system; {what} read through the page cache",
                images.path().display()
            );
        }
        Ok(images)
    }

    /// The data file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether reads into 4096-byte-aligned buffers bypass the page cache (`O_DIRECT`).
    pub fn direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The images, in order.
    pub fn images(&self) -> &[ImageEntry] {
        &self.images
    }

    /// Bytes of the largest read ([`ImageEntry::read_len`]): what a staging buffer holds.
    pub fn largest_read(&self) -> usize {
        self.images.iter().map(ImageEntry::read_len).max().unwrap_or(0)
    }

    /// Reads image `i` into the start of `buf`, which must hold its [`ImageEntry::read_len`]
    /// bytes, and checks it against its CRC.
    pub fn read_into(&self, i: usize, buf: &mut [u8]) -> Result<()> {
        let Some(e) = self.images.get(i) else {
            return Err(Error::InvalidInput(format!(
                "{}: no layer image {i} (it has {})",
                self.path.display(),
                self.images.len()
            )));
        };
        let read_len = e.read_len();
        if buf.len() < read_len {
            return Err(Error::InvalidInput(format!(
                "{}: layer {}'s image needs a {read_len}-byte buffer, got {} bytes",
                self.path.display(),
                e.spec.layer,
                buf.len()
            )));
        }
        let buf = &mut buf[..read_len];
        let aligned = (buf.as_ptr() as usize).is_multiple_of(IMAGE_ALIGN);
        let file = match &self.direct {
            Some(direct) if aligned => direct,
            _ => &self.buffered,
        };
        file.read_exact_at(buf, e.offset).map_err(io_err(&self.path))?;
        let len = e.spec.len as usize;
        let crc = crc32fast::hash(&buf[..len]);
        if crc != e.crc32 {
            return Err(Error::InvalidInput(format!(
                "{}: layer {}'s image (bytes {}..{}) fails its checksum (CRC-32 {crc:08x}, the manifest says {:08x}); \
                 remove the directory to rebuild it",
                self.path.display(),
                e.spec.layer,
                e.offset,
                e.offset + e.spec.len,
                e.crc32
            )));
        }
        Ok(())
    }
}

/// Bytes written between two syncs that also drop the written pages from the page cache, so
/// that writing images larger than RAM does not fill memory with dirty pages (a memory cgroup
/// counts them against the process).
const SYNC_EVERY: u64 = 256 << 20;

/// Writes the images of `specs` at `offsets` into `file` (at `path`), returning their entries.
fn write_images(
    file: &mut File,
    path: &Path,
    specs: &[ImageSpec],
    offsets: &[u64],
    total: u64,
    fill: &mut dyn FnMut(usize, &mut [u8]) -> Result<()>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<ImageEntry>> {
    use std::os::fd::AsRawFd;
    let largest = specs.iter().map(|s| s.len as usize).max().unwrap_or(0).next_multiple_of(IMAGE_ALIGN);
    let mut buf = vec![0u8; largest];
    let mut images = Vec::with_capacity(specs.len());
    let mut synced = 0u64;
    for (i, (spec, &offset)) in specs.iter().zip(offsets).enumerate() {
        let len = spec.len as usize;
        let padded = len.next_multiple_of(IMAGE_ALIGN);
        buf[..padded].fill(0);
        fill(i, &mut buf[..len])?;
        file.write_all(&buf[..padded]).map_err(io_err(path))?;
        images.push(ImageEntry { spec: *spec, offset, crc32: crc32fast::hash(&buf[..len]) });
        let done = offset + padded as u64;
        if done - synced >= SYNC_EVERY {
            file.sync_data().map_err(io_err(path))?;
            // Only advice: an error changes nothing that matters.
            // SAFETY: the descriptor is `file`'s, open for the whole call, which reads no memory.
            unsafe {
                libc::posix_fadvise(file.as_raw_fd(), synced as i64, (done - synced) as i64, libc::POSIX_FADV_DONTNEED)
            };
            synced = done;
        }
        progress(done, total);
    }
    Ok(images)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// A buffer an [`ImageReader`] reads into.
pub trait Staging: Send + 'static {
    /// The bytes to read into; may wait until whoever last read them (a copy to the device) is
    /// done.
    fn bytes(&mut self) -> Result<&mut [u8]>;
}

impl Staging for strata_tensor::AlignedBytes {
    fn bytes(&mut self) -> Result<&mut [u8]> {
        Ok(self.as_mut_slice())
    }
}

type Filled<B> = (usize, B, Result<()>);

/// Threads an [`ImageReader`] reads with: two reads in flight, so that one image's checksum
/// overlaps the next one's read and the disk always has a request queued.
pub const READER_THREADS: usize = 2;

fn thread_ended() -> Error {
    Error::InvalidInput("the layer image reader threads ended".into())
}

/// Reads images ahead into a ring of staging buffers on [`READER_THREADS`] threads of its own,
/// either in cyclic order (a streamed layer's pass, [`ImageReader::new`]) or the ones asked for
/// ([`ImageReader::on_request`], [`ImageReader::request`]: the experts a router picked).
/// [`ImageReader::take`] hands over the buffer holding an image (checked), and
/// [`ImageReader::give_back`] returns it, to read the next image in cyclic order, or the next one
/// requested. Reads may land out of order. Asked for an image it is not reading (a pass that
/// stopped on an error), a cyclic reader drops what it read ahead and starts again from that
/// one; an on-request reader reads it next, dropping a landed read nobody took if every buffer
/// holds one.
pub struct ImageReader<B: Staging> {
    images: Arc<LayerImages>,
    ask: Option<mpsc::Sender<(usize, B)>>,
    filled: mpsc::Receiver<Filled<B>>,
    /// A cyclic reader's images, in the order it reads them (empty for an on-request reader).
    cycle: Vec<usize>,
    /// A cyclic reader's place in `cycle` of the next image to ask for; `None` for an
    /// on-request reader.
    next: Option<usize>,
    /// An on-request reader's images to read, in order, as buffers come free.
    queue: std::collections::VecDeque<usize>,
    /// Buffers asked to read nothing.
    free: Vec<B>,
    /// Images asked for and not taken yet: being read, or landed in `landed`.
    asked: Vec<usize>,
    /// Reads that landed before they were taken.
    landed: Vec<Filled<B>>,
    /// Buffers with the reader threads.
    out: usize,
    threads: Vec<JoinHandle<()>>,
}

impl<B: Staging> ImageReader<B> {
    /// A cyclic reader of `images` into `buffers` (each as large as the largest image's read),
    /// which starts reading the first images at once.
    pub fn new(images: Arc<LayerImages>, buffers: Vec<B>) -> Result<ImageReader<B>> {
        let all = (0..images.images().len()).collect();
        ImageReader::cycling(images, buffers, all)
    }

    /// A cyclic reader of the images `ids` of `images` only, in that order (the streamed layers
    /// without a host copy).
    pub fn cycling(images: Arc<LayerImages>, buffers: Vec<B>, ids: Vec<usize>) -> Result<ImageReader<B>> {
        if ids.is_empty() || ids.iter().any(|&i| i >= images.images().len()) {
            return Err(Error::InvalidInput(format!(
                "a cyclic layer image reader of images {ids:?} of {} (internal)",
                images.images().len()
            )));
        }
        let mut reader = ImageReader::start(images, &buffers, Some(0))?;
        reader.cycle = ids;
        for buf in buffers {
            reader.give_back(buf);
        }
        Ok(reader)
    }

    /// A reader of `images` into `buffers` that reads only what it is asked for
    /// ([`ImageReader::request`], [`ImageReader::take`]).
    pub fn on_request(images: Arc<LayerImages>, buffers: Vec<B>) -> Result<ImageReader<B>> {
        let mut reader = ImageReader::start(images, &buffers, None)?;
        reader.free = buffers;
        Ok(reader)
    }

    fn start(images: Arc<LayerImages>, buffers: &[B], next: Option<usize>) -> Result<ImageReader<B>> {
        if images.images().is_empty() || buffers.is_empty() {
            return Err(Error::InvalidInput("a layer image reader needs images and buffers".into()));
        }
        let (ask, asked) = mpsc::channel::<(usize, B)>();
        let asked = Arc::new(std::sync::Mutex::new(asked));
        let (done, filled) = mpsc::channel::<Filled<B>>();
        let mut threads = Vec::with_capacity(READER_THREADS);
        for t in 0..READER_THREADS {
            let (asked, done, images) = (asked.clone(), done.clone(), images.clone());
            let thread = std::thread::Builder::new()
                .name(format!("strata-layer-images-{t}"))
                .spawn(move || {
                    loop {
                        // The lock is held only to take the next request, not during the read.
                        let next = asked.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok((i, mut buf)) = next else { break };
                        let read = buf.bytes().and_then(|bytes| images.read_into(i, bytes));
                        if done.send((i, buf, read)).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|error| Error::Io { path: PathBuf::from("(layer image reader thread)"), error })?;
            threads.push(thread);
        }
        Ok(ImageReader {
            images,
            ask: Some(ask),
            filled,
            cycle: Vec::new(),
            next,
            queue: Default::default(),
            free: Vec::new(),
            asked: Vec::new(),
            landed: Vec::new(),
            out: 0,
            threads,
        })
    }

    /// The images it reads.
    pub fn images(&self) -> &LayerImages {
        &self.images
    }

    /// Asks an on-request reader to read `ids` (those not asked for already), in order, as
    /// buffers come free.
    pub fn request(&mut self, ids: &[usize]) {
        for &i in ids {
            if !self.asked.contains(&i) && !self.queue.contains(&i) {
                self.queue.push_back(i);
            }
        }
        self.feed();
    }

    /// The buffer holding image `i`, read and checked (waiting for the read).
    pub fn take(&mut self, i: usize) -> Result<B> {
        if !self.asked.contains(&i) {
            if self.next.is_some() {
                self.restart(i)?;
            } else {
                self.queue.retain(|&q| q != i);
                self.queue.push_front(i);
                self.feed();
            }
        }
        let (buf, read) = loop {
            if let Some(at) = self.landed.iter().position(|(got, _, _)| *got == i) {
                let (_, buf, read) = self.landed.swap_remove(at);
                break (buf, read);
            }
            if self.out == 0 {
                // Every buffer is held by the caller, or holds a read nobody took: an on-request
                // reader drops one of those to read `i`.
                match self.landed.pop() {
                    Some((got, b, _)) if self.next.is_none() => {
                        self.forget(got);
                        self.free.push(b);
                        self.feed();
                        continue;
                    }
                    Some(l) => self.landed.push(l),
                    None => {}
                }
                return Err(Error::InvalidInput(
                    "every layer staging buffer is held (internal: a buffer taken was not given back)".into(),
                ));
            }
            let filled = self.filled.recv().map_err(|_| thread_ended())?;
            self.out -= 1;
            self.landed.push(filled);
        };
        self.forget(i);
        if let Err(e) = read {
            if self.next.is_some() {
                // The buffer stays in the ring: asked for the same image again.
                self.ask(i, buf);
            } else {
                self.free.push(buf);
                self.feed();
            }
            return Err(e);
        }
        Ok(buf)
    }

    /// Drops one ask for image `i` from the books.
    fn forget(&mut self, i: usize) {
        if let Some(at) = self.asked.iter().position(|&a| a == i) {
            self.asked.remove(at);
        }
    }

    /// The images it reads, shared.
    pub fn shared_images(&self) -> Arc<LayerImages> {
        self.images.clone()
    }

    /// Drops what was read ahead and asks for the images from `i` on (a cyclic reader).
    fn restart(&mut self, i: usize) -> Result<()> {
        let Some(at) = self.cycle.iter().position(|&c| c == i) else {
            return Err(Error::InvalidInput(format!(
                "layer image {i} is not one this reader reads (internal: its layer has a host copy)"
            )));
        };
        let mut bufs: Vec<B> = self.landed.drain(..).map(|(_, b, _)| b).collect();
        while self.out > 0 {
            let (_, b, _) = self.filled.recv().map_err(|_| thread_ended())?;
            self.out -= 1;
            bufs.push(b);
        }
        self.asked.clear();
        self.next = Some(at);
        for b in bufs {
            self.give_back(b);
        }
        Ok(())
    }

    /// Returns a buffer [`ImageReader::take`] handed over: a cyclic reader asks it to read the
    /// next image after those already asked for; an on-request reader, the next one requested.
    pub fn give_back(&mut self, buf: B) {
        match self.next {
            Some(at) => {
                self.next = Some((at + 1) % self.cycle.len());
                self.ask(self.cycle[at], buf);
            }
            None => {
                self.free.push(buf);
                self.feed();
            }
        }
    }

    /// Gives free buffers to the requested images.
    fn feed(&mut self) {
        while !self.queue.is_empty() {
            let Some(buf) = self.free.pop() else { break };
            let i = self.queue.pop_front().expect("not empty");
            self.ask(i, buf);
        }
    }

    fn ask(&mut self, i: usize, buf: B) {
        if let Some(ask) = &self.ask
            && ask.send((i, buf)).is_ok()
        {
            self.out += 1;
            self.asked.push(i);
        }
    }
}

impl<B: Staging> Drop for ImageReader<B> {
    fn drop(&mut self) {
        // The threads end once the channel closes, after the reads they are doing.
        self.ask = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Host copies of the images an on-request [`ImageReader`] read last, in buffers of the
/// reader's kind, kept under an eviction policy: the host-memory tier between a device expert
/// cache and the experts' images on disk (`--max-ram` beyond the staging buffers).
///
/// [`HostTier::fetch`] brings a batch of images: those the tier holds from their buffers,
/// the others read from disk. A read image stays: the tier swaps the staging buffer it landed
/// in for the buffer of the image it evicts, which goes back to the reader to read into (a
/// page-locked buffer waits there for its last copy out). No bytes are copied on the host.
/// With no buffers, every image is read.
pub struct HostTier<B: Staging> {
    /// Which image each buffer holds, and whom a read evicts (the device cache's rule).
    table: ExpertSlots<Box<dyn ExpertCachePolicy>>,
    buffers: Vec<B>,
    counts: HostTierCounts,
}

/// What a [`HostTier`] did: images served from host memory and read from disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostTierCounts {
    /// Images found in a host buffer.
    pub hits: u64,
    /// Images read from disk.
    pub reads: u64,
}

impl<B: Staging> HostTier<B> {
    /// A tier of `buffers` (each as large as the reader's), empty, evicting by `policy` (its
    /// layers set).
    pub fn new(buffers: Vec<B>, policy: Box<dyn ExpertCachePolicy>) -> HostTier<B> {
        HostTier { table: ExpertSlots::new(buffers.len(), policy), counts: HostTierCounts::default(), buffers }
    }

    /// Images it can hold.
    pub fn slots(&self) -> usize {
        self.buffers.len()
    }

    /// The counts so far.
    pub fn counts(&self) -> HostTierCounts {
        self.counts
    }

    /// Forgets what the buffers hold and the counts, evicting by `policy` from now on.
    pub fn reset(&mut self, policy: Box<dyn ExpertCachePolicy>) {
        self.table = ExpertSlots::new(self.buffers.len(), policy);
        self.counts = HostTierCounts::default();
    }

    /// Hands `upload` each of `ids` (distinct images of `reader`'s), in order, as
    /// `(position in ids, buffer holding it)`: from the tier's buffers, or read by `reader`
    /// (asked for all of them at once, so reads run ahead of the uploads) and then kept, evicting
    /// first the images `held` says are held elsewhere (on the device: the tier then keeps more
    /// images the device lacks). On an error (a read, or `upload`'s) the buffers this batch was
    /// to fill are forgotten, so that no buffer passes for an image it does not hold.
    pub fn fetch(
        &mut self,
        reader: &mut ImageReader<B>,
        ids: &[usize],
        held: impl Fn(usize) -> bool,
        mut upload: impl FnMut(usize, &B) -> Result<()>,
    ) -> Result<()> {
        // Per id: Some((slot, false)) held in `slot`; Some((slot, true)) read and kept in
        // `slot`; None read and not kept (every buffer is this batch's).
        let plan = self.table.serve_preferring(ids, held);
        let reads: Vec<usize> =
            ids.iter().zip(&plan).filter(|(_, p)| !matches!(p, Some((_, false)))).map(|(&i, _)| i).collect();
        reader.request(&reads);
        for (at, (&i, &p)) in ids.iter().zip(&plan).enumerate() {
            let done = match p {
                Some((slot, false)) => {
                    self.counts.hits += 1;
                    upload(at, &self.buffers[slot])
                }
                _ => {
                    self.counts.reads += 1;
                    reader.take(i).and_then(|buf| {
                        let up = upload(at, &buf);
                        let back = match (p, &up) {
                            (Some((slot, _)), Ok(())) => std::mem::replace(&mut self.buffers[slot], buf),
                            _ => buf,
                        };
                        reader.give_back(back);
                        up
                    })
                }
            };
            if let Err(e) = done {
                for &(slot, _) in plan[at..].iter().flatten().filter(|(_, read)| *read) {
                    self.table.forget(slot);
                }
                return Err(e);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs() -> Vec<ImageSpec> {
        [(4, 5000u64), (5, 4096), (6, 1), (7, 9000)]
            .iter()
            .map(|&(layer, len)| ImageSpec { layer, len, layout: 17 * layer as u64 })
            .collect()
    }

    fn fill(i: usize, bytes: &mut [u8]) -> Result<()> {
        for (j, b) in bytes.iter_mut().enumerate() {
            *b = (i * 31 + j * 7) as u8;
        }
        Ok(())
    }

    fn expected(i: usize, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        fill(i, &mut v).unwrap();
        v
    }

    /// A 4096-aligned buffer, as the page-locked ones are.
    fn aligned(len: usize) -> strata_tensor::AlignedBytes {
        strata_tensor::AlignedBytes::zeroed_huge(len.max(1 << 21))
    }

    /// The images of [`specs`] built in `dir`, and staging buffers for a reader of them.
    fn reader_parts(dir: &Path) -> (Arc<LayerImages>, Vec<strata_tensor::AlignedBytes>) {
        let images = Arc::new(LayerImages::build(dir, &specs(), &mut fill, &mut |_, _| {}).unwrap());
        (images, (0..STAGING_BUFFERS).map(|_| aligned(12288)).collect())
    }

    /// Whether `buf` holds image `i` of [`specs`].
    fn check(i: usize, buf: &strata_tensor::AlignedBytes) {
        let len = specs()[i].len as usize;
        assert_eq!(&buf.as_slice()[..len], &expected(i, len)[..], "image {i}");
    }

    #[test]
    fn built_images_read_back_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let specs = specs();
        assert!(LayerImages::open(dir.path(), &specs).unwrap().is_none());
        let mut seen = Vec::new();
        let images =
            LayerImages::build(dir.path(), &specs, &mut fill, &mut |done, total| seen.push((done, total))).unwrap();
        assert_eq!(seen.last(), Some(&(8192 + 4096 + 4096 + 12288, 28672)));
        let offsets: Vec<u64> = images.images().iter().map(|e| e.offset).collect();
        assert_eq!(offsets, [0, 8192, 12288, 16384]);
        let mut buf = aligned(12288);
        for (i, s) in specs.iter().enumerate() {
            images.read_into(i, buf.as_mut_slice()).unwrap();
            assert_eq!(&buf.as_mut_slice()[..s.len as usize], &expected(i, s.len as usize)[..], "image {i}");
            // An unaligned buffer reads through the page cache, to the same bytes.
            let mut plain = vec![0u8; 12289];
            images.read_into(i, &mut plain[1..]).unwrap();
            assert_eq!(&plain[1..1 + s.len as usize], &expected(i, s.len as usize)[..]);
        }
        let reopened = LayerImages::open(dir.path(), &specs).unwrap().expect("complete images reopen");
        assert_eq!(reopened.images(), images.images());
    }

    #[test]
    fn other_layouts_or_a_short_file_mean_rebuild() {
        let dir = tempfile::tempdir().unwrap();
        let specs = specs();
        LayerImages::build(dir.path(), &specs, &mut fill, &mut |_, _| {}).unwrap();
        let mut other = specs.clone();
        other[2].layout += 1;
        assert!(LayerImages::open(dir.path(), &other).unwrap().is_none(), "another layout");
        assert!(LayerImages::open(dir.path(), &specs[..3]).unwrap().is_none(), "fewer layers");
        let data = dir.path().join(DATA_FILE);
        let f = OpenOptions::new().write(true).open(&data).unwrap();
        f.set_len(4096).unwrap();
        assert!(LayerImages::open(dir.path(), &specs).unwrap().is_none(), "a truncated data file");
        fs::remove_file(dir.path().join(MANIFEST_FILE)).unwrap();
        assert!(LayerImages::open(dir.path(), &specs).unwrap().is_none(), "no manifest");
    }

    #[test]
    fn a_build_that_fails_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let mut failing = |i: usize, bytes: &mut [u8]| {
            if i == 2 {
                return Err(Error::InvalidInput("no image 2 today".into()));
            }
            fill(i, bytes)
        };
        let err = LayerImages::build(dir.path(), &specs(), &mut failing, &mut |_, _| {}).unwrap_err();
        assert!(err.to_string().contains("no image 2 today"), "{err}");
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "{left:?}");
        assert!(LayerImages::open(dir.path(), &specs()).unwrap().is_none());
    }

    #[test]
    fn a_corrupted_image_is_refused_naming_the_layer() {
        let dir = tempfile::tempdir().unwrap();
        let images = LayerImages::build(dir.path(), &specs(), &mut fill, &mut |_, _| {}).unwrap();
        let f = OpenOptions::new().write(true).open(images.path()).unwrap();
        f.write_all_at(&[0xff], 8192 + 100).unwrap();
        drop(f);
        let mut buf = vec![0u8; 12288];
        images.read_into(0, &mut buf).unwrap();
        let err = images.read_into(1, &mut buf).unwrap_err().to_string();
        assert!(err.contains("layer 5's image") && err.contains("checksum") && err.contains(DATA_FILE), "{err}");
        let err = images.read_into(0, &mut buf[..4096]).unwrap_err().to_string();
        assert!(err.contains("8192-byte buffer"), "{err}");
    }

    #[test]
    fn a_changed_checkpoint_gets_a_new_directory_and_the_old_one_goes() {
        let root = tempfile::tempdir().unwrap();
        let offload = root.path().join("offload");
        let model = root.path().join("model.gguf");
        fs::write(&model, b"one").unwrap();
        let (first, removed) = prepare_images_dir(&offload, &model).unwrap();
        assert!(removed.is_empty() && first.join(SOURCE_FILE).is_file());
        assert_eq!(first, images_dir(&offload, &model).unwrap());
        LayerImages::build(&first, &specs(), &mut fill, &mut |_, _| {}).unwrap();
        // Another model's images and a directory that is not ours stay.
        let other = root.path().join("other.gguf");
        fs::write(&other, b"other").unwrap();
        let (kept, _) = prepare_images_dir(&offload, &other).unwrap();
        fs::create_dir_all(offload.join("foreign-cuda")).unwrap();
        // Same path, other length: a new directory, and the old one removed.
        fs::write(&model, b"two!").unwrap();
        let (second, removed) = prepare_images_dir(&offload, &model).unwrap();
        assert_ne!(second, first);
        assert_eq!((removed.len(), &removed[0]), (1, &first));
        assert!(!first.exists() && second.is_dir() && kept.is_dir() && offload.join("foreign-cuda").is_dir());
        // Again: nothing to remove, the key file as it was.
        assert!(prepare_images_dir(&offload, &model).unwrap().1.is_empty());
    }

    #[test]
    fn an_on_request_reader_reads_what_it_is_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let (images, buffers) = reader_parts(dir.path());
        let mut reader = ImageReader::on_request(images, buffers).unwrap();
        // A batch larger than the buffers, taken in order; then one taken without a request.
        reader.request(&[3, 1, 0, 2]);
        for i in [3, 1, 0, 2, 2] {
            let buf = reader.take(i).unwrap();
            check(i, &buf);
            reader.give_back(buf);
        }
        // Requested but never taken: once every buffer holds such a read, a take drops one.
        reader.request(&[0, 1, 2]);
        let buf = reader.take(3).unwrap();
        check(3, &buf);
        reader.give_back(buf);
        for i in [1, 0, 2] {
            let buf = reader.take(i).unwrap();
            check(i, &buf);
            reader.give_back(buf);
        }
        let held: Vec<_> = (0..STAGING_BUFFERS).map(|i| reader.take(i).unwrap()).collect();
        assert!(reader.take(3).unwrap_err().to_string().contains("every layer staging buffer is held"));
        drop(held);
    }

    #[test]
    fn the_reader_hands_images_over_in_any_order() {
        let dir = tempfile::tempdir().unwrap();
        let specs = specs();
        let (images, buffers) = reader_parts(dir.path());
        let mut reader = ImageReader::new(images, buffers).unwrap();
        // Two passes in order, then a pass that starts again from image 2, and one from 0.
        for i in [0, 1, 2, 3, 0, 1, 2, 3, 2, 3, 0, 0, 1, 2, 3] {
            let buf = reader.take(i).unwrap();
            check(i, &buf);
            reader.give_back(buf);
        }
        // Holding every buffer is an error, not a hang.
        let held: Vec<_> = (1..=STAGING_BUFFERS).map(|i| reader.take(i % specs.len()).unwrap()).collect();
        assert!(reader.take(0).unwrap_err().to_string().contains("every layer staging buffer is held"));
        for b in held {
            reader.give_back(b);
        }
    }

    /// A host tier of `slots` buffers under `lru`, in front of an on-request reader of [`specs`].
    fn tier_parts(
        dir: &Path,
        slots: usize,
    ) -> (ImageReader<strata_tensor::AlignedBytes>, HostTier<strata_tensor::AlignedBytes>) {
        let (images, buffers) = reader_parts(dir);
        let tier = HostTier::new(
            (0..slots).map(|_| aligned(12288)).collect(),
            Box::new(crate::store::planner::Lru::default()),
        );
        (ImageReader::on_request(images, buffers).unwrap(), tier)
    }

    /// Fetches `ids` through `tier`, checking each upload's bytes; returns the tier's hits and
    /// reads of this batch.
    fn fetch_checked(
        reader: &mut ImageReader<strata_tensor::AlignedBytes>,
        tier: &mut HostTier<strata_tensor::AlignedBytes>,
        ids: &[usize],
    ) -> (u64, u64) {
        let before = tier.counts();
        let mut seen = Vec::new();
        tier.fetch(
            reader,
            ids,
            |_| false,
            |at, buf| {
                check(ids[at], buf);
                seen.push(at);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen, (0..ids.len()).collect::<Vec<_>>(), "every id handed over, in order");
        let after = tier.counts();
        (after.hits - before.hits, after.reads - before.reads)
    }

    #[test]
    fn a_cyclic_reader_of_some_images_reads_only_those() {
        let dir = tempfile::tempdir().unwrap();
        let (images, buffers) = reader_parts(dir.path());
        let mut reader = ImageReader::cycling(images.clone(), buffers, vec![1, 3]).unwrap();
        // Two passes, one started again from 3, then one from 1.
        for i in [1, 3, 1, 3, 3, 1, 3, 1] {
            let buf = reader.take(i).unwrap();
            check(i, &buf);
            reader.give_back(buf);
        }
        // An image it does not cycle through is an error, and the reader goes on.
        let err = reader.take(2).unwrap_err().to_string();
        assert!(err.contains("layer image 2 is not one this reader reads"), "{err}");
        let buf = reader.take(3).unwrap();
        check(3, &buf);
        reader.give_back(buf);
        let none = || (0..STAGING_BUFFERS).map(|_| aligned(12288)).collect::<Vec<_>>();
        assert!(ImageReader::cycling(images.clone(), none(), vec![]).is_err());
        assert!(ImageReader::cycling(images, none(), vec![0, 4]).is_err());
    }

    #[test]
    fn a_host_tier_keeps_what_it_read_and_evicts_by_its_policy() {
        let dir = tempfile::tempdir().unwrap();
        let (mut reader, mut tier) = tier_parts(dir.path(), 2);
        assert_eq!(tier.slots(), 2);
        assert_eq!(fetch_checked(&mut reader, &mut tier, &[0, 1]), (0, 2));
        assert_eq!(fetch_checked(&mut reader, &mut tier, &[1, 0]), (2, 0));
        // 2 evicts 1, the least recently used outside the batch.
        assert_eq!(fetch_checked(&mut reader, &mut tier, &[0, 2]), (1, 1));
        assert_eq!(fetch_checked(&mut reader, &mut tier, &[1]), (0, 1));
        assert_eq!(fetch_checked(&mut reader, &mut tier, &[1, 0]), (1, 1));
        // A batch wider than the tier: each read evicts one the batch has used (0, then 1); the
        // last two stay.
        assert_eq!(fetch_checked(&mut reader, &mut tier, &[0, 1, 2, 3]), (2, 2));
        assert_eq!(fetch_checked(&mut reader, &mut tier, &[3, 2]), (2, 0));
        // The buffers went round between the tier and the reader many times: all still read right.
        for i in [0, 1, 2, 3, 3, 2, 1, 0] {
            fetch_checked(&mut reader, &mut tier, &[i]);
        }
        assert_eq!(tier.counts().hits + tier.counts().reads, 23);
        tier.reset(Box::new(crate::store::planner::Lru::default()));
        assert_eq!(tier.counts(), HostTierCounts::default());
        assert_eq!(fetch_checked(&mut reader, &mut tier, &[0]), (0, 1), "forgotten by the reset");
    }

    #[test]
    fn a_host_tier_gives_up_what_is_held_elsewhere_first() {
        let dir = tempfile::tempdir().unwrap();
        let (mut reader, mut tier) = tier_parts(dir.path(), 2);
        fetch_checked(&mut reader, &mut tier, &[0, 1]);
        // 0 is the least recently used, but 1 is held elsewhere (on the device): 2 evicts 1.
        let upload = |at: usize, buf: &strata_tensor::AlignedBytes| {
            check([2][at], buf);
            Ok(())
        };
        tier.fetch(&mut reader, &[2], |u| u == 1, upload).unwrap();
        assert_eq!(fetch_checked(&mut reader, &mut tier, &[0, 2]), (2, 0));
        assert_eq!(fetch_checked(&mut reader, &mut tier, &[1]), (0, 1));
    }

    #[test]
    fn a_host_tier_without_buffers_reads_everything() {
        let dir = tempfile::tempdir().unwrap();
        let (mut reader, mut tier) = tier_parts(dir.path(), 0);
        for _ in 0..3 {
            assert_eq!(fetch_checked(&mut reader, &mut tier, &[2, 0, 3]), (0, 3));
        }
    }

    #[test]
    fn a_failed_upload_leaves_no_buffer_passing_for_an_image_it_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let (mut reader, mut tier) = tier_parts(dir.path(), 3);
        fetch_checked(&mut reader, &mut tier, &[0, 1, 2]);
        // 3 is read to evict 2, and its upload fails: 0, after it in the batch, is not handed over.
        let mut calls = 0;
        let err = tier.fetch(
            &mut reader,
            &[1, 3, 0],
            |_| false,
            |at, _| {
                calls += 1;
                if at == 1 { Err(Error::InvalidInput("copy failed".into())) } else { Ok(()) }
            },
        );
        assert!(err.unwrap_err().to_string().contains("copy failed"));
        assert_eq!(calls, 2);
        // 2's buffer was planned for 3: neither is held now. 0 and 1 stayed.
        assert_eq!(fetch_checked(&mut reader, &mut tier, &[0, 1]), (2, 0));
        assert_eq!(fetch_checked(&mut reader, &mut tier, &[3]), (0, 1));
        assert_eq!(fetch_checked(&mut reader, &mut tier, &[2]), (0, 1));
    }
}
