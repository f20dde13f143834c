//! Loading a model from a spec: resolve it, read its configuration, map its weights.

use std::path::{Path, PathBuf};

use strata_tensor::Tensor;

use crate::decoder::{Decoder, TensorSource};
use crate::gguf::GgufFile;
use crate::gguf_model::hparams_from_gguf;
use crate::gguf_tokenizer::tokenizer_from_gguf;
use crate::hparams::Hparams;
use crate::resolve::{ModelSource, resolve_model};
use crate::safetensors::Checkpoint;
use crate::{Error, ModelConfig, Result};

/// Where a model's tokenizer comes from.
#[derive(Debug)]
pub enum TokenizerSource {
    /// A `tokenizer.json` file.
    Json(PathBuf),
    /// Built from GGUF metadata.
    Built(Box<tokenizers::Tokenizer>),
}

/// A model ready to run, with what the facade needs to find its tokenizer.
#[derive(Debug)]
pub struct LoadedModel {
    /// The decoder with its weights.
    pub decoder: Decoder,
    /// The tokenizer, if the checkpoint has one.
    pub tokenizer: Option<TokenizerSource>,
    /// The Jinja chat template, if the checkpoint has one.
    pub chat_template: Option<String>,
    /// The checkpoint directory or file.
    pub path: PathBuf,
}

/// Loads the model `spec` names: a checkpoint directory, or a model id in the local Hugging
/// Face cache.
pub fn load(spec: &str) -> Result<LoadedModel> {
    match resolve_model(spec)? {
        ModelSource::Dir(dir) => load_dir(&dir),
        ModelSource::Gguf(path) => load_gguf(&path),
    }
}

/// Loads a GGUF file: weights used in place, the tokenizer and chat template from metadata.
pub fn load_gguf(path: &Path) -> Result<LoadedModel> {
    let file = GgufFile::open(path)?;
    let hparams = hparams_from_gguf(&file)?;
    let decoder = Decoder::load(hparams, &file)?;
    let meta = file.metadata();
    let tokenizer = match meta.opt_str("tokenizer.ggml.model")? {
        Some(_) => Some(TokenizerSource::Built(Box::new(tokenizer_from_gguf(meta)?))),
        None => None,
    };
    let chat_template = meta.opt_str("tokenizer.chat_template")?.map(str::to_string);
    Ok(LoadedModel { decoder, tokenizer, chat_template, path: path.to_path_buf() })
}

/// Loads a Hugging Face checkpoint directory (config.json + safetensors).
pub fn load_dir(dir: &Path) -> Result<LoadedModel> {
    let config = ModelConfig::from_dir(dir)?;
    let hparams = Hparams::from_config(&config)?;
    let checkpoint = Checkpoint::open(dir)?;
    let decoder = Decoder::load(hparams, &checkpoint)?;
    let tokenizer = dir.join("tokenizer.json");
    let tokenizer = tokenizer.is_file().then_some(TokenizerSource::Json(tokenizer));
    let chat_template = chat_template_of_dir(dir)?;
    Ok(LoadedModel { decoder, tokenizer, chat_template, path: dir.to_path_buf() })
}

/// The chat template of a checkpoint directory: `chat_template.jinja` (transformers 5), else
/// `chat_template` in tokenizer_config.json.
fn chat_template_of_dir(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja).map(Some).map_err(|error| Error::Io { path: jinja, error });
    }
    let config = dir.join("tokenizer_config.json");
    if !config.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&config).map_err(|error| Error::Io { path: config.clone(), error })?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Io {
        path: config.clone(),
        error: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    Ok(value.get("chat_template").and_then(|t| t.as_str()).map(str::to_string))
}

impl TensorSource for Checkpoint {
    fn tensor(&self, name: &str) -> Result<Tensor> {
        self.tensor_aligned(name)
    }

    fn contains(&self, name: &str) -> bool {
        Checkpoint::contains(self, name)
    }

    fn location(&self) -> &Path {
        self.path()
    }
}
