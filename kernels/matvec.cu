// Dequantizing matrix-vector products: y[t, r] = sum_c W[r, c] * x[t, c] for a row-major weight
// W [n, k] of any strata dtype (f32, f16, bf16, q8_0, q4_0, q4_1, q4_k, q6_k; ggml block layouts,
// see quant.cuh), f32 activations x [tokens, k] and outputs y [tokens, n], f32 accumulation. The
// activations stay f32: no quantization of x.
//
// Launch: blocks of STRATA_MATVEC_WARPS warps; each warp owns STRATA_MATVEC_ROWS_PER_WARP
// consecutive rows (grid = ceil(n / (warps * rows))), and every lane of it works on the same
// columns of all of its rows, so each activation value read from shared memory serves all of
// them. One kernel per dtype and token count T in {1, 2, 4, 8}: a launch computes up to T tokens
// (p.tokens; the launcher loops over groups of 8 and rounds a group up to the next T), reading
// each weight byte once for all of them.
//
// - Activations: staged per block in shared memory, in tiles of STRATA_MATVEC_XTILE / T columns
//   (at least STRATA_MATVEC_XTILE_MIN), padded by 4 floats every 32 and every 256 columns so
//   that the lanes' 16-byte reads fall in distinct banks; with the sums of x over each 8 columns
//   for the block-quantized kernels of T <= 2.
// - Float weights (f32, f16, bf16): rows whose byte length is a multiple of 16 are read with
//   16-byte streaming loads, consecutive lanes on consecutive 16 bytes, two per row in flight;
//   other rows element by element (the _scalar kernels).
// - Block-quantized weights: each warp streams its rows in chunks of STRATA_MATVEC_CHUNK columns
//   (512 for q8_0) through a STRATA_MATVEC_STAGES-deep cp.async pipeline in shared memory:
//   16-byte copies from the chunk's 16-byte aligned start (zero-filled past the end of the
//   tensor, never read past it), so global loads are fully coalesced whatever the block size and
//   alignment (18, 20, 34, 144, 210 bytes). Lanes then decode from shared memory: one lane per
//   block for q4_0 and q4_1, two for q8_0, eight per super-block for q4_k and q6_k.
// - Integer weights become floats without a conversion instruction. For T <= 2 (decode, the
//   bandwidth-bound case) the 4- and 6-bit values enter the FMA as they are, as subnormal floats
//   q * 2^-149, against activations staged times 2^90: each product is q x 2^-59, rounded like
//   any f32 product as long as |q x| >= 2^-67 (smaller ones lose bits but are below f32
//   resolution of any sum they join), and a block's partial sum times 2^59 d gives its dot
//   product. Offsets (q4_0's 8, q6_k's 32) and minimums (q4_1, q4_k) come from the 8-column sums
//   of x. This needs |x| < 2^38 and subnormal arithmetic, so those FMAs are written as PTX
//   fma.rn.f32, which keeps subnormals whatever -ftz says. q8_0, and every type for T >= 4 (arithmetic-bound: the
//   conversion is shared by T FMAs), use the magic number 2^23 (quant.cuh), with the block scale
//   folded into the weights for T >= 4 (fewer live registers).
//
// The results differ from the CPU's only by the order of the f32 additions (and, against
// strata_tensor::cpu::reference::matvec for block-quantized weights, by the CPU's quantization of
// x). CPU reference: strata_tensor::cpu::reference::matmul (x as [tokens, k]), and
// reference::matvec per token. Launchers: strata_kernels::cuda::ops::{matvec, linear}.
#include "strata_common.cuh"
#include "quant.cuh"
#include "matvec.h"

#define MV_WARPS STRATA_MATVEC_WARPS
#define MV_ROWS STRATA_MATVEC_ROWS_PER_WARP
#define MV_STAGES STRATA_MATVEC_STAGES
#define MV_THREADS (MV_WARPS * 32)

// The activation scale of the subnormal path, and the factor that undoes it (2^149 / 2^90).
#define MV_XSCALE 0x1p90f
#define MV_UNSCALE 0x1p59f

// ---- Shared-memory activation tiles ------------------------------------------------------------

// The activation tile of a T-token kernel: KT columns per token, STRIDE floats per token in
// shared memory (KT padded), SUMS sums of 8 columns per token.
template <int T>
struct XTile {
    static constexpr int KT =
        STRATA_MATVEC_XTILE / T > STRATA_MATVEC_XTILE_MIN ? STRATA_MATVEC_XTILE / T : STRATA_MATVEC_XTILE_MIN;
    static constexpr int STRIDE = KT + KT / 8 + KT / 64;
    static constexpr int SUMS = KT / 8;
    static_assert(KT % STRATA_MATVEC_CHUNK == 0 && KT % STRATA_MATVEC_CHUNK_Q8_0 == 0, "tiles hold whole chunks");
};

// The padded position of tile column e: 4 floats of padding after every 32 columns and after
// every 256. The 32 columns of an aligned group stay contiguous, so xs + xpad(e) + j is column
// e + j for j < 32 - e % 32, and groups of 4 (e a multiple of 4) stay 16-byte aligned.
__device__ __forceinline__ int xpad(int e) { return e + ((e >> 5) << 2) + ((e >> 8) << 2); }

__device__ __forceinline__ float4 lds4(const float* p) { return *reinterpret_cast<const float4*>(p); }

// Copies columns k0 .. k0 + kt of the launch's x rows into the tile (zeros for tokens at or past
// p.tokens), times 2^90 with SCALED, and with SUMS the sum of x (unscaled) over each 8 columns.
// Called by the whole block between barriers.
template <int T, bool SCALED, bool SUMS>
__device__ __forceinline__ void stage_x(const MatvecParams& p, const float* __restrict__ x, unsigned int k0, int kt,
                                        float* xs, float* xsum) {
    using X = XTile<T>;
#pragma unroll
    for (int t = 0; t < T; ++t) {
        const bool live = t < (int)p.tokens;
        const float* xr = x + (size_t)t * p.cols + k0;
        for (int e = threadIdx.x; e < kt; e += MV_THREADS) {
            const float v = live ? __ldg(xr + e) : 0.0f;
            xs[t * X::STRIDE + xpad(e)] = SCALED ? v * MV_XSCALE : v;
        }
    }
    if constexpr (SUMS) {
        __syncthreads();
        const int nb = kt / 8;
        // Sums of the unscaled values (the scaling is exact, and undoing it first keeps the sums
        // finite for any |x| < 2^38).
        constexpr float U = SCALED ? 1.0f / MV_XSCALE : 1.0f;
#pragma unroll
        for (int t = 0; t < T; ++t) {
            for (int b = threadIdx.x; b < nb; b += MV_THREADS) {
                const float* v = xs + t * X::STRIDE + xpad(8 * b);
                const float4 q0 = lds4(v), q1 = lds4(v + 4);
                const float s = ((q0.x * U + q0.y * U) + (q0.z * U + q0.w * U)) +
                                ((q1.x * U + q1.y * U) + (q1.z * U + q1.w * U));
                xsum[t * X::SUMS + b] = s;
            }
        }
    }
}

// The sum of x over the 32 columns from tile column e (a multiple of 32), from the 8-column sums.
__device__ __forceinline__ float xsum32(const float* xsum, int e) {
    const float4 s = lds4(xsum + e / 8);
    return (s.x + s.y) + (s.z + s.w);
}

// Traps when the launch gave less dynamic shared memory than the kernel lays out: the launcher
// computes the size from the same constants, so this only catches a mismatch between the two.
__device__ __forceinline__ void check_smem(unsigned int need) {
    unsigned int have;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
    if (have < need) __trap();
}

// Sums each lane's partial dot products over the warp and writes the live outputs.
template <int T>
__device__ __forceinline__ void write_rows(const MatvecParams& p, float (&acc)[MV_ROWS][T], unsigned int row0,
                                           int lane, float* __restrict__ y) {
#pragma unroll
    for (int r = 0; r < MV_ROWS; ++r) {
#pragma unroll
        for (int t = 0; t < T; ++t) {
            const float v = warp_sum(acc[r][t]);
            if (lane == 0 && row0 + r < p.rows && t < (int)p.tokens) y[(size_t)t * p.rows + row0 + r] = v;
        }
    }
}

// ---- Float weights --------------------------------------------------------------------------

// Adds W[r, e .. e + E] . x[t, e .. e + E] for every row and token, the row's 16 bytes in v[r].
template <int DT, int T>
__device__ __forceinline__ void float_unit(const uint4 (&v)[MV_ROWS], const float* xs, int e,
                                           float (&acc)[MV_ROWS][T]) {
    using X = XTile<T>;
    if constexpr (DT == STRATA_DTYPE_F32) {
#pragma unroll
        for (int t = 0; t < T; ++t) {
            const float4 a = lds4(xs + t * X::STRIDE + xpad(e));
#pragma unroll
            for (int r = 0; r < MV_ROWS; ++r) {
                float s = acc[r][t];
                s = fmaf(__uint_as_float(v[r].x), a.x, s);
                s = fmaf(__uint_as_float(v[r].y), a.y, s);
                s = fmaf(__uint_as_float(v[r].z), a.z, s);
                s = fmaf(__uint_as_float(v[r].w), a.w, s);
                acc[r][t] = s;
            }
        }
    } else {
        float wf[MV_ROWS][8];
#pragma unroll
        for (int r = 0; r < MV_ROWS; ++r) {
            const unsigned int u[4] = {v[r].x, v[r].y, v[r].z, v[r].w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                if constexpr (DT == STRATA_DTYPE_F16) {
                    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&u[i]));
                    wf[r][2 * i] = f.x, wf[r][2 * i + 1] = f.y;
                } else {
                    wf[r][2 * i] = __uint_as_float(u[i] << 16), wf[r][2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
                }
            }
        }
#pragma unroll
        for (int t = 0; t < T; ++t) {
            const float* xr = xs + t * X::STRIDE + xpad(e);
            const float4 a = lds4(xr), b = lds4(xr + 4);
#pragma unroll
            for (int r = 0; r < MV_ROWS; ++r) {
                float s = acc[r][t];
                s = fmaf(wf[r][0], a.x, s);
                s = fmaf(wf[r][1], a.y, s);
                s = fmaf(wf[r][2], a.z, s);
                s = fmaf(wf[r][3], a.w, s);
                s = fmaf(wf[r][4], b.x, s);
                s = fmaf(wf[r][5], b.y, s);
                s = fmaf(wf[r][6], b.z, s);
                s = fmaf(wf[r][7], b.w, s);
                acc[r][t] = s;
            }
        }
    }
}

// Float rows of a multiple of 16 bytes: lanes on consecutive 16-byte units, two per row in flight.
template <int DT, int T>
__device__ __forceinline__ void mv_float_vec(const MatvecParams& p, const unsigned char* __restrict__ w,
                                             const float* __restrict__ x, float* __restrict__ y) {
    using X = XTile<T>;
    constexpr int ES = DT == STRATA_DTYPE_F32 ? 4 : 2;
    constexpr int E = 16 / ES;
    extern __shared__ float4 smem[];
    float* xs = reinterpret_cast<float*>(smem);
    check_smem(T * X::STRIDE * 4);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const unsigned int row0 = (blockIdx.x * MV_WARPS + warp) * MV_ROWS;
    const unsigned char* wr[MV_ROWS];
#pragma unroll
    for (int r = 0; r < MV_ROWS; ++r) wr[r] = w + (unsigned long long)min(row0 + r, p.rows - 1) * p.row_bytes;
    float acc[MV_ROWS][T] = {};
    for (unsigned int k0 = 0; k0 < p.cols; k0 += X::KT) {
        const int kt = min((unsigned int)X::KT, p.cols - k0);
        __syncthreads();
        stage_x<T, false, false>(p, x, k0, kt, xs, nullptr);
        __syncthreads();
        const int units = kt / E;
        for (int u = lane; u < units; u += 64) {
            const bool two = u + 32 < units;
            uint4 a[MV_ROWS], b[MV_ROWS];
#pragma unroll
            for (int r = 0; r < MV_ROWS; ++r) a[r] = __ldcs(reinterpret_cast<const uint4*>(wr[r] + (size_t)(k0 + u * E) * ES));
            if (two) {
#pragma unroll
                for (int r = 0; r < MV_ROWS; ++r)
                    b[r] = __ldcs(reinterpret_cast<const uint4*>(wr[r] + (size_t)(k0 + (u + 32) * E) * ES));
            }
            float_unit<DT, T>(a, xs, u * E, acc);
            if (two) float_unit<DT, T>(b, xs, (u + 32) * E, acc);
        }
    }
    write_rows<T>(p, acc, row0, lane, y);
}

// Float rows of any length: one element per lane and row at a time.
template <int DT, int T>
__device__ __forceinline__ void mv_float_scalar(const MatvecParams& p, const unsigned char* __restrict__ w,
                                                const float* __restrict__ x, float* __restrict__ y) {
    using X = XTile<T>;
    extern __shared__ float4 smem[];
    float* xs = reinterpret_cast<float*>(smem);
    check_smem(T * X::STRIDE * 4);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const unsigned int row0 = (blockIdx.x * MV_WARPS + warp) * MV_ROWS;
    const unsigned char* wr[MV_ROWS];
#pragma unroll
    for (int r = 0; r < MV_ROWS; ++r) wr[r] = w + (unsigned long long)min(row0 + r, p.rows - 1) * p.row_bytes;
    float acc[MV_ROWS][T] = {};
    for (unsigned int k0 = 0; k0 < p.cols; k0 += X::KT) {
        const int kt = min((unsigned int)X::KT, p.cols - k0);
        __syncthreads();
        stage_x<T, false, false>(p, x, k0, kt, xs, nullptr);
        __syncthreads();
        for (int e = lane; e < kt; e += 32) {
            float wv[MV_ROWS];
#pragma unroll
            for (int r = 0; r < MV_ROWS; ++r) {
                if constexpr (DT == STRATA_DTYPE_F32) wv[r] = reinterpret_cast<const float*>(wr[r])[k0 + e];
                else if constexpr (DT == STRATA_DTYPE_F16) wv[r] = f16_bits(load_u16(wr[r] + 2ull * (k0 + e)));
                else wv[r] = bf16_bits(load_u16(wr[r] + 2ull * (k0 + e)));
            }
#pragma unroll
            for (int t = 0; t < T; ++t) {
                const float xv = xs[t * X::STRIDE + xpad(e)];
#pragma unroll
                for (int r = 0; r < MV_ROWS; ++r) acc[r][t] = fmaf(wv[r], xv, acc[r][t]);
            }
        }
    }
    write_rows<T>(p, acc, row0, lane, y);
}

// ---- Block-quantized weights: the cp.async pipeline ------------------------------------------

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

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// a * b + c, rounded once, keeping subnormal operands and results even under -ftz.
__device__ __forceinline__ float fma_sub(float a, float b, float c) {
    float d;
    asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(d) : "f"(a), "f"(b), "f"(c));
    return d;
}

// Byte J of w (0..255) as the subnormal float byte * 2^-149.
template <int J>
__device__ __forceinline__ float sub_byte(unsigned int w) {
    return __uint_as_float(__byte_perm(w, 0u, 0x4440u | J));
}

// Adds the dot product of 4 subnormal-coded (sub_byte) or plain weights with x[0..3] to s.
__device__ __forceinline__ float dot4_sub(const float (&w)[4], float4 x, float s) {
    s = fma_sub(w[0], x.x, s);
    s = fma_sub(w[1], x.y, s);
    s = fma_sub(w[2], x.z, s);
    return fma_sub(w[3], x.w, s);
}

__device__ __forceinline__ float dot4(const float (&w)[4], float4 x, float s) {
    s = fmaf(w[0], x.x, s);
    s = fmaf(w[1], x.y, s);
    s = fmaf(w[2], x.z, s);
    return fmaf(w[3], x.w, s);
}

// The four bytes of w as subnormal floats (sub_byte) or, with the magic number, as floats minus
// `bias`.
__device__ __forceinline__ void bytes_sub(unsigned int w, float (&out)[4]) {
    out[0] = sub_byte<0>(w), out[1] = sub_byte<1>(w), out[2] = sub_byte<2>(w), out[3] = sub_byte<3>(w);
}

__device__ __forceinline__ void bytes_magic(unsigned int w, float bias, float (&out)[4]) {
    out[0] = magic_byte<0>(w) - bias, out[1] = magic_byte<1>(w) - bias;
    out[2] = magic_byte<2>(w) - bias, out[3] = magic_byte<3>(w) - bias;
}

// N 32-bit words starting at a 2-byte aligned shared-memory address, from N + 1 aligned words.
template <int N>
__device__ __forceinline__ void lds_words_a2(const unsigned char* p, unsigned int (&out)[N]) {
    const unsigned int off = (unsigned int)reinterpret_cast<size_t>(p) & 3u;
    const unsigned int* q = reinterpret_cast<const unsigned int*>(p - off);
    unsigned int raw[N + 1];
#pragma unroll
    for (int i = 0; i <= N; ++i) raw[i] = q[i];
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = __funnelshift_rc(raw[i], raw[i + 1], 8 * off);
}

// Bytes of a chunk's shared-memory buffer: the chunk, up to 15 bytes before it (its start is
// rounded down to 16 bytes) and to 16 after it (the last copy, and word reads that run past the
// last block).
__host__ __device__ constexpr int chunk_buffer(int chunk_bytes) { return (chunk_bytes + 32 + 15) / 16 * 16; }

// Each format: CHUNK_ELEMS columns per pipeline step, whose CHUNK_BYTES bytes (per row) land in a
// BUF-byte buffer; SUBNORMAL when its T <= 2 kernels use the subnormal path (and need the scaled
// activations and their sums); unit_elem / unit_byte: where lane `lane`'s block (or super-block)
// starts in the chunk; dot<T, SUB>: adds the lane's share of the chunk for every row and token,
// given each row's block in shared memory and the tile column e of that block. SUB is the
// subnormal path, else the magic number with the scales folded in (or, for q8_0 with T <= 2,
// applied per block).

// q4_0: one lane per block of 32, x = (q - 8) * d.
struct Q4_0 {
    static constexpr int CHUNK_ELEMS = STRATA_MATVEC_CHUNK;
    static constexpr int CHUNK_BYTES = CHUNK_ELEMS / 32 * 18;
    static constexpr int BUF = chunk_buffer(CHUNK_BYTES);
    static constexpr bool SUBNORMAL = true;
    __device__ static int unit_elem(int lane) { return 32 * lane; }
    __device__ static int unit_byte(int lane) { return 18 * lane; }

    template <int T, bool SUB>
    __device__ static void dot(const unsigned char* const (&blk)[MV_ROWS], const float* xs, const float* xsum, int e,
                               int, float (&acc)[MV_ROWS][T]) {
        using X = XTile<T>;
        unsigned int qs[MV_ROWS][4];
        float d[MV_ROWS];
#pragma unroll
        for (int r = 0; r < MV_ROWS; ++r) {
            // The block is 2-byte aligned: d and the 16 nibble bytes from 5 aligned words.
            const unsigned int off = (unsigned int)reinterpret_cast<size_t>(blk[r]) & 3u;
            const unsigned int* q = reinterpret_cast<const unsigned int*>(blk[r] - off);
            unsigned int raw[5];
#pragma unroll
            for (int i = 0; i < 5; ++i) raw[i] = q[i];
            d[r] = f16_bits(raw[0] >> (8 * off));
#pragma unroll
            for (int i = 0; i < 4; ++i) qs[r][i] = __funnelshift_rc(raw[i], raw[i + 1], 16 + 8 * off);
        }
        const float* xr[T];
#pragma unroll
        for (int t = 0; t < T; ++t) xr[t] = xs + t * X::STRIDE + xpad(e);
        float part[MV_ROWS][T] = {};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            // Word i: elements 4i .. 4i + 3 in the low nibbles, 16 + 4i .. in the high ones.
            float wl[MV_ROWS][4], wh[MV_ROWS][4];
#pragma unroll
            for (int r = 0; r < MV_ROWS; ++r) {
                const unsigned int lo = qs[r][i] & 0x0F0F0F0Fu, hi = (qs[r][i] >> 4) & 0x0F0F0F0Fu;
                if constexpr (SUB) {
                    bytes_sub(lo, wl[r]), bytes_sub(hi, wh[r]);
                } else {
                    bytes_magic(lo, STRATA_MAGIC + 8.0f, wl[r]), bytes_magic(hi, STRATA_MAGIC + 8.0f, wh[r]);
#pragma unroll
                    for (int j = 0; j < 4; ++j) wl[r][j] *= d[r], wh[r][j] *= d[r];
                }
            }
#pragma unroll
            for (int t = 0; t < T; ++t) {
                const float4 a = lds4(xr[t] + 4 * i), b = lds4(xr[t] + 16 + 4 * i);
#pragma unroll
                for (int r = 0; r < MV_ROWS; ++r) {
                    if constexpr (SUB) part[r][t] = dot4_sub(wh[r], b, dot4_sub(wl[r], a, part[r][t]));
                    else acc[r][t] = dot4(wh[r], b, dot4(wl[r], a, acc[r][t]));
                }
            }
        }
        if constexpr (SUB) {
            // sum (q - 8) x = 2^59 part - 8 sum x.
#pragma unroll
            for (int t = 0; t < T; ++t) {
                const float sx = xsum32(xsum + t * X::SUMS, e);
#pragma unroll
                for (int r = 0; r < MV_ROWS; ++r)
                    acc[r][t] = fmaf(d[r] * MV_UNSCALE, part[r][t], fmaf(-8.0f * d[r], sx, acc[r][t]));
            }
        }
    }
};

// q4_1: one lane per block of 32, x = q * d + m; blocks are 4-byte aligned.
struct Q4_1 {
    static constexpr int CHUNK_ELEMS = STRATA_MATVEC_CHUNK;
    static constexpr int CHUNK_BYTES = CHUNK_ELEMS / 32 * 20;
    static constexpr int BUF = chunk_buffer(CHUNK_BYTES);
    static constexpr bool SUBNORMAL = true;
    __device__ static int unit_elem(int lane) { return 32 * lane; }
    __device__ static int unit_byte(int lane) { return 20 * lane; }

    template <int T, bool SUB>
    __device__ static void dot(const unsigned char* const (&blk)[MV_ROWS], const float* xs, const float* xsum, int e,
                               int, float (&acc)[MV_ROWS][T]) {
        using X = XTile<T>;
        unsigned int qs[MV_ROWS][4];
        float d[MV_ROWS], m[MV_ROWS];
#pragma unroll
        for (int r = 0; r < MV_ROWS; ++r) {
            const unsigned int* q = reinterpret_cast<const unsigned int*>(blk[r]);
            const unsigned int dm = q[0];
            d[r] = f16_bits(dm), m[r] = f16_bits(dm >> 16);
#pragma unroll
            for (int i = 0; i < 4; ++i) qs[r][i] = q[1 + i];
        }
        const float* xr[T];
#pragma unroll
        for (int t = 0; t < T; ++t) xr[t] = xs + t * X::STRIDE + xpad(e);
        float part[MV_ROWS][T] = {};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float wl[MV_ROWS][4], wh[MV_ROWS][4];
#pragma unroll
            for (int r = 0; r < MV_ROWS; ++r) {
                const unsigned int lo = qs[r][i] & 0x0F0F0F0Fu, hi = (qs[r][i] >> 4) & 0x0F0F0F0Fu;
                if constexpr (SUB) {
                    bytes_sub(lo, wl[r]), bytes_sub(hi, wh[r]);
                } else {
                    bytes_magic(lo, STRATA_MAGIC, wl[r]), bytes_magic(hi, STRATA_MAGIC, wh[r]);
#pragma unroll
                    for (int j = 0; j < 4; ++j) wl[r][j] = fmaf(wl[r][j], d[r], m[r]), wh[r][j] = fmaf(wh[r][j], d[r], m[r]);
                }
            }
#pragma unroll
            for (int t = 0; t < T; ++t) {
                const float4 a = lds4(xr[t] + 4 * i), b = lds4(xr[t] + 16 + 4 * i);
#pragma unroll
                for (int r = 0; r < MV_ROWS; ++r) {
                    if constexpr (SUB) part[r][t] = dot4_sub(wh[r], b, dot4_sub(wl[r], a, part[r][t]));
                    else acc[r][t] = dot4(wh[r], b, dot4(wl[r], a, acc[r][t]));
                }
            }
        }
        if constexpr (SUB) {
            // sum (q d + m) x = 2^59 d part + m sum x.
#pragma unroll
            for (int t = 0; t < T; ++t) {
                const float sx = xsum32(xsum + t * X::SUMS, e);
#pragma unroll
                for (int r = 0; r < MV_ROWS; ++r) acc[r][t] = fmaf(d[r] * MV_UNSCALE, part[r][t], fmaf(m[r], sx, acc[r][t]));
            }
        }
    }
};

// q8_0: two lanes per block of 32 (16 values each), x = q * d. Always the magic number: at 8.5
// bits a value the conversion is not the bottleneck.
struct Q8_0 {
    static constexpr int CHUNK_ELEMS = STRATA_MATVEC_CHUNK_Q8_0;
    static constexpr int CHUNK_BYTES = CHUNK_ELEMS / 32 * 34;
    static constexpr int BUF = chunk_buffer(CHUNK_BYTES);
    static constexpr bool SUBNORMAL = false;
    __device__ static int unit_elem(int lane) { return 32 * (lane >> 1) + 16 * (lane & 1); }
    __device__ static int unit_byte(int lane) { return 34 * (lane >> 1); }

    template <int T, bool>
    __device__ static void dot(const unsigned char* const (&blk)[MV_ROWS], const float* xs, const float*, int e,
                               int lane, float (&acc)[MV_ROWS][T]) {
        using X = XTile<T>;
        constexpr bool FOLD = T >= 4;
        const int half = lane & 1;
        unsigned int qs[MV_ROWS][4];
        float d[MV_ROWS];
#pragma unroll
        for (int r = 0; r < MV_ROWS; ++r) {
            d[r] = f16_bits(load_u16(blk[r]));
            lds_words_a2<4>(blk[r] + 2 + 16 * half, qs[r]);
        }
        const float* xr[T];
#pragma unroll
        for (int t = 0; t < T; ++t) xr[t] = xs + t * X::STRIDE + xpad(e);
        float part[MV_ROWS][T] = {};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float wv[MV_ROWS][4];
#pragma unroll
            for (int r = 0; r < MV_ROWS; ++r) {
                // Bias the signed bytes by 128 to make them unsigned for the magic number.
                bytes_magic(qs[r][i] ^ 0x80808080u, STRATA_MAGIC + 128.0f, wv[r]);
                if constexpr (FOLD) {
#pragma unroll
                    for (int j = 0; j < 4; ++j) wv[r][j] *= d[r];
                }
            }
#pragma unroll
            for (int t = 0; t < T; ++t) {
                const float4 a = lds4(xr[t] + 4 * i);
#pragma unroll
                for (int r = 0; r < MV_ROWS; ++r) {
                    if constexpr (FOLD) acc[r][t] = dot4(wv[r], a, acc[r][t]);
                    else part[r][t] = dot4(wv[r], a, part[r][t]);
                }
            }
        }
        if constexpr (!FOLD) {
#pragma unroll
            for (int r = 0; r < MV_ROWS; ++r)
#pragma unroll
                for (int t = 0; t < T; ++t) acc[r][t] = fmaf(d[r], part[r][t], acc[r][t]);
        }
    }
};

// q4_k: eight lanes per super-block of 256. Lane j takes nibble bytes 32c + 16h .. + 16 (c = j / 2,
// h = j % 2): elements 64c + 16h + i in the low nibbles (sub-block 2c) and 64c + 32 + 16h + i in
// the high ones (sub-block 2c + 1). Lanes with h = 1 do their high run first, which keeps the
// eight lanes' activation reads in distinct banks. Super-blocks are 16-byte aligned.
struct Q4_K {
    static constexpr int CHUNK_ELEMS = STRATA_MATVEC_CHUNK;
    static constexpr int CHUNK_BYTES = CHUNK_ELEMS / 256 * 144;
    static constexpr int BUF = chunk_buffer(CHUNK_BYTES);
    static constexpr bool SUBNORMAL = true;
    __device__ static int unit_elem(int lane) { return 256 * (lane >> 3); }
    __device__ static int unit_byte(int lane) { return 144 * (lane >> 3); }

    template <int T, bool SUB>
    __device__ static void dot(const unsigned char* const (&blk)[MV_ROWS], const float* xs, const float* xsum, int e,
                               int lane, float (&acc)[MV_ROWS][T]) {
        using X = XTile<T>;
        const int j = lane & 7, c = j >> 1, h = j & 1;
        uint4 qv[MV_ROWS];
        float dl[MV_ROWS], dh[MV_ROWS], ml[MV_ROWS], mh[MV_ROWS];
#pragma unroll
        for (int r = 0; r < MV_ROWS; ++r) {
            const uint4 hd = *reinterpret_cast<const uint4*>(blk[r]);
            qv[r] = *reinterpret_cast<const uint4*>(blk[r] + 16 + 32 * c + 16 * h);
            const float d = f16_bits(hd.x), dmin = f16_bits(hd.x >> 16);
            const unsigned int scw = c < 2 ? q4k_scales_lo(hd.y) : q4k_scales_hi(hd.y, hd.w);
            const unsigned int mw = c < 2 ? q4k_mins_lo(hd.z) : q4k_mins_hi(hd.z, hd.w);
            const int sh = 16 * (c & 1);
            dl[r] = d * (float)((scw >> sh) & 0xffu), dh[r] = d * (float)((scw >> (sh + 8)) & 0xffu);
            ml[r] = dmin * (float)((mw >> sh) & 0xffu), mh[r] = dmin * (float)((mw >> (sh + 8)) & 0xffu);
        }
        float part[2][MV_ROWS][T] = {};
#pragma unroll
        for (int rho = 0; rho < 2; ++rho) {
            const int run = rho ^ h;  // 0: low nibbles (sub-block 2c), 1: high nibbles (2c + 1)
            const float* xr[T];
#pragma unroll
            for (int t = 0; t < T; ++t) xr[t] = xs + t * X::STRIDE + xpad(e + 64 * c + 32 * run + 16 * h);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                float wv[MV_ROWS][4];
#pragma unroll
                for (int r = 0; r < MV_ROWS; ++r) {
                    const unsigned int word = i == 0 ? qv[r].x : i == 1 ? qv[r].y : i == 2 ? qv[r].z : qv[r].w;
                    const unsigned int q = (word >> (4 * run)) & 0x0F0F0F0Fu;
                    if constexpr (SUB) {
                        bytes_sub(q, wv[r]);
                    } else {
                        bytes_magic(q, STRATA_MAGIC, wv[r]);
                        const float sc = run ? dh[r] : dl[r], mn = run ? mh[r] : ml[r];
#pragma unroll
                        for (int b = 0; b < 4; ++b) wv[r][b] = fmaf(wv[r][b], sc, -mn);
                    }
                }
#pragma unroll
                for (int t = 0; t < T; ++t) {
                    const float4 a = lds4(xr[t] + 4 * i);
#pragma unroll
                    for (int r = 0; r < MV_ROWS; ++r) {
                        if constexpr (SUB) part[rho][r][t] = dot4_sub(wv[r], a, part[rho][r][t]);
                        else acc[r][t] = dot4(wv[r], a, acc[r][t]);
                    }
                }
            }
        }
        if constexpr (SUB) {
            // The minimum terms of both sub-blocks, once: by the h = 0 lane of the pair.
#pragma unroll
            for (int t = 0; t < T; ++t) {
                const float s0 = h == 0 ? xsum32(xsum + t * X::SUMS, e + 64 * c) : 0.0f;
                const float s1 = h == 0 ? xsum32(xsum + t * X::SUMS, e + 64 * c + 32) : 0.0f;
#pragma unroll
                for (int r = 0; r < MV_ROWS; ++r) {
                    const float pl = h ? part[1][r][t] : part[0][r][t];
                    const float ph = h ? part[0][r][t] : part[1][r][t];
                    float v = fmaf(dl[r] * MV_UNSCALE, pl, (dh[r] * MV_UNSCALE) * ph);
                    v = fmaf(-ml[r], s0, fmaf(-mh[r], s1, v));
                    acc[r][t] += v;
                }
            }
        }
    }
};

// q6_k: eight lanes per super-block of 256. Lane j takes half h = j / 4 and positions
// l = 8m .. 8m + 7 (m = j % 4): elements 128h + 32i + l for i = 0..3, from 8 bytes each of
// ql[64h + l], ql[64h + 32 + l] and qh[32h + l], with scales[8h + m / 2 + 2i]. Lanes with h = 1
// take the i in the order 1, 0, 3, 2 (distinct activation banks). Super-blocks are 2-byte aligned.
struct Q6_K {
    static constexpr int CHUNK_ELEMS = STRATA_MATVEC_CHUNK;
    static constexpr int CHUNK_BYTES = CHUNK_ELEMS / 256 * 210;
    static constexpr int BUF = chunk_buffer(CHUNK_BYTES);
    static constexpr bool SUBNORMAL = true;
    __device__ static int unit_elem(int lane) { return 256 * (lane >> 3); }
    __device__ static int unit_byte(int lane) { return 210 * (lane >> 3); }

    template <int T, bool SUB>
    __device__ static void dot(const unsigned char* const (&blk)[MV_ROWS], const float* xs, const float* xsum, int e,
                               int lane, float (&acc)[MV_ROWS][T]) {
        using X = XTile<T>;
        const int j = lane & 7, h = j >> 2, m = j & 3;
        unsigned int qa[MV_ROWS][2], qb[MV_ROWS][2], qh[MV_ROWS][2], sc[MV_ROWS][2];
        float d[MV_ROWS];
#pragma unroll
        for (int r = 0; r < MV_ROWS; ++r) {
            lds_words_a2<2>(blk[r] + 64 * h + 8 * m, qa[r]);
            lds_words_a2<2>(blk[r] + 64 * h + 32 + 8 * m, qb[r]);
            lds_words_a2<2>(blk[r] + 128 + 32 * h + 8 * m, qh[r]);
            lds_words_a2<2>(blk[r] + 192 + 8 * h, sc[r]);
            d[r] = f16_bits(load_u16(blk[r] + 208));
        }
#pragma unroll
        for (int iota = 0; iota < 4; ++iota) {
            const int i = iota ^ h;
            const int nsh = 4 * (iota >> 1);  // low nibbles for i < 2, high for i >= 2
            const int hsh = 2 * i;
            const int col = e + 128 * h + 32 * i + 8 * m;  // tile column of the 8 elements
            float ds[MV_ROWS];
#pragma unroll
            for (int r = 0; r < MV_ROWS; ++r) {
                const int byte = (m >> 1) + 2 * (i & 1);  // scale (m / 2 + 2i) within word i / 2
                ds[r] = d[r] * (float)(signed char)((sc[r][iota >> 1] >> (8 * byte)) & 0xffu);
            }
            const float* xr[T];
#pragma unroll
            for (int t = 0; t < T; ++t) xr[t] = xs + t * X::STRIDE + xpad(col);
            float part[MV_ROWS][T] = {};
#pragma unroll
            for (int wi = 0; wi < 2; ++wi) {
                float wv[MV_ROWS][4];
#pragma unroll
                for (int r = 0; r < MV_ROWS; ++r) {
                    const unsigned int lo = ((i & 1) ? qb[r][wi] : qa[r][wi]) >> nsh;
                    const unsigned int q = (lo & 0x0F0F0F0Fu) | (((qh[r][wi] >> hsh) & 0x03030303u) << 4);
                    if constexpr (SUB) {
                        bytes_sub(q, wv[r]);
                    } else {
                        bytes_magic(q, STRATA_MAGIC + 32.0f, wv[r]);
#pragma unroll
                        for (int b = 0; b < 4; ++b) wv[r][b] *= ds[r];
                    }
                }
#pragma unroll
                for (int t = 0; t < T; ++t) {
                    const float4 a = lds4(xr[t] + 4 * wi);
#pragma unroll
                    for (int r = 0; r < MV_ROWS; ++r) {
                        if constexpr (SUB) part[r][t] = dot4_sub(wv[r], a, part[r][t]);
                        else acc[r][t] = dot4(wv[r], a, acc[r][t]);
                    }
                }
            }
            if constexpr (SUB) {
                // sum (q - 32) x = 2^59 part - 32 sum x, times the sub-block's scale.
#pragma unroll
                for (int t = 0; t < T; ++t) {
                    const float sx = xsum[t * X::SUMS + col / 8];
#pragma unroll
                    for (int r = 0; r < MV_ROWS; ++r)
                        acc[r][t] = fmaf(ds[r] * MV_UNSCALE, part[r][t], fmaf(-32.0f * ds[r], sx, acc[r][t]));
                }
            }
        }
    }
};

template <class F, int T>
__device__ __forceinline__ void mv_quant(const MatvecParams& p, const unsigned char* __restrict__ w,
                                         const float* __restrict__ x, float* __restrict__ y) {
    using X = XTile<T>;
    constexpr bool SUB = F::SUBNORMAL && T <= 2;
    static_assert(X::KT % F::CHUNK_ELEMS == 0, "a chunk never straddles two activation tiles");
    // Pieces of 16 bytes a row's chunk can need (its start is rounded down to 16 bytes), and the
    // copies per lane that cover them.
    constexpr int PIECES = (F::CHUNK_BYTES + 15 + 15) / 16;
    constexpr int COPIES = (PIECES + 31) / 32;
    static_assert(16 * PIECES <= F::BUF, "the buffer holds every piece");
    static_assert(512 * (COPIES - 1) <= F::CHUNK_BYTES, "a full chunk needs every copy but the last");
    extern __shared__ float4 smem[];
    float* xs = reinterpret_cast<float*>(smem);
    float* xsum = xs + T * X::STRIDE;
    unsigned char* wbuf = reinterpret_cast<unsigned char*>(xsum + T * X::SUMS);
    check_smem(4 * (T * X::STRIDE + T * X::SUMS) + MV_WARPS * MV_STAGES * MV_ROWS * F::BUF);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    wbuf += warp * (MV_STAGES * MV_ROWS * F::BUF);
    const unsigned int row0 = (blockIdx.x * MV_WARPS + warp) * MV_ROWS;
    // Rows past the end are neither staged nor written; their lanes compute on stale bytes. Only
    // the tensor's last row can end inside a 16-byte piece past the end of the tensor (`tail`).
    unsigned long long next[MV_ROWS];  // byte offset of each row's next chunk to stage
    bool live[MV_ROWS], tail[MV_ROWS];
#pragma unroll
    for (int r = 0; r < MV_ROWS; ++r) {
        next[r] = (unsigned long long)(row0 + r) * p.row_bytes;
        live[r] = row0 + r < p.rows;
        tail[r] = row0 + r == p.rows - 1 && (p.total_bytes & 15) != 0;
    }
    const unsigned int roff_lo0 = (unsigned int)(row0 * p.row_bytes);  // low bits of row 0's offset
    const unsigned int row_lo = (unsigned int)p.row_bytes;
    const int chunks = (int)((p.cols + F::CHUNK_ELEMS - 1) / F::CHUNK_ELEMS);

    // Queues chunk c of every row (an empty group past the last chunk keeps the count uniform);
    // called for c = 0, 1, 2, .. in order. A full chunk needs every copy but the last, whatever
    // its alignment; a short one (the row's last) or one running past the tensor takes the
    // general path.
    auto stage = [&](int c) {
        if (c < chunks) {
            unsigned char* dst = wbuf + (c % MV_STAGES) * (MV_ROWS * F::BUF) + 16 * lane;
            const unsigned int len =
                (unsigned int)min((unsigned long long)F::CHUNK_BYTES, p.row_bytes - (unsigned long long)c * F::CHUNK_BYTES);
            const bool full = len == F::CHUNK_BYTES;
#pragma unroll
            for (int r = 0; r < MV_ROWS; ++r) {
                const unsigned long long g = next[r];
                next[r] = g + F::CHUNK_BYTES;
                if (!live[r]) continue;
                const unsigned long long a0 = g & ~15ull;
                const unsigned int need = ((unsigned int)g & 15u) + len;  // bytes from a0
                const unsigned char* src = w + a0 + 16 * lane;
                unsigned char* d = dst + r * F::BUF;
                if (full && !(tail[r] && c == chunks - 1)) {
#pragma unroll
                    for (int i = 0; i < COPIES - 1; ++i) cp_async16(d + 512 * i, src + 512 * i, true);
                    constexpr int L = 512 * (COPIES - 1);
                    cp_async16(d + L, src + L, 16 * lane + L < need);
                } else {
#pragma unroll
                    for (int i = 0; i < COPIES; ++i) {
                        const unsigned int o = 16 * lane + 512 * i;
                        const unsigned long long left = p.total_bytes - (a0 + o);
                        if (o < need) {
                            if (left >= 16) cp_async16(d + 512 * i, src + 512 * i, true);
                            else cp_async16_zfill(d + 512 * i, src + 512 * i, (unsigned int)left);
                        }
                    }
                }
            }
        }
        cp_async_commit();
    };

    float acc[MV_ROWS][T] = {};
#pragma unroll
    for (int s = 0; s < MV_STAGES - 1; ++s) stage(s);
    for (int c = 0; c < chunks; ++c) {
        const unsigned int e0 = (unsigned int)c * F::CHUNK_ELEMS;
        if (e0 % X::KT == 0) {
            __syncthreads();
            stage_x<T, SUB, SUB>(p, x, e0, (int)min((unsigned int)X::KT, p.cols - e0), xs, xsum);
            __syncthreads();
        }
        cp_async_wait<MV_STAGES - 2>();
        __syncwarp();
        const int ue = F::unit_elem(lane);
        if (e0 + ue < p.cols) {
            const unsigned char* buf = wbuf + (c % MV_STAGES) * (MV_ROWS * F::BUF);
            const unsigned char* blk[MV_ROWS];
#pragma unroll
            for (int r = 0; r < MV_ROWS; ++r)
                blk[r] = buf + r * F::BUF + ((roff_lo0 + r * row_lo + (unsigned int)c * F::CHUNK_BYTES) & 15u) +
                         F::unit_byte(lane);
            F::template dot<T, SUB>(blk, xs, xsum, (int)(e0 % X::KT) + ue, lane, acc);
        }
        __syncwarp();
        stage(c + MV_STAGES - 1);
    }
    cp_async_wait<0>();
    write_rows<T>(p, acc, row0, lane, y);
}

// ---- Entry points: matvec_<dtype>[_scalar]_t<T> ------------------------------------------------

#define MV_ENTRY(name, T, CALL)                                                                                    \
    extern "C" __global__ void __launch_bounds__(MV_THREADS)                                                     \
        matvec_##name##_t##T(MatvecParams p, const unsigned char* w, const float* x, float* y) {                 \
        CALL;                                                                                                    \
    }

#define MV_QUANT(name, F)                                  \
    MV_ENTRY(name, 1, (mv_quant<F, 1>(p, w, x, y)))        \
    MV_ENTRY(name, 2, (mv_quant<F, 2>(p, w, x, y)))        \
    MV_ENTRY(name, 4, (mv_quant<F, 4>(p, w, x, y)))        \
    MV_ENTRY(name, 8, (mv_quant<F, 8>(p, w, x, y)))

#define MV_FLOAT(name, DT)                                            \
    MV_ENTRY(name, 1, (mv_float_vec<DT, 1>(p, w, x, y)))              \
    MV_ENTRY(name, 2, (mv_float_vec<DT, 2>(p, w, x, y)))              \
    MV_ENTRY(name, 4, (mv_float_vec<DT, 4>(p, w, x, y)))              \
    MV_ENTRY(name, 8, (mv_float_vec<DT, 8>(p, w, x, y)))              \
    MV_ENTRY(name##_scalar, 1, (mv_float_scalar<DT, 1>(p, w, x, y)))  \
    MV_ENTRY(name##_scalar, 2, (mv_float_scalar<DT, 2>(p, w, x, y)))  \
    MV_ENTRY(name##_scalar, 4, (mv_float_scalar<DT, 4>(p, w, x, y)))  \
    MV_ENTRY(name##_scalar, 8, (mv_float_scalar<DT, 8>(p, w, x, y)))

MV_FLOAT(f32, STRATA_DTYPE_F32)
MV_FLOAT(f16, STRATA_DTYPE_F16)
MV_FLOAT(bf16, STRATA_DTYPE_BF16)
MV_QUANT(q8_0, Q8_0)
MV_QUANT(q4_0, Q4_0)
MV_QUANT(q4_1, Q4_1)
MV_QUANT(q4_k, Q4_K)
MV_QUANT(q6_k, Q6_K)
