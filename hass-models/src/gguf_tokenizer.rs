//! The tokenizer, chat template and special token ids stored in a GGUF file's
//! metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`), read the way llama.cpp
//! reads them and turned into a Hugging Face tokenizer by
//! [`hass_core::tokenizer_builders`].
//!
//! Supported `tokenizer.ggml.model` values: `gpt2` (byte-level BPE: GPT-2, LLaMA-3,
//! Qwen2, SmolLM, ...) and `llama` (SentencePiece BPE with byte fallback: LLaMA-2,
//! Mistral v0.1, Phi-3, ...). Others (`bert`, `t5`, `rwkv`, ...) are an error.

use hass_core::tokenizer_builders::{
    gpt2_bpe, gpt2_pre_default_add_bos, llama_spm, with_bos_eos, TOKEN_TYPE_BYTE,
    TOKEN_TYPE_CONTROL, TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNKNOWN,
};
use hass_core::{HassError, Result, Tokenizer};

use crate::gguf::GgufFile;

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
const KEY_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// Token texts llama.cpp treats as "end of turn" / "end of generation" when the
/// metadata does not name them (a subset of its list in `llama-vocab.cpp`; the first
/// present one of [`EOT_TEXTS`] becomes `eot`).
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
];
const EXTRA_EOG_TEXTS: &[&str] = &["<|eom_id|>", "</s>"];

/// The vocabulary family of a GGUF tokenizer (`tokenizer.ggml.model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufTokenizerKind {
    /// `gpt2`: byte-level BPE with merges.
    Gpt2Bpe,
    /// `llama`: SentencePiece BPE with scores and byte fallback.
    LlamaSpm,
}

/// Special token ids from a GGUF file's metadata, with llama.cpp's defaults and
/// fallbacks. Ids outside the vocabulary are dropped (`None`), as llama.cpp does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufSpecialTokens {
    /// `tokenizer.ggml.bos_token_id` (default 1 for `llama` vocabularies).
    pub bos: Option<u32>,
    /// `tokenizer.ggml.eos_token_id` (default 2 for `llama` vocabularies).
    pub eos: Option<u32>,
    /// `tokenizer.ggml.eot_token_id`, else the first of `<|eot_id|>`, `<|im_end|>`,
    /// `<|end|>`, `<end_of_turn>`, `<|endoftext|>`, ... present in the vocabulary.
    pub eot: Option<u32>,
    /// `tokenizer.ggml.eom_token_id`, else `<|eom_id|>` if present.
    pub eom: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id` (default 0 for `llama` vocabularies).
    pub unk: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad: Option<u32>,
    /// Every id that ends generation: eos, eot, eom and the tokens llama.cpp
    /// recognises by text (`<|im_end|>`, `<|eot_id|>`, `<|endoftext|>`, ...). Sorted.
    pub eog: Vec<u32>,
    /// Whether encoding with special tokens prepends BOS
    /// (`tokenizer.ggml.add_bos_token`; default: true for `llama`, for `gpt2` true only
    /// for the LLaMA-3 pre-tokenizers, as in llama.cpp).
    pub add_bos: bool,
    /// Whether encoding with special tokens appends EOS (`tokenizer.ggml.add_eos_token`).
    pub add_eos: bool,
}

fn tok_err(file: &GgufFile, msg: impl std::fmt::Display) -> HassError {
    HassError::Tokenizer(format!("{}: {msg}", file.name()))
}

/// The kind named by `tokenizer.ggml.model`; an error for a missing key or a model
/// hass cannot build.
pub fn tokenizer_kind(file: &GgufFile) -> Result<GgufTokenizerKind> {
    if !file.contains_key(KEY_MODEL) {
        return Err(tok_err(
            file,
            format!("no tokenizer in the file (`{KEY_MODEL}` is missing)"),
        ));
    }
    match file.get_str(KEY_MODEL)? {
        "gpt2" => Ok(GgufTokenizerKind::Gpt2Bpe),
        "llama" => Ok(GgufTokenizerKind::LlamaSpm),
        other => Err(tok_err(
            file,
            format!(
                "unsupported tokenizer model `{other}` ({KEY_MODEL}); hass builds `gpt2` (byte-level BPE) \
                 and `llama` (SentencePiece BPE) vocabularies"
            ),
        )),
    }
}

fn get_bool_or(file: &GgufFile, key: &str, default: bool) -> Result<bool> {
    if file.contains_key(key) {
        file.get_bool(key)
    } else {
        Ok(default)
    }
}

fn tokens(file: &GgufFile) -> Result<&[String]> {
    if !file.contains_key(KEY_TOKENS) {
        return Err(tok_err(
            file,
            format!("`{KEY_TOKENS}` is missing: the file holds no vocabulary"),
        ));
    }
    file.get_str_array(KEY_TOKENS)
}

fn check_len(file: &GgufFile, key: &str, len: usize, n_tokens: usize) -> Result<()> {
    if len != n_tokens {
        return Err(tok_err(
            file,
            format!("`{key}` has {len} entries but `{KEY_TOKENS}` has {n_tokens}"),
        ));
    }
    Ok(())
}

/// `tokenizer.ggml.scores`: f32 (or, as llama.cpp also accepts, integer) entries.
fn scores(file: &GgufFile, n_tokens: usize) -> Result<Vec<f32>> {
    let array = file.get_array(KEY_SCORES)?;
    check_len(file, KEY_SCORES, array.len(), n_tokens)?;
    if let Some(v) = array.as_f32s() {
        return Ok(v.to_vec());
    }
    match array.to_integers() {
        Some(v) => Ok(v.into_iter().map(|i| i as f32).collect()),
        None => Err(tok_err(
            file,
            format!(
                "`{KEY_SCORES}` should hold f32 values, found {:?}",
                array.elem_type()
            ),
        )),
    }
}

fn token_types(file: &GgufFile, n_tokens: usize) -> Result<Option<Vec<i32>>> {
    if !file.contains_key(KEY_TOKEN_TYPE) {
        return Ok(None);
    }
    let array = file.get_array(KEY_TOKEN_TYPE)?;
    check_len(file, KEY_TOKEN_TYPE, array.len(), n_tokens)?;
    let ints = array.to_integers().ok_or_else(|| {
        tok_err(
            file,
            format!(
                "`{KEY_TOKEN_TYPE}` should hold integers, found {:?}",
                array.elem_type()
            ),
        )
    })?;
    ints.into_iter()
        .map(|i| {
            i32::try_from(i).map_err(|_| {
                tok_err(
                    file,
                    format!("`{KEY_TOKEN_TYPE}` value {i} does not fit i32"),
                )
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// An optional id key; out-of-range or negative ids count as absent.
fn opt_id(file: &GgufFile, key: &str, n_tokens: usize, default: Option<u32>) -> Option<u32> {
    let id = match file.get(key) {
        Some(v) => v.as_integer().and_then(|i| u32::try_from(i).ok()),
        None => default,
    };
    id.filter(|&id| (id as usize) < n_tokens)
}

/// Special token ids and BOS/EOS flags of the file's tokenizer.
pub fn special_tokens_from_gguf(file: &GgufFile) -> Result<GgufSpecialTokens> {
    let kind = tokenizer_kind(file)?;
    let tokens = tokens(file)?;
    special_tokens_for(file, kind, tokens)
}

fn special_tokens_for(
    file: &GgufFile,
    kind: GgufTokenizerKind,
    tokens: &[String],
) -> Result<GgufSpecialTokens> {
    let n = tokens.len();
    let spm = kind == GgufTokenizerKind::LlamaSpm;
    let bos = opt_id(file, "tokenizer.ggml.bos_token_id", n, spm.then_some(1));
    let eos = opt_id(file, "tokenizer.ggml.eos_token_id", n, spm.then_some(2));
    let unk = opt_id(file, "tokenizer.ggml.unknown_token_id", n, spm.then_some(0));
    let pad = opt_id(file, "tokenizer.ggml.padding_token_id", n, None);
    let find = |text: &str| tokens.iter().position(|t| t == text).map(|i| i as u32);
    let eot = opt_id(file, "tokenizer.ggml.eot_token_id", n, None)
        .or_else(|| EOT_TEXTS.iter().find_map(|t| find(t)));
    let eom = opt_id(file, "tokenizer.ggml.eom_token_id", n, None).or_else(|| find("<|eom_id|>"));
    let mut eog: Vec<u32> = EOT_TEXTS
        .iter()
        .chain(EXTRA_EOG_TEXTS)
        .filter_map(|t| find(t))
        .chain([eos, eot, eom].into_iter().flatten())
        .collect();
    eog.sort_unstable();
    eog.dedup();
    let default_add_bos = match kind {
        GgufTokenizerKind::LlamaSpm => true,
        GgufTokenizerKind::Gpt2Bpe => {
            let pre = if file.contains_key(KEY_PRE) {
                file.get_str(KEY_PRE)?
            } else {
                "default"
            };
            gpt2_pre_default_add_bos(pre)
        }
    };
    Ok(GgufSpecialTokens {
        bos,
        eos,
        eot,
        eom,
        unk,
        pad,
        eog,
        add_bos: get_bool_or(file, KEY_ADD_BOS, default_add_bos)?,
        add_eos: get_bool_or(file, KEY_ADD_EOS, false)?,
    })
}

/// Builds the tokenizer stored in `file`'s metadata.
///
/// * `gpt2`: `tokens`, `merges` (required), `token_type` (optional), `pre` (default
///   `default`, as llama.cpp); see [`hass_core::tokenizer_builders::gpt2_bpe`].
/// * `llama`: `tokens`, `scores` (required), `token_type` (optional: without it, byte
///   tokens are recognised by their `<0xNN>` form and bos/eos/unk are control
///   tokens), `add_space_prefix` (default true); see
///   [`hass_core::tokenizer_builders::llama_spm`].
///
/// `encode(text, true)` adds BOS / EOS as `add_bos_token` / `add_eos_token` say
/// (see [`GgufSpecialTokens::add_bos`]).
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<Tokenizer> {
    let kind = tokenizer_kind(file)?;
    let tokens = tokens(file)?;
    let n = tokens.len();
    let special = special_tokens_for(file, kind, tokens)?;
    let bos = if special.add_bos {
        Some(special.bos.ok_or_else(|| {
            tok_err(
                file,
                format!(
                    "`{KEY_ADD_BOS}` is set but there is no valid `tokenizer.ggml.bos_token_id`"
                ),
            )
        })?)
    } else {
        None
    };
    let wrap = |e: HassError| match e {
        HassError::Tokenizer(msg) => tok_err(file, msg),
        other => other,
    };
    let tokenizer = match kind {
        GgufTokenizerKind::Gpt2Bpe => {
            if !file.contains_key(KEY_MERGES) {
                return Err(tok_err(
                    file,
                    format!("`{KEY_MERGES}` is missing (needed by a `gpt2` tokenizer)"),
                ));
            }
            let merges = file.get_str_array(KEY_MERGES)?;
            let types = token_types(file, n)?;
            let pre = if file.contains_key(KEY_PRE) {
                file.get_str(KEY_PRE)?
            } else {
                "default"
            };
            gpt2_bpe(tokens, merges, types.as_deref(), pre, bos).map_err(wrap)?
        }
        GgufTokenizerKind::LlamaSpm => {
            if !file.contains_key(KEY_SCORES) {
                return Err(tok_err(
                    file,
                    format!("`{KEY_SCORES}` is missing (needed by a `llama` tokenizer)"),
                ));
            }
            let scores = scores(file, n)?;
            let types = match token_types(file, n)? {
                Some(t) => t,
                None => infer_spm_types(tokens, &special),
            };
            let add_space_prefix = get_bool_or(file, KEY_ADD_SPACE_PREFIX, true)?;
            llama_spm(tokens, &scores, &types, bos, add_space_prefix).map_err(wrap)?
        }
    };
    if special.add_eos {
        let eos = special.eos.ok_or_else(|| {
            tok_err(
                file,
                format!(
                    "`{KEY_ADD_EOS}` is set but there is no valid `tokenizer.ggml.eos_token_id`"
                ),
            )
        })?;
        return with_bos_eos(&tokenizer, bos, Some(eos)).map_err(wrap);
    }
    Ok(tokenizer)
}

/// Token types for a `llama` vocabulary without `token_type`: `<0xNN>` pieces are
/// bytes, bos/eos are control, unk is unknown, the rest normal.
fn infer_spm_types(tokens: &[String], special: &GgufSpecialTokens) -> Vec<i32> {
    let is_byte = |t: &str| {
        t.len() == 6
            && t.starts_with("<0x")
            && t.ends_with('>')
            && t[3..5].chars().all(|c| c.is_ascii_hexdigit())
    };
    let mut types: Vec<i32> = tokens
        .iter()
        .map(|t| {
            if is_byte(t) {
                TOKEN_TYPE_BYTE
            } else {
                TOKEN_TYPE_NORMAL
            }
        })
        .collect();
    for id in [special.bos, special.eos].into_iter().flatten() {
        types[id as usize] = TOKEN_TYPE_CONTROL;
    }
    if let Some(id) = special.unk {
        types[id as usize] = TOKEN_TYPE_UNKNOWN;
    }
    types
}

/// The Jinja chat template (`tokenizer.chat_template`), if the file has one.
pub fn chat_template_from_gguf(file: &GgufFile) -> Option<String> {
    file.get(KEY_CHAT_TEMPLATE)
        .and_then(|v| v.as_str())
        .map(str::to_owned)
}
