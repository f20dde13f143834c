//! Loading a model from a spec: resolve it, read its configuration, map its weights.

use std::path::{Path, PathBuf};

use strata_tensor::Tensor;

use crate::decoder::{Decoder, TensorSource};
use crate::hparams::Hparams;
use crate::resolve::{ModelSource, resolve_model};
use crate::safetensors::Checkpoint;
use crate::{Error, ModelConfig, Result};

/// A model ready to run, with what the facade needs to find its tokenizer.
#[derive(Debug)]
pub struct LoadedModel {
    /// The decoder with its weights.
    pub decoder: Decoder,
    /// `tokenizer.json` next to the checkpoint, if there is one.
    pub tokenizer_json: Option<PathBuf>,
    /// The checkpoint directory or file.
    pub path: PathBuf,
}

/// Loads the model `spec` names: a checkpoint directory, or a model id in the local Hugging
/// Face cache.
pub fn load(spec: &str) -> Result<LoadedModel> {
    match resolve_model(spec)? {
        ModelSource::Dir(dir) => load_dir(&dir),
        ModelSource::Gguf(path) => {
            Err(Error::Unsupported(format!("{}: GGUF checkpoints are not supported yet", path.display())))
        }
    }
}

/// Loads a Hugging Face checkpoint directory (config.json + safetensors).
pub fn load_dir(dir: &Path) -> Result<LoadedModel> {
    let config = ModelConfig::from_dir(dir)?;
    let hparams = Hparams::from_config(&config)?;
    let checkpoint = Checkpoint::open(dir)?;
    let decoder = Decoder::load(hparams, &checkpoint)?;
    let tokenizer = dir.join("tokenizer.json");
    Ok(LoadedModel { decoder, tokenizer_json: tokenizer.is_file().then_some(tokenizer), path: dir.to_path_buf() })
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
