// Launch parameters and launch-shape constants of kernels/matvec.cu. The launcher
// (strata_kernels::cuda::ops::matvec) sizes the grid and the dynamic shared memory from the same
// constants, and every kernel checks on entry that it was given enough shared memory.
#pragma once

/// Tokens one launch handles: each weight byte is read once per this many tokens.
#define STRATA_MATVEC_MAX_TOKENS 8
/// Warps per thread block (float kernels, and block-quantized kernels for 4 and 8 tokens). The
/// block-quantized kernels run as many blocks as fit on the device at once (the launcher asks
/// the driver), each warp looping over groups of rows.
#define STRATA_MATVEC_WARPS 4
/// Warps per thread block of the block-quantized kernels for 1 and 2 tokens (decode): one large
/// block per SM shares one activation tile, leaving shared memory for a deep weight pipeline.
#define STRATA_MATVEC_WARPS_DECODE 16
/// Weight rows per warp: each activation value read from shared memory serves this many rows.
#define STRATA_MATVEC_ROWS_PER_WARP 4
/// Depth of each warp's cp.async pipeline of weight chunks (block-quantized dtypes, 4 and 8
/// tokens).
#define STRATA_MATVEC_STAGES 3
/// The same for 1 and 2 tokens: three chunks in flight per warp (two for q6_k, whose chunks are
/// larger), about 110 KiB per SM, which HBM's latency under load needs.
#define STRATA_MATVEC_STAGES_DECODE 4
#define STRATA_MATVEC_STAGES_DECODE_Q6_K 3
/// Activation floats staged in shared memory per tile by the block-quantized kernels, over all
/// tokens of the launch (a tile is this divided by the kernel's token count, but at least
/// STRATA_MATVEC_XTILE_MIN columns). Rows up to a tile long are staged once per block.
#define STRATA_MATVEC_XTILE 8192
/// The same for the float kernels, whose rows are long enough to amortize restaging.
#define STRATA_MATVEC_XTILE_FLOAT 4096
/// The smallest activation tile, in columns: a multiple of every chunk below.
#define STRATA_MATVEC_XTILE_MIN 1024
/// Columns of one row a warp streams per pipeline step (block-quantized dtypes), except q8_0.
#define STRATA_MATVEC_CHUNK 1024
/// Columns per pipeline step for q8_0 (two lanes per block).
#define STRATA_MATVEC_CHUNK_Q8_0 512
/// Columns per pipeline step of the q4_k and q6_k integer kernels for up to 4 tokens (four lanes
/// per super-block, each lane 64 of its weights per row), and the warps per block of their 1- and
/// 2-token kernels: chunks twice as long take half the warps of the other decode kernels, the
/// same bytes in flight per SM.
#define STRATA_MATVEC_CHUNK_WIDE 2048
#define STRATA_MATVEC_WARPS_DECODE_WIDE 8

/// Stores of MatvecParams::store: y = W x; y += W x (each product rounded, then added: a
/// residual connection fused into its projection); SwiGLU of a weight whose rows come in groups
/// of four, gate rows 2j and 2j + 1 then up rows 2j and 2j + 1 (rows a multiple of 4): y has
/// rows / 2 outputs per token, y[t, 2j + i] = silu(gate_{2j+i} x) * (up_{2j+i} x).
#define STRATA_MATVEC_STORE_WRITE 0
#define STRATA_MATVEC_STORE_ADD 1
#define STRATA_MATVEC_STORE_SWIGLU 2

/// Activations of MatvecParams::acts: f32 x (quantized in the block by the integer kernels), or,
/// for the integer kernels only, x already quantized to two digits in global memory (actq.cuh's
/// records, one per token: matvec_quantize_x or a fused producer wrote them), which the blocks
/// copy rather than quantize.
#define STRATA_MATVEC_ACTS_F32 0
#define STRATA_MATVEC_ACTS_Q16 1

/// `y[t, r] = sum_c W[r, c] * x[t, c]` for `r < rows`, `t < tokens`, stored as `store` says; in a
/// Mixture-of-Experts launch, for every slot, with its expert's W (every expert of one shape and
/// dtype: rows, cols, row_bytes and total_bytes hold for each).
typedef struct {
    /// Weight rows n (outputs per token).
    unsigned int rows;
    /// Weight columns k (inputs per token).
    unsigned int cols;
    /// Bytes per weight row.
    unsigned long long row_bytes;
    /// Bytes of the whole weight tensor: no read goes past it.
    unsigned long long total_bytes;
    /// Tokens in this launch, at most the kernel's own count (rows of x beyond count as zeros).
    unsigned int tokens;
    /// What becomes of the products (STRATA_MATVEC_STORE_*).
    unsigned int store;
    /// What x points to (STRATA_MATVEC_ACTS_*).
    unsigned int acts;
    /// Mixture-of-Experts launches (the kernel's `experts` table not null): the experts the table
    /// lists. Block row blockIdx.y computes slot blockIdx.y, with the weight of expert
    /// ids[blockIdx.y]; a slot whose id is `experts` or more (0xffffffff: unused) is skipped.
    unsigned int experts;
    /// Bytes from one slot's activations to the next's (0: every slot reads the same x).
    unsigned long long x_slot;
    /// Floats from one slot's outputs to the next's.
    unsigned long long y_slot;
    /// The epsilon of the RMSNorm the kernel applies to x (its `norm` weight not null).
    float norm_eps;
    /// Block-quantized kernels whose rows fit one activation tile: the warps that share each
    /// group of rows, each taking an equal run of its chunks, their sums added in warp order (a
    /// power of two dividing the block's warps; 0 or 1: a warp per group). More warps on fewer
    /// rows: what a product of few, long rows needs to keep its bytes in flight.
    unsigned int splits;
} MatvecParams;
