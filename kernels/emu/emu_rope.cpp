// kernels/rope.cu on the CPU emulation (driver.h).
#include "driver.h"

#include "rope.cu"

EMU_KERNELS(EMU_KERNEL(rope_qk_f32), EMU_KERNEL(rope_qk_f16), EMU_KERNEL(rope_qk_bf16), EMU_KERNEL(rope_qk_f16x2),
            EMU_KERNEL(rope_qk_bf16x2), EMU_KERNEL(rope_qk_append_f32))
