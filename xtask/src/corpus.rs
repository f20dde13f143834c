//! `cargo xtask corpus`: a long public-domain English text for perplexity measurements,
//! available offline once fetched: Jane Austen's *Pride and Prejudice* (1813) as shipped by the
//! Debian package `r-cran-janeaustenr` (the novels as R character vectors, one line each).
//!
//! The package is fetched with `apt-get download` (a pinned version, checked against its
//! sha256), unpacked with `dpkg-deb`, and the novel decoded from R's lazy-load database
//! (`data/Rdata.rdb`: zlib blobs, each one object in R's XDR serialization) by a few lines of
//! the system Python. The text lands in `<strata cache>/corpus/pride-and-prejudice.txt`, whose
//! path the command prints.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::kernels::cache_dir;

/// The Debian package and version the text comes from.
const PACKAGE: &str = "r-cran-janeaustenr";
const VERSION: &str = "1.0.0-1";
const SHA256: &str = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95";
/// The novel's first line in the package, which picks its object out of the database.
const TITLE: &str = "PRIDE AND PREJUDICE";
const FILE: &str = "pride-and-prejudice.txt";

/// Decodes every character vector of an R lazy-load database and writes the one whose first
/// element is the title, one element per line. argv: rdb path, title, output path.
const DECODE: &str = r#"
import struct, sys, zlib
data = open(sys.argv[1], 'rb').read()
title, out = sys.argv[2], sys.argv[3]
off = 0
while off < len(data):
    # A blob: 4-byte big-endian uncompressed length, then a zlib stream.
    z = zlib.decompressobj()
    blob = z.decompress(data[off + 4:])
    off += 4 + len(data) - off - 4 - len(z.unused_data)
    if blob[:2] != b'X\n':
        continue
    # Header: format version, R version, minimum version, then (version 3) the native encoding.
    p = 2 + 12
    (version,) = struct.unpack('>i', blob[2:6])
    if version == 3:
        (n,) = struct.unpack('>i', blob[p:p + 4])
        p += 4 + n
    flags, length = struct.unpack('>ii', blob[p:p + 8])
    p += 8
    if flags & 0xff != 16:  # not a character vector (STRSXP)
        continue
    lines = []
    for _ in range(length):
        _, n = struct.unpack('>ii', blob[p:p + 8])
        p += 8
        if n < 0:  # NA
            lines.append('')
            continue
        lines.append(blob[p:p + n].decode('utf-8'))
        p += n
    if lines and lines[0] == title:
        open(out, 'w', encoding='utf-8').write('\n'.join(lines) + '\n')
        sys.exit(0)
sys.exit('no character vector starting with %r in %s' % (title, sys.argv[1]))
"#;

/// Prints the path of the corpus text, fetching it first if it is not cached.
pub fn run() -> Result<()> {
    println!("{}", ensure_corpus()?.display());
    Ok(())
}

/// The corpus text, fetched and decoded on first use.
pub fn ensure_corpus() -> Result<PathBuf> {
    let dir = cache_dir().join("corpus");
    let text = dir.join(FILE);
    if text.is_file() {
        return Ok(text);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let work = dir.join("download");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    eprintln!("fetching {PACKAGE}={VERSION} (Jane Austen's novels, public domain) with apt-get download");
    run_checked(
        Command::new("apt-get").args(["download", &format!("{PACKAGE}={VERSION}")]).current_dir(&work),
        "apt-get download",
    )?;
    let deb = work.join(format!("{PACKAGE}_{VERSION}_all.deb"));
    let digest = sha256(&deb)?;
    if digest != SHA256 {
        bail!("{} has sha256 {digest}, expected {SHA256}", deb.display());
    }
    let root = work.join("x");
    run_checked(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root), "dpkg-deb -x")?;
    let rdb = root.join("usr/lib/R/site-library/janeaustenr/data/Rdata.rdb");
    let tmp = dir.join(format!("{FILE}.tmp"));
    run_checked(Command::new("python3").args(["-c", DECODE]).arg(&rdb).arg(TITLE).arg(&tmp), "decoding the novel")?;
    std::fs::rename(&tmp, &text)?;
    let _ = std::fs::remove_dir_all(&work);
    eprintln!("wrote {}", text.display());
    Ok(text)
}

fn sha256(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(path).output().context("cannot run sha256sum")?;
    if !out.status.success() {
        bail!("sha256sum {} failed", path.display());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.split_whitespace().next().unwrap_or_default().to_string())
}

fn run_checked(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}
