// kernels/matvec.cu on the CPU emulation (driver.h).
#include "driver.h"

#include "matvec.cu"

// The kernels of one block-quantized dtype (the float path for 1 and 2 tokens, the integer one
// for 1 to 8) and of one float dtype (vector and element-by-element rows), as matvec.cu's
// MV_QUANT and MV_FLOAT define them.
#define EMU_MV_QUANT(n)                                                                                     \
    EMU_KERNEL(matvec_##n##_t1), EMU_KERNEL(matvec_##n##_t2), EMU_KERNEL(matvec_##n##_i16_t1),              \
        EMU_KERNEL(matvec_##n##_i16_t2), EMU_KERNEL(matvec_##n##_i16_t4), EMU_KERNEL(matvec_##n##_i16_t8)
#define EMU_MV_FLOAT(n)                                                                                     \
    EMU_KERNEL(matvec_##n##_t1), EMU_KERNEL(matvec_##n##_t2), EMU_KERNEL(matvec_##n##_t4),                  \
        EMU_KERNEL(matvec_##n##_t8), EMU_KERNEL(matvec_##n##_scalar_t1), EMU_KERNEL(matvec_##n##_scalar_t2), \
        EMU_KERNEL(matvec_##n##_scalar_t4), EMU_KERNEL(matvec_##n##_scalar_t8)

EMU_KERNELS(EMU_MV_QUANT(q8_0), EMU_MV_QUANT(q4_0), EMU_MV_QUANT(q4_1), EMU_MV_QUANT(q4_k), EMU_MV_QUANT(q6_k),
            EMU_MV_FLOAT(f32), EMU_MV_FLOAT(f16), EMU_MV_FLOAT(bf16), EMU_KERNEL(matvec_quantize_x))
