//! Where a stretch of GPU work spent its time, kernel by kernel: a [`KernelProfile`], as
//! strata-kernels' `Cuda::start_profile` and `Cuda::finish_profile` measure it (a timing event on
//! the compute stream before and after each kernel launch, read back on the GPU's clock).
//!
//! Plain data, here in the base crate so that every crate above can carry it in every build, with
//! or without CUDA. What it counts: kernels launched one by one. Launches recorded into a CUDA
//! graph, cuBLAS GEMMs and copies are not in it; the time a pass took beyond its kernels' sum is
//! launch overhead, host work and waits.

/// One kernel's launches in a [`KernelProfile`].
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    /// The kernel's name in its `.cu` file (e.g. `matvec_q4_0_i16_t1`).
    pub kernel: &'static str,
    /// How many times it was launched.
    pub launches: usize,
    /// Its launches' GPU time summed, in seconds (each from the event before it to the one after).
    pub seconds: f64,
}

/// The kernels of a stretch of GPU work, most time first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelProfile {
    /// One row per kernel launched, sorted by time, most first (ties by name).
    pub kernels: Vec<KernelTime>,
}

impl KernelProfile {
    /// Adds one launch of `kernel` that took `seconds`.
    pub fn add(&mut self, kernel: &'static str, seconds: f64) {
        match self.kernels.iter_mut().find(|k| k.kernel == kernel) {
            Some(k) => {
                k.launches += 1;
                k.seconds += seconds;
            }
            None => self.kernels.push(KernelTime { kernel, launches: 1, seconds }),
        }
    }

    /// Orders the rows most time first, ties by name.
    pub fn sort(&mut self) {
        self.kernels.sort_by(|a, b| b.seconds.total_cmp(&a.seconds).then(a.kernel.cmp(b.kernel)));
    }

    /// Launches in all.
    pub fn launches(&self) -> usize {
        self.kernels.iter().map(|k| k.launches).sum()
    }

    /// GPU time of all launches, in seconds.
    pub fn seconds(&self) -> f64 {
        self.kernels.iter().map(|k| k.seconds).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launches_fold_per_kernel_and_sort_by_time() {
        let mut p = KernelProfile::default();
        assert_eq!((p.launches(), p.seconds()), (0, 0.0));
        // Times of few binary digits: their sums are exact.
        p.add("rms_norm", 0.125);
        p.add("matvec", 0.5);
        p.add("rms_norm", 0.25);
        p.add("add", 0.25);
        p.sort();
        let rows: Vec<_> = p.kernels.iter().map(|k| (k.kernel, k.launches)).collect();
        assert_eq!(rows, [("matvec", 1), ("rms_norm", 2), ("add", 1)]);
        assert_eq!(p.launches(), 4);
        assert_eq!(p.seconds(), 1.125);
        assert_eq!(p.kernels[1].seconds, 0.375);
        // Equal times: by name.
        p.add("add", 0.25);
        p.sort();
        assert_eq!(p.kernels[0].kernel, "add");
    }
}
