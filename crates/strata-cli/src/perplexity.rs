//! `strata perplexity`: how well the model predicts a text, at one or more sequence lengths.
//!
//! The text is tokenized once; for each length N the first N tokens run as one request (chunk
//! by chunk through the KV cache, planned for N tokens) and every token after the first is
//! scored. Comparing lengths and `--rope-scaling` algorithms shows how a model holds up past its
//! trained context.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::{ModelArgs, load};

#[derive(Args, Debug)]
pub(crate) struct PerplexityArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// A UTF-8 text file to score.
    #[arg(long, value_name = "FILE")]
    text_file: PathBuf,
    /// Comma-separated sequence lengths in tokens (each the first N tokens of the text).
    #[arg(long, value_delimiter = ',', default_value = "4096")]
    tokens: Vec<usize>,
    /// Tokens per forward pass.
    #[arg(long, default_value_t = strata::DEFAULT_PERPLEXITY_CHUNK)]
    chunk: usize,
    /// Print one JSON object per length instead of a table.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(a: PerplexityArgs) -> Result<()> {
    let model = load(&a.model)?;
    let text = std::fs::read_to_string(&a.text_file)
        .with_context(|| format!("cannot read the text file {}", a.text_file.display()))?;
    let Some(tok) = model.tokenizer() else {
        bail!("{} has no tokenizer, so it cannot score a text", model.source().display());
    };
    let ids = tok.encode(&text, true)?;
    let longest = a.tokens.iter().copied().max().unwrap_or(0);
    if longest > ids.len() {
        bail!("{} is {} tokens long, shorter than the {longest} tokens asked for", a.text_file.display(), ids.len());
    }
    let scaling = a.model.scaling.rope_scaling.as_deref().unwrap_or("checkpoint");
    if !a.json {
        println!("{:>8}  {:>14}  {:>10}  {:>10}  {:>9}", "tokens", "rope-scaling", "mean NLL", "perplexity", "tok/s");
    }
    for &n in &a.tokens {
        let mut last_shown = 0;
        let p = model.perplexity(&ids[..n], a.chunk, |done, total| {
            // A progress line on stderr every eighth of the way.
            if done == total || done - last_shown >= total.div_ceil(8) {
                last_shown = done;
                eprint!("\r  {n} tokens: {done}/{total}");
                if done == total {
                    eprintln!();
                }
                let _ = std::io::stderr().flush();
            }
        })?;
        let tok_s = p.tokens as f64 / p.elapsed.as_secs_f64();
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "tokens": p.tokens,
                    "rope_scaling": scaling,
                    "mean_nll": p.mean_nll,
                    "perplexity": p.perplexity,
                    "tok_s": tok_s,
                    "seconds": p.elapsed.as_secs_f64(),
                })
            );
        } else {
            println!("{:>8}  {:>14}  {:>10.4}  {:>10.3}  {:>9.1}", p.tokens, scaling, p.mean_nll, p.perplexity, tok_s);
        }
    }
    Ok(())
}
