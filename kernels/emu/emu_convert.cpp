// kernels/convert.cu on the CPU emulation (driver.h).
#include "driver.h"

#include "convert.cu"

EMU_KERNELS(EMU_KERNEL(convert_f32), EMU_KERNEL(convert_f16), EMU_KERNEL(convert_bf16), EMU_KERNEL(convert_q8_0),
            EMU_KERNEL(convert_q4_0), EMU_KERNEL(convert_q4_1), EMU_KERNEL(convert_q4_k), EMU_KERNEL(convert_q6_k),
            EMU_KERNEL(convert_f32_scalar), EMU_KERNEL(convert_f16_scalar), EMU_KERNEL(convert_bf16_scalar))
