// Element dtypes as the kernels see them. The numbers are shared with Rust through bindgen
// (strata_kernels::cuda::params): keep them in step with the launchers in src/cuda/ops.
#pragma once

#define STRATA_DTYPE_F32 0
#define STRATA_DTYPE_F16 1
#define STRATA_DTYPE_BF16 2
#define STRATA_DTYPE_Q8_0 3
#define STRATA_DTYPE_Q4_0 4
#define STRATA_DTYPE_Q4_1 5
#define STRATA_DTYPE_Q4_K 6
#define STRATA_DTYPE_Q6_K 7
