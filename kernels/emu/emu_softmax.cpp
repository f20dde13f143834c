// kernels/softmax.cu on the CPU emulation (driver.h).
#include "driver.h"

#include "softmax.cu"

EMU_KERNELS(EMU_KERNEL(softmax_warp_f32), EMU_KERNEL(softmax_block_f32), EMU_KERNEL(argmax_warp_f32),
            EMU_KERNEL(argmax_block_f32))
