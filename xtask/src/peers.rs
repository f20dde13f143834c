//! `cargo xtask bench --peers`: strata's CPU speed against llama.cpp and mistral.rs, on the same
//! GGUF files, with the same thread count, in one invocation.
//!
//! The peers are installed once into `$XDG_CACHE_HOME/strata/peers` (see [`install`]). For each
//! file (by default the SmolLM2-135M Q4_1 GGUF and synthetic TinyLlama-1.1B-shape GGUFs in q4_0,
//! q8_0 and q4_k, written by `synth-model` into `<cache>/synth` when absent) every engine
//! prefills 128 tokens and decodes 64, reporting medians of 3 runs (see [`engines`]). The
//! machine's memory read bandwidth is measured at the start and at the end of the same
//! invocation; decode speed is shown as a fraction of the bandwidth bound, `bandwidth / weight
//! bytes read per token`, with the bytes per token strata reports for the file (the same
//! weights, so the same bound for every engine). The table closes with strata/peer ratios; the
//! target is 1.0 against the faster peer in each phase.
//!
//! Runs in release: from a debug build it rebuilds xtask in release and reruns itself, and it
//! builds the release `strata` binary it measures.

mod engines;
mod install;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::synth;
use engines::{Speeds, Workload};

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
    json: bool,
}

impl Options {
    /// Parses `--peers [--threads N] [--files FILE...] [--json]`.
    fn parse(args: &[String]) -> Result<Options> {
        let mut opts = Options { threads: 2, files: Vec::new(), json: false };
        let mut it = args.iter().peekable();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--peers" => {}
                "--json" => opts.json = true,
                "--threads" => {
                    let n = it.next().context("--threads needs a number")?;
                    opts.threads = n
                        .parse()
                        .ok()
                        .filter(|&n| n > 0)
                        .with_context(|| format!("--threads takes a positive whole number, got `{n}`"))?;
                }
                "--files" => {
                    while let Some(f) = it.next_if(|a| !a.starts_with("--")) {
                        opts.files.push(PathBuf::from(f));
                    }
                    ensure!(!opts.files.is_empty(), "--files needs at least one GGUF file");
                }
                other => {
                    bail!("unknown bench --peers option `{other}` (options: --threads N, --files FILE..., --json)")
                }
            }
        }
        Ok(opts)
    }

    /// The arguments that parse back into these options.
    fn to_args(&self) -> Vec<String> {
        let mut args = vec!["--peers".to_string(), "--threads".into(), self.threads.to_string()];
        if !self.files.is_empty() {
            args.push("--files".into());
            args.extend(self.files.iter().map(|f| f.display().to_string()));
        }
        if self.json {
            args.push("--json".into());
        }
        args
    }
}

/// The engines, in table order.
const ENGINES: [&str; 3] = ["strata", "llama.cpp", "mistral.rs"];

/// One file's results.
struct FileResult {
    file: PathBuf,
    /// Per engine (in [`ENGINES`] order): speeds, or why there are none.
    results: Vec<Result<Speeds, String>>,
    /// The 1-minute load average when each engine started.
    load: Vec<Option<f64>>,
}

impl FileResult {
    /// Weight bytes read per decoded token, from strata's report.
    fn bytes_per_token(&self) -> Option<f64> {
        self.results[0].as_ref().ok().and_then(|s| s.raw.get("bytes_read_per_token")).and_then(Value::as_f64)
    }

    /// The faster peer's speed in one phase.
    fn best_peer(&self, phase: fn(&Speeds) -> f64) -> Option<(f64, &'static str)> {
        self.results[1..]
            .iter()
            .zip(&ENGINES[1..])
            .filter_map(|(r, &name)| r.as_ref().ok().map(|s| (phase(s), name)))
            .max_by(|a, b| a.0.total_cmp(&b.0))
    }
}

/// The whole run.
struct Report {
    threads: usize,
    /// Memory read bandwidth measured at the start and at the end, bytes per second.
    bandwidth: [f64; 2],
    load: [Option<f64>; 2],
    files: Vec<FileResult>,
    peers: Vec<(&'static str, String)>,
}

impl Report {
    /// The bandwidth the bound uses: the better of the two measurements.
    fn bandwidth(&self) -> f64 {
        self.bandwidth[0].max(self.bandwidth[1])
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
    Ok(pool.install(|| read_bandwidth(DEFAULT_BANDWIDTH_BYTES, 5)))
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
    say(&format!("memory read bandwidth ({} threads)", w.threads));
    let bw_start = bandwidth(w.threads)?;
    say(&format!("  {:.1} GB/s", bw_start / 1e9));

    let mut results = Vec::new();
    for file in &files {
        let mut r = FileResult { file: file.clone(), results: Vec::new(), load: Vec::new() };
        for engine in ENGINES {
            say(&format!(
                "{} on {}: prefill {PROMPT_TOKENS}, decode {GEN_TOKENS}, {} threads",
                engine,
                file.file_name().unwrap_or_default().to_string_lossy(),
                w.threads
            ));
            r.load.push(load_average());
            let t = Instant::now();
            let outcome = match engine {
                "strata" => engines::strata(&strata_bin, file, w).map_err(|e| format!("{e:#}")),
                "llama.cpp" => match &llama_bench {
                    Ok(bin) => engines::llama_cpp(bin, file, w).map_err(|e| format!("{e:#}")),
                    Err(e) => Err(format!("not installed: {e}")),
                },
                _ => match &mistral_py {
                    Ok(py) => engines::mistralrs(py, &driver, file, w).map_err(|e| format!("{e:#}")),
                    Err(e) => Err(format!("not installed: {e}")),
                },
            };
            match &outcome {
                Ok(s) => say(&format!(
                    "  prefill {:.1} tok/s, decode {:.2} tok/s ({:.0} s)",
                    s.prefill_tok_s,
                    s.decode_tok_s,
                    t.elapsed().as_secs_f64()
                )),
                Err(e) => say(&format!("  n/a: {e}")),
            }
            r.results.push(outcome);
        }
        results.push(r);
    }

    say("memory read bandwidth again");
    let bw_end = bandwidth(w.threads)?;
    say(&format!("  {:.1} GB/s ({:.0} s in all)", bw_end / 1e9, started.elapsed().as_secs_f64()));
    let mut peers = vec![("strata", format!("{} (release)", strata_bin.display()))];
    if let Ok(bin) = &llama_bench {
        peers.push((
            "llama.cpp",
            format!("llama-cpp-python {} vendored llama.cpp, {}", install::LLAMA_CPP_PYTHON, bin.display()),
        ));
    }
    if mistral_py.is_ok() {
        peers.push(("mistral.rs", format!("mistralrs {} (PyPI wheel)", install::MISTRALRS)));
    }
    let report = Report {
        threads: w.threads,
        bandwidth: [bw_start, bw_end],
        load: [load_start, load_average()],
        files: results,
        peers,
    };
    if opts.json {
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
        let _ = writeln!(
            t,
            "strata vs peers: {} threads, prefill {PROMPT_TOKENS} tokens, decode {GEN_TOKENS} tokens, medians of {} runs",
            self.threads,
            engines::RUNS
        );
        let _ = writeln!(
            t,
            "memory read bandwidth {:.1} GB/s at the start, {:.1} GB/s at the end (bound uses {:.1}); \
             load average {} at the start, {} at the end\n",
            self.bandwidth[0] / 1e9,
            self.bandwidth[1] / 1e9,
            bw / 1e9,
            fmt(self.load[0], 2),
            fmt(self.load[1], 2)
        );
        t += "| file | engine | prefill tok/s | decode tok/s | decode / bound | strata / engine, prefill | strata / engine, decode | load |\n";
        t += "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n";
        for f in &self.files {
            let name = f.file.file_name().unwrap_or_default().to_string_lossy().into_owned();
            let bound = f.bytes_per_token().map(|b| bw / b);
            let strata = f.results[0].as_ref().ok();
            for (i, (engine, r)) in ENGINES.iter().zip(&f.results).enumerate() {
                let file_cell = if i == 0 {
                    format!(
                        "{name} ({} MB/token, bound {} tok/s)",
                        fmt(f.bytes_per_token().map(|b| b / 1e6), 1),
                        fmt(bound, 1)
                    )
                } else {
                    String::new()
                };
                let load = fmt(f.load[i], 1);
                match r {
                    Ok(s) => {
                        let (rp, rd) = if i == 0 {
                            let p = f.best_peer(|s| s.prefill_tok_s).map(|(v, n)| (s.prefill_tok_s / v, n));
                            let d = f.best_peer(|s| s.decode_tok_s).map(|(v, n)| (s.decode_tok_s / v, n));
                            let cell = |r: Option<(f64, &str)>| {
                                r.map_or_else(|| "-".into(), |(v, n)| format!("**{v:.2}** vs {n}"))
                            };
                            (cell(p), cell(d))
                        } else {
                            (
                                fmt(strata.map(|st| st.prefill_tok_s / s.prefill_tok_s), 2),
                                fmt(strata.map(|st| st.decode_tok_s / s.decode_tok_s), 2),
                            )
                        };
                        let _ = writeln!(
                            t,
                            "| {file_cell} | {engine} | {:.1} | {:.2} | {} | {rp} | {rd} | {load} |",
                            s.prefill_tok_s,
                            s.decode_tok_s,
                            fmt(bound.map(|b| s.decode_tok_s / b), 2),
                        );
                    }
                    Err(e) => {
                        let e = e.replace('|', "/").replace('\n', " ");
                        let _ = writeln!(t, "| {file_cell} | {engine} | n/a: {e} | | | | | {load} |");
                    }
                }
            }
        }
        t += "\nstrata rows: the ratio against the faster peer in that phase (target >= 1.00); peer rows: strata / that peer.\n";
        t += "decode / bound: decode tok/s over (bandwidth / weight bytes read per token, as strata reports for the file).\n";
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
                let engines: Vec<Value> = ENGINES
                    .iter()
                    .zip(&f.results)
                    .zip(&f.load)
                    .map(|((engine, r), load)| match r {
                        Ok(s) => json!({
                            "engine": engine,
                            "prefill_tok_s": s.prefill_tok_s,
                            "decode_tok_s": s.decode_tok_s,
                            "decode_fraction_of_bound": bound.map(|b| s.decode_tok_s / b),
                            "load_average": load,
                            "report": s.raw,
                        }),
                        Err(e) => json!({ "engine": engine, "error": e, "load_average": load }),
                    })
                    .collect();
                let strata = f.results[0].as_ref().ok();
                let ratio = |phase: fn(&Speeds) -> f64| {
                    strata.zip(f.best_peer(phase)).map(|(s, (v, name))| json!({ "ratio": phase(s) / v, "peer": name }))
                };
                json!({
                    "file": f.file.display().to_string(),
                    "bytes_read_per_token": f.bytes_per_token(),
                    "decode_bound_tok_s": bound,
                    "engines": engines,
                    "strata_vs_best_peer": {
                        "prefill": ratio(|s| s.prefill_tok_s),
                        "decode": ratio(|s| s.decode_tok_s),
                    },
                })
            })
            .collect();
        json!({
            "threads": self.threads,
            "prompt_tokens": PROMPT_TOKENS,
            "gen_tokens": GEN_TOKENS,
            "runs": engines::RUNS,
            "memory_read_gb_s": { "start": self.bandwidth[0] / 1e9, "end": self.bandwidth[1] / 1e9, "used": bw / 1e9 },
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
        let o = Options::parse(&args("--peers --threads 4 --files a.gguf b.gguf --json")).unwrap();
        assert_eq!(o, Options { threads: 4, files: vec!["a.gguf".into(), "b.gguf".into()], json: true });
        assert_eq!(Options::parse(&o.to_args()).unwrap(), o);
        let d = Options::parse(&args("--peers")).unwrap();
        assert_eq!(d, Options { threads: 2, files: vec![], json: false });
        assert!(Options::parse(&args("--peers --files")).is_err());
        assert!(Options::parse(&args("--peers --threads 0")).is_err());
        assert!(Options::parse(&args("--peers --bogus")).is_err());
    }

    fn speeds(prefill: f64, decode: f64) -> Speeds {
        Speeds { prefill_tok_s: prefill, decode_tok_s: decode, raw: json!({ "bytes_read_per_token": 1e8 }) }
    }

    #[test]
    fn ratios_are_against_the_faster_peer_per_phase() {
        let f = FileResult {
            file: "m.gguf".into(),
            results: vec![Ok(speeds(100.0, 20.0)), Ok(speeds(200.0, 10.0)), Ok(speeds(50.0, 25.0))],
            load: vec![Some(1.0); 3],
        };
        assert_eq!(f.best_peer(|s| s.prefill_tok_s), Some((200.0, "llama.cpp")));
        assert_eq!(f.best_peer(|s| s.decode_tok_s), Some((25.0, "mistral.rs")));
        let r = Report { threads: 2, bandwidth: [20e9, 30e9], load: [None, None], files: vec![f], peers: vec![] };
        let j = r.json();
        assert_eq!(j["files"][0]["strata_vs_best_peer"]["prefill"]["ratio"], 0.5);
        assert_eq!(j["files"][0]["strata_vs_best_peer"]["decode"]["peer"], "mistral.rs");
        // Bound: 30 GB/s over 100 MB per token = 300 tok/s; strata decodes 20.
        let frac = j["files"][0]["engines"][0]["decode_fraction_of_bound"].as_f64().unwrap();
        assert!((frac - 20.0 / 300.0).abs() < 1e-12);
        let table = r.table();
        assert!(table.contains("**0.50** vs llama.cpp"), "{table}");
        assert!(table.contains("**0.80** vs mistral.rs"), "{table}");
    }

    #[test]
    fn a_failed_peer_is_a_row_not_an_error() {
        let f = FileResult {
            file: "m.gguf".into(),
            results: vec![Ok(speeds(100.0, 20.0)), Err("boom | bad".into()), Ok(speeds(50.0, 25.0))],
            load: vec![None; 3],
        };
        assert_eq!(f.best_peer(|s| s.prefill_tok_s), Some((50.0, "mistral.rs")));
        let r = Report { threads: 2, bandwidth: [30e9, 30e9], load: [None, None], files: vec![f], peers: vec![] };
        assert!(r.table().contains("| llama.cpp | n/a: boom / bad |"));
        assert_eq!(r.json()["files"][0]["engines"][1]["error"], "boom | bad");
    }
}
