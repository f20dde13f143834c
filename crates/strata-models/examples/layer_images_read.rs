//! How fast the layer image reader (`strata_models::layer_images`) streams from disk, against
//! the same file read with plain `O_DIRECT` preads back to back on one thread: what a CUDA
//! decoder under `--max-vram --offload-dir` can get from this disk, without a GPU (the staging
//! buffers are ordinary 2 MiB-aligned memory here, page-locked ones on CUDA).
//!
//! `cargo run --release -p strata-models --example layer_images_read -- DIR [IMAGE_MIB] [IMAGES] [PASSES]`
//! writes IMAGES images of IMAGE_MIB MiB (default 8 of 64) into DIR, reads them PASSES times
//! (default 3) each way, alternating, and prints the median rate of each and their ratio. The
//! file is removed at the end.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use strata_models::layer_images::{ImageReader, ImageSpec, LayerImages, STAGING_BUFFERS};
use strata_tensor::AlignedBytes;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A buffer of `len` bytes with every page already faulted in, as page-locked memory is.
fn touched(len: usize) -> AlignedBytes {
    let mut b = AlignedBytes::zeroed_huge(len);
    b.as_mut_slice().fill(1);
    b
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first().map(PathBuf::from) else {
        eprintln!("usage: layer_images_read DIR [IMAGE_MIB] [IMAGES] [PASSES]");
        std::process::exit(2);
    };
    let arg = |i: usize, default: usize| args.get(i).map_or(default, |a| a.parse().expect("a number"));
    let (mib, count, passes) = (arg(1, 64), arg(2, 8), arg(3, 3));
    let dir = dir.join("layer-images-read");
    let len = (mib << 20) as u64 - 1000;
    let specs: Vec<ImageSpec> = (0..count).map(|layer| ImageSpec { layer, len, layout: 0 }).collect();
    let mut fill = |i: usize, bytes: &mut [u8]| {
        bytes.iter_mut().enumerate().for_each(|(j, b)| *b = (i + j / 4096) as u8);
        Ok(())
    };
    let images = Arc::new(LayerImages::build(&dir, &specs, &mut fill, &mut |_, _| {}).expect("write the images"));
    assert!(images.direct(), "{}: no O_DIRECT here, the rates would be the page cache's", dir.display());
    let total: u64 = images.images().iter().map(|e| e.read_len() as u64).sum();
    let read = images.largest_read();
    println!(
        "{count} images of {:.1} MiB in {} ({:.0} MiB), {passes} passes each way",
        len as f64 / (1 << 20) as f64,
        images.path().display(),
        total as f64 / (1 << 20) as f64
    );
    let direct = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(images.path()).unwrap();
    let mut plain_buf = touched(read);
    let (mut ring, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..passes {
        // The reader, as a CUDA pass takes the images: each taken (checked) and given back. A
        // fresh reader each pass, timed from its start, so that no read ahead of it ran during
        // the other loop; dropping it (after the timing) waits for the reads it started ahead.
        let buffers: Vec<AlignedBytes> = (0..STAGING_BUFFERS).map(|_| touched(read)).collect();
        let t = Instant::now();
        let mut reader = ImageReader::new(images.clone(), buffers).expect("start the reader");
        for i in 0..count {
            let buf = reader.take(i).expect("read an image");
            reader.give_back(buf);
        }
        ring.push(total as f64 / t.elapsed().as_secs_f64() / 1e9);
        drop(reader);
        // The bound: the same bytes, one O_DIRECT pread after the other, no checksum.
        let t = Instant::now();
        for e in images.images() {
            direct.read_exact_at(&mut plain_buf.as_mut_slice()[..e.read_len()], e.offset).unwrap();
        }
        plain.push(total as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    let (r, p) = (median(&mut ring), median(&mut plain));
    println!("image reader (read ahead, CRC-checked): {r:.2} GB/s");
    println!("plain O_DIRECT preads, one at a time:  {p:.2} GB/s");
    println!("ratio: {:.2}", r / p);
    std::fs::remove_dir_all(&dir).expect("remove the images");
}
