//! Runtime detection of the SIMD instruction sets the fast kernels use.

use std::sync::OnceLock;

/// An instruction-set level, ordered from least to most capable. Kernels pick the best path at
/// or below [`isa()`]; tests run every level in [`Isa::available`] against the reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Portable Rust, no `std::arch`.
    Scalar,
    /// AVX2 with FMA and F16C.
    Avx2,
    /// AVX-512 F/BW/DQ/VL.
    Avx512,
    /// AVX-512 with VNNI (`vpdpbusd`) and BF16.
    Avx512Vnni,
}

impl Isa {
    /// Detects what this CPU supports, without any override.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 =
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
            let avx512 = avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl");
            let vnni = avx512 && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512bf16");
            if vnni {
                return Isa::Avx512Vnni;
            }
            if avx512 {
                return Isa::Avx512;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    /// Every level this CPU can run, lowest first.
    pub fn available() -> Vec<Isa> {
        let best = Isa::detect();
        [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni].into_iter().filter(|i| *i <= best).collect()
    }

    /// Parses `scalar`, `avx2`, `avx512` or `avx512vnni`.
    pub fn from_name(name: &str) -> Option<Isa> {
        match name.to_ascii_lowercase().as_str() {
            "scalar" => Some(Isa::Scalar),
            "avx2" => Some(Isa::Avx2),
            "avx512" => Some(Isa::Avx512),
            "avx512vnni" => Some(Isa::Avx512Vnni),
            _ => None,
        }
    }
}

/// The level the fast kernels use: the detected one, lowered by the environment variable
/// `STRATA_ISA` (`scalar`, `avx2`, `avx512`) when set, to compare paths or work around a CPU bug.
/// An override above what the CPU supports is ignored.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = Isa::detect();
        match std::env::var("STRATA_ISA").ok().as_deref().and_then(Isa::from_name) {
            Some(forced) if forced <= best => forced,
            _ => best,
        }
    })
}
