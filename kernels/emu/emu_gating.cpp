// kernels/gating.cu on the CPU emulation (driver.h).
#include "driver.h"

#include "gating.cu"

EMU_KERNELS(EMU_KERNEL(topk_gating_f32))
