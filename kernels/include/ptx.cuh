// The inline-PTX helpers of kernels/matvec.cu and kernels/attention.cu: cp.async copies from
// global to shared memory, the launch's dynamic shared memory size, and an FMA that keeps
// subnormals. Kept apart so that the CPU emulation of the kernels (kernels/emu/) can put plain C++
// versions in their place.
#pragma once

// A 4-byte copy from global to shared memory, cached in L1 (every block of the SM reads x).
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
    const unsigned int d = (unsigned int)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(d), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Traps when the launch gave less dynamic shared memory than the kernel lays out: the launcher
// computes the size from the same constants, so this only catches a mismatch between the two.
__device__ __forceinline__ void check_smem(unsigned int need) {
    unsigned int have;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
    if (have < need) __trap();
}
// A 16-byte copy from global to shared memory (both 16-byte aligned) that bypasses L1, issued
// only when `on` (a predicated instruction, not a branch).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool on) {
    const unsigned int d = (unsigned int)__cvta_generic_to_shared(dst);
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n @p cp.async.cg.shared.global [%0], [%1], 16;\n}\n" ::"r"(d),
        "l"(src), "r"((unsigned int)on)
        : "memory");
}

// A 16-byte copy that reads only the first `src_bytes` (<= 16) bytes and zero-fills the rest.
__device__ __forceinline__ void cp_async16_zfill(void* dst, const void* src, unsigned int src_bytes) {
    const unsigned int d = (unsigned int)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes) : "memory");
}

// a * b + c, rounded once, keeping subnormal operands and results even under -ftz.
__device__ __forceinline__ float fma_sub(float a, float b, float c) {
    float d;
    asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(d) : "f"(a), "f"(b), "f"(c));
    return d;
}
