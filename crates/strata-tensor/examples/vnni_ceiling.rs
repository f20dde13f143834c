//! The compute bound of the quantized prefill GEMM on this CPU: how many `vpdpbusd` (512-bit, 64
//! byte products each) a core retires per second, alone and inside the loop structure of the
//! GEMM's microkernel (`cpu::matmul_quant`), with everything in L1.
//!
//! `cargo run --release -p strata-tensor --example vnni_ceiling -- [threads]`
//!
//! - `peak`: twelve independent accumulators, nothing else: the issue rate of the instruction.
//! - `steps`: the microkernel's inner step, two loads of levels and one broadcast of four digits
//!   per row of `x`, two `vpdpbusd` per broadcast, four rows of `x`.
//! - `groups`: whole groups of 32 columns as the microkernel runs them for `Q4_K` (two digit
//!   passes, the shift of the high one, and per group the f32 epilogue: convert, scale by the
//!   weight's scale times the activation's unit, add the minimums' term).
//! - `shifted`: `groups` with activation units that are powers of two: the group's integers are
//!   shifted right to the row's largest unit (a rounding bias added first) and scaled by the
//!   weight's scale alone, the multiply by the unit saved.
//! - `wide`: the 16-bit `Q4_K` kernel (`cpu::matmul_quant`'s `wide`): `vpdpwssd` on two columns of
//!   16-bit `sc * q` and 16-bit activations per lane, 64 columns summed in i32, then converted and
//!   added in f32; per 32 columns the minimums' FMA, per 256 one multiply and FMA by `d * unit`.
//!   Counted in `vpdpwssd`, each doing the work of one two-digit `vpdpbusd` (32 products of a
//!   weight by a 16-bit activation), so its figure compares directly with `groups`.
//!
//! A two-digit GEMM at `F` GFLOP/s (`2 m n k` per call, as the `prefill_matmul` example reports)
//! issues `F / 64` G `vpdpbusd` per second (two digits, 64 products each), so its fraction of the
//! `groups` figure is how close it runs to the microkernel's own ceiling; the rest is panel
//! decoding, activation quantization and cache misses. One-digit kernels (ggml's) issue half as
//! many instructions for the same product.

use std::time::Instant;

fn main() {
    let threads: usize = std::env::args().nth(1).map_or(1, |a| a.parse().expect("threads: a number"));
    #[cfg(target_arch = "x86_64")]
    {
        if !(is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni"))
        {
            println!("this CPU has no AVX-512 VNNI: the quantized GEMM runs the matrix-vector kernels instead");
            return;
        }
        println!("{threads} thread(s), each timing its own loop; G vpdpbusd/s per thread, median of 5");
        let loops = [
            ("peak", x86::peak as fn(u64) -> u64),
            ("steps", x86::steps),
            ("groups", x86::groups),
            ("shifted", x86::shifted),
            ("wide", x86::wide),
        ];
        for (name, f) in loops {
            let rates = run(threads, f);
            let each: Vec<String> = rates.iter().map(|r| format!("{r:.2}")).collect();
            println!("{name:>7}: {} (sum {:.2})", each.join(" "), rates.iter().sum::<f64>());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("only x86-64 has the VNNI GEMM ({threads} thread(s) asked)");
}

/// Runs `f` on `threads` threads at once, five times, and returns each thread's median rate in G
/// instructions per second (`f(reps)` returns the instructions it issued).
#[cfg(target_arch = "x86_64")]
fn run(threads: usize, f: fn(u64) -> u64) -> Vec<f64> {
    const REPS: u64 = 20_000;
    std::hint::black_box(f(REPS / 10)); // warm up the clocks
    let per_thread: Vec<Vec<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(move || {
                    (0..5)
                        .map(|_| {
                            let t = Instant::now();
                            let n = std::hint::black_box(f(REPS));
                            n as f64 / t.elapsed().as_secs_f64() / 1e9
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("timing thread")).collect()
    });
    per_thread
        .into_iter()
        .map(|mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        })
        .collect()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::hint::black_box;

    /// Rows of `x` per tile, columns per group, steps of four columns per group.
    const R: usize = 4;
    const G: usize = 32;
    const GROUPS: usize = 32;

    /// Operands in L1: levels `[GROUPS * G / 4][32][4]`, two digits of `R` rows, scales, minimums.
    struct Data {
        levels: Vec<u8>,
        hi: [[i8; GROUPS * G]; R],
        lo: [[i8; GROUPS * G]; R],
        scales: Vec<f32>,
        mins: Vec<f32>,
        units: [[f32; GROUPS]; R],
        sums: [[f32; GROUPS]; R],
        bias: [[i32; GROUPS]; R],
        shifts: [[i32; GROUPS]; R],
    }

    fn data() -> Data {
        Data {
            levels: (0..GROUPS * G * 32).map(|i| (i * 7 % 16) as u8).collect(),
            hi: std::array::from_fn(|r| std::array::from_fn(|i| ((i * 3 + r) % 255) as u8 as i8)),
            lo: std::array::from_fn(|r| std::array::from_fn(|i| ((i * 5 + r) % 255) as u8 as i8)),
            scales: (0..GROUPS * 32).map(|i| 1e-3 * i as f32).collect(),
            mins: vec![2e-3; GROUPS * 32],
            units: [[1e-4; GROUPS]; R],
            sums: [[0.5; GROUPS]; R],
            bias: [[1; GROUPS]; R],
            shifts: std::array::from_fn(|r| std::array::from_fn(|g| ((g + r) % 3) as i32)),
        }
    }

    pub fn peak(reps: u64) -> u64 {
        // SAFETY: main checked AVX-512 F/BW and VNNI.
        unsafe { peak_impl(reps) }
    }

    pub fn steps(reps: u64) -> u64 {
        let d = data();
        // SAFETY: as above.
        unsafe { steps_impl(&d, reps / 4) }
    }

    pub fn groups(reps: u64) -> u64 {
        let d = data();
        // SAFETY: as above.
        unsafe { groups_impl::<false>(&d, reps / 8) }
    }

    pub fn wide(reps: u64) -> u64 {
        let d = wide_data();
        // SAFETY: as above.
        unsafe { wide_impl(&d, reps / 8) }
    }

    /// Operands of the `wide` loop: 16-bit weights `[GROUPS * G / 2][32][2]`, 16-bit activations
    /// of `R` rows, a unit per 256 columns, per super-block scales, minimums per 32.
    struct Wide {
        w: Vec<i16>,
        x: [[i16; GROUPS * G]; R],
        d: Vec<f32>,
        mins: Vec<f32>,
        units: [[f32; GROUPS / 8]; R],
        sums: [[f32; GROUPS]; R],
    }

    fn wide_data() -> Wide {
        Wide {
            w: (0..GROUPS * G * 32).map(|i| (i * 7 % 945) as i16).collect(),
            x: std::array::from_fn(|r| std::array::from_fn(|i| ((i * 3 + r) % 65535) as u16 as i16)),
            d: (0..GROUPS / 8 * 32).map(|i| 1e-3 * i as f32).collect(),
            mins: vec![2e-3; GROUPS * 32],
            units: [[1e-4; GROUPS / 8]; R],
            sums: [[0.5; GROUPS]; R],
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
    unsafe fn wide_impl(d: &Wide, reps: u64) -> u64 {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for _ in 0..reps {
            for sb in 0..GROUPS / 8 {
                let mut part = [[_mm512_setzero_ps(); 2]; R];
                for h in 0..4 {
                    let mut dot = [[_mm512_setzero_si512(); 2]; R];
                    for s in 0..32 {
                        let c = sb * 256 + h * 64 + 2 * s;
                        // SAFETY: `c + 2 <= GROUPS * G`, inside `d`.
                        unsafe {
                            let p = d.w.as_ptr().add(c * 32);
                            let u = [_mm512_loadu_si512(p.cast()), _mm512_loadu_si512(p.add(32).cast())];
                            for (row, x) in dot.iter_mut().zip(&d.x) {
                                let a = _mm512_set1_epi32(x.as_ptr().add(c).cast::<i32>().read_unaligned());
                                row[0] = _mm512_dpwssd_epi32(row[0], u[0], a);
                                row[1] = _mm512_dpwssd_epi32(row[1], u[1], a);
                            }
                        }
                    }
                    for i in 0..R {
                        for v in 0..2 {
                            part[i][v] = _mm512_add_ps(part[i][v], _mm512_cvtepi32_ps(dot[i][v]));
                        }
                    }
                    for j in 2 * h..2 * h + 2 {
                        let g = sb * 8 + j;
                        // SAFETY: `g * 32 + 32 <= GROUPS * 32`.
                        let mn = unsafe {
                            let m = d.mins.as_ptr().add(g * 32);
                            [_mm512_loadu_ps(m), _mm512_loadu_ps(m.add(16))]
                        };
                        for (row, sums) in acc.iter_mut().zip(&d.sums) {
                            let e = _mm512_set1_ps(sums[g]);
                            row[0] = _mm512_fmadd_ps(mn[0], e, row[0]);
                            row[1] = _mm512_fmadd_ps(mn[1], e, row[1]);
                        }
                    }
                }
                // SAFETY: `sb * 32 + 32 <= GROUPS / 8 * 32`.
                let dd = unsafe {
                    let p = d.d.as_ptr().add(sb * 32);
                    [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))]
                };
                for i in 0..R {
                    let unit = _mm512_set1_ps(d.units[i][sb]);
                    for v in 0..2 {
                        acc[i][v] = _mm512_fmadd_ps(part[i][v], _mm512_mul_ps(dd[v], unit), acc[i][v]);
                    }
                }
            }
        }
        black_box(acc);
        reps * (GROUPS * G / 2 * R * 2) as u64
    }

    pub fn shifted(reps: u64) -> u64 {
        let d = data();
        // SAFETY: as above.
        unsafe { groups_impl::<true>(&d, reps / 8) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn peak_impl(reps: u64) -> u64 {
        let w = _mm512_set1_epi8(3);
        let b = black_box(_mm512_set1_epi8(5));
        let mut acc = [_mm512_set1_epi32(1); 12];
        for _ in 0..reps * 64 {
            for a in acc.iter_mut() {
                *a = _mm512_dpbusd_epi32(*a, w, b);
            }
        }
        let sum = acc.iter().fold(_mm512_setzero_si512(), |s, &a| _mm512_add_epi32(s, a));
        black_box(sum);
        reps * 64 * 12
    }

    /// One step: the levels of four columns of 32 weight rows, times the four digits of each row.
    #[inline(always)]
    unsafe fn step(levels: *const u8, s: usize, digits: &[[i8; GROUPS * G]; R], dot: &mut [[__m512i; 2]; R]) {
        // SAFETY: `s < GROUPS * G / 4`, inside the buffers of `Data`.
        unsafe {
            let p = levels.add(s * 128);
            let u = [_mm512_loadu_si512(p.cast()), _mm512_loadu_si512(p.add(64).cast())];
            for i in 0..R {
                let a = _mm512_set1_epi32(digits[i].as_ptr().add(4 * s).cast::<i32>().read_unaligned());
                dot[i][0] = _mm512_dpbusd_epi32(dot[i][0], u[0], a);
                dot[i][1] = _mm512_dpbusd_epi32(dot[i][1], u[1], a);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn steps_impl(d: &Data, reps: u64) -> u64 {
        let mut dot = [[_mm512_setzero_si512(); 2]; R];
        let levels = d.levels.as_ptr();
        for _ in 0..reps {
            for s in 0..GROUPS * G / 4 {
                // SAFETY: inside `d`.
                unsafe { step(levels, s, &d.hi, &mut dot) };
            }
        }
        black_box(dot);
        reps * (GROUPS * G / 4 * R * 2) as u64
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
    unsafe fn groups_impl<const SHIFT: bool>(d: &Data, reps: u64) -> u64 {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for _ in 0..reps {
            for g in 0..GROUPS {
                let mut dot = [[_mm512_setzero_si512(); 2]; R];
                for s in 0..G / 4 {
                    // SAFETY: inside `d`.
                    unsafe { step(d.levels.as_ptr(), g * G / 4 + s, &d.hi, &mut dot) };
                }
                for row in dot.iter_mut() {
                    for v in row.iter_mut() {
                        *v = _mm512_slli_epi32::<8>(*v);
                    }
                }
                let again = black_box(d.levels.as_ptr());
                for s in 0..G / 4 {
                    // SAFETY: inside `d`.
                    unsafe { step(again, g * G / 4 + s, &d.lo, &mut dot) };
                }
                // SAFETY: `g * 32 + 32 <= GROUPS * 32`.
                let (sc, mn) = unsafe {
                    let (s, m) = (d.scales.as_ptr().add(g * 32), d.mins.as_ptr().add(g * 32));
                    ([_mm512_loadu_ps(s), _mm512_loadu_ps(s.add(16))], [_mm512_loadu_ps(m), _mm512_loadu_ps(m.add(16))])
                };
                for i in 0..R {
                    let (unit, e) = (_mm512_set1_ps(d.units[i][g]), _mm512_set1_ps(d.sums[i][g]));
                    let (bias, shift) = (_mm512_set1_epi32(d.bias[i][g]), _mm_cvtsi32_si128(d.shifts[i][g]));
                    for v in 0..2 {
                        if SHIFT {
                            let dot = _mm512_sra_epi32(_mm512_add_epi32(dot[i][v], bias), shift);
                            acc[i][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc[v], acc[i][v]);
                        } else {
                            let scaled = _mm512_mul_ps(sc[v], unit);
                            acc[i][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i][v]), scaled, acc[i][v]);
                        }
                        acc[i][v] = _mm512_fmadd_ps(mn[v], e, acc[i][v]);
                    }
                }
            }
        }
        black_box(acc);
        reps * (GROUPS * 2 * (G / 4) * R * 2) as u64
    }
}
