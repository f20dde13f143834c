// Causal attention over a paged KV cache, f32: the cache's append, split-K decode with its
// combine step, and tiled prefill.
//
// The cache (strata_kernels::cuda::kv::DeviceKvCache) keeps each layer's keys and values in
// blocks of block_len tokens laid out [block_len, n_kv_heads, head_dim], and a device table of
// block addresses, interleaved: table[2b] is key block b, table[2b + 1] value block b. Token t
// lives in block t / block_len at row t % block_len. Query head h reads KV head
// h / (n_heads / n_kv_heads). A query at position i sees key j iff j <= i and, with a sliding
// window W, i - j < W.
//
// kv_append_f32: grid-stride over tokens x row elements, any launch shape; copies row t of k
// and v to position start + t through the table.
//
// attention_decode_f32: one query token (position seq_len - 1). Grid (n_chunks, n_kv_heads,
// ceil(group / heads_per_block)), STRATA_ATTN_DECODE_THREADS threads, dynamic shared memory
// (see the launcher). Each block takes one chunk of chunk_len visible keys for up to
// heads_per_block query heads of one KV group, so each key and value row is read once for
// the whole group: tiles of key_tile rows are staged in shared memory (double-buffered with
// cp.async, the next tile in flight while this one is used), the scores go through
// an online softmax (running max and sum per head), and the values are accumulated in
// registers. With one chunk it writes the normalised output; otherwise it leaves the
// unnormalised accumulators and (max, sum) per head in `part`, and the chunks are merged with
// the log-sum-exp rule out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c in one of two ways:
// - folded (`counters` not null, at most STRATA_ATTN_FOLD_MAX_CHUNKS chunks): each block, its
//   partials written and fenced, takes a ticket from its group's counter (one per blockIdx.y,
//   blockIdx.z; zero before the launch); the block that takes the last merges the group's
//   chunks in chunk order and sets the counter back to zero. No second launch;
// - attention_decode_combine_f32 (`counters` null; one block of STRATA_ATTN_COMBINE_THREADS
//   per query head, dynamic shared memory for the chunk weights and per-group sums), groups of
//   threads summing interleaved chunks: for long sequences, whose many chunks one block per
//   group would merge too slowly.
//
// attention_prefill_f32_d{64,128,256}: `tokens` queries at positions q_pos0.. (the last
// positions of the cache). Grid (ceil(tokens / 64), n_heads), STRATA_ATTN_PREFILL_THREADS
// threads as 16 x 16, dynamic shared memory. Each block holds 64 query rows of one head in
// shared memory and walks the key tiles that some of its queries see (fully masked tiles are
// never visited): Q K^T in 4 x (key tile / 16) register tiles per thread, the masks, an online
// softmax across the 16 threads of a row (shuffles), then P V into 4 x (head_dim / 64 float4)
// accumulators per thread. The suffix is the largest head_dim the variant takes.
//
// CPU references: strata_tensor::cpu::reference::attention_decode (decode) and
// strata_tensor::cpu::reference::attention (prefill, chunked prefill). Launchers:
// strata_kernels::cuda::kv::DeviceKvCache::append and strata_kernels::cuda::ops::attention.
#include "strata_common.cuh"
#include "attention.h"
#include "ptx.cuh"

// The first key position visible from query position i with sliding window w (0: none).
__device__ __forceinline__ unsigned int first_visible(unsigned int i, unsigned int w) {
    return (w != 0 && i + 1 > w) ? i + 1 - w : 0;
}

// The row of position `pos`, KV head offset `head_off` (floats), in the key (which = 0) or
// value (which = 1) blocks of a table.
__device__ __forceinline__ const float* cache_row(const unsigned long long* table, unsigned int which,
                                                  unsigned int pos, unsigned int block_len, unsigned int row,
                                                  unsigned int head_off) {
    const unsigned int b = pos / block_len, r = pos % block_len;
    const float* base = reinterpret_cast<const float*>(table[2 * (size_t)b + which]);
    return base + (size_t)r * row + head_off;
}

__device__ __forceinline__ float dot4(float4 a, float4 b, float acc) {
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
    acc = fmaf(a.z, b.z, acc);
    return fmaf(a.w, b.w, acc);
}

__device__ __forceinline__ float4 axpy4(float a, float4 x, float4 y) {
    return make_float4(fmaf(a, x.x, y.x), fmaf(a, x.y, y.y), fmaf(a, x.z, y.z), fmaf(a, x.w, y.w));
}

__device__ __forceinline__ float4 scale4(float4 x, float a) { return make_float4(x.x * a, x.y * a, x.z * a, x.w * a); }

extern "C" __global__ void kv_append_f32(KvAppendParams p, const float* k, const float* v,
                                         const unsigned long long* table) {
    const size_t n = (size_t)p.tokens * p.row;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const unsigned int t = (unsigned int)(i / p.row), c = (unsigned int)(i % p.row);
        const unsigned int pos = p.start + t;
        const size_t b = pos / p.block_len;
        const size_t off = (size_t)(pos % p.block_len) * p.row + c;
        reinterpret_cast<float*>(table[2 * b])[off] = k[i];
        reinterpret_cast<float*>(table[2 * b + 1])[off] = v[i];
    }
}

// Asynchronous 16-byte copy from global to shared memory (sm_80+); with valid false it
// writes zeros and reads nothing (ptx.cuh's zero-filling copy, which the emulation replaces).
__device__ __forceinline__ void cp_async16_or_zero(void* dst, const void* src, bool valid) {
    cp_async16_zfill(dst, src, valid ? 16 : 0);
}

// Accumulator float4s per thread of the decode kernel: (head, float4 of head_dim) pairs of a
// block, spread over its threads.
#define DECODE_PAIRS \
    ((STRATA_ATTN_DECODE_MAX_HEADS * STRATA_ATTN_MAX_HEAD_DIM / 4 + STRATA_ATTN_DECODE_THREADS - 1) / \
     STRATA_ATTN_DECODE_THREADS)

// Starts copying the key and value rows t0 .. t0 + n of KV head offset `head_off` into a tile
// pair (keys at kt, values tile_floats later); rows n .. TK become zeros (they get probability
// 0, and 0 x a stale value could be NaN).
__device__ __forceinline__ void decode_stage(const AttnDecodeParams& p, const unsigned long long* table,
                                             unsigned int t0, unsigned int n, unsigned int row,
                                             unsigned int head_off, float* kt, unsigned int tile_floats) {
    const unsigned int D4 = p.head_dim / 4, stride = p.head_dim + 4;
    for (unsigned int i = threadIdx.x; i < p.key_tile * D4; i += blockDim.x) {
        const unsigned int j = i / D4, d4 = i % D4;
        const bool valid = j < n;
        const unsigned int pos = t0 + (valid ? j : 0);  // a readable row even when nothing is read
        float* dst = kt + j * stride + 4 * d4;
        cp_async16_or_zero(dst, cache_row(table, 0, pos, p.block_len, row, head_off) + 4 * d4, valid);
        cp_async16_or_zero(dst + tile_floats, cache_row(table, 1, pos, p.block_len, row, head_off) + 4 * d4, valid);
    }
}

// The folded combine (see the header): the last block of a (KV group, head block) merges the
// n_chunks <= 32 partials of its nh heads h0.. into out. A warp per head weighs the chunks (a
// lane per chunk: w_c = e^(m_c - M), den = sum_c w_c l_c), then each thread sums the weighted
// accumulators of (head, float4) pairs over the chunks in order. The partials were written by
// other blocks of this launch, so they are read through L2 (__ldcg), never the L1 or the
// read-only cache. `wsm` holds 32 floats per head, `den` one.
__device__ __forceinline__ void decode_combine_folded(const AttnDecodeParams& p, const float* part, float* out,
                                                      unsigned int h0, unsigned int nh, float* wsm, float* den) {
    const unsigned int C = p.n_chunks, H = p.n_heads, D4 = p.head_dim / 4;
    const unsigned int warp = threadIdx.x / STRATA_WARP, lane = threadIdx.x % STRATA_WARP;
    const unsigned int n_warps = blockDim.x / STRATA_WARP;
    const float* stats = part + (size_t)C * H * p.head_dim;
    for (unsigned int hh = warp; hh < nh; hh += n_warps) {
        float2 st = make_float2(-INFINITY, 0.0f);
        if (lane < C) st = __ldcg(reinterpret_cast<const float2*>(stats + ((size_t)lane * H + h0 + hh) * 2));
        const float m = warp_max(st.x);  // every chunk holds a visible key: finite
        const float w = lane < C ? expf(st.x - m) : 0.0f;
        const float d = warp_sum(w * st.y);
        wsm[hh * STRATA_WARP + lane] = w;
        if (lane == 0) den[hh] = d;
    }
    __syncthreads();
    const float4* acc = reinterpret_cast<const float4*>(part);
    const size_t chunk_stride = (size_t)H * D4;
    for (unsigned int pair = threadIdx.x; pair < nh * D4; pair += blockDim.x) {
        const unsigned int hh = pair / D4, d4 = pair % D4;
        const float4* a = acc + (size_t)(h0 + hh) * D4 + d4;
        const float* w = wsm + hh * STRATA_WARP;
        float4 num = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 8
        for (unsigned int c = 0; c < C; ++c) num = axpy4(w[c], __ldcg(a + c * chunk_stride), num);
        reinterpret_cast<float4*>(out)[(size_t)(h0 + hh) * D4 + d4] = scale4(num, 1.0f / den[hh]);
    }
}

extern "C" __global__ void __launch_bounds__(STRATA_ATTN_DECODE_THREADS, STRATA_ATTN_DECODE_MIN_BLOCKS)
    attention_decode_f32(AttnDecodeParams p, const float* q, const unsigned long long* table, float* part, float* out,
                         unsigned int* counters) {
    STRATA_DYNAMIC_SMEM(float4, decode_smem);
    float* smem = reinterpret_cast<float*>(decode_smem);
    const unsigned int D = p.head_dim, D4 = D / 4, TK = p.key_tile, NH = p.heads_per_block;
    const unsigned int stride = D + 4;  // padded tile row: float4 reads of 8 rows hit 32 banks
    const unsigned int tile_floats = TK * stride;
    const unsigned int group = p.n_heads / p.n_kv_heads;
    const unsigned int g = blockIdx.y;
    const unsigned int h0 = g * group + blockIdx.z * NH;  // this block's first query head
    const unsigned int nh = min(NH, group - blockIdx.z * NH);
    const unsigned int chunk = blockIdx.x;
    const unsigned int k_begin = p.first + chunk * p.chunk_len;
    const unsigned int k_end = min(k_begin + p.chunk_len, p.seq_len);
    const unsigned int n_tiles = (k_end - k_begin + TK - 1) / TK;
    const unsigned int row = p.n_kv_heads * D, head_off = g * D;
    const unsigned int tid = threadIdx.x;

    float* qs = smem;                     // [NH][D] queries
    float* tiles = qs + NH * D;           // [2 buffers][keys, values][TK][stride]
    float* ss = tiles + 4 * tile_floats;  // [NH][TK] scores, then probabilities
    float* alpha = ss + NH * TK;          // [NH] the tile's rescale of the accumulators
    float* m_run = alpha + NH;            // [NH] running max
    float* l_run = m_run + NH;            // [NH] running sum of exp(score - max)

    // The first tile's copy overlaps the query load.
    decode_stage(p, table, k_begin, min(TK, k_end - k_begin), row, head_off, tiles, tile_floats);
    cp_async_commit();
    const float4* q4 = reinterpret_cast<const float4*>(q) + (size_t)h0 * D4;
    for (unsigned int i = tid; i < nh * D4; i += blockDim.x) reinterpret_cast<float4*>(qs)[i] = q4[i];
    if (tid < nh) {
        m_run[tid] = -INFINITY;
        l_run[tid] = 0.0f;
    }

    float4 acc[DECODE_PAIRS];
#pragma unroll
    for (int i = 0; i < DECODE_PAIRS; ++i) acc[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);

    const unsigned int warp = tid / STRATA_WARP, lane = tid % STRATA_WARP, n_warps = blockDim.x / STRATA_WARP;
    for (unsigned int it = 0; it < n_tiles; ++it) {
        const unsigned int t0 = k_begin + it * TK, n = min(TK, k_end - t0);
        // Copy the next tile into the other buffer while this one is used (the barrier at the
        // end of the previous iteration freed it).
        if (it + 1 < n_tiles) {
            decode_stage(p, table, t0 + TK, min(TK, k_end - t0 - TK), row, head_off,
                         tiles + ((it + 1) & 1) * 2 * tile_floats, tile_floats);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();  // this tile, the queries and the stats are visible to every thread
        const float* ks = tiles + (it & 1) * 2 * tile_floats;
        const float* vs = ks + tile_floats;

        // Scores: one (head, key) pair per thread at a time.
        for (unsigned int i = tid; i < nh * TK; i += blockDim.x) {
            const unsigned int hh = i / TK, j = i % TK;
            float s = -INFINITY;
            if (j < n) {
                const float4* qr = reinterpret_cast<const float4*>(qs + hh * D);
                const float4* kr = reinterpret_cast<const float4*>(ks + j * stride);
                float a = 0.0f;
                for (unsigned int d4 = 0; d4 < D4; ++d4) a = dot4(qr[d4], kr[d4], a);
                s = a * p.scale;
            }
            ss[i] = s;
        }
        __syncthreads();
        // Online softmax, one warp per head: the tile holds at least one key, so the new max
        // is finite.
        for (unsigned int hh = warp; hh < nh; hh += n_warps) {
            const float s = lane < TK ? ss[hh * TK + lane] : -INFINITY;
            const float m_old = m_run[hh];
            const float m_new = fmaxf(m_old, warp_max(s));
            const float pr = lane < TK ? expf(s - m_new) : 0.0f;
            const float sum = warp_sum(pr);
            if (lane < TK) ss[hh * TK + lane] = pr;
            __syncwarp();  // every lane has read m_run[hh] before lane 0 updates it
            if (lane == 0) {
                const float a = expf(m_old - m_new);
                alpha[hh] = a;
                m_run[hh] = m_new;
                l_run[hh] = l_run[hh] * a + sum;
            }
        }
        __syncthreads();
        // Values: each thread owns (head, float4 of head_dim) pairs.
#pragma unroll
        for (int i = 0; i < DECODE_PAIRS; ++i) {
            const unsigned int pair = tid + i * blockDim.x;
            if (pair < nh * D4) {
                const unsigned int hh = pair / D4, d4 = pair % D4;
                const float* pr = ss + hh * TK;
                float4 o = scale4(acc[i], alpha[hh]);
                for (unsigned int j = 0; j < n; ++j) o = axpy4(pr[j], reinterpret_cast<const float4*>(vs + j * stride)[d4], o);
                acc[i] = o;
            }
        }
        __syncthreads();  // this buffer and the probabilities are free for the next iteration
    }

    if (p.n_chunks == 1) {
#pragma unroll
        for (int i = 0; i < DECODE_PAIRS; ++i) {
            const unsigned int pair = tid + i * blockDim.x;
            if (pair < nh * D4) {
                const unsigned int hh = pair / D4, d4 = pair % D4;
                reinterpret_cast<float4*>(out)[(size_t)(h0 + hh) * D4 + d4] = scale4(acc[i], 1.0f / l_run[hh]);
            }
        }
        return;
    }
    // Partials: accumulators [n_chunks][n_heads][D], then (max, sum) [n_chunks][n_heads][2].
    float4* pacc = reinterpret_cast<float4*>(part + (size_t)chunk * p.n_heads * D);
#pragma unroll
    for (int i = 0; i < DECODE_PAIRS; ++i) {
        const unsigned int pair = tid + i * blockDim.x;
        if (pair < nh * D4) pacc[(size_t)h0 * D4 + pair] = acc[i];
    }
    if (tid < nh) {
        float* stats = part + (size_t)p.n_chunks * p.n_heads * D + ((size_t)chunk * p.n_heads + h0 + tid) * 2;
        stats[0] = m_run[tid];
        stats[1] = l_run[tid];
    }
    if (counters == nullptr) return;  // attention_decode_combine_f32 merges the chunks

    // Folded combine: the block that finishes last among its group's chunks merges them. Each
    // thread's partials are made visible device-wide before the block takes its ticket, and the
    // last block fences again before it reads the others' (the threadfence-reduction pattern).
    STRATA_SHARED unsigned int ticket;
    __threadfence();
    __syncthreads();
    unsigned int* counter = counters + (size_t)blockIdx.z * gridDim.y + blockIdx.y;
    if (tid == 0) ticket = atomicAdd(counter, 1u);
    __syncthreads();
    if (ticket != p.n_chunks - 1) return;
    __threadfence();
    decode_combine_folded(p, part, out, h0, nh, tiles, alpha);
    if (tid == 0) *counter = 0;  // ready for the next launch
}

extern "C" __global__ void __launch_bounds__(STRATA_ATTN_COMBINE_THREADS)
    attention_decode_combine_f32(AttnDecodeParams p, const float* part, float* out) {
    STRATA_SHARED float scratch[32];
    STRATA_DYNAMIC_SMEM(float4, combine_smem);
    const unsigned int h = blockIdx.x, D4 = p.head_dim / 4, C = p.n_chunks, H = p.n_heads, tid = threadIdx.x;
    const unsigned int groups = blockDim.x / D4;  // chunk groups summed in parallel
    float4* sums = combine_smem;                                    // [groups][D4]
    float* w = reinterpret_cast<float*>(combine_smem + groups * D4);  // [C] chunk weights
    const float* stats = part + (size_t)C * H * p.head_dim;

    float m = -INFINITY;
    for (unsigned int c = tid; c < C; c += blockDim.x) m = fmaxf(m, stats[((size_t)c * H + h) * 2]);
    m = block_max(m, scratch);
    float den = 0.0f;
    for (unsigned int c = tid; c < C; c += blockDim.x) {
        const float* st = stats + ((size_t)c * H + h) * 2;
        w[c] = expf(st[0] - m);
        den = fmaf(w[c], st[1], den);
    }
    den = block_sum(den, scratch);  // its barriers also publish w

    if (tid < groups * D4) {
        const unsigned int c4 = tid % D4, grp = tid / D4;
        const float4* acc = reinterpret_cast<const float4*>(part) + (size_t)h * D4 + c4;
        const size_t chunk_stride = (size_t)H * D4;
        float4 num = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 4
        for (unsigned int c = grp; c < C; c += groups) num = axpy4(w[c], acc[c * chunk_stride], num);
        sums[grp * D4 + c4] = num;
    }
    __syncthreads();
    if (tid < D4) {
        float4 num = sums[tid];
        for (unsigned int grp = 1; grp < groups; ++grp) {
            const float4 x = sums[grp * D4 + tid];
            num = make_float4(num.x + x.x, num.y + x.y, num.z + x.z, num.w + x.w);
        }
        reinterpret_cast<float4*>(out)[(size_t)h * D4 + tid] = scale4(num, 1.0f / den);
    }
}

// Prefill: BM query rows of one head per block; thread (ty, tx) of 16 x 16 owns the rows
// ty + 16 i (i < 4), the score columns tx + 16 j (j < BN / 16) and the output float4 columns
// tx + 16 k (k < NC4).
#define PREFILL_BM STRATA_ATTN_PREFILL_QUERIES

template <int NC4, int BN>
__device__ __forceinline__ void prefill(const AttnPrefillParams& p, const float* q, const unsigned long long* table,
                                        float* out) {
    constexpr unsigned int BM = PREFILL_BM, NJ = BN / 16, PS = BN + 16;  // PS: 2 rows per warp on 32 banks
    STRATA_DYNAMIC_SMEM(float4, prefill_smem);
    float* smem = reinterpret_cast<float*>(prefill_smem);
    const unsigned int D = p.head_dim, D4 = D / 4, stride = D + 4, stride4 = stride / 4;
    float* qs = smem;               // [BM][stride] queries
    float* kv = qs + BM * stride;   // [BN][stride] the key tile, then the value tile
    float* ps = kv + BN * stride;   // [BM][PS] probabilities
    const float4* qs4 = reinterpret_cast<const float4*>(qs);
    const float4* kv4 = reinterpret_cast<const float4*>(kv);

    const unsigned int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const unsigned int h = blockIdx.y, g = h / (p.n_heads / p.n_kv_heads);
    const unsigned int n_qt = (p.tokens + BM - 1) / BM;
    const unsigned int t0 = (n_qt - 1 - blockIdx.x) * BM;  // the longest rows go first
    const unsigned int nq = min(BM, p.tokens - t0);
    const unsigned int i0 = p.q_pos0 + t0;                  // position of the first query row
    const unsigned int row = p.n_kv_heads * D, head_off = g * D;
    const size_t q_stride = (size_t)p.n_heads * D;

    for (unsigned int i = tid; i < BM * D4; i += blockDim.x) {
        const unsigned int r = i / D4, d4 = i % D4;
        float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (r < nq) x = reinterpret_cast<const float4*>(q + (t0 + r) * q_stride + (size_t)h * D)[d4];
        reinterpret_cast<float4*>(qs)[r * stride4 + d4] = x;
    }

    float4 acc[4][NC4];
    float m[4], l[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int k = 0; k < NC4; ++k) acc[i][k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }

    // The keys some row sees: from the first row's window start to the last row.
    const unsigned int k_lo = first_visible(i0, p.window), k_hi = i0 + nq;
    for (unsigned int kt0 = k_lo; kt0 < k_hi; kt0 += BN) {
        const unsigned int nk = min((unsigned int)BN, k_hi - kt0);
        __syncthreads();  // the previous value tile and probabilities are no longer read
        for (unsigned int i = tid; i < BN * D4; i += blockDim.x) {
            const unsigned int j = i / D4, d4 = i % D4;
            float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (j < nk) x = reinterpret_cast<const float4*>(cache_row(table, 0, kt0 + j, p.block_len, row, head_off))[d4];
            reinterpret_cast<float4*>(kv)[j * stride4 + d4] = x;
        }
        __syncthreads();

        float s[4][NJ];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < NJ; ++j) s[i][j] = 0.0f;
#pragma unroll(NC4 >= 4 ? 1 : 2)
        for (unsigned int d4 = 0; d4 < D4; ++d4) {
            float4 a[4], b[NJ];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = qs4[(ty + 16 * i) * stride4 + d4];
#pragma unroll
            for (int j = 0; j < NJ; ++j) b[j] = kv4[(tx + 16 * j) * stride4 + d4];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < NJ; ++j) s[i][j] = dot4(a[i], b[j], s[i][j]);
        }

        // Masks and the online softmax; the 16 threads of a row are 16 lanes of one warp.
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const unsigned int r = ty + 16 * i, qi = i0 + r, lo = first_visible(qi, p.window);
            float mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                const unsigned int c = tx + 16 * j, kpos = kt0 + c;
                const bool seen = r < nq && c < nk && kpos <= qi && kpos >= lo;
                s[i][j] = seen ? s[i][j] * p.scale : -INFINITY;
                mx = fmaxf(mx, s[i][j]);
            }
#pragma unroll
            for (int o = 8; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            const float m_new = fmaxf(m[i], mx);
            const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row that has seen nothing yet
            const float a = expf(m[i] - m_use);
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                const float pr = expf(s[i][j] - m_use);
                ps[r * PS + tx + 16 * j] = pr;
                sum += pr;
            }
#pragma unroll
            for (int o = 8; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            l[i] = l[i] * a + sum;
            m[i] = m_new;
#pragma unroll
            for (int k = 0; k < NC4; ++k) acc[i][k] = scale4(acc[i][k], a);
        }
        __syncthreads();  // the key tile is no longer read; the probabilities are written

        for (unsigned int i = tid; i < BN * D4; i += blockDim.x) {
            const unsigned int j = i / D4, d4 = i % D4;
            float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (j < nk) x = reinterpret_cast<const float4*>(cache_row(table, 1, kt0 + j, p.block_len, row, head_off))[d4];
            reinterpret_cast<float4*>(kv)[j * stride4 + d4] = x;
        }
        __syncthreads();

        for (unsigned int j = 0; j < nk; ++j) {
            float pr[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) pr[i] = ps[(ty + 16 * i) * PS + j];
#pragma unroll
            for (int k = 0; k < NC4; ++k) {
                const unsigned int c4 = tx + 16 * k;
                if (c4 < D4) {
                    const float4 v = kv4[j * stride4 + c4];
#pragma unroll
                    for (int i = 0; i < 4; ++i) acc[i][k] = axpy4(pr[i], v, acc[i][k]);
                }
            }
        }
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const unsigned int r = ty + 16 * i;
        if (r >= nq) continue;
        const float inv = 1.0f / l[i];
        float4* o = reinterpret_cast<float4*>(out + (t0 + r) * q_stride + (size_t)h * D);
#pragma unroll
        for (int k = 0; k < NC4; ++k) {
            const unsigned int c4 = tx + 16 * k;
            if (c4 < D4) o[c4] = scale4(acc[i][k], inv);
        }
    }
}

extern "C" __global__ void __launch_bounds__(STRATA_ATTN_PREFILL_THREADS, 2)
    attention_prefill_f32_d64(AttnPrefillParams p, const float* q, const unsigned long long* table, float* out) {
    prefill<1, 64>(p, q, table, out);
}

extern "C" __global__ void __launch_bounds__(STRATA_ATTN_PREFILL_THREADS, 2)
    attention_prefill_f32_d128(AttnPrefillParams p, const float* q, const unsigned long long* table, float* out) {
    prefill<2, 64>(p, q, table, out);
}

extern "C" __global__ void __launch_bounds__(STRATA_ATTN_PREFILL_THREADS, 2)
    attention_prefill_f32_d256(AttnPrefillParams p, const float* q, const unsigned long long* table, float* out) {
    prefill<4, 32>(p, q, table, out);
}
