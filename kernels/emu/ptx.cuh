// The CPU emulation's versions of kernels/include/ptx.cuh: the copies happen at once, the FMA is
// the host's (which keeps subnormals), the shared memory size is the emulated launch's.
#pragma once
#include "cuda_emu.h"

inline void cp_async4(void* dst, const void* src) { std::memcpy(dst, src, 4); }
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}
inline void check_smem(unsigned int need) {
    if (emu.dynamic_smem < need) __trap();
}
inline void cp_async16(void* dst, const void* src, bool on) {
    if (on) std::memcpy(dst, src, 16);
}
inline void cp_async16_zfill(void* dst, const void* src, unsigned int src_bytes) {
    std::memcpy(dst, src, src_bytes);
    std::memset((char*)dst + src_bytes, 0, 16 - src_bytes);
}
inline float fma_sub(float a, float b, float c) { return std::fma(a, b, c); }
