//! What the attention examples share: their arguments `[threads] [sizes,..] [heads/kv_heads/head_dim]`.

use strata_tensor::cpu::{self, AttentionParams};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The parsed arguments.
pub struct Args {
    /// Threads of the pool the example runs in (default 2).
    pub threads: usize,
    /// The sizes to time (keys, or prompt tokens).
    pub sizes: Vec<usize>,
    /// The attention shape (default SmolLM2-135M's 9/3/64), scaled by 1 / sqrt(head_dim).
    pub params: AttentionParams,
}

/// Parses the command line, `default_sizes` when no sizes are given, and prints the threads,
/// shape and ISA.
pub fn parse(default_sizes: &[usize]) -> Result<Args, BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let threads: usize = args.first().map_or(Ok(2), |a| a.parse())?;
    let sizes: Vec<usize> =
        args.get(1).map_or(Ok(default_sizes.to_vec()), |a| a.split(',').map(str::parse).collect::<Result<_, _>>())?;
    let shape: Vec<usize> =
        args.get(2).map_or(Ok(vec![9, 3, 64]), |a| a.split('/').map(str::parse).collect::<Result<_, _>>())?;
    let [n_heads, n_kv_heads, head_dim] = shape[..] else { return Err("shape: heads/kv_heads/head_dim".into()) };
    let params =
        AttentionParams { n_heads, n_kv_heads, head_dim, scale: 1.0 / (head_dim as f32).sqrt(), sliding_window: None };
    println!("threads {threads}, heads {n_heads}/{n_kv_heads} x {head_dim}, isa {:?}", cpu::isa());
    Ok(Args { threads, sizes, params })
}
