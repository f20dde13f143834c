//! [`Model`]: a loaded model with its tokenizer, a thread pool, and the generation loop.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use strata_models::{Decoder, KvCache, Logits, TokenizerSource};

use crate::chat::{ChatMessage, ChatTemplate};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{TextStream, Tokenizer};
use crate::{Error, Result};

/// How to load a model.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Worker threads for the CPU backend (`None`: one per core).
    pub threads: Option<usize>,
}

/// How a sequence of ids is run to produce logits at every position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsMode {
    /// One forward pass over all ids (prefill).
    OnePass,
    /// One id at a time through the KV cache (decode).
    Decode,
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Stop after this many new tokens.
    pub max_new_tokens: usize,
    /// How to pick each token.
    pub sampling: SamplingParams,
    /// Stop at an end-of-sequence token (the model's, from its config or GGUF metadata).
    pub stop_at_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> GenerateOptions {
        GenerateOptions { max_new_tokens: 128, sampling: SamplingParams::default(), stop_at_eos: true }
    }
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-sequence token was produced (it is not part of the output).
    Eos,
    /// `max_new_tokens` were produced.
    MaxTokens,
    /// The callback asked to stop.
    Callback,
}

/// The outcome of [`Model::generate`].
#[derive(Clone, Debug)]
pub struct Generation {
    /// The new token ids (without the prompt, without a final EOS).
    pub tokens: Vec<u32>,
    /// Why it stopped.
    pub stop: StopReason,
    /// Time spent on the prompt (prefill).
    pub prefill_time: Duration,
    /// Time spent producing tokens after the first.
    pub decode_time: Duration,
}

/// A loaded model ready to run.
pub struct Model {
    decoder: Decoder,
    tokenizer: Option<Tokenizer>,
    chat_template: Option<String>,
    pool: rayon::ThreadPool,
    source: PathBuf,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("source", &self.source).field("hparams", self.decoder.hparams()).finish()
    }
}

impl Model {
    /// Loads a model from a checkpoint directory (config.json + safetensors, tokenizer.json if
    /// present) or a model id found in the local Hugging Face cache.
    pub fn from_pretrained(spec: impl AsRef<Path>, options: LoadOptions) -> Result<Model> {
        let spec = spec.as_ref();
        let loaded = strata_models::load(&spec.to_string_lossy())?;
        let tokenizer = match loaded.tokenizer {
            Some(TokenizerSource::Json(p)) => Some(Tokenizer::from_file(&p)?),
            Some(TokenizerSource::Built(t)) => Some(Tokenizer::from_inner(*t)),
            None => None,
        };
        let mut builder = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("strata-cpu-{i}"));
        if let Some(n) = options.threads {
            builder = builder.num_threads(n);
        }
        let pool = builder.build().map_err(|e| Error::Runtime(format!("cannot start the CPU thread pool: {e}")))?;
        Ok(Model { decoder: loaded.decoder, tokenizer, chat_template: loaded.chat_template, pool, source: loaded.path })
    }

    /// The decoder (hyperparameters, weight sizes).
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// The tokenizer, if the checkpoint has one.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    /// The model's Jinja chat template, if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Where the model was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The number of worker threads.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Runs `f` inside this model's thread pool.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    /// A fresh KV cache.
    pub fn new_cache(&self) -> KvCache {
        self.decoder.new_cache()
    }

    /// Logits at every position of `ids`, `[ids.len(), vocab]` row-major.
    pub fn logits(&self, ids: &[u32], mode: LogitsMode) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        self.install(|| {
            let mut cache = self.decoder.new_cache();
            match mode {
                LogitsMode::OnePass => Ok(self.decoder.forward(ids, &mut cache, Logits::All)?),
                LogitsMode::Decode => {
                    let mut out = Vec::with_capacity(ids.len() * self.decoder.hparams().vocab_size);
                    for &id in ids {
                        out.extend(self.decoder.forward(&[id], &mut cache, Logits::Last)?);
                    }
                    Ok(out)
                }
            }
        })
    }

    /// One forward step: feeds `ids` through the cache and returns the last position's logits.
    pub fn step(&self, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        self.install(|| Ok(self.decoder.forward(ids, cache, Logits::Last)?))
    }

    /// Generates from prompt ids, calling `on_token` with each new id as soon as it exists;
    /// returning `ControlFlow::Break` stops early.
    pub fn generate(
        &self,
        prompt: &[u32],
        options: &GenerateOptions,
        mut on_token: impl FnMut(u32) -> ControlFlow<()>,
    ) -> Result<Generation> {
        if prompt.is_empty() {
            return Err(Error::InvalidInput("the prompt is empty: give at least one token".into()));
        }
        let eos = &self.decoder.hparams().eos_token_ids;
        let mut sampler = Sampler::new(options.sampling.clone());
        let mut cache = self.new_cache();
        let mut history = prompt.to_vec();
        let mut tokens = Vec::new();
        let start = Instant::now();
        let mut logits = self.step(prompt, &mut cache)?;
        let prefill_time = start.elapsed();
        let decode_start = Instant::now();
        let mut stop = StopReason::MaxTokens;
        for i in 0..options.max_new_tokens {
            let id = sampler.sample(&mut logits, &history);
            if options.stop_at_eos && eos.contains(&id) {
                stop = StopReason::Eos;
                break;
            }
            tokens.push(id);
            history.push(id);
            if on_token(id).is_break() {
                stop = StopReason::Callback;
                break;
            }
            if i + 1 < options.max_new_tokens {
                logits = self.step(&[id], &mut cache)?;
            }
        }
        Ok(Generation { tokens, stop, prefill_time, decode_time: decode_start.elapsed() })
    }

    /// Generates from a text prompt, calling `on_text` with each new piece of text as soon as it
    /// is complete (a multi-byte character split across tokens is held back until whole).
    pub fn generate_text(
        &self,
        prompt: &str,
        options: &GenerateOptions,
        on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let tok = self.tokenizer.as_ref().ok_or_else(|| Error::NoTokenizer { model: self.source.clone() })?;
        let ids = tok.encode(prompt, true)?;
        self.generate_ids_text(&ids, options, on_text)
    }

    /// The token ids of a conversation rendered with the model's chat template, ending with the
    /// opening of the assistant's turn (special tokens come from the template, so none are added).
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let tok = self.tokenizer.as_ref().ok_or_else(|| Error::NoTokenizer { model: self.source.clone() })?;
        let source =
            self.chat_template.as_deref().ok_or_else(|| Error::NoChatTemplate { model: self.source.clone() })?;
        let hp = self.decoder.hparams();
        let name = |id: Option<u32>| id.and_then(|id| tok.inner().id_to_token(id)).unwrap_or_default();
        let template = ChatTemplate::new(source, &name(hp.bos_token_id), &name(hp.eos_token_ids.first().copied()))?;
        let text = template.render(messages, true)?;
        tok.encode(&text, false)
    }

    /// Generates from token ids, calling `on_text` with each new piece of text as soon as it is
    /// complete (a multi-byte character split across tokens is held back until whole).
    pub fn generate_ids_text(
        &self,
        prompt: &[u32],
        options: &GenerateOptions,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let tok = self.tokenizer.as_ref().ok_or_else(|| Error::NoTokenizer { model: self.source.clone() })?;
        let mut stream = TextStream::new(tok);
        let mut failure = None;
        let generation = self.generate(prompt, options, |id| match stream.push(id) {
            Ok(text) => {
                if !text.is_empty() {
                    on_text(&text);
                }
                ControlFlow::Continue(())
            }
            Err(e) => {
                failure = Some(e);
                ControlFlow::Break(())
            }
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        let rest = stream.finish()?;
        if !rest.is_empty() {
            on_text(&rest);
        }
        Ok(generation)
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let vocab = self.decoder.hparams().vocab_size;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::InvalidInput(format!("token id {bad} is outside the vocabulary of {vocab} tokens")));
        }
        if ids.is_empty() {
            return Err(Error::InvalidInput("no token ids given".into()));
        }
        Ok(())
    }
}
