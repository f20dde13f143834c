//! Runs one engine on one GGUF file and reads its speeds: strata (`strata bench --json`),
//! llama.cpp (`llama-bench -o json`) and mistral.rs (`xtask/fixtures/mistralrs_bench.py`).
//!
//! Every engine gets the same thread count, prompt length and generation length, and reports
//! the median of at least [`RUNS`] timed runs after its own warm-up. Each engine runs as a child
//! process with a time limit, so one stuck or crashing peer becomes one "n/a" cell.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

/// Timed runs per measurement (strata's bench also does 3).
pub const RUNS: usize = 3;
/// The longest one engine may take on one file.
pub(super) const TIME_LIMIT: Duration = Duration::from_secs(30 * 60);

/// One engine's speeds on one file.
#[derive(Clone, Debug)]
pub struct Speeds {
    /// Prompt tokens per second of the prefill.
    pub prefill_tok_s: f64,
    /// Generated tokens per second of the decode.
    pub decode_tok_s: f64,
    /// The engine's whole JSON report, kept in `--json` output.
    pub raw: Value,
}

/// What the bench asks of every engine.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    /// Threads.
    pub threads: usize,
    /// Prompt tokens of the prefill.
    pub prompt_tokens: usize,
    /// Tokens of the decode.
    pub gen_tokens: usize,
}

/// A child's exit status and its captured output.
pub(super) struct Captured {
    pub(super) success: bool,
    pub(super) status: String,
    pub(super) stdout: String,
    pub(super) stderr: String,
}

impl Captured {
    /// The last lines of stderr, for an error message.
    pub(super) fn stderr_tail(&self) -> String {
        let lines: Vec<&str> = self.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(6)..].join("\n")
    }
}

/// Runs `cmd` with its stdout and stderr captured, killing it after `limit`.
pub(super) fn run_captured(cmd: &mut Command, limit: Duration) -> Result<Captured> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start {cmd:?}"))?;
    let drain = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            // A read error only truncates the captured text; the exit status still tells.
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout is piped")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr is piped")));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > limit {
            child.kill()?;
            child.wait()?;
            bail!("killed after {} s without finishing", limit.as_secs());
        }
        thread::sleep(Duration::from_millis(100));
    };
    Ok(Captured {
        success: status.success(),
        status: status.to_string(),
        stdout: stdout.join().expect("the stdout reader does not panic"),
        stderr: stderr.join().expect("the stderr reader does not panic"),
    })
}

/// The median of `xs` (the upper one of the middle two for an even count).
pub fn median(xs: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

pub(super) fn number(v: &Value, key: &str) -> Result<f64> {
    v.get(key).and_then(Value::as_f64).with_context(|| format!("the report has no number {key:?}"))
}

/// The last line of `stdout` that parses as a JSON object, or the whole text as JSON.
pub(super) fn json_output(stdout: &str) -> Result<Value> {
    if let Ok(v) = serde_json::from_str::<Value>(stdout.trim()) {
        return Ok(v);
    }
    stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l.trim()).ok().filter(Value::is_object))
        .context("no JSON in the output")
}

/// strata: `strata bench --json --act-quant <act_quant>` (3 runs inside, medians), which also
/// reports the weight bytes read per decoded token and the memory bandwidth it measured.
pub fn strata(strata_bin: &Path, file: &Path, w: Workload, act_quant: &str) -> Result<Speeds> {
    let out = run_captured(
        Command::new(strata_bin)
            .arg("bench")
            .arg("--model")
            .arg(file)
            .args(["--prompt-tokens", &w.prompt_tokens.to_string()])
            .args(["--gen-tokens", &w.gen_tokens.to_string()])
            .args(["--threads", &w.threads.to_string()])
            .args(["--act-quant", act_quant])
            .arg("--json"),
        TIME_LIMIT,
    )?;
    ensure!(out.success, "strata bench failed ({}): {}", out.status, out.stderr_tail());
    let raw = json_output(&out.stdout).context("reading strata bench's JSON")?;
    Ok(Speeds { prefill_tok_s: number(&raw, "prefill_tok_s")?, decode_tok_s: number(&raw, "decode_tok_s")?, raw })
}

/// llama.cpp: `llama-bench -p P -n N -d 0,P -t T -r 3 -o json`. Its prompt test at depth 0 times
/// one prefill of P tokens into an empty context; its generation test at depth P decodes N tokens
/// one at a time after P tokens in the cache, as strata and mistral.rs decode after the prompt
/// (a context of P to P+N tokens). The other two tests of the grid are not used.
pub fn llama_cpp(llama_bench: &Path, file: &Path, w: Workload) -> Result<Speeds> {
    let out = run_captured(
        Command::new(llama_bench)
            .arg("-m")
            .arg(file)
            .args(["-p", &w.prompt_tokens.to_string()])
            .args(["-n", &w.gen_tokens.to_string()])
            .args(["-d", &format!("0,{}", w.prompt_tokens)])
            .args(["-t", &w.threads.to_string()])
            .args(["-r", &RUNS.to_string()])
            .args(["-o", "json"]),
        TIME_LIMIT,
    )?;
    ensure!(out.success, "llama-bench failed ({}): {}", out.status, out.stderr_tail());
    let raw: Value = serde_json::from_str(out.stdout.trim()).context("reading llama-bench's JSON")?;
    let tests = raw.as_array().context("llama-bench's JSON is not an array of tests")?;
    let speed = |n_prompt: usize, n_gen: usize, n_depth: usize| -> Result<f64> {
        let test = tests
            .iter()
            .find(|t| {
                let is = |key: &str, want: usize| t.get(key).and_then(Value::as_u64) == Some(want as u64);
                is("n_prompt", n_prompt) && is("n_gen", n_gen) && is("n_depth", n_depth)
            })
            .with_context(|| {
                format!("llama-bench reported no test with n_prompt {n_prompt}, n_gen {n_gen}, n_depth {n_depth}")
            })?;
        let samples: Vec<f64> = test
            .get("samples_ts")
            .and_then(Value::as_array)
            .context("a llama-bench test without samples_ts")?
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        ensure!(samples.len() >= RUNS, "llama-bench reported {} samples, expected {RUNS}", samples.len());
        median(&samples).context("no finite llama-bench sample")
    };
    Ok(Speeds {
        prefill_tok_s: speed(w.prompt_tokens, 0, 0)?,
        decode_tok_s: speed(0, w.gen_tokens, w.prompt_tokens)?,
        raw,
    })
}

/// mistral.rs: the Python driver in the peers venv, threads set through `RAYON_NUM_THREADS`.
pub fn mistralrs(python: &Path, driver: &Path, file: &Path, w: Workload) -> Result<Speeds> {
    let out = run_captured(
        Command::new(python)
            .arg(driver)
            .arg("--model")
            .arg(file)
            .args(["--prompt-tokens", &w.prompt_tokens.to_string()])
            .args(["--gen-tokens", &w.gen_tokens.to_string()])
            .args(["--runs", &RUNS.to_string()])
            .env("RAYON_NUM_THREADS", w.threads.to_string())
            .env("OMP_NUM_THREADS", w.threads.to_string()),
        TIME_LIMIT,
    )?;
    let raw = json_output(&out.stdout);
    if let Some(e) = raw.as_ref().ok().and_then(|v| v.get("error")).and_then(Value::as_str) {
        bail!("{}", e.lines().next().unwrap_or(e));
    }
    ensure!(out.success, "the mistral.rs driver failed ({}): {}", out.status, out.stderr_tail());
    let raw = raw.context("reading the mistral.rs driver's JSON")?;
    Ok(Speeds { prefill_tok_s: number(&raw, "prefill_tok_s")?, decode_tok_s: number(&raw, "decode_tok_s")?, raw })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_takes_the_middle_and_skips_non_finite() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(3.0));
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn json_output_finds_the_last_object_line() {
        let v = json_output("log line\n{\"a\": 1}\nnoise\n{\"b\": 2}\n").unwrap();
        assert_eq!(v["b"], 2);
        let whole = json_output("[\n  {\"n_prompt\": 128}\n]\n").unwrap();
        assert_eq!(whole[0]["n_prompt"], 128);
        assert!(json_output("nothing here").is_err());
    }
}
