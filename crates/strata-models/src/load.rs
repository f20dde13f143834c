//! Loading a model from a spec: resolve it, read its configuration, map its weights.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use strata_store::pack::{Pack, Progress as PackProgress};
use strata_store::planner::{ExpertCachePolicy, Plan, Tier, UnitKind, WeightManifest};
use strata_store::{ExpertCacheConfig, Residency, Store};
use strata_tensor::{DType, Tensor};

use crate::decoder::{Decoder, TensorSource};
use crate::gguf::GgufFile;
use crate::gguf_model::hparams_from_gguf;
use crate::gguf_tokenizer::tokenizer_from_gguf;
use crate::hparams::Hparams;
use crate::offload::{self, UnitLayout};
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
    open(spec)?.load()
}

/// Loads a GGUF file: weights used in place, the tokenizer and chat template from metadata.
pub fn load_gguf(path: &Path) -> Result<LoadedModel> {
    open_gguf(path)?.load()
}

/// Loads a Hugging Face checkpoint directory (config.json + safetensors).
pub fn load_dir(dir: &Path) -> Result<LoadedModel> {
    open_dir(dir)?.load()
}

/// A checkpoint opened (configuration read, weights mapped, nothing loaded yet): the step
/// before loading where the weights' placement can be planned.
pub struct OpenedModel {
    /// The model's hyperparameters.
    pub hparams: Hparams,
    source: Box<dyn TensorSource>,
    tokenizer: Option<TokenizerSource>,
    chat_template: Option<String>,
    path: PathBuf,
}

impl std::fmt::Debug for OpenedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedModel").field("path", &self.path).field("hparams", &self.hparams).finish()
    }
}

/// Opens the model `spec` names (see [`load`]).
pub fn open(spec: &str) -> Result<OpenedModel> {
    match resolve_model(spec)? {
        ModelSource::Dir(dir) => open_dir(&dir),
        ModelSource::Gguf(path) => open_gguf(&path),
    }
}

/// Opens a GGUF file (see [`load_gguf`]).
pub fn open_gguf(path: &Path) -> Result<OpenedModel> {
    let file = GgufFile::open(path)?;
    let hparams = hparams_from_gguf(&file)?;
    let meta = file.metadata();
    let tokenizer = match meta.opt_str("tokenizer.ggml.model")? {
        Some(_) => Some(TokenizerSource::Built(Box::new(tokenizer_from_gguf(meta)?))),
        None => None,
    };
    let chat_template = meta.opt_str("tokenizer.chat_template")?.map(str::to_string);
    Ok(OpenedModel { hparams, source: Box::new(file), tokenizer, chat_template, path: path.to_path_buf() })
}

/// Opens a Hugging Face checkpoint directory (see [`load_dir`]).
pub fn open_dir(dir: &Path) -> Result<OpenedModel> {
    let config = ModelConfig::from_dir(dir)?;
    let hparams = Hparams::from_config(&config)?;
    let checkpoint = Checkpoint::open(dir)?;
    let tokenizer = dir.join("tokenizer.json");
    let tokenizer = tokenizer.is_file().then_some(TokenizerSource::Json(tokenizer));
    let chat_template = chat_template_of_dir(dir)?;
    Ok(OpenedModel { hparams, source: Box::new(checkpoint), tokenizer, chat_template, path: dir.to_path_buf() })
}

impl OpenedModel {
    /// The checkpoint directory or file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads every weight in place (memory-mapped): the whole model resident.
    pub fn load(self) -> Result<LoadedModel> {
        let decoder = Decoder::load(self.hparams, &*self.source)?;
        Ok(LoadedModel { decoder, tokenizer: self.tokenizer, chat_template: self.chat_template, path: self.path })
    }

    /// The units the model's weights group into for placement.
    pub fn layout(&self) -> Result<UnitLayout> {
        UnitLayout::of(&self.hparams, &*self.source)
    }

    /// The weight manifest the planner places, with the pack's matrices converted to
    /// `convert` (if any).
    pub fn manifest(&self, layout: &UnitLayout, convert: Option<DType>) -> Result<WeightManifest> {
        layout.manifest(&self.hparams, &*self.source, convert)
    }

    /// Builds (or finds) the model's offload pack in `offload_dir`.
    pub fn pack(
        &self,
        layout: &UnitLayout,
        offload_dir: &Path,
        convert: Option<DType>,
        progress: &mut dyn FnMut(&PackProgress),
    ) -> Result<Pack> {
        offload::ensure_pack(&self.hparams, layout, &*self.source, &self.path, offload_dir, convert, progress)
    }

    /// Loads the model placed as `plan` says. With nothing streamed and no conversion, this is
    /// [`OpenedModel::load`]. Otherwise the offload pack in `offload_dir` (its matrices converted
    /// to `convert`, if given) is built if missing (`pack_progress`), the checkpoint is unmapped,
    /// the resident units are read from the pack into RAM (`read_progress(done, total)`) and the
    /// streamed ones are read on use, `plan.prefetch_depth` ahead. Experts on disk are read when
    /// their router picks them, into an expert cache of the plan's size evicting as `policy`
    /// says.
    #[allow(clippy::too_many_arguments)]
    pub fn load_placed(
        self,
        plan: &Plan,
        layout: &UnitLayout,
        offload_dir: &Path,
        convert: Option<DType>,
        policy: Box<dyn ExpertCachePolicy>,
        pack_progress: &mut dyn FnMut(&PackProgress),
        read_progress: impl FnMut(u64, u64),
    ) -> Result<LoadedModel> {
        if plan.placements.len() != layout.units.len() {
            return Err(Error::Unsupported(format!(
                "the plan places {} units but the model has {}",
                plan.placements.len(),
                layout.units.len()
            )));
        }
        if plan.placements.iter().all(|p| p.tier != Tier::Disk) && convert.is_none() {
            return self.load();
        }
        let pack = self.pack(layout, offload_dir, convert, pack_progress)?;
        let OpenedModel { hparams, source, tokenizer, chat_template, path } = self;
        // The checkpoint's mapping goes before the resident units are read, so its pages do not
        // count against the memory budget.
        drop(source);
        let residency: Vec<Residency> = (0..layout.units.len())
            .map(|i| match plan.tier_of(i) {
                Tier::Disk if matches!(layout.units[i].kind, UnitKind::Expert { .. }) => Residency::Cached,
                Tier::Disk => Residency::Streamed,
                Tier::Mapped => Residency::Mapped,
                Tier::Ram | Tier::Vram => Residency::Resident,
            })
            .collect();
        let mut policy = policy;
        let layer_of: Vec<(usize, usize)> = (0..layout.units.len())
            .filter_map(|i| match layout.units[i].kind {
                UnitKind::Expert { layer, .. } => Some((i, layer)),
                _ => None,
            })
            .collect();
        policy.set_layers(&layer_of);
        let cache =
            residency.contains(&Residency::Cached).then(|| ExpertCacheConfig { bytes: plan.ram.expert_cache, policy });
        let store = Store::open_with_experts(pack, &residency, plan.prefetch_depth, cache, read_progress)?;
        let decoder = Decoder::load_placed(hparams, Arc::new(store), layout)?;
        Ok(LoadedModel { decoder, tokenizer, chat_template, path })
    }
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
