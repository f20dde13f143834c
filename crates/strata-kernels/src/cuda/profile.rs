//! The recording behind [`Cuda::start_profile`]: two timing events on the compute stream around
//! each launch, read back in batches into a [`KernelProfile`].
//!
//! Events are reused: a batch of launches is read back (waiting for its last event) once
//! [`BATCH`] of them are pending, and at [`Cuda::finish_profile`], so a long profile holds a
//! bounded number of events. The events cost each launch two records on the host, so a profiled
//! pass runs slower than an unprofiled one; each kernel's GPU time is its own, unaffected.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};

use crate::cuda::{Cuda, driver};
use strata_tensor::profile::KernelProfile;

use crate::Result;

/// Launches pending before their events are read back.
const BATCH: usize = 2048;

/// A profile being recorded.
pub(crate) struct Recording {
    profile: KernelProfile,
    /// Launches whose events have not been read back: the kernel, the events before and after.
    pending: Vec<(&'static str, CudaEvent, CudaEvent)>,
    /// Events read back, for the next launches.
    spare: Vec<CudaEvent>,
}

impl Recording {
    pub(crate) fn new() -> Recording {
        Recording { profile: KernelProfile::default(), pending: Vec::new(), spare: Vec::new() }
    }

    /// A timing event recorded now on `stream`.
    pub(crate) fn mark(&mut self, ctx: &std::sync::Arc<CudaContext>, stream: &CudaStream) -> Result<CudaEvent> {
        let event = match self.spare.pop() {
            Some(e) => e,
            None => ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver("profile: new_event"))?,
        };
        event.record(stream).map_err(driver("profile: record"))?;
        Ok(event)
    }

    /// Keeps one launch of `kernel` between `before` and `after`; reads a full batch back.
    pub(crate) fn push(&mut self, kernel: &'static str, before: CudaEvent, after: CudaEvent) -> Result<()> {
        self.pending.push((kernel, before, after));
        if self.pending.len() >= BATCH { self.read_back() } else { Ok(()) }
    }

    /// Waits for the pending launches and adds their times to the profile.
    pub(crate) fn read_back(&mut self) -> Result<()> {
        for (kernel, before, after) in self.pending.drain(..) {
            // `elapsed_ms` waits for both events.
            let ms = before.elapsed_ms(&after).map_err(driver("profile: elapsed"))?;
            self.profile.add(kernel, f64::from(ms) / 1e3);
            self.spare.extend([before, after]);
        }
        Ok(())
    }

    /// The profile, once every launch is read back.
    pub(crate) fn finish(mut self) -> Result<KernelProfile> {
        self.read_back()?;
        self.profile.sort();
        Ok(self.profile)
    }
}

impl Cuda {
    /// Starts timing every kernel launched on this device from now on, one by one (a graph's
    /// recorded launches are not timed: see [`Cuda::profiling`]). A profile already running is
    /// restarted.
    pub fn start_profile(&self) {
        *self.profiler.lock().unwrap_or_else(|p| p.into_inner()) = Some(Recording::new());
        self.profiling.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether launches on this device are being timed ([`Cuda::start_profile`]): passes that
    /// would record their launches into a graph launch them one by one instead, to be timed.
    pub fn profiling(&self) -> bool {
        self.profiling.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops timing and returns what was launched since [`Cuda::start_profile`], waiting for those
    /// launches to finish (`None` if no profile was running).
    pub fn finish_profile(&self) -> Result<Option<KernelProfile>> {
        self.profiling.store(false, std::sync::atomic::Ordering::Relaxed);
        let recording = self.profiler.lock().unwrap_or_else(|p| p.into_inner()).take();
        recording.map(Recording::finish).transpose()
    }
}
