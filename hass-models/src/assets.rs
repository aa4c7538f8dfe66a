//! The real assets hass runs on out of the box, fetched on first use by the
//! repository's `scripts/fetch_assets.sh` (PyPI wheels; no model hub is needed) into
//! `$HASS_CACHE` (default `<repo>/models`, ignored by git).

use std::path::PathBuf;
use std::process::Command;

use hass_core::{HassError, Result};

/// Assets known to `scripts/fetch_assets.sh`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asset {
    /// SmolLM2-135M-Instruct, Q4_1 GGUF: the embedded default model.
    SmolLm2,
    /// Qwen2.5-Coder-0.5B-Instruct GGUF: a second, larger target.
    QwenCoder,
    /// ShareGPT conversations (training data).
    ShareGpt,
    /// Directory of llama.cpp's vocabulary-only GGUFs and tokenizer test vectors
    /// (from the `llama-cpp-python` source package): the GGUF tokenizer tests' fixtures.
    VocabFixtures,
    /// Directory of tiny GGUFs with reference tensors, written by
    /// `scripts/make_gguf_fixtures.py`: the GGUF reader tests' fixtures.
    GgufFixtures,
}

impl Asset {
    fn script_name(self) -> &'static str {
        match self {
            Asset::SmolLm2 => "smollm2",
            Asset::QwenCoder => "qwen-coder",
            Asset::ShareGpt => "sharegpt",
            Asset::VocabFixtures => "vocab",
            Asset::GgufFixtures => "gguf-fixtures",
        }
    }

    fn file_name(self) -> &'static str {
        match self {
            Asset::SmolLm2 => "SmolLM2-135M-Instruct.Q4_1.gguf",
            Asset::QwenCoder => "qwen2.5-coder-0.5b-instruct.gguf",
            Asset::ShareGpt => "ShareGPT_V3_unfiltered_cleaned_split.json",
            Asset::VocabFixtures => "llama.cpp-vocab",
            Asset::GgufFixtures => "gguf-fixtures",
        }
    }

    /// The file whose presence means the asset is complete (the scripts write it last
    /// or move the whole directory into place).
    fn marker(self) -> Option<&'static str> {
        match self {
            Asset::VocabFixtures => Some("LICENSE"),
            Asset::GgufFixtures => Some("types.gguf"),
            _ => None,
        }
    }

    fn is_cached(self) -> bool {
        let path = cached_path(self);
        match self.marker() {
            Some(m) => path.join(m).is_file(),
            None => path.is_file(),
        }
    }
}

fn repo_root() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    root.canonicalize().unwrap_or(root)
}

/// The cache directory: `$HASS_CACHE` or `<repo>/models`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("HASS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models"))
}

/// Where `asset` (a file, or a directory for the fixture sets) lives once fetched (it
/// may not exist yet).
pub fn cached_path(asset: Asset) -> PathBuf {
    cache_dir().join(asset.file_name())
}

/// The path of `asset`, fetching it first if it is not cached.
pub fn ensure(asset: Asset) -> Result<PathBuf> {
    let path = cached_path(asset);
    if asset.is_cached() {
        return Ok(path);
    }
    let script = repo_root().join("scripts/fetch_assets.sh");
    eprintln!(
        "{} is not cached; fetching it with {} ...",
        asset.file_name(),
        script.display()
    );
    let status = Command::new("bash")
        .arg(&script)
        .arg(asset.script_name())
        .env("HASS_CACHE", cache_dir())
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| HassError::io(&script, e))?;
    if !status.success() || !asset.is_cached() {
        return Err(HassError::InvalidArgument(format!(
            "fetching {} failed ({status}); run `{} {}` by hand to see why",
            asset.file_name(),
            script.display(),
            asset.script_name()
        )));
    }
    Ok(path)
}
