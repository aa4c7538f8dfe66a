//! The one error type of hass. Every variant carries enough context (file, tensor
//! name, expected vs found) for a user to fix the input without a debugger.

use std::path::PathBuf;

/// Errors of every hass crate.
#[derive(Debug, thiserror::Error)]
pub enum HassError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid JSON in {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A configuration value that hass cannot honour (unknown architecture,
    /// unsupported rope scaling, inconsistent head sizes, ...).
    #[error("config {context}: {msg}")]
    Config { context: String, msg: String },
    #[error("tensor `{name}` is missing from {file}")]
    MissingTensor { file: String, name: String },
    #[error("tensor `{name}` in {file} is not used by the model (unexpected tensor)")]
    UnexpectedTensor { file: String, name: String },
    #[error("tensor `{name}` in {file}: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        file: String,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor `{name}` in {file}: unsupported dtype {dtype}")]
    UnsupportedDType {
        file: String,
        name: String,
        dtype: String,
    },
    /// A weight file that cannot be parsed: truncated, corrupt header, offsets out of bounds.
    #[error("malformed weight file {file}: {msg}")]
    MalformedFile { file: String, msg: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("invalid sampling parameters: {0}")]
    InvalidSampling(String),
    #[error("prompt of {prompt} tokens does not fit the context of {context} tokens")]
    PromptTooLong { prompt: usize, context: usize },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A file that hass ships (a head, the prompt sets, a script) or fetches was not
    /// found at run time; `looked_in` lists every place searched, `hint` how to point
    /// hass at it.
    #[error("{what} not found; looked in {}. {hint}", looked_in.join(", "))]
    NotFound {
        what: String,
        looked_in: Vec<String>,
        hint: String,
    },
    /// The compiled-in backend cannot run on this machine (no GPU, no driver, no
    /// Vulkan adapter): `backend` names it, `msg` is what it reported.
    #[error("the {backend} backend has no usable device ({device}): {msg}. {hint}")]
    Device {
        backend: String,
        device: String,
        msg: String,
        hint: String,
    },
}

/// Result alias used throughout hass.
pub type Result<T, E = HassError> = std::result::Result<T, E>;

impl HassError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        HassError::Io {
            path: path.into(),
            source,
        }
    }

    /// A malformed-file error for `file`.
    pub fn malformed(file: impl std::fmt::Display, msg: impl Into<String>) -> Self {
        HassError::MalformedFile {
            file: file.to_string(),
            msg: msg.into(),
        }
    }

    /// A config error in `context`.
    pub fn config(context: impl Into<String>, msg: impl Into<String>) -> Self {
        HassError::Config {
            context: context.into(),
            msg: msg.into(),
        }
    }
}
