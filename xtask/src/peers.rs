//! `cargo xtask bench --peers`: strata's CPU speed against llama.cpp and mistral.rs, on the same
//! GGUF files, with the same thread count, in one invocation.
//!
//! The peers are installed once into `$XDG_CACHE_HOME/strata/peers` (see [`install`]). For each
//! file (by default the SmolLM2-135M Q4_1 GGUF and synthetic TinyLlama-1.1B-shape GGUFs in q4_0,
//! q8_0 and q4_k, written by `synth-model` into `<cache>/synth` when absent) every engine
//! prefills 128 tokens and decodes 64, reporting medians of 3 runs (see [`engines`]).
//!
//! The machine's memory read bandwidth is measured in the same invocation, before each file and
//! at the end; decode speed is shown as a fraction of the bandwidth bound, `bandwidth / weight
//! bytes read per token`, with the best bandwidth measured and the bytes per token strata
//! reports for the file (the same weights, so the same bound for every engine). The table
//! closes with strata/peer ratios; the target is 1.0 against the faster peer in each phase.
//!
//! On a shared machine other work slows whichever engine it lands on. Every measurement records
//! how many cores other processes kept busy meanwhile (see [`load`]), and `--rounds N` repeats
//! the whole sequence N times, interleaving the engines, and keeps each engine's best median
//! per phase (interference only ever slows an engine down); the JSON has every round. With
//! several rounds the table also gives paired ratios: strata over the faster peer of the same
//! round, round by round and their median. The engines of a round run back to back on a file, so
//! a pair shares the machine's memory bandwidth, which on a shared VM drifts by a factor of two
//! over minutes; the best-of-rounds ratio compares figures taken minutes apart.
//!
//! `--int8` adds a fourth row, strata with one-digit activations (`--act-quant int8`, the
//! rounding the peers use; strata's default keeps two digits for accuracy), run after the peers
//! in each round and compared with them the same way.
//!
//! Runs in release: from a debug build it rebuilds xtask in release and reruns itself, and it
//! builds the release `strata` binary it measures.

mod engines;
mod install;
mod load;
pub mod offload;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::synth;
use engines::{Speeds, Workload};
use load::{CpuSample, Interference};

/// Prompt tokens of the prefill (the workload).
const PROMPT_TOKENS: usize = 128;
/// Tokens of the decode.
const GEN_TOKENS: usize = 64;
/// The synthetic files of the default set: TinyLlama-1.1B shape in these dtypes.
const SYNTH_SHAPE: &str = "tinyllama-1.1b";
const SYNTH_DTYPES: [&str; 3] = ["q4_0", "q8_0", "q4_k"];

/// Prints a progress line on stderr.
fn say(msg: &str) {
    eprintln!("peers: {msg}");
}

/// What `cargo xtask bench --peers` was asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Options {
    threads: usize,
    files: Vec<PathBuf>,
    rounds: usize,
    json: bool,
    /// Also run strata with `--act-quant int8`.
    int8: bool,
}

impl Options {
    /// Parses `--peers [--threads N] [--files FILE...] [--rounds N] [--int8] [--json]`.
    fn parse(args: &[String]) -> Result<Options> {
        let mut opts = Options { threads: 2, files: Vec::new(), rounds: 1, json: false, int8: false };
        let mut it = args.iter().peekable();
        let positive = |flag: &str, v: Option<&String>| -> Result<usize> {
            let v = v.with_context(|| format!("{flag} needs a number"))?;
            v.parse()
                .ok()
                .filter(|&n| n > 0)
                .with_context(|| format!("{flag} takes a positive whole number, got `{v}`"))
        };
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--peers" => {}
                "--json" => opts.json = true,
                "--int8" => opts.int8 = true,
                "--threads" => opts.threads = positive("--threads", it.next())?,
                "--rounds" => opts.rounds = positive("--rounds", it.next())?,
                "--files" => {
                    while let Some(f) = it.next_if(|a| !a.starts_with("--")) {
                        opts.files.push(PathBuf::from(f));
                    }
                    ensure!(!opts.files.is_empty(), "--files needs at least one GGUF file");
                }
                other => bail!(
                    "unknown bench --peers option `{other}` (options: --threads N, --files FILE..., --rounds N, --int8, --json)"
                ),
            }
        }
        Ok(opts)
    }

    /// The arguments that parse back into these options.
    fn to_args(&self) -> Vec<String> {
        let mut args = vec!["--peers".to_string(), "--threads".into(), self.threads.to_string()];
        args.extend(["--rounds".to_string(), self.rounds.to_string()]);
        if !self.files.is_empty() {
            args.push("--files".into());
            args.extend(self.files.iter().map(|f| f.display().to_string()));
        }
        if self.int8 {
            args.push("--int8".into());
        }
        if self.json {
            args.push("--json".into());
        }
        args
    }
}

/// The engines, in table order: strata, the peers ([`PEERS`]), and strata with one-digit
/// activations ([`STRATA_INT8`], only with `--int8`).
const ENGINES: [&str; 4] = ["strata", "llama.cpp", "mistral.rs", "strata int8"];

/// The peers' indices in [`ENGINES`].
const PEERS: std::ops::Range<usize> = 1..3;

/// The index of strata with `--act-quant int8` in [`ENGINES`].
const STRATA_INT8: usize = 3;

/// Whether engine `e` is strata (in either activation mode), whose rows compare with the peers.
fn is_strata(e: usize) -> bool {
    !PEERS.contains(&e)
}

/// One engine on one file in one round.
struct Measurement {
    /// Speeds, or why there are none.
    outcome: Result<Speeds, String>,
    /// Other work on the machine meanwhile.
    interference: Option<Interference>,
    /// The 1-minute load average when the engine started.
    load: Option<f64>,
}

/// One file's results.
struct FileResult {
    file: PathBuf,
    /// `[engine][round]`, engines in [`ENGINES`] order (no rounds for an engine not run).
    runs: Vec<Vec<Measurement>>,
}

/// `phase` of the speeds.
type Phase = fn(&Speeds) -> f64;
const PREFILL: Phase = |s| s.prefill_tok_s;
const DECODE: Phase = |s| s.decode_tok_s;

impl FileResult {
    /// Weight bytes read per decoded token, from strata's report.
    fn bytes_per_token(&self) -> Option<f64> {
        self.runs[0]
            .iter()
            .find_map(|m| m.outcome.as_ref().ok())
            .and_then(|s| s.raw.get("bytes_read_per_token"))
            .and_then(Value::as_f64)
    }

    /// Engine `e`'s best speed in `phase` over the rounds.
    fn best(&self, e: usize, phase: Phase) -> Option<f64> {
        self.runs[e].iter().filter_map(|m| m.outcome.as_ref().ok()).map(phase).max_by(f64::total_cmp)
    }

    /// Engine `e`'s first error, when no round succeeded.
    fn error(&self, e: usize) -> Option<&str> {
        if self.best(e, DECODE).is_some() {
            return None;
        }
        self.runs[e].iter().find_map(|m| m.outcome.as_ref().err()).map(String::as_str)
    }

    /// The faster peer's speed in one phase.
    fn best_peer(&self, phase: Phase) -> Option<(f64, &'static str)> {
        PEERS.filter_map(|e| self.best(e, phase).map(|v| (v, ENGINES[e]))).max_by(|a, b| a.0.total_cmp(&b.0))
    }

    /// Per round, strata's (engine `e`'s) speed in `phase` over the faster peer's in that same
    /// round (`None` for a round where it or both peers failed): the paired ratios of the module
    /// docs.
    fn paired(&self, e: usize, phase: Phase) -> Vec<Option<f64>> {
        let speed = |e: usize, r: usize| self.runs[e].get(r).and_then(|m| m.outcome.as_ref().ok()).map(phase);
        (0..self.runs[e].len())
            .map(|r| {
                let peer = PEERS.filter_map(|p| speed(p, r)).max_by(f64::total_cmp)?;
                Some(speed(e, r)? / peer)
            })
            .collect()
    }

    /// The median of [`FileResult::paired`] over the rounds that have one.
    fn paired_median(&self, e: usize, phase: Phase) -> Option<f64> {
        let v: Vec<f64> = self.paired(e, phase).into_iter().flatten().collect();
        engines::median(&v)
    }

    /// The engines that ran on this file, in table order.
    fn engines(&self) -> impl Iterator<Item = usize> + '_ {
        (0..ENGINES.len()).filter(|&e| !self.runs[e].is_empty())
    }

    /// The range of other cores busy over engine `e`'s rounds.
    fn other_cores(&self, e: usize) -> Option<(f64, f64)> {
        let v: Vec<f64> = self.runs[e].iter().filter_map(|m| m.interference.map(|i| i.other_cores)).collect();
        let min = v.iter().copied().min_by(f64::total_cmp)?;
        Some((min, v.iter().copied().max_by(f64::total_cmp)?))
    }
}

/// The whole run.
struct Report {
    threads: usize,
    rounds: usize,
    /// Memory read bandwidth, bytes per second, before each file of each round and at the end.
    bandwidth: Vec<f64>,
    load: [Option<f64>; 2],
    files: Vec<FileResult>,
    peers: Vec<(&'static str, String)>,
}

impl Report {
    /// The bandwidth the bound uses: the best measurement (other work only lowers it).
    fn bandwidth(&self) -> f64 {
        self.bandwidth.iter().copied().fold(0.0, f64::max)
    }
}

/// The 1-minute load average, from /proc/loadavg.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

/// Memory read bandwidth in bytes per second with `threads` threads: the best of 5 sums over a
/// buffer eight times the L3, as `strata bench` measures it.
fn bandwidth(threads: usize) -> Result<f64> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().context("building the thread pool")?;
    use strata_tensor::cpu::{DEFAULT_BANDWIDTH_BYTES, read_bandwidth};
    let b = pool.install(|| read_bandwidth(DEFAULT_BANDWIDTH_BYTES, 5));
    say(&format!("memory read bandwidth ({threads} threads): {:.1} GB/s", b / 1e9));
    Ok(b)
}

/// The target directory cargo builds into.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| crate::workspace_root().join("target"), PathBuf::from)
}

/// Entry point: `cargo xtask bench --peers ...`.
pub fn run(args: &[String]) -> Result<()> {
    let opts = Options::parse(args)?;
    if cfg!(debug_assertions) {
        eprintln!("xtask bench --peers: building xtask in release and running it there");
        let status = crate::cargo()
            .args(["run", "--release", "--quiet", "-p", "xtask", "--", "bench"])
            .args(opts.to_args())
            .status()
            .context("could not start `cargo run --release -p xtask`")?;
        ensure!(status.success(), "the release bench failed ({status})");
        return Ok(());
    }
    let started = Instant::now();

    say("building the release strata binary (cargo build --release -p strata-cli)");
    crate::step(&["build", "--release", "--quiet", "-p", "strata-cli"])?;
    let strata_bin = target_dir().join("release").join("strata");
    ensure!(strata_bin.is_file(), "the build left no {}", strata_bin.display());

    let cache = install::cache_root()?;
    let peers_dir = cache.join("peers");
    let llama_bench = install::llama_bench(&peers_dir).map_err(|e| format!("{e:#}"));
    let mistral_py = install::mistralrs(&peers_dir).map_err(|e| format!("{e:#}"));
    for (name, r) in [("llama.cpp", &llama_bench), ("mistral.rs", &mistral_py)] {
        if let Err(e) = r {
            say(&format!("{name} could not be installed, so it is reported as n/a: {e}"));
        }
    }
    let driver = crate::workspace_root().join("xtask").join("fixtures").join("mistralrs_bench.py");

    let files = if opts.files.is_empty() { default_files(&cache)? } else { opts.files.clone() };
    for f in &files {
        ensure!(f.is_file(), "{} is not a file", f.display());
    }

    let w = Workload { threads: opts.threads, prompt_tokens: PROMPT_TOKENS, gen_tokens: GEN_TOKENS };
    let load_start = load_average();
    let mut bandwidths = Vec::new();
    let mut results: Vec<FileResult> = files
        .iter()
        .map(|f| FileResult { file: f.clone(), runs: ENGINES.iter().map(|_| Vec::new()).collect() })
        .collect();
    for round in 1..=opts.rounds {
        for r in &mut results {
            bandwidths.push(bandwidth(w.threads)?);
            let name = r.file.file_name().unwrap_or_default().to_string_lossy().into_owned();
            for (e, engine) in ENGINES.iter().enumerate() {
                if e == STRATA_INT8 && !opts.int8 {
                    continue;
                }
                say(&format!(
                    "round {round}/{}: {engine} on {name}: prefill {PROMPT_TOKENS}, decode {GEN_TOKENS}, {} threads",
                    opts.rounds, w.threads
                ));
                let load = load_average();
                let before = CpuSample::now();
                let t = Instant::now();
                let outcome = match e {
                    0 => engines::strata(&strata_bin, &r.file, w, "int16").map_err(|e| format!("{e:#}")),
                    STRATA_INT8 => engines::strata(&strata_bin, &r.file, w, "int8").map_err(|e| format!("{e:#}")),
                    1 => match &llama_bench {
                        Ok(bin) => engines::llama_cpp(bin, &r.file, w).map_err(|e| format!("{e:#}")),
                        Err(e) => Err(format!("not installed: {e}")),
                    },
                    _ => match &mistral_py {
                        Ok(py) => engines::mistralrs(py, &driver, &r.file, w).map_err(|e| format!("{e:#}")),
                        Err(e) => Err(format!("not installed: {e}")),
                    },
                };
                let interference = before.zip(CpuSample::now()).and_then(|(b, a)| b.interference(&a));
                let other = interference.map_or_else(String::new, |i| {
                    format!(", other work {:.2} cores, steal {:.2}", i.other_cores, i.steal_cores)
                });
                match &outcome {
                    Ok(s) => say(&format!(
                        "  prefill {:.1} tok/s, decode {:.2} tok/s ({:.0} s{other})",
                        s.prefill_tok_s,
                        s.decode_tok_s,
                        t.elapsed().as_secs_f64()
                    )),
                    Err(e) => say(&format!("  n/a: {e}")),
                }
                r.runs[e].push(Measurement { outcome, interference, load });
            }
        }
    }
    bandwidths.push(bandwidth(w.threads)?);
    say(&format!("done in {:.0} s", started.elapsed().as_secs_f64()));

    let mut peers = vec![("strata", format!("{} (release), --act-quant int16 (the default)", strata_bin.display()))];
    if opts.int8 {
        peers.push(("strata int8", format!("{} (release), --act-quant int8", strata_bin.display())));
    }
    if let Ok(bin) = &llama_bench {
        peers.push((
            "llama.cpp",
            format!(
                "llama-bench from llama-cpp-python {} (vendored llama.cpp), {}",
                install::LLAMA_CPP_PYTHON,
                bin.display()
            ),
        ));
    }
    if mistral_py.is_ok() {
        peers.push((
            "mistral.rs",
            format!("mistralrs {} (PyPI wheel), driven by {}", install::MISTRALRS, driver.display()),
        ));
    }
    let report = Report {
        threads: w.threads,
        rounds: opts.rounds,
        bandwidth: bandwidths,
        load: [load_start, load_average()],
        files: results,
        peers,
    };
    if opts.json {
        // The table goes to stderr, for the person watching; stdout holds only the JSON.
        eprint!("\n{}", report.table());
        println!("{}", serde_json::to_string_pretty(&report.json())?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// The default files: SmolLM2-135M Q4_1, then TinyLlama-shape synthetic GGUFs (written when
/// absent).
fn default_files(cache: &Path) -> Result<Vec<PathBuf>> {
    let mut files = vec![install::smollm2(cache)?];
    let dir = cache.join("synth");
    for dtype in SYNTH_DTYPES {
        let path = dir.join(format!("{SYNTH_SHAPE}-{dtype}.gguf"));
        if !path.is_file() {
            say(&format!("writing the synthetic {SYNTH_SHAPE} {dtype} GGUF (synth-model) to {}", path.display()));
            synth::run(SYNTH_SHAPE, dtype, None, Some(synth::Format::Gguf), &path)?;
        }
        files.push(path);
    }
    Ok(files)
}

/// `x` with `digits` decimals, or `-`.
fn fmt(x: Option<f64>, digits: usize) -> String {
    x.filter(|v| v.is_finite()).map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

impl Report {
    fn table(&self) -> String {
        let bw = self.bandwidth();
        let mut t = String::new();
        let best_of = if self.rounds > 1 { format!(", best of {} rounds", self.rounds) } else { String::new() };
        let _ = writeln!(
            t,
            "strata vs peers: {} threads, prefill {PROMPT_TOKENS} tokens, decode {GEN_TOKENS} tokens, medians of {} runs{best_of}",
            self.threads,
            engines::RUNS
        );
        let min_bw = self.bandwidth.iter().copied().fold(f64::INFINITY, f64::min);
        let _ = writeln!(
            t,
            "memory read bandwidth {:.1} to {:.1} GB/s over {} measurements (the bound uses the best); \
             load average {} at the start, {} at the end\n",
            min_bw / 1e9,
            bw / 1e9,
            self.bandwidth.len(),
            fmt(self.load[0], 2),
            fmt(self.load[1], 2)
        );
        t += "| file | engine | prefill tok/s | decode tok/s | decode / bound | strata / engine, prefill | strata / engine, decode | other work, cores |\n";
        t += "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n";
        for f in &self.files {
            let name = f.file.file_name().unwrap_or_default().to_string_lossy().into_owned();
            let bound = f.bytes_per_token().map(|b| bw / b);
            let strata = (f.best(0, PREFILL), f.best(0, DECODE));
            for e in f.engines() {
                let engine = ENGINES[e];
                let file_cell = if e == 0 {
                    format!(
                        "{name} ({} MB/token, bound {} tok/s)",
                        fmt(f.bytes_per_token().map(|b| b / 1e6), 1),
                        fmt(bound, 1)
                    )
                } else {
                    String::new()
                };
                let other = f.other_cores(e).map_or_else(
                    || "-".to_string(),
                    |(lo, hi)| if self.rounds > 1 { format!("{lo:.1} to {hi:.1}") } else { format!("{lo:.1}") },
                );
                if let Some(err) = f.error(e) {
                    let err = err.replace('|', "/").replace('\n', " ");
                    let _ = writeln!(t, "| {file_cell} | {engine} | n/a: {err} | | | | | {other} |");
                    continue;
                }
                let (p, d) = (f.best(e, PREFILL), f.best(e, DECODE));
                let (rp, rd) = if is_strata(e) {
                    let cell = |mine: Option<f64>, phase: Phase| {
                        mine.zip(f.best_peer(phase))
                            .map_or_else(|| "-".into(), |(v, (peer, n))| format!("**{:.2}** vs {n}", v / peer))
                    };
                    (cell(p, PREFILL), cell(d, DECODE))
                } else {
                    (fmt(strata.0.zip(p).map(|(s, v)| s / v), 2), fmt(strata.1.zip(d).map(|(s, v)| s / v), 2))
                };
                let _ = writeln!(
                    t,
                    "| {file_cell} | {engine} | {} | {} | {} | {rp} | {rd} | {other} |",
                    fmt(p, 1),
                    fmt(d, 2),
                    fmt(d.zip(bound).map(|(d, b)| d / b), 2),
                );
            }
        }
        if self.rounds > 1 {
            t += "\nPaired rounds: strata / the faster peer of the same round (the engines of a round run back to back on a file).\n\n";
            t += "| file | engine | prefill, round by round | prefill, median | decode, round by round | decode, median |\n";
            t += "| --- | --- | --- | ---: | --- | ---: |\n";
            for f in &self.files {
                let name = f.file.file_name().unwrap_or_default().to_string_lossy().into_owned();
                for e in f.engines().filter(|&e| is_strata(e)) {
                    let rounds =
                        |phase: Phase| f.paired(e, phase).iter().map(|r| fmt(*r, 2)).collect::<Vec<_>>().join(" / ");
                    let _ = writeln!(
                        t,
                        "| {name} | {} | {} | **{}** | {} | **{}** |",
                        ENGINES[e],
                        rounds(PREFILL),
                        fmt(f.paired_median(e, PREFILL), 2),
                        rounds(DECODE),
                        fmt(f.paired_median(e, DECODE), 2)
                    );
                }
            }
        }
        t += "\nstrata rows: the ratio against the faster peer in that phase (target >= 1.00); peer rows: strata / that peer.\n";
        if self.files.iter().any(|f| !f.runs[STRATA_INT8].is_empty()) {
            t += "strata int8: one-digit activations (--act-quant int8), the peers' rounding; strata's default is int16.\n";
        }
        t += "decode / bound: decode tok/s over (best bandwidth / weight bytes read per token, as strata reports for the file).\n";
        t += "other work: cores other processes kept busy while the engine ran (2 cores in all).\n";
        for (name, what) in &self.peers {
            let _ = writeln!(t, "{name}: {what}");
        }
        t
    }

    fn json(&self) -> Value {
        let bw = self.bandwidth();
        let files: Vec<Value> = self
            .files
            .iter()
            .map(|f| {
                let bound = f.bytes_per_token().map(|b| bw / b);
                let engines: Vec<Value> = f
                    .engines()
                    .map(|e| {
                        let engine = ENGINES[e];
                        let rounds: Vec<Value> = f.runs[e]
                            .iter()
                            .map(|m| {
                                let other = m
                                    .interference
                                    .map(|i| json!({ "other_cores": i.other_cores, "steal_cores": i.steal_cores }));
                                match &m.outcome {
                                    Ok(s) => json!({
                                        "prefill_tok_s": s.prefill_tok_s,
                                        "decode_tok_s": s.decode_tok_s,
                                        "interference": other,
                                        "load_average": m.load,
                                        "report": s.raw,
                                    }),
                                    Err(err) => json!({ "error": err, "interference": other, "load_average": m.load }),
                                }
                            })
                            .collect();
                        let decode = f.best(e, DECODE);
                        json!({
                            "engine": engine,
                            "prefill_tok_s": f.best(e, PREFILL),
                            "decode_tok_s": decode,
                            "decode_fraction_of_bound": decode.zip(bound).map(|(d, b)| d / b),
                            "error": f.error(e),
                            "rounds": rounds,
                        })
                    })
                    .collect();
                let ratio = |e: usize, phase: Phase| {
                    f.best(e, phase)
                        .zip(f.best_peer(phase))
                        .map(|(s, (v, name))| json!({ "ratio": s / v, "peer": name }))
                };
                let paired =
                    |e: usize, phase: Phase| json!({ "rounds": f.paired(e, phase), "median": f.paired_median(e, phase) });
                let mut file = json!({
                    "file": f.file.display().to_string(),
                    "bytes_read_per_token": f.bytes_per_token(),
                    "decode_bound_tok_s": bound,
                    "engines": engines,
                    "strata_vs_best_peer": { "prefill": ratio(0, PREFILL), "decode": ratio(0, DECODE) },
                    "strata_vs_best_peer_paired": { "prefill": paired(0, PREFILL), "decode": paired(0, DECODE) },
                });
                if !f.runs[STRATA_INT8].is_empty() {
                    let i = STRATA_INT8;
                    file["strata_int8_vs_best_peer"] = json!({ "prefill": ratio(i, PREFILL), "decode": ratio(i, DECODE) });
                    file["strata_int8_vs_best_peer_paired"] =
                        json!({ "prefill": paired(i, PREFILL), "decode": paired(i, DECODE) });
                }
                file
            })
            .collect();
        json!({
            "threads": self.threads,
            "prompt_tokens": PROMPT_TOKENS,
            "gen_tokens": GEN_TOKENS,
            "runs": engines::RUNS,
            "rounds": self.rounds,
            "memory_read_gb_s": {
                "samples": self.bandwidth.iter().map(|b| b / 1e9).collect::<Vec<_>>(),
                "used": bw / 1e9,
            },
            "load_average": { "start": self.load[0], "end": self.load[1] },
            "engines": self.peers.iter().map(|(n, w)| json!({ "engine": n, "what": w })).collect::<Vec<_>>(),
            "files": files,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn options_parse_and_round_trip() {
        let o = Options::parse(&args("--peers --threads 4 --files a.gguf b.gguf --rounds 2 --int8 --json")).unwrap();
        let files = vec!["a.gguf".into(), "b.gguf".into()];
        assert_eq!(o, Options { threads: 4, files, rounds: 2, json: true, int8: true });
        assert_eq!(Options::parse(&o.to_args()).unwrap(), o);
        let d = Options::parse(&args("--peers")).unwrap();
        assert_eq!(d, Options { threads: 2, files: vec![], rounds: 1, json: false, int8: false });
        assert_eq!(Options::parse(&d.to_args()).unwrap(), d);
        assert!(Options::parse(&args("--peers --files")).is_err());
        assert!(Options::parse(&args("--peers --threads 0")).is_err());
        assert!(Options::parse(&args("--peers --rounds x")).is_err());
        assert!(Options::parse(&args("--peers --bogus")).is_err());
    }

    fn ok(prefill: f64, decode: f64, other: f64) -> Measurement {
        Measurement {
            outcome: Ok(Speeds {
                prefill_tok_s: prefill,
                decode_tok_s: decode,
                raw: json!({ "bytes_read_per_token": 1e8 }),
            }),
            interference: Some(Interference { other_cores: other, steal_cores: 0.0 }),
            load: Some(1.0),
        }
    }

    fn failed(e: &str) -> Measurement {
        Measurement { outcome: Err(e.into()), interference: None, load: None }
    }

    /// A report of one file with `runs` (`[engine][round]`, engines missing at the end not run).
    fn report(mut runs: Vec<Vec<Measurement>>, rounds: usize) -> Report {
        runs.resize_with(ENGINES.len(), Vec::new);
        Report {
            threads: 2,
            rounds,
            bandwidth: vec![20e9, 30e9, 25e9],
            load: [None, None],
            files: vec![FileResult { file: "m.gguf".into(), runs }],
            peers: vec![],
        }
    }

    #[test]
    fn ratios_are_against_the_faster_peer_per_phase() {
        let r = report(vec![vec![ok(100.0, 20.0, 0.1)], vec![ok(200.0, 10.0, 0.2)], vec![ok(50.0, 25.0, 0.3)]], 1);
        let f = &r.files[0];
        assert_eq!(f.best_peer(PREFILL), Some((200.0, "llama.cpp")));
        assert_eq!(f.best_peer(DECODE), Some((25.0, "mistral.rs")));
        let j = r.json();
        assert_eq!(j["files"][0]["strata_vs_best_peer"]["prefill"]["ratio"], 0.5);
        assert_eq!(j["files"][0]["strata_vs_best_peer"]["decode"]["peer"], "mistral.rs");
        // Bound: the best bandwidth, 30 GB/s, over 100 MB per token = 300 tok/s; strata decodes 20.
        let frac = j["files"][0]["engines"][0]["decode_fraction_of_bound"].as_f64().unwrap();
        assert!((frac - 20.0 / 300.0).abs() < 1e-12);
        let table = r.table();
        assert!(table.contains("**0.50** vs llama.cpp"), "{table}");
        assert!(table.contains("**0.80** vs mistral.rs"), "{table}");
        assert!(table.contains("20.0 to 30.0 GB/s over 3 measurements"), "{table}");
    }

    #[test]
    fn rounds_keep_the_best_median_per_phase() {
        let r = report(
            vec![
                vec![ok(100.0, 10.0, 1.5), ok(80.0, 20.0, 0.1)],
                vec![failed("crashed"), ok(50.0, 5.0, 0.0)],
                vec![failed("boom | bad"), failed("again")],
            ],
            2,
        );
        let f = &r.files[0];
        assert_eq!((f.best(0, PREFILL), f.best(0, DECODE)), (Some(100.0), Some(20.0)));
        assert_eq!(f.error(1), None);
        assert_eq!(f.error(2), Some("boom | bad"));
        assert_eq!(f.other_cores(0), Some((0.1, 1.5)));
        let table = r.table();
        assert!(table.contains("| mistral.rs | n/a: boom / bad |"), "{table}");
        assert!(table.contains("0.1 to 1.5"), "{table}");
        let j = r.json();
        assert_eq!(j["files"][0]["engines"][2]["error"], "boom | bad");
        assert_eq!(j["files"][0]["engines"][1]["rounds"][0]["error"], "crashed");
        assert_eq!(j["files"][0]["strata_vs_best_peer"]["decode"]["ratio"], 4.0);
        // Round 1 has no peer result; round 2: strata 80 / 50 and 20 / 5.
        assert_eq!(f.paired(0, PREFILL), vec![None, Some(1.6)]);
        assert_eq!(f.paired_median(0, DECODE), Some(4.0));
        assert!(table.contains("| m.gguf | strata | - / 1.60 | **1.60** | - / 4.00 | **4.00** |"), "{table}");
        assert!(!table.contains("strata int8"), "{table}");
        assert_eq!(j["files"][0]["strata_vs_best_peer_paired"]["prefill"]["rounds"][1], 1.6);
    }

    /// Paired ratios compare engines within a round: a peer's one fast round decides the
    /// best-of-rounds ratio but only its own paired ratio.
    #[test]
    fn paired_ratios_take_the_median_over_rounds() {
        let r = report(
            vec![
                vec![ok(100.0, 40.0, 0.0), ok(110.0, 44.0, 0.0), ok(90.0, 42.0, 0.0)],
                vec![ok(90.0, 38.0, 0.0), ok(100.0, 55.0, 0.0), ok(95.0, 40.0, 0.0)],
                vec![ok(120.0, 20.0, 0.0), failed("crashed"), ok(80.0, 20.0, 0.0)],
            ],
            3,
        );
        let f = &r.files[0];
        assert_eq!(f.best_peer(DECODE), Some((55.0, "llama.cpp")));
        let close = |a: Option<f64>, b: f64| (a.unwrap() - b).abs() < 1e-12;
        let d = f.paired(0, DECODE);
        assert!(close(d[0], 40.0 / 38.0) && close(d[1], 44.0 / 55.0) && close(d[2], 42.0 / 40.0), "{d:?}");
        assert!(close(f.paired_median(0, DECODE), 42.0 / 40.0));
        // Prefill: round 1 against mistral.rs (120), round 2 against llama.cpp alone (100).
        let p = f.paired(0, PREFILL);
        assert!(close(p[0], 100.0 / 120.0) && close(p[1], 1.1) && close(p[2], 90.0 / 95.0), "{p:?}");
        assert!(close(f.paired_median(0, PREFILL), 90.0 / 95.0));
    }

    /// With `--int8`, strata's one-digit row is compared with the peers like strata's own.
    #[test]
    fn the_int8_row_compares_with_the_peers() {
        let r = report(
            vec![
                vec![ok(100.0, 40.0, 0.0), ok(110.0, 44.0, 0.0)],
                vec![ok(90.0, 38.0, 0.0), ok(100.0, 55.0, 0.0)],
                vec![ok(120.0, 20.0, 0.0), ok(125.0, 20.0, 0.0)],
                vec![ok(180.0, 41.0, 0.0), ok(150.0, 45.0, 0.0)],
            ],
            2,
        );
        let f = &r.files[0];
        assert_eq!(f.best_peer(PREFILL), Some((125.0, "mistral.rs")));
        assert_eq!(f.paired(STRATA_INT8, PREFILL), vec![Some(1.5), Some(1.2)]);
        let table = r.table();
        assert!(table.contains("| strata int8 | 180.0 | 45.00 |"), "{table}");
        assert!(table.contains("**1.44** vs mistral.rs"), "{table}");
        assert!(table.contains("| m.gguf | strata int8 | 1.50 / 1.20 | **1.50** |"), "{table}");
        let j = r.json();
        assert_eq!(j["files"][0]["engines"][3]["engine"], "strata int8");
        assert_eq!(j["files"][0]["strata_int8_vs_best_peer"]["prefill"]["ratio"], 1.44);
        assert_eq!(j["files"][0]["strata_int8_vs_best_peer_paired"]["prefill"]["median"], 1.5);
        assert!(j["files"][0]["strata_vs_best_peer"]["prefill"]["ratio"].as_f64().unwrap() < 1.0);
    }
}
