//! Kernel profiles (`Cuda::start_profile`, `Cuda::finish_profile`): every launch between the two
//! is counted under its kernel's name with a positive GPU time, past the batch at which the
//! recording reads its events back, and a profiled launch computes what an unprofiled one does.
#![cfg(feature = "cuda")]

use strata_kernels::Cuda;
use strata_kernels::cuda::ops;
use strata_kernels::cuda::testing::device_or_skip;

#[test]
fn every_launch_is_counted_and_timed() {
    let Some(_) = device_or_skip("every_launch_is_counted_and_timed") else { return };
    // An instance of its own: the shared one may run other tests' launches meanwhile.
    let cuda = Cuda::new(0).unwrap();
    let n = 1 << 20;
    let x = cuda.upload(&vec![1f32; n]).unwrap();
    let mut acc = cuda.zeros::<f32>(n).unwrap();
    assert!(!cuda.profiling());
    assert_eq!(cuda.finish_profile().unwrap(), None, "no profile was running");
    // Past one read-back batch (2,048 launches, two events each).
    let (adds, swiglus) = (2500usize, 3usize);
    cuda.start_profile();
    assert!(cuda.profiling());
    for _ in 0..adds {
        ops::add(&cuda, &mut acc, &x).unwrap();
    }
    let (gate, up) = (cuda.upload(&vec![2f32; n]).unwrap(), cuda.upload(&vec![3f32; n]).unwrap());
    let mut act = cuda.zeros::<f32>(n).unwrap();
    for _ in 0..swiglus {
        ops::swiglu(&cuda, &gate, &up, &mut act).unwrap();
    }
    let profile = cuda.finish_profile().unwrap().expect("a profile was running");
    assert!(!cuda.profiling());
    assert_eq!(cuda.finish_profile().unwrap(), None, "finished once");
    println!("{profile:?}");
    let counts: Vec<_> = profile.kernels.iter().map(|k| (k.kernel, k.launches)).collect();
    assert_eq!(profile.kernels.len(), 2, "{counts:?}");
    assert!(counts.contains(&("add_f32", adds)), "{counts:?}");
    assert_eq!(profile.launches(), adds + swiglus);
    for k in &profile.kernels {
        // Each launch moves 8 or 12 MiB: microseconds, not nothing and not seconds.
        let mean = k.seconds / k.launches as f64;
        assert!(mean > 1e-7 && mean < 0.1, "{}: {mean} s a launch", k.kernel);
    }
    // The profiled launches computed: every element was incremented `adds` times.
    let sums = cuda.download(&acc).unwrap();
    assert!(sums.iter().all(|&s| s == adds as f32), "{:?}", &sums[..4]);
    // Launches after the profile are not recorded: a new profile starts empty.
    ops::add(&cuda, &mut acc, &x).unwrap();
    cuda.start_profile();
    assert_eq!(cuda.finish_profile().unwrap().unwrap().launches(), 0);
}
