// kernels/attention.cu on the CPU emulation (driver.h; the block table through `+` and `*`).
#include "driver.h"

#include "attention.cu"

EMU_KERNELS(EMU_KERNEL(kv_append_f32), EMU_KERNEL(attention_decode_f32), EMU_KERNEL(attention_decode_combine_f32),
            EMU_KERNEL(attention_prefill_f32_d64), EMU_KERNEL(attention_prefill_f32_d128),
            EMU_KERNEL(attention_prefill_f32_d256))
