// Dequantizing matrix-vector products: y[t, r] = sum_c W[r, c] * x[t, c] for a row-major weight
// W [n, k] of any strata dtype (f32, f16, bf16, q8_0, q4_0, q4_1, q4_k, q6_k; ggml block layouts,
// see quant.cuh), f32 activations x [tokens, k] and outputs y [tokens, n], f32 accumulation;
// stored, added to y (a residual connection fused), or, for a weight of paired gate and up rows,
// SwiGLU'd into y [tokens, n / 2] (matvec.h's STRATA_MATVEC_STORE_*).
// Float weights multiply x as it is. Block-quantized weights take one of two paths:
// - integer (the _i16 kernels, the default): x quantized in the kernel to two 8-bit digits per
//   value with a unit per block of 32, bit for bit as strata_tensor's ActQ8 (the CPU decode
//   path's default) quantizes it, and the weights' integers multiplied with both digits by dp4a;
// - float (kept for comparison, 1 and 2 tokens only): x kept in f32, each weight made a float.
//
// Launch: blocks of STRATA_MATVEC_WARPS warps; each warp owns STRATA_MATVEC_ROWS_PER_WARP
// consecutive rows at a time, and every lane of it works on the same columns of all of its rows,
// so each activation value read from shared memory serves all of them. Float kernels: one block
// per group of warps * rows rows (grid = ceil(n / (warps * rows))), or, with p.splits = S warps
// to a group of rows (decode products of few groups, vector rows), of warps / S * rows rows, each
// warp of a group taking every S-th run of its loads. Block-quantized kernels: persistent, as
// many blocks as are resident at once (the launcher asks the driver; no more than the groups of
// rows), each warp
// taking the groups of STRATA_MATVEC_ROWS_PER_WARP rows g, g + all warps, .. from its place g in
// the grid (warp-major, so that few groups still spread over every SM), its weight pipeline
// running on from one group into the next; the block's activations
// are staged once when a row fits one tile (else tile by tile, all warps in step). A product of
// few groups whose rows fit one tile shares each group among p.splits warps (the launcher's
// row_splits: a decode step's o and down products), each taking an equal run of the group's
// chunks, their sums added in warp order at the group's end (write_split_rows). For 1 and 2
// tokens a block has STRATA_MATVEC_WARPS_DECODE warps (STRATA_MATVEC_WARPS_DECODE_WIDE for the
// integer kernels of q4_k and q6_k, whose chunks are twice as long; one block per SM) and deeper
// pipelines:
// what bounds these kernels is the weight bytes in flight per SM and the instructions per
// weight. A kernel per dtype, path and token count T (1, 2, 4, 8; the float path of quantized
// weights 1, 2): a launch computes up to T tokens (p.tokens; the launcher loops over groups and
// rounds a group up to the next T), reading each weight byte once for all of them.
//
// - Activations, float path: staged per block in shared memory with 4-byte cp.async copies (one
//   round trip), in tiles of STRATA_MATVEC_XTILE / T columns (STRATA_MATVEC_XTILE_FLOAT / T for
//   the float kernels; at least STRATA_MATVEC_XTILE_MIN), padded by 4 floats every 32 and every
//   256 columns so that the lanes' 16-byte reads fall in distinct banks; with the sums of x over
//   each 8 columns for the 4- and 6-bit dtypes.
// - Activations, integer path: the same tiles, in two digit arrays with a unit and a sum per block
//   (QTile), either quantized by the block as it stages them (stage_xq: a warp per block of 32
//   columns; p.acts == STRATA_MATVEC_ACTS_F32) or copied from x quantized once before the launch
//   (load_xq; STRATA_MATVEC_ACTS_Q16: actq.cuh's records, written by matvec_quantize_x below or by
//   a producer such as RMSNorm). The launcher quantizes first above two tokens, or when a row is
//   longer than the tile: the blocks would otherwise quantize every tile again for every round
//   of rows.
// - RMSNorm in the product (the kernel's `norm` weight not null; float weights, and the integer
//   path when its blocks quantize): each block computes each token's scale over the whole row in
//   norm.cuh's order, then stages (x * scale) * w in place of x (MvNorm): bit for bit
//   rmsnorm_f32's outputs, so the product is that of the separate norm.
// - Float weights (f32, f16, bf16): rows whose byte length is a multiple of 16 are read with
//   16-byte streaming loads, consecutive lanes on consecutive 16 bytes, four per row in flight
//   (two above two tokens);
//   other rows element by element (the _scalar kernels).
// - Block-quantized weights: each warp streams its rows in chunks of STRATA_MATVEC_CHUNK columns
//   (512 for q8_0; STRATA_MATVEC_CHUNK_WIDE for the integer kernels of q4_k and q6_k up to 4
//   tokens) through a STRATA_MATVEC_STAGES-deep cp.async pipeline in shared memory: 16-byte
//   copies from the chunk's 16-byte aligned start (zero-filled past the end of the tensor, never
//   read past it), so global loads are fully coalesced whatever the block size and
//   alignment (18, 20, 34, 144, 210 bytes). Lanes then decode from shared memory: one lane per
//   block for q4_0 and q4_1, two for q8_0, eight per super-block for q4_k and q6_k (four on their
//   integer path up to 4 tokens: each row's scales then serve twice the weights).
// - Integer path: a lane's weights, as bytes (nibbles masked out of their words; q6_k's 6-bit
//   values less 32 as signed bytes), go through dp4a with both digit words of x; per block (q4_k:
//   sub-block, q6_k: group of 8 under one scale) 256 * (high sum) + (low sum) is the integer dot
//   product, times the weight scale and the activation unit. Offsets (q4_0's 8) and minimums
//   (q4_1, q4_k) take the block sums of the quantized x.
// - Float path: integer weights become floats without a conversion instruction. The 4- and 6-bit
//   values enter the FMA as they are, as subnormal floats q * 2^-149, against activations staged
//   times 2^90: each product is q x 2^-59, rounded like any f32 product as long as |q x| >= 2^-67
//   (smaller ones lose bits but are below f32 resolution of any sum they join), and a block's
//   partial sum times 2^59 d gives its dot product. Offsets (q4_0's 8, q6_k's 32) and minimums
//   (q4_1, q4_k) come from the 8-column sums of x. This needs |x| < 2^38 and subnormal
//   arithmetic, so those FMAs are written as PTX fma.rn.f32 (ptx.cuh), which keeps subnormals
//   whatever -ftz says. q8_0 uses the magic number 2^23 (quant.cuh).
//
// The integer path computes the integers of strata_tensor::cpu::reference::matvec (per token)
// and differs from it by f32 rounding only: the order of the additions. The float path differs
// from strata_tensor::cpu::reference::matmul (x as [tokens, k]) likewise. The CPU emulation in
// kernels/emu runs these kernels unchanged against both (strata-kernels' tests/emu.rs).
// Mixture-of-Experts decode: one launch computes the product of each of a token's chosen experts
// (grid.y = the slots of ids, top-k gating's output on the device), each slot's weight looked up
// in a device table of the experts' weight addresses (mv_slot); the slots share x or read their
// own, and write their own outputs. Each slot computes exactly what a launch on its expert alone
// computes.
// Launchers: strata_kernels::cuda::ops::{matvec, matvec_as, matvec_normed, matvec_experts,
// matvec_experts_normed, linear, quantize_acts}.
#include "strata_common.cuh"
#include "quant.cuh"
#include "actq.cuh"
#include "matvec.h"
#include "norm.cuh"
#include "ptx.cuh"

#define MV_WARPS STRATA_MATVEC_WARPS
#define MV_ROWS STRATA_MATVEC_ROWS_PER_WARP
#define MV_THREADS (MV_WARPS * 32)
#define MV_THREADS_DECODE (STRATA_MATVEC_WARPS_DECODE * 32)
// Floats of a block's split sums (write_split_rows): a float per warp, row and token, for the
// largest of WARPS_DECODE x 2 tokens and WARPS x 8 tokens.
#define S_RED_FLOATS 128

// The activation scale of the subnormal path, and the factor that undoes it (2^149 / 2^90).
#define MV_XSCALE 0x1p90f
#define MV_UNSCALE 0x1p59f

// ---- Shared-memory activation tiles ------------------------------------------------------------

// The activation tile of a T-token kernel: KT columns per token, STRIDE floats per token in
// shared memory (KT padded), SUMS sums of 8 columns per token.
template <int T, int TOTAL = STRATA_MATVEC_XTILE>
struct XTile {
    static constexpr int KT = TOTAL / T > STRATA_MATVEC_XTILE_MIN ? TOTAL / T : STRATA_MATVEC_XTILE_MIN;
    static constexpr int STRIDE = KT + KT / 8 + KT / 64;
    static constexpr int SUMS = KT / 8;
    static_assert(KT % STRATA_MATVEC_CHUNK == 0 && KT % STRATA_MATVEC_CHUNK_Q8_0 == 0, "tiles hold whole chunks");
};

// The padded position of tile column e: 4 floats of padding after every 32 columns and after
// every 256. The 32 columns of an aligned group stay contiguous, so xs + xpad(e) + j is column
// e + j for j < 32 - e % 32, and groups of 4 (e a multiple of 4) stay 16-byte aligned.
__device__ __forceinline__ int xpad(int e) { return e + ((e >> 5) << 2) + ((e >> 8) << 2); }

__device__ __forceinline__ float4 lds4(const float* p) { return *reinterpret_cast<const float4*>(p); }

// The RMSNorm a product applies to its activations as it stages them (the kernel's `norm` weight
// not null): token t's value at column c becomes (x * scale[t]) * w[c], with scale[t] from
// norm.cuh's sum of squares of the token's whole row, bit for bit what rmsnorm_f32 writes. With
// w null the values are taken as they are.
template <int T>
struct MvNorm {
    const float* w;
    float scale[T];

    __device__ __forceinline__ float operator()(float v, int t, unsigned int c) const {
        return w == nullptr ? v : __fmul_rn(__fmul_rn(v, scale[t]), w[c]);
    }
};

// The norm of a launch (`w` its weight, or null), each live token's scale computed over the
// row; called by the whole block (the same w and p.tokens for all), before the activation tile
// is staged: `scratch` (NORM_RUNS + 1 floats, the tile's memory) is free again on return.
template <int T>
__device__ __forceinline__ MvNorm<T> mv_norm(const MatvecParams& p, const float* __restrict__ x, const float* w,
                                             float* scratch) {
    MvNorm<T> n{w, {}};
    if (w != nullptr) {
#pragma unroll
        for (int t = 0; t < T; ++t) {
            if (t >= (int)p.tokens) break;
            n.scale[t] = norm_scale(norm_sumsq(x + (size_t)t * p.cols, p.cols, scratch), p.cols, p.norm_eps);
        }
    }
    return n;
}

// Copies columns k0 .. k0 + kt of the launch's x rows into tile X (zeros for tokens at or past
// p.tokens; normalised as `norm` says), times 2^90 with SCALED, and with SUMS the sum of x
// (unscaled) over each 8 columns. Called by the whole block after a barrier; ends with one. Waits
// for every cp.async group of the thread, so the weight chunks in flight land too.
template <class X, int T, bool SCALED, bool SUMS>
__device__ __forceinline__ void stage_x(const MatvecParams& p, const float* __restrict__ x, unsigned int k0, int kt,
                                        float* xs, float* xsum, const MvNorm<T>& norm) {
#pragma unroll
    for (int t = 0; t < T; ++t) {
        const bool live = t < (int)p.tokens;
        const float* xr = x + (size_t)t * p.cols + k0;
        for (int e = threadIdx.x; e < kt; e += blockDim.x) {
            float* d = xs + t * X::STRIDE + xpad(e);
            if (!live) *d = 0.0f;
            else if (norm.w != nullptr) *d = norm(xr[e], t, k0 + e);
            else cp_async4(d, xr + e);
        }
    }
    cp_async_commit();
    cp_async_wait<0>();
    if constexpr (SCALED) {
        // Each thread scales the values it copied itself.
#pragma unroll
        for (int t = 0; t < T; ++t)
            for (int e = threadIdx.x; e < kt; e += blockDim.x) xs[t * X::STRIDE + xpad(e)] *= MV_XSCALE;
    }
    __syncthreads();
    if constexpr (SUMS) {
        const int nb = kt / 8;
        // Sums of the unscaled values (the scaling is exact, and undoing it first keeps the sums
        // finite for any |x| < 2^38).
        constexpr float U = SCALED ? 1.0f / MV_XSCALE : 1.0f;
#pragma unroll
        for (int t = 0; t < T; ++t) {
            for (int b = threadIdx.x; b < nb; b += blockDim.x) {
                const float* v = xs + t * X::STRIDE + xpad(8 * b);
                const float4 q0 = lds4(v), q1 = lds4(v + 4);
                const float s = ((q0.x * U + q0.y * U) + (q0.z * U + q0.w * U)) +
                                ((q1.x * U + q1.y * U) + (q1.z * U + q1.w * U));
                xsum[t * X::SUMS + b] = s;
            }
        }
        __syncthreads();
    }
}

// The sum of x over the 32 columns from tile column e (a multiple of 32), from the 8-column sums.
__device__ __forceinline__ float xsum32(const float* xsum, int e) {
    const float4 s = lds4(xsum + e / 8);
    return (s.x + s.y) + (s.z + s.w);
}


// Sums each lane's partial dot products over the warp and stores the live outputs as p.store says:
// written, added to y's (the sum is rounded to f32 first, so y + W x is rounded as an add of the
// written product would round it), or, rows in SwiGLU groups of four (gate 2j, 2j + 1, up 2j,
// 2j + 1: row0 / 2 is the group's first output), silu(gate) * up into y's rows / 2 per token.
template <int T>
__device__ __forceinline__ void store_rows(const MatvecParams& p, const float (&v)[MV_ROWS][T], unsigned int row0,
                                           float* __restrict__ y) {
    static_assert(MV_ROWS == 4, "a SwiGLU group of rows is one warp's");
#pragma unroll
    for (int t = 0; t < T; ++t) {
        if (t >= (int)p.tokens) break;
        if (p.store == STRATA_MATVEC_STORE_SWIGLU) {
            float* out = y + (size_t)t * (p.rows / 2) + row0 / 2;
            if (row0 + 3 < p.rows) out[0] = silu_mul(v[0][t], v[2][t]), out[1] = silu_mul(v[1][t], v[3][t]);
            continue;
        }
#pragma unroll
        for (int r = 0; r < MV_ROWS; ++r) {
            if (row0 + r < p.rows) {
                float* out = y + (size_t)t * p.rows + row0 + r;
                *out = p.store == STRATA_MATVEC_STORE_ADD ? __fadd_rn(*out, v[r][t]) : v[r][t];
            }
        }
    }
}

template <int T>
__device__ __forceinline__ void write_rows(const MatvecParams& p, float (&acc)[MV_ROWS][T], unsigned int row0,
                                           int lane, float* __restrict__ y) {
    float v[MV_ROWS][T];
#pragma unroll
    for (int r = 0; r < MV_ROWS; ++r)
#pragma unroll
        for (int t = 0; t < T; ++t) v[r][t] = warp_sum(acc[r][t]);
    if (lane == 0) store_rows<T>(p, v, row0, y);
}

// write_rows for a group of rows that S warps split (MatvecParams::splits; warps w .. w + S - 1
// of the block, w a multiple of S, `sub` this warp's place among them): each warp's sums go to
// shared memory (red: a float per warp, row and token), then the first warp adds them in warp
// order and stores. `live`: whether the group exists (the same for all S warps). Called by every
// warp of the block at the same step: it holds two barriers.
template <int T>
__device__ __forceinline__ void write_split_rows(const MatvecParams& p, float (&acc)[MV_ROWS][T], bool live,
                                                 unsigned int row0, int warp, int sub, int lane, unsigned int S,
                                                 float* red, float* __restrict__ y) {
    float v[MV_ROWS][T];
#pragma unroll
    for (int r = 0; r < MV_ROWS; ++r)
#pragma unroll
        for (int t = 0; t < T; ++t) v[r][t] = warp_sum(acc[r][t]);
    if (lane == 0)
#pragma unroll
        for (int r = 0; r < MV_ROWS; ++r)
#pragma unroll
            for (int t = 0; t < T; ++t) red[(warp * MV_ROWS + r) * T + t] = v[r][t];
    __syncthreads();
    if (live && lane == 0 && sub == 0) {
        for (unsigned int s = 1; s < S; ++s)
#pragma unroll
            for (int r = 0; r < MV_ROWS; ++r)
#pragma unroll
                for (int t = 0; t < T; ++t) v[r][t] += red[((warp + s) * MV_ROWS + r) * T + t];
        store_rows<T>(p, v, row0, y);
    }
    __syncthreads();
}

// ---- Float weights --------------------------------------------------------------------------

// Adds W[r, e .. e + E] . x[t, e .. e + E] for every row and token, the row's 16 bytes in v[r].
template <int DT, int T>
__device__ __forceinline__ void float_unit(const uint4 (&v)[MV_ROWS], const float* xs, int e,
                                           float (&acc)[MV_ROWS][T]) {
    using X = XTile<T, STRATA_MATVEC_XTILE_FLOAT>;
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

// Float rows of a multiple of 16 bytes: lanes on consecutive 16-byte units, several per row in
// flight.
template <int DT, int T>
__device__ __forceinline__ void mv_float_vec(const MatvecParams& p, const unsigned char* __restrict__ w,
                                             const float* __restrict__ x, float* __restrict__ y,
                                             const float* norm_w) {
    using X = XTile<T, STRATA_MATVEC_XTILE_FLOAT>;
    constexpr int ES = DT == STRATA_DTYPE_F32 ? 4 : 2;
    constexpr int E = 16 / ES;
    STRATA_DYNAMIC_SMEM(float4, smem);
    float* xs = reinterpret_cast<float*>(smem);
    check_smem(T * X::STRIDE * 4);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    // With p.splits = S > 1, S consecutive warps share a group of rows, warp `sub` of them taking
    // every S-th run of 32 U units of each tile (U below), their sums added at the end
    // (write_split_rows); a block then has MV_WARPS / S groups.
    const unsigned int S = p.splits > 1 && MV_WARPS % p.splits == 0 ? p.splits : 1;
    const unsigned int sub = warp % S;
    const unsigned int row0 = (blockIdx.x * (MV_WARPS / S) + warp / S) * MV_ROWS;
    const unsigned char* wr[MV_ROWS];
#pragma unroll
    for (int r = 0; r < MV_ROWS; ++r) wr[r] = w + (unsigned long long)min(row0 + r, p.rows - 1) * p.row_bytes;
    static_assert(T * X::STRIDE >= NORM_RUNS + 1, "the tile holds the norm's scratch");
    const MvNorm<T> norm = mv_norm<T>(p, x, norm_w, xs);
    STRATA_SHARED float red[S_RED_FLOATS];
    static_assert(MV_WARPS * MV_ROWS * T <= S_RED_FLOATS, "the split sums fit");
    float acc[MV_ROWS][T] = {};
    for (unsigned int k0 = 0; k0 < p.cols; k0 += X::KT) {
        const int kt = min((unsigned int)X::KT, p.cols - k0);
        __syncthreads();
        stage_x<X, T, false, false>(p, x, k0, kt, xs, nullptr, norm);
        const int units = kt / E;
        // U units per row in flight per lane: 4 at one and two tokens, where a decode step's
        // small products (2048 rows: 512 warps) need each warp's loads to cover the latency; 2
        // above, where the accumulators take the registers. The units go through float_unit in
        // column order either way.
        constexpr int U = T <= 2 ? 4 : 2;
        for (int u = lane + 32 * U * (int)sub; u < units; u += 32 * U * (int)S) {
            uint4 a[U][MV_ROWS];
#pragma unroll
            for (int j = 0; j < U; ++j) {
                if (u + 32 * j < units) {
#pragma unroll
                    for (int r = 0; r < MV_ROWS; ++r)
                        a[j][r] = __ldcs(reinterpret_cast<const uint4*>(wr[r] + (size_t)(k0 + (u + 32 * j) * E) * ES));
                }
            }
#pragma unroll
            for (int j = 0; j < U; ++j)
                if (u + 32 * j < units) float_unit<DT, T>(a[j], xs, (u + 32 * j) * E, acc);
        }
    }
    if (S > 1) write_split_rows<T>(p, acc, row0 < p.rows, row0, warp, (int)sub, lane, S, red, y);
    else write_rows<T>(p, acc, row0, lane, y);
}

// Float rows of any length: one element per lane and row at a time.
template <int DT, int T>
__device__ __forceinline__ void mv_float_scalar(const MatvecParams& p, const unsigned char* __restrict__ w,
                                                const float* __restrict__ x, float* __restrict__ y,
                                                const float* norm_w) {
    using X = XTile<T, STRATA_MATVEC_XTILE_FLOAT>;
    STRATA_DYNAMIC_SMEM(float4, smem);
    float* xs = reinterpret_cast<float*>(smem);
    check_smem(T * X::STRIDE * 4);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const unsigned int row0 = (blockIdx.x * MV_WARPS + warp) * MV_ROWS;
    const unsigned char* wr[MV_ROWS];
#pragma unroll
    for (int r = 0; r < MV_ROWS; ++r) wr[r] = w + (unsigned long long)min(row0 + r, p.rows - 1) * p.row_bytes;
    static_assert(T * X::STRIDE >= NORM_RUNS + 1, "the tile holds the norm's scratch");
    const MvNorm<T> norm = mv_norm<T>(p, x, norm_w, xs);
    float acc[MV_ROWS][T] = {};
    for (unsigned int k0 = 0; k0 < p.cols; k0 += X::KT) {
        const int kt = min((unsigned int)X::KT, p.cols - k0);
        __syncthreads();
        stage_x<X, T, false, false>(p, x, k0, kt, xs, nullptr, norm);
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

// ---- Two-digit integer activations --------------------------------------------------------------

// The integer activation tile of a T-token kernel (the _i16 kernels): the same KT columns per
// token as XTile, quantized as strata_tensor's ActQ8 quantizes (two 8-bit digits per value, a unit
// per block of 32 columns). Laid out as the high digits of every token (STRIDE bytes per token,
// padded by 16 bytes after every 128 so that the lanes' 16-byte reads fall in distinct banks),
// the low digits likewise, then per block of 32 columns and token the unit d (f32) and the sum of
// the values 256 h + l (i32), then per 8 columns and token the sum of their values (i32, for
// q6_k's offset of 32 per group of 8).
template <int T>
struct QTile {
    static constexpr int KT = XTile<T>::KT;
    static constexpr int STRIDE = KT + KT / 8;
    static constexpr int BLOCKS = KT / 32;
    static constexpr int BYTES = 2 * T * STRIDE + 8 * T * BLOCKS + 4 * T * (KT / 8);
    static_assert(STRIDE % 16 == 0 && BYTES % 16 == 0, "the arrays and the buffers after them stay 16-byte aligned");
};

// The padded position of tile column e in a digit array.
__device__ __forceinline__ int qpad(int e) { return e + ((e >> 7) << 4); }

// The integer tile's arrays.
struct QAct {
    const signed char* hi;
    const signed char* lo;
    const float* d;
    const int* s;
    const int* s8;
};

template <int T>
__device__ __forceinline__ QAct qact(const unsigned char* tile) {
    using Q = QTile<T>;
    const signed char* hi = reinterpret_cast<const signed char*>(tile);
    const float* d = reinterpret_cast<const float*>(tile + 2 * T * Q::STRIDE);
    const int* s = reinterpret_cast<const int*>(d + T * Q::BLOCKS);
    return QAct{hi, hi + T * Q::STRIDE, d, s, s + T * Q::BLOCKS};
}

// 16 (or 8) digit bytes of a token's digit array from tile column e, a multiple of 16 (of 8).
__device__ __forceinline__ uint4 ldq16(const signed char* digits, int e) {
    return *reinterpret_cast<const uint4*>(digits + qpad(e));
}
__device__ __forceinline__ uint2 ldq8(const signed char* digits, int e) {
    return *reinterpret_cast<const uint2*>(digits + qpad(e));
}

// The sum of the four signed byte products of a and b, added to c.
__device__ __forceinline__ int dp4(unsigned int a, unsigned int b, int c) { return __dp4a((int)a, (int)b, c); }

// Both digit arrays' words of token t for the block of 32 columns at tile column e.
struct BlockDigits {
    unsigned int h[8], l[8];
};

template <int T>
__device__ __forceinline__ BlockDigits block_digits(const QAct& a, int t, int e) {
    using Q = QTile<T>;
    const uint4 h0 = ldq16(a.hi + t * Q::STRIDE, e), h1 = ldq16(a.hi + t * Q::STRIDE, e + 16);
    const uint4 l0 = ldq16(a.lo + t * Q::STRIDE, e), l1 = ldq16(a.lo + t * Q::STRIDE, e + 16);
    return BlockDigits{{h0.x, h0.y, h0.z, h0.w, h1.x, h1.y, h1.z, h1.w}, {l0.x, l0.y, l0.z, l0.w, l1.x, l1.y, l1.z, l1.w}};
}

// sum q a over a block of 32 nibbles q (q4_0 and q4_1's layout: word i holds elements 4i .. 4i + 3
// in its low nibbles and 16 + 4i .. in its high ones) and the block's values a = 256 h + l.
__device__ __forceinline__ int nibble_dot(const unsigned int (&qs)[4], const BlockDigits& x) {
    int sh = 0, sl = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const unsigned int ql = qs[i] & 0x0F0F0F0Fu, qh = (qs[i] >> 4) & 0x0F0F0F0Fu;
        sh = dp4(ql, x.h[i], dp4(qh, x.h[4 + i], sh));
        sl = dp4(ql, x.l[i], dp4(qh, x.l[4 + i], sl));
    }
    return 256 * sh + sl;
}

// Quantizes columns k0 .. k0 + kt (a multiple of 32) of the launch's x rows, normalised as `norm`
// says, into the integer tile (zeros for tokens at or past p.tokens), a block of 32 per warp at a
// time (quantize_block), with eight blocks' loads in flight per warp; with SUMS8 the sums of each
// 8 values too. Called by the whole block after a barrier; ends with one.
template <int T, bool SUMS8>
__device__ __forceinline__ void stage_xq(const MatvecParams& p, const float* __restrict__ x, unsigned int k0, int kt,
                                         unsigned char* tile, const MvNorm<T>& norm) {
    using Q = QTile<T>;
    signed char* hi = reinterpret_cast<signed char*>(tile);
    signed char* lo = hi + T * Q::STRIDE;
    float* dd = reinterpret_cast<float*>(lo + T * Q::STRIDE);
    int* ss = reinterpret_cast<int*>(dd + T * Q::BLOCKS);
    int* s8 = SUMS8 ? ss + T * Q::BLOCKS : nullptr;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const int nb = kt / 32, total = T * nb;
    constexpr int BATCH = 8;
    for (int i0 = warp; i0 < total; i0 += BATCH * warps) {
        float v[BATCH];
#pragma unroll
        for (int j = 0; j < BATCH; ++j) {
            const int i = i0 + j * warps, t = i / nb, b = i - t * nb;
            const unsigned int c = k0 + 32 * b + lane;
            v[j] = i < total && t < (int)p.tokens ? norm(__ldg(x + (size_t)t * p.cols + c), t, c) : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < BATCH; ++j) {
            const int i = i0 + j * warps, t = i / nb, b = i - t * nb;
            if (i >= total) break;  // the same for every lane of the warp
            quantize_block(v[j], lane, hi, lo, t * Q::STRIDE + qpad(32 * b + lane), dd + t * Q::BLOCKS + b,
                           ss + t * Q::BLOCKS + b, SUMS8 ? s8 + t * (Q::KT / 8) + 4 * b : nullptr);
        }
    }
    __syncthreads();
}

// Copies columns k0 .. k0 + kt (a multiple of 32) of the launch's quantized activations (xq:
// actq.cuh's records, one per token) into the integer tile, zeros for tokens at or past
// p.tokens; with SUMS8 the sums of each 8 values too. The digits go in 16-byte copies, the units
// and sums in 4-byte ones. Called by the whole block after a barrier; ends with one. Waits for
// every cp.async group of the thread, so the weight chunks in flight land too.
template <int T, bool SUMS8>
__device__ __forceinline__ void load_xq(const MatvecParams& p, const unsigned char* __restrict__ xq, unsigned int k0,
                                        int kt, unsigned char* tile) {
    using Q = QTile<T>;
    signed char* hi = reinterpret_cast<signed char*>(tile);
    float* dd = reinterpret_cast<float*>(hi + 2 * T * Q::STRIDE);
    int* ss = reinterpret_cast<int*>(dd + T * Q::BLOCKS);
    int* s8 = ss + T * Q::BLOCKS;
    const int pieces = kt / 16, nb = kt / 32;
#pragma unroll
    for (int t = 0; t < T; ++t) {
        if (t < (int)p.tokens) {
            const ActqRecord r = actq_record(const_cast<unsigned char*>(xq), p.cols, t);
            // Both digit arrays: pieces i < `pieces` of the high digits, then as many of the low.
            for (int i = threadIdx.x; i < 2 * pieces; i += blockDim.x) {
                const int low = i >= pieces, c = 16 * (i - low * pieces);
                cp_async16(hi + (low * T + t) * Q::STRIDE + qpad(c), (low ? r.lo : r.hi) + k0 + c, true);
            }
            for (int b = threadIdx.x; b < nb; b += blockDim.x) {
                cp_async4(dd + t * Q::BLOCKS + b, r.d + k0 / 32 + b);
                cp_async4(ss + t * Q::BLOCKS + b, r.s + k0 / 32 + b);
            }
            if constexpr (SUMS8)
                for (int g = threadIdx.x; g < kt / 8; g += blockDim.x) cp_async4(s8 + t * (Q::KT / 8) + g, r.s8 + k0 / 8 + g);
        } else {
            for (int c = threadIdx.x; c < kt; c += blockDim.x)
                hi[t * Q::STRIDE + qpad(c)] = 0, hi[(T + t) * Q::STRIDE + qpad(c)] = 0;
            for (int b = threadIdx.x; b < nb; b += blockDim.x) dd[t * Q::BLOCKS + b] = 0.0f, ss[t * Q::BLOCKS + b] = 0;
            if constexpr (SUMS8)
                for (int g = threadIdx.x; g < kt / 8; g += blockDim.x) s8[t * (Q::KT / 8) + g] = 0;
        }
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
}

// ---- Block-quantized weights: the cp.async pipeline ------------------------------------------


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

// Each format: STAGES_DECODE and WARPS_DECODE, its pipeline depth and warps per block for 1 and 2
// tokens; CHUNK_ELEMS columns per pipeline step, whose CHUNK_BYTES bytes (per row) land in a
// BUF-byte buffer; SUBNORMAL when its float path uses the subnormal path (and needs the scaled
// activations and their sums; else the magic number, with the scale applied per block);
// unit_elem / unit_byte: where lane `lane`'s block (or super-block) starts in the chunk;
// SUMS8<T>: whether its T-token integer path reads the activation sums per 8 columns; dot<T>
// (float path) and idot<T> (integer path):
// add the lane's share of the chunk for every row and token, given each row's block in shared
// memory and the tile column e of that block.

// q4_0: one lane per block of 32, x = (q - 8) * d.
struct Q4_0 {
    static constexpr int STAGES_DECODE = STRATA_MATVEC_STAGES_DECODE;
    static constexpr int WARPS_DECODE = STRATA_MATVEC_WARPS_DECODE;
    static constexpr int CHUNK_ELEMS = STRATA_MATVEC_CHUNK;
    static constexpr int CHUNK_BYTES = CHUNK_ELEMS / 32 * 18;
    static constexpr int BUF = chunk_buffer(CHUNK_BYTES);
    static constexpr bool SUBNORMAL = true;
    __device__ static int unit_elem(int lane) { return 32 * lane; }
    __device__ static int unit_byte(int lane) { return 18 * lane; }
    template <int T>
    static constexpr bool SUMS8 = false;

    // A block's nibble words and d. The block is 2-byte aligned: both from 5 aligned words.
    __device__ static void block(const unsigned char* b, unsigned int (&qs)[4], float& d) {
        const unsigned int off = (unsigned int)reinterpret_cast<size_t>(b) & 3u;
        const unsigned int* q = reinterpret_cast<const unsigned int*>(b - off);
        unsigned int raw[5];
#pragma unroll
        for (int i = 0; i < 5; ++i) raw[i] = q[i];
        d = f16_bits(raw[0] >> (8 * off));
#pragma unroll
        for (int i = 0; i < 4; ++i) qs[i] = __funnelshift_rc(raw[i], raw[i + 1], 16 + 8 * off);
    }

    template <int T>
    __device__ static void dot(const unsigned char* const (&blk)[MV_ROWS], const float* xs, const float* xsum, int e,
                               int, float (&acc)[MV_ROWS][T]) {
        using X = XTile<T>;
        unsigned int qs[MV_ROWS][4];
        float d[MV_ROWS];
#pragma unroll
        for (int r = 0; r < MV_ROWS; ++r) block(blk[r], qs[r], d[r]);
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
                bytes_sub(lo, wl[r]), bytes_sub(hi, wh[r]);
            }
#pragma unroll
            for (int t = 0; t < T; ++t) {
                const float4 a = lds4(xr[t] + 4 * i), b = lds4(xr[t] + 16 + 4 * i);
#pragma unroll
                for (int r = 0; r < MV_ROWS; ++r) part[r][t] = dot4_sub(wh[r], b, dot4_sub(wl[r], a, part[r][t]));
            }
        }
        // sum (q - 8) x = 2^59 part - 8 sum x.
#pragma unroll
        for (int t = 0; t < T; ++t) {
            const float sx = xsum32(xsum + t * X::SUMS, e);
#pragma unroll
            for (int r = 0; r < MV_ROWS; ++r)
                acc[r][t] = fmaf(d[r] * MV_UNSCALE, part[r][t], fmaf(-8.0f * d[r], sx, acc[r][t]));
        }
    }
    // The integer path: sum (q - 8) a = 256 sum(q h) + sum(q l) - 8 S, S the block's sum of a.
    template <int T>
    __device__ static void idot(const unsigned char* const (&blk)[MV_ROWS], const QAct& a, int e, int,
                                float (&acc)[MV_ROWS][T]) {
        using Q = QTile<T>;
        unsigned int qs[MV_ROWS][4];
        float d[MV_ROWS];
#pragma unroll
        for (int r = 0; r < MV_ROWS; ++r) block(blk[r], qs[r], d[r]);
#pragma unroll
        for (int t = 0; t < T; ++t) {
            const BlockDigits x = block_digits<T>(a, t, e);
            const float dx = a.d[t * Q::BLOCKS + e / 32];
            const int sx = a.s[t * Q::BLOCKS + e / 32];
#pragma unroll
            for (int r = 0; r < MV_ROWS; ++r) acc[r][t] = fmaf(d[r] * dx, (float)(nibble_dot(qs[r], x) - 8 * sx), acc[r][t]);
        }
    }
};

// q4_1: one lane per block of 32, x = q * d + m; blocks are 4-byte aligned.
struct Q4_1 {
    static constexpr int STAGES_DECODE = STRATA_MATVEC_STAGES_DECODE;
    static constexpr int WARPS_DECODE = STRATA_MATVEC_WARPS_DECODE;
    static constexpr int CHUNK_ELEMS = STRATA_MATVEC_CHUNK;
    static constexpr int CHUNK_BYTES = CHUNK_ELEMS / 32 * 20;
    static constexpr int BUF = chunk_buffer(CHUNK_BYTES);
    static constexpr bool SUBNORMAL = true;
    __device__ static int unit_elem(int lane) { return 32 * lane; }
    __device__ static int unit_byte(int lane) { return 20 * lane; }
    template <int T>
    static constexpr bool SUMS8 = false;

    // A block's nibble words, d and m (the block is 4-byte aligned).
    __device__ static void block(const unsigned char* b, unsigned int (&qs)[4], float& d, float& m) {
        const unsigned int* q = reinterpret_cast<const unsigned int*>(b);
        const unsigned int dm = q[0];
        d = f16_bits(dm), m = f16_bits(dm >> 16);
#pragma unroll
        for (int i = 0; i < 4; ++i) qs[i] = q[1 + i];
    }

    template <int T>
    __device__ static void dot(const unsigned char* const (&blk)[MV_ROWS], const float* xs, const float* xsum, int e,
                               int, float (&acc)[MV_ROWS][T]) {
        using X = XTile<T>;
        unsigned int qs[MV_ROWS][4];
        float d[MV_ROWS], m[MV_ROWS];
#pragma unroll
        for (int r = 0; r < MV_ROWS; ++r) block(blk[r], qs[r], d[r], m[r]);
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
                bytes_sub(lo, wl[r]), bytes_sub(hi, wh[r]);
            }
#pragma unroll
            for (int t = 0; t < T; ++t) {
                const float4 a = lds4(xr[t] + 4 * i), b = lds4(xr[t] + 16 + 4 * i);
#pragma unroll
                for (int r = 0; r < MV_ROWS; ++r) part[r][t] = dot4_sub(wh[r], b, dot4_sub(wl[r], a, part[r][t]));
            }
        }
        // sum (q d + m) x = 2^59 d part + m sum x.
#pragma unroll
        for (int t = 0; t < T; ++t) {
            const float sx = xsum32(xsum + t * X::SUMS, e);
#pragma unroll
            for (int r = 0; r < MV_ROWS; ++r) acc[r][t] = fmaf(d[r] * MV_UNSCALE, part[r][t], fmaf(m[r], sx, acc[r][t]));
        }
    }
    // The integer path: sum (q d + m) x = d dx (256 sum(q h) + sum(q l)) + m dx S.
    template <int T>
    __device__ static void idot(const unsigned char* const (&blk)[MV_ROWS], const QAct& a, int e, int,
                                float (&acc)[MV_ROWS][T]) {
        using Q = QTile<T>;
        unsigned int qs[MV_ROWS][4];
        float d[MV_ROWS], m[MV_ROWS];
#pragma unroll
        for (int r = 0; r < MV_ROWS; ++r) block(blk[r], qs[r], d[r], m[r]);
#pragma unroll
        for (int t = 0; t < T; ++t) {
            const BlockDigits x = block_digits<T>(a, t, e);
            const float dx = a.d[t * Q::BLOCKS + e / 32];
            const float sx = (float)a.s[t * Q::BLOCKS + e / 32];
#pragma unroll
            for (int r = 0; r < MV_ROWS; ++r)
                acc[r][t] = fmaf(d[r] * dx, (float)nibble_dot(qs[r], x), fmaf(m[r] * dx, sx, acc[r][t]));
        }
    }
};

// q8_0: two lanes per block of 32 (16 values each), x = q * d. Always the magic number: at 8.5
// bits a value the conversion is not the bottleneck.
struct Q8_0 {
    static constexpr int STAGES_DECODE = STRATA_MATVEC_STAGES_DECODE;
    static constexpr int WARPS_DECODE = STRATA_MATVEC_WARPS_DECODE;
    static constexpr int CHUNK_ELEMS = STRATA_MATVEC_CHUNK_Q8_0;
    static constexpr int CHUNK_BYTES = CHUNK_ELEMS / 32 * 34;
    static constexpr int BUF = chunk_buffer(CHUNK_BYTES);
    static constexpr bool SUBNORMAL = false;
    __device__ static int unit_elem(int lane) { return 32 * (lane >> 1) + 16 * (lane & 1); }
    __device__ static int unit_byte(int lane) { return 34 * (lane >> 1); }
    template <int T>
    static constexpr bool SUMS8 = false;

    template <int T>
    __device__ static void dot(const unsigned char* const (&blk)[MV_ROWS], const float* xs, const float*, int e,
                               int lane, float (&acc)[MV_ROWS][T]) {
        using X = XTile<T>;
        const int half = lane & 1;
        unsigned int qs[MV_ROWS][4];
        float d[MV_ROWS];
#pragma unroll
        for (int r = 0; r < MV_ROWS; ++r) d[r] = f16_bits(load_u16(blk[r])), lds_words_a2<4>(blk[r] + 2 + 16 * half, qs[r]);
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
            }
#pragma unroll
            for (int t = 0; t < T; ++t) {
                const float4 a = lds4(xr[t] + 4 * i);
#pragma unroll
                for (int r = 0; r < MV_ROWS; ++r) part[r][t] = dot4(wv[r], a, part[r][t]);
            }
        }
#pragma unroll
        for (int r = 0; r < MV_ROWS; ++r)
#pragma unroll
            for (int t = 0; t < T; ++t) acc[r][t] = fmaf(d[r], part[r][t], acc[r][t]);
    }
    // The integer path: the lane's 16 signed bytes against both digits, times d dx.
    template <int T>
    __device__ static void idot(const unsigned char* const (&blk)[MV_ROWS], const QAct& a, int e, int lane,
                                float (&acc)[MV_ROWS][T]) {
        using Q = QTile<T>;
        const int half = lane & 1;
        unsigned int qs[MV_ROWS][4];
        float d[MV_ROWS];
#pragma unroll
        for (int r = 0; r < MV_ROWS; ++r) d[r] = f16_bits(load_u16(blk[r])), lds_words_a2<4>(blk[r] + 2 + 16 * half, qs[r]);
#pragma unroll
        for (int t = 0; t < T; ++t) {
            const uint4 h = ldq16(a.hi + t * Q::STRIDE, e), l = ldq16(a.lo + t * Q::STRIDE, e);
            const unsigned int hw[4] = {h.x, h.y, h.z, h.w}, lw[4] = {l.x, l.y, l.z, l.w};
            const float dx = a.d[t * Q::BLOCKS + e / 32];
#pragma unroll
            for (int r = 0; r < MV_ROWS; ++r) {
                int sh = 0, sl = 0;
#pragma unroll
                for (int i = 0; i < 4; ++i) sh = dp4(qs[r][i], hw[i], sh), sl = dp4(qs[r][i], lw[i], sl);
                acc[r][t] = fmaf(d[r] * dx, (float)(256 * sh + sl), acc[r][t]);
            }
        }
    }
};

// q4_k's integer path: the __byte_perm selector of byte 2 (c & 1) (the scale of sub-block 2c in
// its word; the next selector is sub-block 2c + 1's) under 0x4B, 0, 0 (magic_byte's layout), made
// once per lane.
__device__ __forceinline__ unsigned int q4k_selector(int c) { return 0x7440u | (2u * (c & 1)); }

// The scales d * sc and minimums dmin * m of sub-blocks 2c and 2c + 1 of a q4_k super-block whose
// header is hd: each 6-bit byte as the float 2^23 + byte (one byte permute), times d less 2^23 d
// in one FMA, so d * byte is rounded once, as the product d * (float)byte would be, without a
// conversion instruction.
__device__ __forceinline__ void q4k_scales(uint4 hd, int c, unsigned int sel_lo, float& dl, float& dh, float& ml,
                                           float& mh) {
    const float d = f16_bits(hd.x), dmin = f16_bits(hd.x >> 16);
    const unsigned int scw = c < 2 ? q4k_scales_lo(hd.y) : q4k_scales_hi(hd.y, hd.w);
    const unsigned int mw = c < 2 ? q4k_mins_lo(hd.z) : q4k_mins_hi(hd.z, hd.w);
    const float dm = -STRATA_MAGIC * d, mm = -STRATA_MAGIC * dmin;
    const unsigned int sel_hi = sel_lo + 1;
    dl = fmaf(__uint_as_float(__byte_perm(scw, 0x4B000000u, sel_lo)), d, dm);
    dh = fmaf(__uint_as_float(__byte_perm(scw, 0x4B000000u, sel_hi)), d, dm);
    ml = fmaf(__uint_as_float(__byte_perm(mw, 0x4B000000u, sel_lo)), dmin, mm);
    mh = fmaf(__uint_as_float(__byte_perm(mw, 0x4B000000u, sel_hi)), dmin, mm);
}

// q4_k: eight lanes per super-block of 256. Lane j takes nibble bytes 32c + 16h .. + 16 (c = j / 2,
// h = j % 2): elements 64c + 16h + i in the low nibbles (sub-block 2c) and 64c + 32 + 16h + i in
// the high ones (sub-block 2c + 1). Lanes with h = 1 do their high run first, which keeps the
// eight lanes' activation reads in distinct banks. Super-blocks are 16-byte aligned.
struct Q4_K {
    static constexpr int STAGES_DECODE = STRATA_MATVEC_STAGES_DECODE;
    static constexpr int WARPS_DECODE = STRATA_MATVEC_WARPS_DECODE;
    static constexpr int CHUNK_ELEMS = STRATA_MATVEC_CHUNK;
    static constexpr int CHUNK_BYTES = CHUNK_ELEMS / 256 * 144;
    static constexpr int BUF = chunk_buffer(CHUNK_BYTES);
    static constexpr bool SUBNORMAL = true;
    __device__ static int unit_elem(int lane) { return 256 * (lane >> 3); }
    __device__ static int unit_byte(int lane) { return 144 * (lane >> 3); }
    template <int T>
    static constexpr bool SUMS8 = false;

    template <int T>
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
                    bytes_sub((word >> (4 * run)) & 0x0F0F0F0Fu, wv[r]);
                }
#pragma unroll
                for (int t = 0; t < T; ++t) {
                    const float4 a = lds4(xr[t] + 4 * i);
#pragma unroll
                    for (int r = 0; r < MV_ROWS; ++r) part[rho][r][t] = dot4_sub(wv[r], a, part[rho][r][t]);
                }
            }
        }
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
    // The integer path, per sub-block: d sc dx (256 sum(q h) + sum(q l)) - dmin m dx S.
    template <int T>
    __device__ static void idot(const unsigned char* const (&blk)[MV_ROWS], const QAct& a, int e, int lane,
                                float (&acc)[MV_ROWS][T]) {
        using Q = QTile<T>;
        const int j = lane & 7, c = j >> 1, h = j & 1;
        const unsigned int sel_lo = q4k_selector(c);
        unsigned int ql[MV_ROWS][4], qh[MV_ROWS][4];
        float dl[MV_ROWS], dh[MV_ROWS], ml[MV_ROWS], mh[MV_ROWS];
#pragma unroll
        for (int r = 0; r < MV_ROWS; ++r) {
            const uint4 hd = *reinterpret_cast<const uint4*>(blk[r]);
            const uint4 qv = *reinterpret_cast<const uint4*>(blk[r] + 16 + 32 * c + 16 * h);
            const unsigned int words[4] = {qv.x, qv.y, qv.z, qv.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) ql[r][i] = words[i] & 0x0F0F0F0Fu, qh[r][i] = (words[i] >> 4) & 0x0F0F0F0Fu;
            q4k_scales(hd, c, sel_lo, dl[r], dh[r], ml[r], mh[r]);
        }
#pragma unroll
        for (int t = 0; t < T; ++t) {
            // The lane's 16 columns of sub-block 2c (low nibbles) and of 2c + 1 (high nibbles).
            const int col = e + 64 * c + 16 * h;
            const signed char *hi = a.hi + t * Q::STRIDE, *lo = a.lo + t * Q::STRIDE;
            const uint4 h0 = ldq16(hi, col), h1 = ldq16(hi, col + 32), l0 = ldq16(lo, col), l1 = ldq16(lo, col + 32);
            const unsigned int hw0[4] = {h0.x, h0.y, h0.z, h0.w}, hw1[4] = {h1.x, h1.y, h1.z, h1.w};
            const unsigned int lw0[4] = {l0.x, l0.y, l0.z, l0.w}, lw1[4] = {l1.x, l1.y, l1.z, l1.w};
            // Their units, and their sums for the minimums (taken once, by the h = 0 lane of the
            // pair).
            const int b = t * Q::BLOCKS + (e + 64 * c) / 32;
            const float dx0 = a.d[b], dx1 = a.d[b + 1];
            const float s0 = h == 0 ? (float)a.s[b] * dx0 : 0.0f, s1 = h == 0 ? (float)a.s[b + 1] * dx1 : 0.0f;
#pragma unroll
            for (int r = 0; r < MV_ROWS; ++r) {
                int h0s = 0, l0s = 0, h1s = 0, l1s = 0;
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    h0s = dp4(ql[r][i], hw0[i], h0s), l0s = dp4(ql[r][i], lw0[i], l0s);
                    h1s = dp4(qh[r][i], hw1[i], h1s), l1s = dp4(qh[r][i], lw1[i], l1s);
                }
                float v = fmaf(dl[r] * dx0, (float)(256 * h0s + l0s), (dh[r] * dx1) * (float)(256 * h1s + l1s));
                v = fmaf(-ml[r], s0, fmaf(-mh[r], s1, v));
                acc[r][t] += v;
            }
        }
    }
};

// q4_k's integer path at up to four tokens: four lanes per super-block of 256, lane c taking the
// 32 nibble bytes 32c .. 32c + 32, sub-blocks 2c (low nibbles) and 2c + 1 (high nibbles) whole.
// Against Q4_K's eight lanes, each row's scales and minimums are decoded once per 64 weights
// rather than per 32, and a chunk of twice the columns halves the staging per weight.
struct Q4_K_I16 {
    static constexpr int STAGES_DECODE = STRATA_MATVEC_STAGES_DECODE;
    static constexpr int WARPS_DECODE = STRATA_MATVEC_WARPS_DECODE_WIDE;
    static constexpr int CHUNK_ELEMS = STRATA_MATVEC_CHUNK_WIDE;
    static constexpr int CHUNK_BYTES = CHUNK_ELEMS / 256 * 144;
    static constexpr int BUF = chunk_buffer(CHUNK_BYTES);
    static constexpr bool SUBNORMAL = false;  // no float path
    __device__ static int unit_elem(int lane) { return 256 * (lane >> 2); }
    __device__ static int unit_byte(int lane) { return 144 * (lane >> 2); }
    template <int T>
    static constexpr bool SUMS8 = false;

    // Per sub-block: d sc dx (256 sum(q h) + sum(q l)) - dmin m dx S, as Q4_K::idot.
    template <int T>
    __device__ static void idot(const unsigned char* const (&blk)[MV_ROWS], const QAct& a, int e, int lane,
                                float (&acc)[MV_ROWS][T]) {
        using Q = QTile<T>;
        const int c = lane & 3;
        const unsigned int sel_lo = q4k_selector(c);
        unsigned int ql[MV_ROWS][8], qh[MV_ROWS][8];
        float dl[MV_ROWS], dh[MV_ROWS], ml[MV_ROWS], mh[MV_ROWS];
#pragma unroll
        for (int r = 0; r < MV_ROWS; ++r) {
            const uint4 hd = *reinterpret_cast<const uint4*>(blk[r]);
            const uint4 q0 = *reinterpret_cast<const uint4*>(blk[r] + 16 + 32 * c);
            const uint4 q1 = *reinterpret_cast<const uint4*>(blk[r] + 32 + 32 * c);
            const unsigned int words[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
#pragma unroll
            for (int i = 0; i < 8; ++i) ql[r][i] = words[i] & 0x0F0F0F0Fu, qh[r][i] = (words[i] >> 4) & 0x0F0F0F0Fu;
            q4k_scales(hd, c, sel_lo, dl[r], dh[r], ml[r], mh[r]);
        }
#pragma unroll
        for (int t = 0; t < T; ++t) {
            // The 32 columns of sub-block 2c and the 32 of 2c + 1, both digits.
            const int col = e + 64 * c;
            const signed char *hi = a.hi + t * Q::STRIDE, *lo = a.lo + t * Q::STRIDE;
            unsigned int hw0[8], hw1[8], lw0[8], lw1[8];
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const uint4 h0 = ldq16(hi, col + 16 * half), h1 = ldq16(hi, col + 32 + 16 * half);
                const uint4 l0 = ldq16(lo, col + 16 * half), l1 = ldq16(lo, col + 32 + 16 * half);
                hw0[4 * half] = h0.x, hw0[4 * half + 1] = h0.y, hw0[4 * half + 2] = h0.z, hw0[4 * half + 3] = h0.w;
                hw1[4 * half] = h1.x, hw1[4 * half + 1] = h1.y, hw1[4 * half + 2] = h1.z, hw1[4 * half + 3] = h1.w;
                lw0[4 * half] = l0.x, lw0[4 * half + 1] = l0.y, lw0[4 * half + 2] = l0.z, lw0[4 * half + 3] = l0.w;
                lw1[4 * half] = l1.x, lw1[4 * half + 1] = l1.y, lw1[4 * half + 2] = l1.z, lw1[4 * half + 3] = l1.w;
            }
            const int b = t * Q::BLOCKS + (e + 64 * c) / 32;
            const float dx0 = a.d[b], dx1 = a.d[b + 1];
            const float s0 = (float)a.s[b] * dx0, s1 = (float)a.s[b + 1] * dx1;
#pragma unroll
            for (int r = 0; r < MV_ROWS; ++r) {
                // |256 sum(q h) + sum(q l)| <= 32 * 15 * 32512 < 2^24: exact as a float.
                int h0s = 0, l0s = 0, h1s = 0, l1s = 0;
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    h0s = dp4(ql[r][i], hw0[i], h0s), l0s = dp4(ql[r][i], lw0[i], l0s);
                    h1s = dp4(qh[r][i], hw1[i], h1s), l1s = dp4(qh[r][i], lw1[i], l1s);
                }
                float v = fmaf(dl[r] * dx0, (float)(256 * h0s + l0s), (dh[r] * dx1) * (float)(256 * h1s + l1s));
                v = fmaf(-ml[r], s0, fmaf(-mh[r], s1, v));
                acc[r][t] += v;
            }
        }
    }
};

// q6_k: eight lanes per super-block of 256. Lane j takes half h = j / 4 and positions
// l = 8m .. 8m + 7 (m = j % 4): elements 128h + 32i + l for i = 0..3, from 8 bytes each of
// ql[64h + l], ql[64h + 32 + l] and qh[32h + l], with scales[8h + m / 2 + 2i]. On the float path,
// lanes with h = 1 take the i in the order 1, 0, 3, 2 (distinct activation banks). Super-blocks
// are 2-byte aligned.
struct Q6_K {
    static constexpr int STAGES_DECODE = STRATA_MATVEC_STAGES_DECODE_Q6_K;
    static constexpr int WARPS_DECODE = STRATA_MATVEC_WARPS_DECODE;
    static constexpr int CHUNK_ELEMS = STRATA_MATVEC_CHUNK;
    static constexpr int CHUNK_BYTES = CHUNK_ELEMS / 256 * 210;
    static constexpr int BUF = chunk_buffer(CHUNK_BYTES);
    static constexpr bool SUBNORMAL = true;
    // At one and two tokens the integer path takes the offset of 32 from the per-8 sums of the
    // quantized activations; at more, where they cost an instruction per row and token, from
    // signed bytes.
    template <int T>
    static constexpr bool SUMS8 = T <= 2;
    __device__ static int unit_elem(int lane) { return 256 * (lane >> 3); }
    __device__ static int unit_byte(int lane) { return 210 * (lane >> 3); }

    // The lane's words of super-block b: 8 bytes each of ql[64h + 8m], ql[64h + 32 + 8m] and
    // qh[32h + 8m], the 8 scales of half h, and d.
    __device__ static void lane_words(const unsigned char* b, int h, int m, unsigned int (&qa)[2], unsigned int (&qb)[2],
                                      unsigned int (&qh)[2], unsigned int (&sc)[2], float& d) {
        lds_words_a2<2>(b + 64 * h + 8 * m, qa);
        lds_words_a2<2>(b + 64 * h + 32 + 8 * m, qb);
        lds_words_a2<2>(b + 128 + 32 * h + 8 * m, qh);
        lds_words_a2<2>(b + 192 + 8 * h, sc);
        d = f16_bits(load_u16(b + 208));
    }

    template <int T>
    __device__ static void dot(const unsigned char* const (&blk)[MV_ROWS], const float* xs, const float* xsum, int e,
                               int lane, float (&acc)[MV_ROWS][T]) {
        using X = XTile<T>;
        const int j = lane & 7, h = j >> 2, m = j & 3;
        unsigned int qa[MV_ROWS][2], qb[MV_ROWS][2], qh[MV_ROWS][2], sc[MV_ROWS][2];
        float d[MV_ROWS];
#pragma unroll
        for (int r = 0; r < MV_ROWS; ++r) lane_words(blk[r], h, m, qa[r], qb[r], qh[r], sc[r], d[r]);
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
                    bytes_sub((lo & 0x0F0F0F0Fu) | (((qh[r][wi] >> hsh) & 0x03030303u) << 4), wv[r]);
                }
#pragma unroll
                for (int t = 0; t < T; ++t) {
                    const float4 a = lds4(xr[t] + 4 * wi);
#pragma unroll
                    for (int r = 0; r < MV_ROWS; ++r) part[r][t] = dot4_sub(wv[r], a, part[r][t]);
                }
            }
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
    // The integer path, per group of 8 under one scale: d sc dx (256 sum(q h) + sum(q l) - 32 S8),
    // S8 the group's sum of the values 256 h + l, for one and two tokens; for more, where that
    // costs an instruction per row and token, the 6-bit values less 32 as signed bytes ((q + 0x60)
    // ^ 0x80 per byte: no carries, as q < 64), two instructions per word for all the tokens.
    template <int T>
    __device__ static void idot(const unsigned char* const (&blk)[MV_ROWS], const QAct& a, int e, int lane,
                                float (&acc)[MV_ROWS][T]) {
        using Q = QTile<T>;
        constexpr bool SUMS = SUMS8<T>;
        const int j = lane & 7, h = j >> 2, m = j & 3;
        unsigned int qa[MV_ROWS][2], qb[MV_ROWS][2], qh[MV_ROWS][2], sc[MV_ROWS][2];
        float d[MV_ROWS];
#pragma unroll
        for (int r = 0; r < MV_ROWS; ++r) lane_words(blk[r], h, m, qa[r], qb[r], qh[r], sc[r], d[r]);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            unsigned int q[MV_ROWS][2];
            float ds[MV_ROWS];
#pragma unroll
            for (int r = 0; r < MV_ROWS; ++r) {
#pragma unroll
                for (int wi = 0; wi < 2; ++wi) {
                    const unsigned int lo = ((i & 1) ? qb[r][wi] : qa[r][wi]) >> (4 * (i >> 1));
                    const unsigned int v = (lo & 0x0F0F0F0Fu) | (((qh[r][wi] >> (2 * i)) & 0x03030303u) << 4);
                    q[r][wi] = SUMS ? v : (v + 0x60606060u) ^ 0x80808080u;
                }
                const int byte = (m >> 1) + 2 * (i & 1);  // scale (m / 2 + 2i) within word i / 2
                ds[r] = d[r] * (float)(signed char)((sc[r][i >> 1] >> (8 * byte)) & 0xffu);
            }
            const int col = e + 128 * h + 32 * i + 8 * m;  // tile column of the 8 elements
#pragma unroll
            for (int t = 0; t < T; ++t) {
                const uint2 hx = ldq8(a.hi + t * Q::STRIDE, col), lx = ldq8(a.lo + t * Q::STRIDE, col);
                const float dx = a.d[t * Q::BLOCKS + col / 32];
                const int offset = SUMS ? 32 * a.s8[t * (Q::KT / 8) + col / 8] : 0;
#pragma unroll
                for (int r = 0; r < MV_ROWS; ++r) {
                    const int sh = dp4(q[r][0], hx.x, dp4(q[r][1], hx.y, 0));
                    const int sl = dp4(q[r][0], lx.x, dp4(q[r][1], lx.y, 0));
                    acc[r][t] = fmaf(ds[r] * dx, (float)(256 * sh + sl - offset), acc[r][t]);
                }
            }
        }
    }
};

// q6_k's integer path at up to four tokens: four lanes per super-block of 256. Lane j takes half
// h = j / 2 and positions l = 16m .. 16m + 15 (m = j % 2): elements 128h + 32i + l for i = 0..3,
// each a whole group of 16 under one scale, from 16 bytes each of ql[64h + l], ql[64h + 32 + l]
// and qh[32h + l], with scales[8h + m + 2i]. Against Q6_K's eight lanes, each row's scales are
// applied once per 16 weights rather than per 8, and a chunk of twice the columns halves the
// staging per weight. Its lanes' 16-byte activation reads meet in pairs on some banks (the
// lanes with m = 1 and h = 0 against m = 0 and h = 1); ordering the groups per lane to avoid
// that would cost more instructions than the second shared-memory wavefront.
struct Q6_K_I16 {
    static constexpr int STAGES_DECODE = STRATA_MATVEC_STAGES_DECODE_Q6_K;
    static constexpr int WARPS_DECODE = STRATA_MATVEC_WARPS_DECODE_WIDE;
    static constexpr int CHUNK_ELEMS = STRATA_MATVEC_CHUNK_WIDE;
    static constexpr int CHUNK_BYTES = CHUNK_ELEMS / 256 * 210;
    static constexpr int BUF = chunk_buffer(CHUNK_BYTES);
    static constexpr bool SUBNORMAL = false;  // no float path
    template <int T>
    static constexpr bool SUMS8 = Q6_K::SUMS8<T>;
    __device__ static int unit_elem(int lane) { return 256 * (lane >> 2); }
    __device__ static int unit_byte(int lane) { return 210 * (lane >> 2); }

    // As Q6_K::idot, a group of 16 at a time: with S16 the sum of the group's values 256 h + l
    // (two per-8 sums), 256 sum(q h) + sum(q l) - 32 S16 is the integer dot product of q - 32;
    // |that| <= 16 * 32 * 32512 < 2^24, exact as a float.
    template <int T>
    __device__ static void idot(const unsigned char* const (&blk)[MV_ROWS], const QAct& a, int e, int lane,
                                float (&acc)[MV_ROWS][T]) {
        using Q = QTile<T>;
        constexpr bool SUMS = SUMS8<T>;
        const int j = lane & 3, h = j >> 1, m = j & 1;
        unsigned int qa[MV_ROWS][4], qb[MV_ROWS][4], qh[MV_ROWS][4], sc[MV_ROWS][2];
        float d[MV_ROWS];
#pragma unroll
        for (int r = 0; r < MV_ROWS; ++r) {
            const unsigned char* b = blk[r];
            lds_words_a2<4>(b + 64 * h + 16 * m, qa[r]);
            lds_words_a2<4>(b + 64 * h + 32 + 16 * m, qb[r]);
            lds_words_a2<4>(b + 128 + 32 * h + 16 * m, qh[r]);
            lds_words_a2<2>(b + 192 + 8 * h, sc[r]);
            d[r] = f16_bits(load_u16(b + 208));
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            unsigned int q[MV_ROWS][4];
            float ds[MV_ROWS];
#pragma unroll
            for (int r = 0; r < MV_ROWS; ++r) {
#pragma unroll
                for (int wi = 0; wi < 4; ++wi) {
                    const unsigned int lo = ((i & 1) ? qb[r][wi] : qa[r][wi]) >> (4 * (i >> 1));
                    const unsigned int v = (lo & 0x0F0F0F0Fu) | (((qh[r][wi] >> (2 * i)) & 0x03030303u) << 4);
                    q[r][wi] = SUMS ? v : (v + 0x60606060u) ^ 0x80808080u;
                }
                const int byte = m + 2 * (i & 1);  // scale (m + 2i) within word i / 2
                ds[r] = d[r] * (float)(signed char)((sc[r][i >> 1] >> (8 * byte)) & 0xffu);
            }
            const int col = e + 128 * h + 32 * i + 16 * m;  // tile column of the 16 elements
#pragma unroll
            for (int t = 0; t < T; ++t) {
                const uint4 hx = ldq16(a.hi + t * Q::STRIDE, col), lx = ldq16(a.lo + t * Q::STRIDE, col);
                const float dx = a.d[t * Q::BLOCKS + col / 32];
                const int* s8 = a.s8 + t * (Q::KT / 8) + col / 8;
                const int offset = SUMS ? 32 * (s8[0] + s8[1]) : 0;
#pragma unroll
                for (int r = 0; r < MV_ROWS; ++r) {
                    const int sh = dp4(q[r][0], hx.x, dp4(q[r][1], hx.y, dp4(q[r][2], hx.z, dp4(q[r][3], hx.w, 0))));
                    const int sl = dp4(q[r][0], lx.x, dp4(q[r][1], lx.y, dp4(q[r][2], lx.z, dp4(q[r][3], lx.w, 0))));
                    acc[r][t] = fmaf(ds[r] * dx, (float)(256 * sh + sl - offset), acc[r][t]);
                }
            }
        }
    }
};

// INT: the integer path (_i16 kernels), with the activations quantized to two digits in QTile;
// else the float path, with x in XTile.
template <class F, int T, bool INT>
__device__ __forceinline__ void mv_quant(const MatvecParams& p, const unsigned char* __restrict__ w,
                                         const float* __restrict__ x, float* __restrict__ y, const float* norm_w) {
    using X = XTile<T>;
    static_assert(INT || T <= 2, "the float path of block-quantized weights has kernels for 1 and 2 tokens");
    constexpr bool SUB = !INT && F::SUBNORMAL;
    constexpr int TILE = INT ? QTile<T>::BYTES : 4 * (T * X::STRIDE + T * X::SUMS);
    constexpr int WARPS = T <= 2 ? F::WARPS_DECODE : STRATA_MATVEC_WARPS;
    constexpr int STAGES = T <= 2 ? F::STAGES_DECODE : STRATA_MATVEC_STAGES;
    static_assert(X::KT % F::CHUNK_ELEMS == 0, "a chunk never straddles two activation tiles");
    // Pieces of 16 bytes a row's chunk can need (its start is rounded down to 16 bytes), and the
    // copies per lane that cover them.
    constexpr int PIECES = (F::CHUNK_BYTES + 15 + 15) / 16;
    constexpr int COPIES = (PIECES + 31) / 32;
    static_assert(16 * PIECES <= F::BUF, "the buffer holds every piece");
    static_assert(512 * (COPIES - 1) <= F::CHUNK_BYTES, "a full chunk needs every copy but the last");
    STRATA_DYNAMIC_SMEM(float4, smem);
    unsigned char* tile = reinterpret_cast<unsigned char*>(smem);
    float* xs = reinterpret_cast<float*>(smem);
    float* xsum = xs + T * X::STRIDE;
    unsigned char* wbuf = tile + TILE;
    check_smem(TILE + WARPS * STAGES * MV_ROWS * F::BUF);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    wbuf += warp * (STAGES * MV_ROWS * F::BUF);

    // This warp's work: groups of MV_ROWS rows g0, g0 + stride, .. where g0 is its place in the
    // grid, warp-major (warp w of block b starts at w * blocks + b): a product with fewer groups
    // than the grid has warps (a decode step's o and down products of 512 groups against 132 x
    // 16 warps) spreads them over every SM, a few warps each, rather than filling the first
    // blocks and leaving the other SMs idle. Each group takes `chunks` steps. Every warp of the
    // block takes the same number of steps (those past the last group do nothing), so that all
    // meet at the barriers of the activation tiles.
    //
    // With p.splits = S > 1 (rows within one tile), S consecutive warps share each group: they
    // count as one in the grid's order, and warp `sub` of them takes chunks sub * chunks ..
    // (sub + 1) * chunks - 1 of each group's all_chunks (the last ones may have fewer or none),
    // their sums added at the group's end (write_split_rows).
    const bool one_tile = p.cols <= (unsigned int)X::KT;
    const unsigned int S = p.splits > 1 && one_tile && WARPS % p.splits == 0 ? p.splits : 1;
    const unsigned int sub = warp % S;
    const unsigned int groups = (p.rows + MV_ROWS - 1) / MV_ROWS;
    const unsigned int g0 = warp / S * gridDim.x + blockIdx.x, stride = gridDim.x * (WARPS / S);
    const unsigned int rounds = (groups + stride - 1) / stride;
    const unsigned int all_chunks = (p.cols + F::CHUNK_ELEMS - 1) / F::CHUNK_ELEMS;
    const unsigned int chunks = (all_chunks + S - 1) / S;  // steps per group
    const unsigned int c_first = sub * chunks;
    const unsigned int own = c_first < all_chunks ? min(chunks, all_chunks - c_first) : 0;  // this warp's
    const unsigned long long steps = (unsigned long long)rounds * chunks;
    const unsigned int row_lo = (unsigned int)p.row_bytes;  // low bits, for the misalignments

    // Queues the next step's chunk for the warp's rows (an empty group past the last step keeps
    // the count uniform). A full chunk needs every copy but the last, whatever its alignment; a
    // short one (the row's last) or one running past the tensor takes the general path. Rows past
    // the end are not staged (their lanes compute on stale bytes and write nothing).
    unsigned long long s_step = 0;
    unsigned int s_group = g0, s_chunk = 0;
    auto stage = [&]() {
        if (s_step < steps && s_group < groups && s_chunk < own) {
            unsigned char* dst = wbuf + (unsigned int)(s_step % STAGES) * (MV_ROWS * F::BUF) + 16 * lane;
            const unsigned long long start = (unsigned long long)(c_first + s_chunk) * F::CHUNK_BYTES;
            const unsigned int len = (unsigned int)min((unsigned long long)F::CHUNK_BYTES, p.row_bytes - start);
            const bool full = len == F::CHUNK_BYTES;
            const unsigned int row0 = s_group * MV_ROWS;
            const unsigned long long g0 = (unsigned long long)row0 * p.row_bytes + start;
            const unsigned long long last = g0 + (MV_ROWS - 1) * p.row_bytes;  // the last row's chunk
            if (full && row0 + MV_ROWS <= p.rows && (last & ~15ull) + 16 * PIECES <= p.total_bytes) {
                // The common case, with the tests made once for the group: every row present, a
                // full chunk of each, and every copy within the tensor.
                constexpr int L = 512 * (COPIES - 1);
#pragma unroll
                for (int r = 0; r < MV_ROWS; ++r) {
                    const unsigned long long g = g0 + r * p.row_bytes;
                    const unsigned char* src = w + (g & ~15ull) + 16 * lane;
                    unsigned char* d = dst + r * F::BUF;
#pragma unroll
                    for (int i = 0; i < COPIES - 1; ++i) cp_async16(d + 512 * i, src + 512 * i, true);
                    cp_async16(d + L, src + L, 16 * lane + L < ((unsigned int)g & 15u) + F::CHUNK_BYTES);
                }
            } else {
            // The rest (a row's last chunk, the last group, the end of the tensor), rarer: a loop.
#pragma unroll 1
            for (int r = 0; r < MV_ROWS; ++r) {
                const unsigned int row = row0 + r;
                if (row >= p.rows) continue;
                const unsigned long long g = (unsigned long long)row * p.row_bytes + start;
                const unsigned long long a0 = g & ~15ull;
                const unsigned int need = ((unsigned int)g & 15u) + len;  // bytes from a0
                const unsigned char* src = w + a0 + 16 * lane;
                unsigned char* d = dst + r * F::BUF;
                if (full && a0 + 16 * PIECES <= p.total_bytes) {
#pragma unroll
                    for (int i = 0; i < COPIES - 1; ++i) cp_async16(d + 512 * i, src + 512 * i, true);
                    constexpr int L = 512 * (COPIES - 1);
                    cp_async16(d + L, src + L, 16 * lane + L < need);
                } else {
#pragma unroll
                    for (int i = 0; i < COPIES; ++i) {
                        const unsigned int o = 16 * lane + 512 * i;
                        if (o < need) {
                            const unsigned long long left = p.total_bytes - (a0 + o);
                            if (left >= 16) cp_async16(d + 512 * i, src + 512 * i, true);
                            else cp_async16_zfill(d + 512 * i, src + 512 * i, (unsigned int)left);
                        }
                    }
                }
            }
            }
        }
        cp_async_commit();
        ++s_step;
        if (++s_chunk == chunks) s_chunk = 0, s_group += stride;
    };

    // A loop, not unrolled: one copy of the staging code rather than one per step.
#pragma unroll 1
    for (int s = 0; s < STAGES - 1; ++s) stage();
    // The norm's scales, with the first weight chunks already in flight (the tile's memory as
    // scratch). The integer path only: the float path, kept for comparison, takes x as it is.
    static_assert(TILE >= 4 * (NORM_RUNS + 1), "the tile holds the norm's scratch");
    MvNorm<T> norm{nullptr, {}};
    if constexpr (INT) norm = mv_norm<T>(p, x, norm_w, xs);
    // Stages columns k0 .. k0 + kt of the activations.
    auto stage_acts = [&](unsigned int k0, int kt) {
        __syncthreads();
        if constexpr (INT) {
            if (p.acts == STRATA_MATVEC_ACTS_Q16)
                load_xq<T, F::template SUMS8<T>>(p, reinterpret_cast<const unsigned char*>(x), k0, kt, tile);
            else stage_xq<T, F::template SUMS8<T>>(p, x, k0, kt, tile, norm);
        }
        else stage_x<X, T, SUB, SUB>(p, x, k0, kt, xs, xsum, norm);
    };
    if (one_tile && rounds > 0) stage_acts(0, (int)p.cols);
    // The split groups' sums (write_split_rows): a float per warp, row and token.
    STRATA_SHARED float red[S_RED_FLOATS];
    static_assert(WARPS * MV_ROWS * T <= S_RED_FLOATS, "the split sums fit");
    float acc[MV_ROWS][T] = {};
    unsigned int group = g0, c = 0;
    for (unsigned long long step = 0; step < steps; ++step) {
        const unsigned int e0 = (c_first + c) * F::CHUNK_ELEMS;
        if (!one_tile && e0 % X::KT == 0) stage_acts(e0, (int)min((unsigned int)X::KT, p.cols - e0));
        cp_async_wait<STAGES - 2>();
        __syncwarp();
        const unsigned int row0 = group * MV_ROWS;
        const int ue = F::unit_elem(lane);
        if (group < groups && c < own && e0 + ue < p.cols) {
            const unsigned char* buf = wbuf + (unsigned int)(step % STAGES) * (MV_ROWS * F::BUF);
            // The low bits of the chunk's offset.
            const unsigned int g_lo = row0 * row_lo + (c_first + c) * F::CHUNK_BYTES;
            const unsigned char* blk[MV_ROWS];
#pragma unroll
            for (int r = 0; r < MV_ROWS; ++r) blk[r] = buf + r * F::BUF + ((g_lo + r * row_lo) & 15u) + F::unit_byte(lane);
            const int e = (int)(e0 % X::KT) + ue;
            if constexpr (INT) F::template idot<T>(blk, qact<T>(tile), e, lane, acc);
            else F::template dot<T>(blk, xs, xsum, e, lane, acc);
        }
        __syncwarp();
        stage();
        if (++c == chunks) {
            if (S > 1) write_split_rows<T>(p, acc, group < groups, row0, warp, (int)sub, lane, S, red, y);
            else if (group < groups) write_rows<T>(p, acc, row0, lane, y);
#pragma unroll
            for (int r = 0; r < MV_ROWS; ++r)
#pragma unroll
                for (int t = 0; t < T; ++t) acc[r][t] = 0.0f;
            c = 0, group += stride;
        }
    }
    cp_async_wait<0>();
}

// ---- Entry points: matvec_<dtype>[_scalar]_t<T> ------------------------------------------------

// A Mixture-of-Experts launch (experts not null): the weight, activations and outputs of this
// block's slot, blockIdx.y. The weight is the one table entry ids[slot] names (each expert in an
// allocation of its own, so 16-byte aligned as every kernel assumes); false when the slot is
// unused (its id not below p.experts), and the whole block returns.
__device__ __forceinline__ bool mv_slot(const MatvecParams& p, const unsigned long long* experts,
                                        const unsigned int* ids, const unsigned char*& w, const float*& x, float*& y) {
    const unsigned int id = ids[blockIdx.y];
    if (id >= p.experts) return false;
    w = reinterpret_cast<const unsigned char*>(experts[id]);
    x = reinterpret_cast<const float*>(reinterpret_cast<const unsigned char*>(x) + blockIdx.y * p.x_slot);
    y += blockIdx.y * p.y_slot;
    return true;
}

// BOUNDS: the launch bounds, (threads) or (threads, min blocks per SM). experts and ids: null, or
// a Mixture-of-Experts launch (mv_slot). norm: null, or the weight of the RMSNorm the kernel
// applies to x's rows as it stages them (MvNorm; f32 activations, p.acts F32; float weights and
// the integer path of block-quantized ones).
#define MV_ENTRY(name, T, BOUNDS, CALL)                                                                           \
    extern "C" __global__ void __launch_bounds__ BOUNDS                                                          \
        matvec_##name##_t##T(MatvecParams p, const unsigned char* w, const float* x, float* y,                  \
                             const unsigned long long* experts, const unsigned int* ids, const float* norm) {    \
        if (experts != nullptr && !mv_slot(p, experts, ids, w, x, y)) return;                                    \
        CALL;                                                                                                    \
    }

// The integer kernels for 1, 2, 4 and 8 tokens (FI: the format struct of the integer kernels for up
// to 4 tokens, F the others'), and the float ones for 1 and 2 (kept for comparison; the launcher
// runs them in launches of up to 2 tokens).
#define MV_QUANT(name, F, FI)                                                                  \
    MV_ENTRY(name, 1, (MV_THREADS_DECODE), (mv_quant<F, 1, false>(p, w, x, y, norm)))                  \
    MV_ENTRY(name, 2, (MV_THREADS_DECODE), (mv_quant<F, 2, false>(p, w, x, y, norm)))                  \
    MV_ENTRY(name##_i16, 1, (FI::WARPS_DECODE * 32, 1), (mv_quant<FI, 1, true>(p, w, x, y, norm)))      \
    MV_ENTRY(name##_i16, 2, (FI::WARPS_DECODE * 32, 1), (mv_quant<FI, 2, true>(p, w, x, y, norm)))      \
    MV_ENTRY(name##_i16, 4, (MV_THREADS), (mv_quant<FI, 4, true>(p, w, x, y, norm)))                   \
    MV_ENTRY(name##_i16, 8, (MV_THREADS), (mv_quant<F, 8, true>(p, w, x, y, norm)))

#define MV_FLOAT(name, DT)                                                        \
    MV_ENTRY(name, 1, (MV_THREADS), (mv_float_vec<DT, 1>(p, w, x, y, norm)))              \
    MV_ENTRY(name, 2, (MV_THREADS), (mv_float_vec<DT, 2>(p, w, x, y, norm)))              \
    MV_ENTRY(name, 4, (MV_THREADS), (mv_float_vec<DT, 4>(p, w, x, y, norm)))              \
    MV_ENTRY(name, 8, (MV_THREADS), (mv_float_vec<DT, 8>(p, w, x, y, norm)))              \
    MV_ENTRY(name##_scalar, 1, (MV_THREADS), (mv_float_scalar<DT, 1>(p, w, x, y, norm)))  \
    MV_ENTRY(name##_scalar, 2, (MV_THREADS), (mv_float_scalar<DT, 2>(p, w, x, y, norm)))  \
    MV_ENTRY(name##_scalar, 4, (MV_THREADS), (mv_float_scalar<DT, 4>(p, w, x, y, norm)))  \
    MV_ENTRY(name##_scalar, 8, (MV_THREADS), (mv_float_scalar<DT, 8>(p, w, x, y, norm)))

MV_FLOAT(f32, STRATA_DTYPE_F32)
MV_FLOAT(f16, STRATA_DTYPE_F16)
MV_FLOAT(bf16, STRATA_DTYPE_BF16)
MV_QUANT(q8_0, Q8_0, Q8_0)
MV_QUANT(q4_0, Q4_0, Q4_0)
MV_QUANT(q4_1, Q4_1, Q4_1)
MV_QUANT(q4_k, Q4_K, Q4_K_I16)
MV_QUANT(q6_k, Q6_K, Q6_K_I16)

// x [tokens, cols] (cols a multiple of 32) quantized to two digits into xq, actq.cuh's record per
// token, bit for bit as the integer kernels quantize it in the block: the matvec's activations
// quantized once for all of its blocks (p.rows, p.row_bytes, p.total_bytes and p.store are not
// read). Launch: blocks of any multiple of 32 threads, a warp per block of 32 columns at a time
// (grid-stride).
extern "C" __global__ void matvec_quantize_x(MatvecParams p, const float* __restrict__ x, unsigned char* xq) {
    const unsigned int lane = threadIdx.x % 32, nb = p.cols / 32;
    const unsigned long long total = (unsigned long long)p.tokens * nb;
    const unsigned long long warps = (unsigned long long)gridDim.x * (blockDim.x / 32);
    for (unsigned long long i = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; i < total; i += warps) {
        const unsigned int t = (unsigned int)(i / nb), b = (unsigned int)(i % nb);
        const ActqRecord r = actq_record(xq, p.cols, t);
        quantize_block(__ldg(x + (size_t)t * p.cols + 32 * b + lane), (int)lane, r.hi, r.lo, (int)(32 * b + lane),
                       r.d + b, r.s + b, r.s8 + 4 * b);
    }
}
