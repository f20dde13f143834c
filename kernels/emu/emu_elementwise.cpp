// kernels/elementwise.cu on the CPU emulation (driver.h).
#include "driver.h"

#include "elementwise.cu"

EMU_KERNELS(EMU_KERNEL(swiglu_f32), EMU_KERNEL(swiglu_pairs_f32), EMU_KERNEL(copy_cols_f32),
            EMU_KERNEL(gather_rows_f32), EMU_KERNEL(scatter_add_rows_f32), EMU_KERNEL(add_sigmoid_scaled_f32),
            EMU_KERNEL(moe_combine_f32),
            EMU_KERNEL(add_f32), EMU_KERNEL(add_bias_f32), EMU_KERNEL(cast_f32_f16), EMU_KERNEL(cast_f32_bf16))
