//! The facade's error type.

use std::path::PathBuf;

/// Everything the facade can report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Loading or running the model failed.
    #[error(transparent)]
    Model(#[from] strata_models::Error),
    /// The tokenizer could not be loaded or failed on its input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Text in or out needs a tokenizer and the model has none.
    #[error("{} has no tokenizer (tokenizer.json): pass token ids instead of text", model.display())]
    NoTokenizer {
        /// The model's path.
        model: PathBuf,
    },
    /// The chat template could not be compiled or rendered.
    #[error("{0}")]
    Template(String),
    /// The model has no chat template.
    #[error("{} has no chat template", model.display())]
    NoChatTemplate {
        /// The model's path.
        model: PathBuf,
    },
    /// The default model could not be fetched.
    #[error("{0}")]
    Fetch(String),
    /// A Mixture-of-Experts setting or statistic was asked of a dense model.
    #[error("{} is not a Mixture-of-Experts model, which {what} needs", model.display())]
    NotMixtureOfExperts {
        /// The model's path.
        model: PathBuf,
        /// What needed a MoE model (a flag, a setting, a statistic).
        what: String,
    },
    /// A caller's input is invalid.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A requested feature does not exist yet in this version.
    #[error("{0} is not supported yet")]
    Unsupported(String),
    /// A CUDA device was asked for, but this build of strata has no CUDA backend.
    #[error(
        "{device} was requested, but strata was built without CUDA (rebuild with `--features cuda`, e.g. \
         `cargo build --release -p strata-cli --features cuda`)"
    )]
    CudaNotCompiled {
        /// The device that was asked for.
        device: strata_models::tensor::Device,
    },
    /// The runtime could not be set up.
    #[error("{0}")]
    Runtime(String),
    /// A file could not be read or written.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        error: std::io::Error,
    },
}

/// The facade's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<strata_models::store::Error> for Error {
    fn from(e: strata_models::store::Error) -> Error {
        Error::Model(e.into())
    }
}

impl From<strata_models::store::nvme::Error> for Error {
    fn from(e: strata_models::store::nvme::Error) -> Error {
        Error::Model(strata_models::store::Error::from(e).into())
    }
}

impl From<strata_models::store::planner::PlanError> for Error {
    fn from(e: strata_models::store::planner::PlanError) -> Error {
        Error::Model(e.into())
    }
}

impl From<strata_models::tensor::Error> for Error {
    fn from(e: strata_models::tensor::Error) -> Error {
        Error::Model(e.into())
    }
}
