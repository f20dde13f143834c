//! The measuring harness: CUDA-event timing, the copy-bandwidth peak, and the report.

use std::sync::Arc;

use strata_kernels::Cuda;
use strata_kernels::cuda::cudarc::driver::sys::CUevent_flags;

/// One measured kernel.
pub struct Row {
    /// Kernel and variant, e.g. "matvec q4_0".
    pub kernel: String,
    /// The problem size in words.
    pub shape: String,
    /// Bytes the kernel must move through device memory (each input read once, each output
    /// written once).
    pub bytes: f64,
    /// Median time in milliseconds.
    pub ms: f64,
}

/// The harness.
pub struct Bench {
    /// The device.
    pub cuda: Arc<Cuda>,
    /// Device-to-device copy bandwidth (bytes read + written per second), measured at start.
    pub peak_bytes_s: f64,
    /// Only the rows whose "kernel shape" contains this are measured (`--only`).
    pub only: Option<String>,
    rows: Vec<Row>,
    notes: Vec<String>,
}

type R<T> = Result<T, Box<dyn std::error::Error>>;

impl Bench {
    /// Opens the harness and measures the copy peak with a 2 GiB device-to-device copy.
    pub fn new(cuda: Arc<Cuda>) -> R<Bench> {
        let n = 1usize << 29; // 2 GiB of f32
        let src = cuda.zeros::<f32>(n)?;
        let mut dst = cuda.zeros::<f32>(n)?;
        let ms = time_ms(&cuda, 20, || {
            cuda.stream().memcpy_dtod(&src, &mut dst).map_err(|e| format!("{e:?}"))?;
            Ok(())
        })?;
        let peak_bytes_s = 2.0 * (n * 4) as f64 / (ms / 1e3);
        eprintln!("{}: device-to-device copy {:.0} GB/s (read + write)", cuda.name()?, peak_bytes_s / 1e9);
        Ok(Bench { cuda, peak_bytes_s, only: None, rows: Vec::new(), notes: Vec::new() })
    }

    /// Times `f` (which launches the kernel once) and records it.
    pub fn measure(&mut self, kernel: &str, shape: &str, bytes: f64, reps: usize, f: impl FnMut() -> R<()>) -> R<()> {
        if !self.wants(kernel, shape) {
            return Ok(());
        }
        let ms = time_ms(&self.cuda, reps, f)?;
        let row = Row { kernel: kernel.to_string(), shape: shape.to_string(), bytes, ms };
        eprintln!("{}", self.line(&row));
        self.rows.push(row);
        Ok(())
    }

    /// Times `launches` calls of `f` (each launching the kernel once) queued back to back between
    /// one pair of events, and records the time per launch; notes beside it the host's time to
    /// queue one (`f` returning, no synchronisation). Against [`Bench::measure`]'s single launch
    /// between its own events: whether a small kernel's time is its own or the launch's, and
    /// whether the host queues launches as fast as the device runs them.
    pub fn measure_chain(
        &mut self,
        kernel: &str,
        shape: &str,
        bytes: f64,
        launches: usize,
        mut f: impl FnMut() -> R<()>,
    ) -> R<()> {
        if !self.wants(&format!("{kernel} chained"), shape) {
            return Ok(());
        }
        let launches = launches.max(1);
        let mut host_us = Vec::new();
        let ms = time_ms(&self.cuda, 7, || {
            let t = std::time::Instant::now();
            for _ in 0..launches {
                f()?;
            }
            host_us.push(t.elapsed().as_secs_f64() * 1e6 / launches as f64);
            Ok(())
        })? / launches as f64;
        host_us.sort_by(|a, b| a.total_cmp(b));
        let host = host_us[host_us.len() / 2];
        let row = Row { kernel: format!("{kernel} chained"), shape: format!("{shape} x{launches}"), bytes, ms };
        eprintln!("{}", self.line(&row));
        self.notes.push(format!(
            "{kernel} {shape}: {launches} launches back to back, {:.2} us of device time each, the host {host:.2} us to \
             queue each",
            ms * 1e3
        ));
        self.rows.push(row);
        Ok(())
    }

    /// Whether the row of `kernel` at `shape` is measured (every row without `--only`): a
    /// profiler can then see one kernel's launches alone.
    pub fn wants(&self, kernel: &str, shape: &str) -> bool {
        self.only.as_ref().is_none_or(|only| format!("{kernel} {shape}").contains(only.as_str()))
    }

    /// A free-form result line for the report (transfers, overlap).
    pub fn note(&mut self, line: String) {
        self.notes.push(line);
    }

    fn line(&self, r: &Row) -> String {
        let gb_s = r.bytes / (r.ms / 1e3) / 1e9;
        format!(
            "{:<28} {:<34} {:>9.4} ms {:>8.0} GB/s {:>6.2} of peak",
            r.kernel,
            r.shape,
            r.ms,
            gb_s,
            gb_s * 1e9 / self.peak_bytes_s
        )
    }

    /// Prints the table and writes the JSON report.
    pub fn finish(&self, json: Option<&str>) -> R<()> {
        println!("device: {}   copy peak: {:.0} GB/s", self.cuda.name()?, self.peak_bytes_s / 1e9);
        for r in &self.rows {
            println!("{}", self.line(r));
        }
        for n in &self.notes {
            println!("{n}");
        }
        if let Some(path) = json {
            let mut s = format!(
                "{{\"device\": {:?}, \"copy_peak_gb_s\": {:.1}, \"kernels\": [\n",
                self.cuda.name()?,
                self.peak_bytes_s / 1e9
            );
            for (i, r) in self.rows.iter().enumerate() {
                let gb_s = r.bytes / (r.ms / 1e3) / 1e9;
                s.push_str(&format!(
                    "  {{\"kernel\": {:?}, \"shape\": {:?}, \"ms\": {:.5}, \"gb_s\": {:.1}, \"fraction_of_peak\": {:.3}}}{}\n",
                    r.kernel,
                    r.shape,
                    r.ms,
                    gb_s,
                    gb_s * 1e9 / self.peak_bytes_s,
                    if i + 1 < self.rows.len() { "," } else { "" }
                ));
            }
            s.push_str("], \"notes\": [");
            s.push_str(&self.notes.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", "));
            s.push_str("]}\n");
            std::fs::write(path, s)?;
        }
        Ok(())
    }
}

/// The median time of `reps` runs of `f` (after 3 warm-ups), by CUDA events on the compute
/// stream.
pub fn time_ms(cuda: &Cuda, reps: usize, mut f: impl FnMut() -> R<()>) -> R<f64> {
    for _ in 0..3 {
        f()?;
    }
    cuda.synchronize()?;
    let ctx = cuda.context();
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| format!("{e:?}"))?;
        let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| format!("{e:?}"))?;
        start.record(cuda.stream()).map_err(|e| format!("{e:?}"))?;
        f()?;
        end.record(cuda.stream()).map_err(|e| format!("{e:?}"))?;
        end.synchronize().map_err(|e| format!("{e:?}"))?;
        times.push(start.elapsed_ms(&end).map_err(|e| format!("{e:?}"))? as f64);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}
