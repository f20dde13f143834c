//! What the planner assumes about the machine and the request: the hardware profile (disk,
//! memory and matvec rates, which the CLI measures and caches as JSON), the memory budget of
//! each tier, and the workload that sizes the KV cache and the activations.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::PlanError;

/// The read size `HardwareProfile::disk_read_gb_s` is measured in.
pub const SMALL_DISK_READ: u64 = 8 << 20;

/// The read size `HardwareProfile::disk_read_large_gb_s` is measured in.
pub const LARGE_DISK_READ: u64 = 64 << 20;

/// Measured rates of the machine, in GB/s (10^9 bytes per second).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HardwareProfile {
    /// Sequential read rate of the disk that holds the offload pack, in reads of
    /// [`SMALL_DISK_READ`] bytes, four in flight.
    pub disk_read_gb_s: f64,
    /// The same in reads of [`LARGE_DISK_READ`] bytes: a unit of 99 MB is one read, which some
    /// disks serve twice as fast as 8 MiB ones. `None` (profiles measured before it existed):
    /// every read at `disk_read_gb_s`.
    #[serde(default)]
    pub disk_read_large_gb_s: Option<f64>,
    /// Host memory bandwidth; the matvec rate of dtypes missing from `matvec_gb_s`.
    pub memory_gb_s: f64,
    /// Bytes of weights per second a matrix-vector product consumes, per dtype name (`f32`,
    /// `bf16`, `q8_0`, ...), with the profile's thread count.
    pub matvec_gb_s: BTreeMap<String, f64>,
    /// Host-to-device copy rate, once GPU placement exists; unused by CPU plans.
    pub host_to_device_gb_s: Option<f64>,
    /// The number of threads the rates were measured with.
    pub threads: usize,
}

impl HardwareProfile {
    /// The matvec rate of a dtype: its entry in `matvec_gb_s`, or `memory_gb_s` if it has none.
    pub fn matvec_rate(&self, dtype: &str) -> f64 {
        self.matvec_gb_s.get(dtype).copied().unwrap_or(self.memory_gb_s)
    }

    /// The disk's read rate for one read of `read_bytes`: `disk_read_gb_s` up to
    /// [`SMALL_DISK_READ`], `disk_read_large_gb_s` from [`LARGE_DISK_READ`] on, and between them
    /// linear in the logarithm of the size.
    pub fn disk_read_rate(&self, read_bytes: u64) -> f64 {
        let Some(large) = self.disk_read_large_gb_s else { return self.disk_read_gb_s };
        let small = self.disk_read_gb_s;
        if read_bytes <= SMALL_DISK_READ {
            small
        } else if read_bytes >= LARGE_DISK_READ {
            large
        } else {
            let position = (read_bytes as f64 / SMALL_DISK_READ as f64).log2()
                / (LARGE_DISK_READ as f64 / SMALL_DISK_READ as f64).log2();
            small + position * (large - small)
        }
    }

    /// Checks that every rate is a finite number above zero.
    pub fn validate(&self) -> Result<(), PlanError> {
        let check = |field: String, value: f64| {
            if value.is_finite() && value > 0.0 { Ok(()) } else { Err(PlanError::InvalidHardware { field, value }) }
        };
        check("disk_read_gb_s".to_string(), self.disk_read_gb_s)?;
        check("memory_gb_s".to_string(), self.memory_gb_s)?;
        if let Some(rate) = self.disk_read_large_gb_s {
            check("disk_read_large_gb_s".to_string(), rate)?;
        }
        for (dtype, &rate) in &self.matvec_gb_s {
            check(format!("matvec_gb_s[{dtype}]"), rate)?;
        }
        if let Some(rate) = self.host_to_device_gb_s {
            check("host_to_device_gb_s".to_string(), rate)?;
        }
        Ok(())
    }
}

/// The memory each tier may hold, in bytes. `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierBudgets {
    /// GPU memory. CPU plans leave VRAM unused, whatever its budget.
    pub vram: Option<u64>,
    /// Host RAM: resident weights, the KV cache, activations and the staging buffers.
    pub ram: Option<u64>,
}

/// The request shape that sizes the memory a plan must hold besides the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Tokens of context the KV cache reserves.
    pub context_tokens: usize,
    /// Tokens in the largest forward pass chunk (the prefill chunk), which sizes activations.
    pub batch_tokens: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> HardwareProfile {
        HardwareProfile {
            disk_read_gb_s: 2.0,
            disk_read_large_gb_s: None,
            memory_gb_s: 40.0,
            matvec_gb_s: BTreeMap::from([("q8_0".to_string(), 20.0)]),
            host_to_device_gb_s: None,
            threads: 8,
        }
    }

    #[test]
    fn missing_dtypes_fall_back_to_memory_bandwidth() {
        assert_eq!(profile().matvec_rate("q8_0"), 20.0);
        assert_eq!(profile().matvec_rate("bf16"), 40.0);
    }

    #[test]
    fn the_disk_rate_follows_the_read_size_between_the_two_measured() {
        let single = profile();
        assert_eq!(single.disk_read_rate(1), 2.0);
        assert_eq!(single.disk_read_rate(1 << 30), 2.0);
        let two = HardwareProfile { disk_read_large_gb_s: Some(4.0), ..profile() };
        assert_eq!(two.disk_read_rate(4096), 2.0);
        assert_eq!(two.disk_read_rate(SMALL_DISK_READ), 2.0);
        // 16 MiB and 32 MiB are a third and two thirds of the way from 8 to 64 MiB in log2.
        assert!((two.disk_read_rate(16 << 20) - 2.0 - 2.0 / 3.0).abs() < 1e-12);
        assert!((two.disk_read_rate(32 << 20) - 2.0 - 4.0 / 3.0).abs() < 1e-12);
        assert_eq!(two.disk_read_rate(LARGE_DISK_READ), 4.0);
        assert_eq!(two.disk_read_rate(u64::MAX), 4.0);
        // A disk slower in large reads is modelled so too.
        let slower = HardwareProfile { disk_read_large_gb_s: Some(1.0), ..profile() };
        assert!(slower.disk_read_rate(20 << 20) < 2.0 && slower.disk_read_rate(20 << 20) > 1.0);
    }

    #[test]
    fn validate_names_the_bad_rate() {
        assert_eq!(profile().validate(), Ok(()));
        let mut bad = profile();
        bad.matvec_gb_s.insert("f32".to_string(), 0.0);
        assert_eq!(
            bad.validate(),
            Err(PlanError::InvalidHardware { field: "matvec_gb_s[f32]".to_string(), value: 0.0 })
        );
        let mut bad = profile();
        bad.disk_read_gb_s = f64::NAN;
        assert!(bad.validate().unwrap_err().to_string().contains("disk_read_gb_s"));
        let mut bad = profile();
        bad.disk_read_large_gb_s = Some(0.0);
        assert!(bad.validate().unwrap_err().to_string().contains("disk_read_large_gb_s"));
        let mut bad = profile();
        bad.host_to_device_gb_s = Some(-1.0);
        assert!(bad.validate().unwrap_err().to_string().contains("host_to_device_gb_s"));
    }

    #[test]
    fn profile_round_trips_through_json() {
        let two = HardwareProfile { disk_read_large_gb_s: Some(3.0), ..profile() };
        for p in [profile(), two] {
            let json = serde_json::to_string(&p).unwrap();
            let back: HardwareProfile = serde_json::from_str(&json).unwrap();
            assert_eq!(back, p);
        }
        // A profile cached before the large-read rate existed still reads.
        let old = r#"{"disk_read_gb_s": 1.5, "memory_gb_s": 20.0, "matvec_gb_s": {}, "host_to_device_gb_s": null, "threads": 2}"#;
        let back: HardwareProfile = serde_json::from_str(old).unwrap();
        assert_eq!(back.disk_read_large_gb_s, None);
    }
}
