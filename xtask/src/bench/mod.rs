//! `cargo xtask bench`: microbenchmarks of the CPU tensor core's hot ops against this machine's
//! limits.
//!
//! Three measurements, all in one rayon pool of `--threads` threads:
//! - memory read bandwidth, a vectorised sum over 256 MiB (well past the L3);
//! - decode matvec for a 5632 x 2048 weight (one FFN matrix of a 1.1B Llama) in every dtype,
//!   rotating over weight copies that total 256 MiB so that each call reads DRAM, reported as
//!   achieved GB/s of weight bytes and as a fraction of the measured bandwidth (target 0.80);
//! - f32 prefill matmul, m = 128, n = 5632, k = 2048, in GFLOP/s next to the `gemm` crate.
//!
//! Must run in release: `cargo xtask bench` rebuilds xtask in release and runs it there.

mod bandwidth;
mod json;
mod matmul;
mod matvec;
mod measure;

use std::time::Duration;

use anyhow::{Context, Result};
use strata_tensor::DType;

use bandwidth::Bandwidth;
use json::Json;
use matmul::MatmulResult;
use matvec::MatvecResult;
use measure::Budget;

const MIB: usize = 1 << 20;
/// The bandwidth buffer: eight times the 32 MiB L3.
const BANDWIDTH_BYTES: usize = 256 * MIB;
/// The total size of the weight copies the matvec rotates over.
const ROTATE_BYTES: usize = 256 * MIB;
/// One FFN matrix of a 1.1B Llama (TinyLlama): intermediate size x hidden size.
const FFN_N: usize = 5632;
const FFN_K: usize = 2048;
/// Tokens of the prefill matmul.
const PREFILL_M: usize = 128;
/// The fraction of the measured bandwidth a decode matvec should reach.
const TARGET_RATIO: f64 = 0.80;
const BANDWIDTH_BUDGET: Budget =
    Budget { min_samples: 10, min_time: Duration::from_millis(500), max_time: Duration::from_secs(5) };

/// What `cargo xtask bench` was asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Threads in the rayon pool every op runs in.
    pub threads: usize,
    /// Print a JSON object instead of tables.
    pub json: bool,
}

impl Options {
    /// Parses `[--threads N] [--json]`.
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut opts = Options { threads: 2, json: false };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--json" => opts.json = true,
                "--threads" => {
                    let n = it.next().context("--threads needs a number")?;
                    opts.threads = n
                        .parse()
                        .ok()
                        .filter(|&n| n > 0)
                        .with_context(|| format!("--threads takes a positive whole number, got `{n}`"))?;
                }
                other => anyhow::bail!("unknown bench option `{other}` (options: --threads N, --json)"),
            }
        }
        Ok(opts)
    }

    /// The arguments that parse back into these options.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec!["--threads".to_string(), self.threads.to_string()];
        if self.json {
            args.push("--json".into());
        }
        args
    }
}

/// Everything one run measured.
struct Report {
    threads: usize,
    cpu: String,
    isa: String,
    bandwidth: Bandwidth,
    matvec: Vec<MatvecResult>,
    matmul: MatmulResult,
}

/// Runs every benchmark and prints the report (tables, or JSON with `--json`) on stdout, with
/// progress on stderr.
pub fn run(opts: &Options) -> Result<()> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(opts.threads).build().context("building the thread pool")?;
    let threads = opts.threads;

    eprintln!("bench: memory read bandwidth ({} MiB, {threads} threads)", BANDWIDTH_BYTES / MIB);
    let bandwidth = pool.install(|| bandwidth::measure(BANDWIDTH_BYTES, BANDWIDTH_BUDGET));

    let weight = measure::random_f32(FFN_N * FFN_K, 1);
    let mut matvec = Vec::new();
    for dtype in DType::ALL {
        eprintln!("bench: decode matvec {FFN_N} x {FFN_K} {dtype}");
        matvec.push(pool.install(|| matvec::measure(&weight, FFN_N, FFN_K, dtype, ROTATE_BYTES, matvec::BUDGET)));
    }

    eprintln!("bench: prefill matmul f32 {PREFILL_M} x {FFN_N} x {FFN_K}");
    let matmul = pool.install(|| matmul::measure(&weight, PREFILL_M, FFN_N, FFN_K, threads, matmul::BUDGET));

    let report =
        Report { threads, cpu: cpu_name(), isa: format!("{:?}", strata_tensor::cpu::isa()), bandwidth, matvec, matmul };
    if opts.json {
        println!("{}", report.json().render());
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// The CPU's model name from `/proc/cpuinfo`, or `unknown CPU`.
fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|rest| rest.split_once(':'))
                    .map(|(_, name)| name.trim().to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

impl Report {
    fn table(&self) -> String {
        let bw = &self.bandwidth;
        let mut t =
            format!("strata op benchmarks: {} threads, {}, kernels at ISA {}\n\n", self.threads, self.cpu, self.isa);
        t += &format!(
            "Memory read bandwidth: {:.1} GB/s median, {:.1} GB/s best ({} MiB buffer, {} sum, {} passes)\n\n",
            bw.median_gb_s,
            bw.best_gb_s,
            bw.bytes / MIB,
            bw.kernel,
            bw.passes
        );
        t += &format!(
            "Decode matvec {FFN_N} x {FFN_K}, rotating over copies totalling >= {} MiB (target >= {TARGET_RATIO:.2} of bandwidth)\n",
            ROTATE_BYTES / MIB
        );
        t += &format!(
            "{:<6} {:>10} {:>6} {:>6} {:>10} {:>7} {:>8} {:>11}\n",
            "dtype", "weight MiB", "copies", "calls", "median us", "GB/s", "x bw", "max rel err"
        );
        for r in &self.matvec {
            match &r.outcome {
                Ok(s) => {
                    t += &format!(
                        "{:<6} {:>10.2} {:>6} {:>6} {:>10.1} {:>7.1} {:>8.2} {:>11.1e}\n",
                        r.dtype.name(),
                        s.weight_bytes as f64 / MIB as f64,
                        s.copies,
                        s.calls,
                        s.median_s * 1e6,
                        s.gb_s,
                        s.gb_s / bw.median_gb_s,
                        s.max_rel_err
                    )
                }
                Err(e) => t += &format!("{:<6} not measured: {e}\n", r.dtype.name()),
            }
        }
        let mm = &self.matmul;
        t += &format!("\nPrefill matmul f32, m {} x n {} x k {}\n", mm.m, mm.n, mm.k);
        t += &format!("{:<7} {:>10} {:>8} {:>6}\n", "impl", "median ms", "GFLOP/s", "calls");
        let row = |name: &str, s: &matmul::MatmulStats| {
            format!("{name:<7} {:>10.2} {:>8.1} {:>6}\n", s.median_s * 1e3, s.gflop_s, s.calls)
        };
        t += &row("gemm", &mm.gemm);
        match &mm.strata {
            Ok((s, diff)) => {
                t += &row("strata", s);
                t +=
                    &format!("strata / gemm: {:.2} (max rel diff from gemm {diff:.1e})\n", s.gflop_s / mm.gemm.gflop_s);
            }
            Err(e) => t += &format!("strata  not measured: {e}\n"),
        }
        t
    }

    fn json(&self) -> Json {
        let bw = &self.bandwidth;
        let matvec = self
            .matvec
            .iter()
            .map(|r| {
                let mut fields = vec![("dtype", Json::Str(r.dtype.name().into()))];
                match &r.outcome {
                    Ok(s) => fields.extend([
                        ("weight_bytes", Json::Int(s.weight_bytes)),
                        ("copies", Json::Int(s.copies)),
                        ("calls", Json::Int(s.calls)),
                        ("median_us", Json::Num(s.median_s * 1e6)),
                        ("gb_s", Json::Num(s.gb_s)),
                        ("bandwidth_ratio", Json::Num(s.gb_s / bw.median_gb_s)),
                        ("max_rel_err", Json::Num(s.max_rel_err)),
                    ]),
                    Err(e) => fields.push(("error", Json::Str(e.clone()))),
                }
                Json::Obj(fields)
            })
            .collect();
        let mm = &self.matmul;
        let stats = |s: &matmul::MatmulStats| {
            vec![
                ("calls", Json::Int(s.calls)),
                ("median_ms", Json::Num(s.median_s * 1e3)),
                ("gflop_s", Json::Num(s.gflop_s)),
            ]
        };
        let strata = match &mm.strata {
            Ok((s, diff)) => {
                let mut fields = stats(s);
                fields.push(("gemm_ratio", Json::Num(s.gflop_s / mm.gemm.gflop_s)));
                fields.push(("max_rel_diff_from_gemm", Json::Num(*diff)));
                Json::Obj(fields)
            }
            Err(e) => Json::Obj(vec![("error", Json::Str(e.clone()))]),
        };
        Json::Obj(vec![
            ("threads", Json::Int(self.threads)),
            ("cpu", Json::Str(self.cpu.clone())),
            ("isa", Json::Str(self.isa.clone())),
            (
                "bandwidth",
                Json::Obj(vec![
                    ("bytes", Json::Int(bw.bytes)),
                    ("passes", Json::Int(bw.passes)),
                    ("kernel", Json::Str(bw.kernel.clone())),
                    ("median_gb_s", Json::Num(bw.median_gb_s)),
                    ("best_gb_s", Json::Num(bw.best_gb_s)),
                ]),
            ),
            (
                "matvec",
                Json::Obj(vec![
                    ("n", Json::Int(FFN_N)),
                    ("k", Json::Int(FFN_K)),
                    ("rotate_bytes", Json::Int(ROTATE_BYTES)),
                    ("target_ratio", Json::Num(TARGET_RATIO)),
                    ("results", Json::Arr(matvec)),
                ]),
            ),
            (
                "matmul",
                Json::Obj(vec![
                    ("m", Json::Int(mm.m)),
                    ("n", Json::Int(mm.n)),
                    ("k", Json::Int(mm.k)),
                    ("gemm", Json::Obj(stats(&mm.gemm))),
                    ("strata", strata),
                ]),
            ),
        ])
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
        assert_eq!(Options::parse(&[]).unwrap(), Options { threads: 2, json: false });
        let opts = Options::parse(&args("--threads 1 --json")).unwrap();
        assert_eq!(opts, Options { threads: 1, json: true });
        assert_eq!(Options::parse(&opts.to_args()).unwrap(), opts);
    }

    #[test]
    fn bad_options_are_errors() {
        for bad in ["--threads", "--threads 0", "--threads two", "--fast"] {
            assert!(Options::parse(&args(bad)).is_err(), "{bad}");
        }
    }
}
