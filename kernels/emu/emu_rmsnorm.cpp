// kernels/rmsnorm.cu on the CPU emulation (driver.h).
#include "driver.h"

#include "rmsnorm.cu"

EMU_KERNELS(EMU_KERNEL(rmsnorm_f32), EMU_KERNEL(rmsnorm_f32_actq))
