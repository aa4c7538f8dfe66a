//! Hugging Face tokenizers built from plain vocabulary lists, as GGUF files store
//! them (`tokenizer.ggml.*`), with no `tokenizer.json` at hand.
//!
//! Two families are covered, the ones llama.cpp calls `gpt2` and `llama`:
//!
//! * [`gpt2_bpe`]: byte-level BPE with ranked merges (GPT-2, LLaMA-3, Qwen2,
//!   SmolLM, StarCoder, ...). The text is split by the pre-tokenizer regexes that
//!   llama.cpp's `llama-vocab.cpp` uses for the `tokenizer.ggml.pre` name (each regex
//!   splits the pieces of the previous one, keeping matches and the text between them
//!   as pieces), then mapped to GPT-2's byte alphabet and merged by rank.
//! * [`llama_spm`]: LLaMA-2 style SentencePiece BPE. As `transformers`' LlamaConverter
//!   and its GGUF loader do, it is a BPE model with `<0xNN>` byte fallback whose merges
//!   are every split of a vocabulary piece into two vocabulary pieces, ranked by the
//!   score of the merged piece (SentencePiece merges the adjacent pair whose merged
//!   piece scores highest, which is the same greedy order).
//!
//! Both are checked against the `.inp`/`.out` test vectors llama.cpp ships with its
//! vocabulary GGUFs (ids from Hugging Face `tokenizers`), see
//! `hass-models/tests/gguf_tokenizer.rs`.
//!
//! Token types follow GGUF / llama.cpp: 1 normal, 2 unknown, 3 control, 4
//! user-defined, 5 unused, 6 byte. Control and unknown tokens become special added
//! tokens (matched in the text as one id, dropped by `decode(.., true)`);
//! user-defined tokens become non-special added tokens (matched as one id, always
//! decoded as text), which is how llama.cpp and `transformers` treat them.

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{HassError, Result};
use crate::tokenizer::Tokenizer;

/// GGUF token type of an ordinary vocabulary piece.
pub const TOKEN_TYPE_NORMAL: i32 = 1;
/// GGUF token type of the unknown token (`<unk>`).
pub const TOKEN_TYPE_UNKNOWN: i32 = 2;
/// GGUF token type of control tokens (`<s>`, `<|im_start|>`, ...).
pub const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF token type of user-defined added tokens.
pub const TOKEN_TYPE_USER_DEFINED: i32 = 4;
/// GGUF token type of unused (reserved) tokens.
pub const TOKEN_TYPE_UNUSED: i32 = 5;
/// GGUF token type of `<0xNN>` byte tokens.
pub const TOKEN_TYPE_BYTE: i32 = 6;

fn tok_err(msg: impl Into<String>) -> HassError {
    HassError::Tokenizer(msg.into())
}

// ---------------------------------------------------------------------------------
// Pre-tokenizer regexes (llama.cpp `llm_tokenizer_bpe`, src/llama-vocab.cpp).

const GPT2_RE: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const DEFAULT_RES: &[&str] = &[
    r"[\p{P}\$\+<=>\^~\|]+",
    GPT2_RE,
    r"\p{N}+",
    "[0-9][0-9][0-9]",
];
const FALCON_RES: &[&str] = &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2_RE, "[0-9][0-9][0-9]"];
const STARCODER_RES: &[&str] = &[r"\p{N}", GPT2_RE];
// Non-ASCII characters are escaped: several of them (U+1FDB, U+212A, ...) are
// changed by Unicode normalisation, which editors may apply to literal text.
const CJK_RE: &str = "[\u{4e00}-\u{9fa5}\u{800}-\u{4e00}\u{ac00}-\u{d7ff}]+";
const DEEPSEEK_CODER_RES: &[&str] = &["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", CJK_RE, r"\p{N}"];
const DEEPSEEK_LLM_RES: &[&str] = &[
    "[\r\n]",
    "\\s?[A-Za-z\u{b5}\u{c0}-\u{d6}\u{d8}-\u{f6}\u{f8}-\u{1ba}\u{1bc}-\u{1bf}\u{1c4}-\u{293}\u{295}-\u{2af}\u{370}-\u{373}\u{376}\u{377}\u{37b}-\u{37d}\u{37f}\u{386}\u{388}-\u{38a}\u{38c}\u{38e}-\u{3a1}\u{3a3}-\u{3f5}\u{3f7}-\u{481}\u{48a}-\u{52f}\u{531}-\u{556}\u{10a0}-\u{10c5}\u{13a0}-\u{13f5}\u{13f8}-\u{13fd}\u{1c90}-\u{1cba}\u{1cbd}-\u{1cbf}\u{1d00}-\u{1d2b}\u{1d6b}-\u{1d77}\u{1d79}-\u{1d9a}\u{1e00}-\u{1f15}\u{1f18}-\u{1f1d}\u{1f20}-\u{1f45}\u{1f48}-\u{1f4d}\u{1f50}-\u{1f57}\u{1f59}\u{1f5b}\u{1f5d}\u{1f5f}-\u{1f7d}\u{1f80}-\u{1fb4}\u{1fb6}-\u{1fbc}\u{1fbe}\u{1fc2}-\u{1fc4}\u{1fc6}-\u{1fcc}\u{1fd0}-\u{1fd3}\u{1fd6}-\u{1fdb}\u{1fe0}-\u{1fec}\u{1ff2}-\u{1ff4}\u{1ff6}-\u{1ffc}\u{2102}\u{2107}\u{210a}-\u{2113}\u{2115}\u{2119}-\u{211d}\u{2124}\u{2126}\u{2128}\u{212a}-\u{212d}\u{212f}-\u{2134}\u{2139}\u{213c}-\u{213f}\u{2145}-\u{2149}\u{214e}\u{2183}\u{2184}\u{2c00}-\u{2c7b}\u{2c7e}-\u{2ce4}\u{2ceb}-\u{2cee}\u{2cf2}\u{2cf3}\u{a640}-\u{a66d}\u{a680}-\u{a69b}\u{a722}-\u{a76f}\u{a771}-\u{a787}\u{a78b}-\u{a78e}\u{ab70}-\u{abbf}\u{fb00}-\u{fb06}\u{fb13}-\u{fb17}\u{ff21}-\u{ff3a}\u{ff41}-\u{ff5a}\u{10400}-\u{1044f}\u{104b0}-\u{104d3}\u{104d8}-\u{104fb}\u{10c80}-\u{10cb2}\u{10cc0}-\u{10cf2}\u{118a0}-\u{118df}\u{1e900}-\u{1e943}]+",
    "\\s?[!-/:-~\u{ff01}-\u{ff0f}\u{ff1a}-\u{ff5e}\u{2018}-\u{201f}\u{3000}-\u{3002}]+",
    r"\s+$",
    CJK_RE,
    r"\p{N}+",
];

/// How a `tokenizer.ggml.pre` name pre-tokenizes, per llama.cpp.
struct PreSpec {
    regexes: &'static [&'static str],
    /// A pre-token that is itself in the vocabulary is emitted without merging.
    ignore_merges: bool,
    /// The Hugging Face tokenizer NFC-normalises the text first (Qwen2).
    nfc: bool,
    /// llama.cpp adds BOS by default for this pre-tokenizer.
    add_bos: bool,
}

fn pre_spec(pre: &str) -> Option<PreSpec> {
    let spec = |regexes, ignore_merges, nfc, add_bos| PreSpec {
        regexes,
        ignore_merges,
        nfc,
        add_bos,
    };
    Some(match pre {
        "default" | "" => spec(DEFAULT_RES, false, false, false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => spec(&[LLAMA3_RE], true, false, true),
        "dbrx" | "smaug-bpe" => spec(&[LLAMA3_RE], false, false, false),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" => spec(&[QWEN2_RE], false, true, false),
        "stablelm2" => spec(&[QWEN2_RE], false, false, false),
        // Qwen3.5's tokenizer dropped Qwen2's NFC normalizer (llama.cpp's test
        // vectors for it keep combining marks apart).
        "qwen35" => spec(&[QWEN35_RE], false, false, false),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "modern-bert" | "mpt" | "olmo" | "jais" | "trillion"
        | "exaone4" | "jina-v1-en" | "jina-v2-code" | "roberta-bpe" => {
            spec(&[GPT2_RE], false, false, false)
        }
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => spec(STARCODER_RES, false, false, false),
        "falcon" => spec(FALCON_RES, false, false, false),
        "deepseek-coder" => spec(DEEPSEEK_CODER_RES, false, false, false),
        "deepseek-llm" => spec(DEEPSEEK_LLM_RES, false, false, false),
        _ => return None,
    })
}

/// The `tokenizer.ggml.pre` names [`gpt2_bpe`] accepts (llama.cpp aliases included).
pub fn supported_bpe_pre_tokenizers() -> &'static [&'static str] {
    &[
        "default",
        "llama3",
        "llama-v3",
        "llama-bpe",
        "falcon3",
        "falcon-h1",
        "pixtral",
        "midm-2.0",
        "lfm2",
        "jina-v5-nano",
        "dbrx",
        "smaug-bpe",
        "qwen2",
        "deepseek-r1-qwen",
        "kormo",
        "f2llmv2",
        "stablelm2",
        "qwen35",
        "gpt-2",
        "phi-2",
        "jina-es",
        "jina-de",
        "gigachat",
        "jina-v2-es",
        "jina-v2-de",
        "a.x-4.0",
        "mellum",
        "modern-bert",
        "mpt",
        "olmo",
        "jais",
        "trillion",
        "exaone4",
        "jina-v1-en",
        "jina-v2-code",
        "roberta-bpe",
        "starcoder",
        "refact",
        "command-r",
        "smollm",
        "codeshell",
        "exaone",
        "minerva-7b",
        "mellum2",
        "falcon",
        "deepseek-coder",
        "deepseek-llm",
    ]
}

/// Whether llama.cpp adds BOS by default (no `tokenizer.ggml.add_bos_token`) for a
/// byte-level BPE vocabulary with this pre-tokenizer: true for the LLaMA-3 family.
pub fn gpt2_pre_default_add_bos(pre: &str) -> bool {
    pre_spec(pre).is_some_and(|s| s.add_bos)
}

// ---------------------------------------------------------------------------------
// Shared pieces.

/// Token strings as the vocabulary map sees them: llama.cpp renames empty tokens to
/// `[EMPTY_<id>]`.
fn token_texts(tokens: &[String]) -> Result<Vec<String>> {
    if tokens.is_empty() {
        return Err(tok_err("the vocabulary has no tokens"));
    }
    if u32::try_from(tokens.len()).is_err() {
        return Err(tok_err(format!(
            "{} tokens do not fit u32 ids",
            tokens.len()
        )));
    }
    Ok(tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if t.is_empty() {
                format!("[EMPTY_{i}]")
            } else {
                t.clone()
            }
        })
        .collect())
}

/// token → id; for duplicated strings the last id wins, as in llama.cpp.
fn vocab_map(tokens: &[String]) -> HashMap<&str, u32> {
    let mut map = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        map.insert(t.as_str(), i as u32);
    }
    map
}

fn bpe_vocab(tokens: &[String]) -> Vocab {
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect()
}

fn check_types(token_types: &[i32], n_tokens: usize) -> Result<()> {
    if token_types.len() != n_tokens {
        return Err(tok_err(format!(
            "token_type has {} entries but there are {n_tokens} tokens",
            token_types.len()
        )));
    }
    Ok(())
}

/// Registers control/unknown tokens as special added tokens and user-defined tokens
/// as plain added tokens (neither is touched by the normalizer).
fn add_added_tokens(
    tok: &mut tokenizers::Tokenizer,
    tokens: &[String],
    token_types: Option<&[i32]>,
) {
    let Some(types) = token_types else { return };
    let mut special = Vec::new();
    let mut user = Vec::new();
    for (t, &ty) in tokens.iter().zip(types) {
        match ty {
            TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN => {
                special.push(AddedToken::from(t.clone(), true).normalized(false))
            }
            TOKEN_TYPE_USER_DEFINED => {
                user.push(AddedToken::from(t.clone(), false).normalized(false))
            }
            _ => {}
        }
    }
    if !special.is_empty() {
        tok.add_special_tokens(&special);
    }
    if !user.is_empty() {
        tok.add_tokens(&user);
    }
}

/// A post-processor prepending `bos` and/or appending `eos` when encoding with
/// `add_special_tokens = true`; `None` when neither is set.
fn bos_eos_processor(
    tokens: &[String],
    bos: Option<u32>,
    eos: Option<u32>,
) -> Result<Option<TemplateProcessing>> {
    if bos.is_none() && eos.is_none() {
        return Ok(None);
    }
    let mut specials = Vec::new();
    let mut single: Vec<String> = Vec::new();
    let mut pair: Vec<String> = Vec::new();
    let text = |id: u32, what: &str| -> Result<String> {
        tokens.get(id as usize).cloned().ok_or_else(|| {
            tok_err(format!(
                "{what} token id {id} is out of range for a vocabulary of {} tokens",
                tokens.len()
            ))
        })
    };
    if let Some(id) = bos {
        specials.push(
            SpecialToken::new("bos".into(), vec![id], vec![text(id, "BOS")?])
                .map_err(|e| tok_err(e.to_string()))?,
        );
        single.push("bos".into());
        pair.push("bos".into());
    }
    single.push("$A".into());
    pair.push("$A".into());
    if let Some(id) = eos {
        specials.push(
            SpecialToken::new("eos".into(), vec![id], vec![text(id, "EOS")?])
                .map_err(|e| tok_err(e.to_string()))?,
        );
        single.push("eos".into());
        pair.push("eos".into());
    }
    if bos.is_some() {
        pair.push("bos:1".into());
    }
    pair.push("$B:1".into());
    if eos.is_some() {
        pair.push("eos:1".into());
    }
    let processor = TemplateProcessing::builder()
        .try_single(single)
        .map_err(tok_err)?
        .try_pair(pair)
        .map_err(tok_err)?
        .special_tokens(specials)
        .build()
        .map_err(|e| tok_err(format!("BOS/EOS post-processor: {e}")))?;
    Ok(Some(processor))
}

/// Replaces the post-processor of `tokenizer` so that `encode(.., true)` prepends
/// `bos` and/or appends `eos` (e.g. for GGUFs with `tokenizer.ggml.add_eos_token`).
/// Copies the underlying tokenizer.
pub fn with_bos_eos(
    tokenizer: &Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
) -> Result<Tokenizer> {
    let mut inner = tokenizer.inner().clone();
    let n = inner.get_vocab_size(true);
    let mut tokens = vec![String::new(); n];
    for (t, id) in inner.get_vocab(true) {
        if let Some(slot) = tokens.get_mut(id as usize) {
            *slot = t;
        }
    }
    let processor = bos_eos_processor(&tokens, bos, eos)?;
    inner.with_post_processor(processor);
    Ok(Tokenizer::from_tokenizers(inner))
}

// ---------------------------------------------------------------------------------
// Byte-level BPE.

/// A byte-level BPE tokenizer (llama.cpp's `gpt2` vocabulary type).
///
/// * `tokens`: the vocabulary, id = index.
/// * `merges`: `"left right"` strings, highest priority first (GGUF
///   `tokenizer.ggml.merges`). Merges naming pieces that are not in the vocabulary
///   are skipped, as they could never apply.
/// * `token_types`: GGUF token types, one per token; control tokens become special
///   added tokens, user-defined ones plain added tokens. `None`: all normal.
/// * `pre`: `tokenizer.ggml.pre`, selecting the pre-tokenizer regexes (see
///   [`supported_bpe_pre_tokenizers`]); an unknown name is an error naming it.
/// * `add_bos`: BOS id that `encode(.., add_special_tokens = true)` prepends.
pub fn gpt2_bpe(
    tokens: &[String],
    merges: &[String],
    token_types: Option<&[i32]>,
    pre: &str,
    add_bos: Option<u32>,
) -> Result<Tokenizer> {
    let spec = pre_spec(pre).ok_or_else(|| {
        tok_err(format!(
            "unknown pre-tokenizer `{pre}` (tokenizer.ggml.pre); supported: {}",
            supported_bpe_pre_tokenizers().join(", ")
        ))
    })?;
    let tokens = token_texts(tokens)?;
    if let Some(types) = token_types {
        check_types(types, tokens.len())?;
    }
    let ids = vocab_map(&tokens);

    let mut pairs = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        // llama.cpp splits at the first space after the first byte.
        let pos = m
            .as_bytes()
            .iter()
            .skip(1)
            .position(|&b| b == b' ')
            .map(|p| p + 1)
            .ok_or_else(|| {
                tok_err(format!(
                    "merge {i} `{m}` has no space separating its two pieces"
                ))
            })?;
        let (a, b) = (&m[..pos], &m[pos + 1..]);
        if ids.contains_key(a)
            && ids.contains_key(b)
            && ids.contains_key(format!("{a}{b}").as_str())
        {
            pairs.push((a.to_string(), b.to_string()));
        }
    }

    let model = BPE::builder()
        .vocab_and_merges(bpe_vocab(&tokens), pairs)
        .ignore_merges(spec.ignore_merges)
        .build()
        .map_err(|e| tok_err(format!("cannot build the BPE model: {e}")))?;
    let mut tok = tokenizers::Tokenizer::new(model);

    if spec.nfc {
        tok.with_normalizer(Some(NormalizerWrapper::from(NFC)));
    }
    let mut pre_tokenizers = Vec::with_capacity(spec.regexes.len() + 1);
    for re in spec.regexes {
        let split = Split::new(
            SplitPattern::Regex((*re).to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| tok_err(format!("pre-tokenizer regex of `{pre}`: {e}")))?;
        pre_tokenizers.push(PreTokenizerWrapper::from(split));
    }
    // Bytes → GPT-2's printable alphabet; the splitting was done above.
    pre_tokenizers.push(PreTokenizerWrapper::from(ByteLevel::new(
        false, true, false,
    )));
    tok.with_pre_tokenizer(Some(PreTokenizerWrapper::from(PreTokenizerSequence::new(
        pre_tokenizers,
    ))));
    tok.with_decoder(Some(DecoderWrapper::from(ByteLevel::default())));
    tok.with_post_processor(bos_eos_processor(&tokens, add_bos, None)?);
    add_added_tokens(&mut tok, &tokens, token_types);
    Ok(Tokenizer::from_tokenizers(tok))
}

// ---------------------------------------------------------------------------------
// SentencePiece BPE.

/// Merges of a SentencePiece BPE vocabulary: every split of a mergeable piece into
/// two vocabulary pieces, ordered by the score of the merged piece (highest first),
/// ties as `transformers`' `generate_merges`: longer left piece, then longer right
/// piece, then vocabulary order.
fn spm_merges(
    tokens: &[String],
    scores: &[f32],
    token_types: &[i32],
    ids: &HashMap<&str, u32>,
) -> Vec<(String, String)> {
    struct Cand {
        score: f32,
        len_l: usize,
        len_r: usize,
        order: (u32, u32, u32),
        l: usize,
        r: usize,
    }
    let mut cands = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        // Control, unknown and byte tokens are never the result of a merge.
        if matches!(
            token_types[id],
            TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN | TOKEN_TYPE_BYTE
        ) {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = (&piece[..split], &piece[split..]);
            if let (Some(&il), Some(&ir)) = (ids.get(l), ids.get(r)) {
                cands.push(Cand {
                    score: scores[id],
                    len_l: l.chars().count(),
                    len_r: r.chars().count(),
                    order: (id as u32, il, ir),
                    l: il as usize,
                    r: ir as usize,
                });
            }
        }
    }
    cands.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.len_l.cmp(&a.len_l))
            .then(b.len_r.cmp(&a.len_r))
            .then(a.order.cmp(&b.order))
    });
    cands
        .into_iter()
        .map(|c| (tokens[c.l].clone(), tokens[c.r].clone()))
        .collect()
}

/// A LLaMA-2 style SentencePiece BPE tokenizer (llama.cpp's `llama` vocabulary
/// type) from its pieces, scores and token types.
///
/// The text is normalised as SentencePiece does (`▁` prepended when
/// `add_space_prefix`, spaces replaced by `▁`), pieces merge by score, and characters
/// outside the vocabulary fall back to `<0xNN>` byte tokens. Decoding reverses it and
/// strips the one leading space the prefix added.
///
/// * `scores` and `token_types` must have one entry per token.
/// * `add_bos`: BOS id that `encode(.., add_special_tokens = true)` prepends.
/// * `add_space_prefix`: GGUF `tokenizer.ggml.add_space_prefix` (default true).
pub fn llama_spm(
    tokens: &[String],
    scores: &[f32],
    token_types: &[i32],
    add_bos: Option<u32>,
    add_space_prefix: bool,
) -> Result<Tokenizer> {
    let tokens = token_texts(tokens)?;
    if scores.len() != tokens.len() {
        return Err(tok_err(format!(
            "scores has {} entries but there are {} tokens",
            scores.len(),
            tokens.len()
        )));
    }
    check_types(token_types, tokens.len())?;
    let ids = vocab_map(&tokens);
    let merges = spm_merges(&tokens, scores, token_types, &ids);

    let unk = token_types
        .iter()
        .position(|&t| t == TOKEN_TYPE_UNKNOWN)
        .map(|i| tokens[i].clone())
        .or_else(|| ids.contains_key("<unk>").then(|| "<unk>".to_string()));
    let mut builder = BPE::builder()
        .vocab_and_merges(bpe_vocab(&tokens), merges)
        .fuse_unk(true)
        .byte_fallback(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let model = builder
        .build()
        .map_err(|e| tok_err(format!("cannot build the BPE model: {e}")))?;
    let mut tok = tokenizers::Tokenizer::new(model);

    let replace_space = Replace::new(" ", "▁").map_err(|e| tok_err(e.to_string()))?;
    let normalizer = if add_space_prefix {
        NormalizerWrapper::from(NormalizerSequence::new(vec![
            NormalizerWrapper::from(Prepend::new("▁".into())),
            NormalizerWrapper::from(replace_space),
        ]))
    } else {
        NormalizerWrapper::from(replace_space)
    };
    tok.with_normalizer(Some(normalizer));

    let mut decoders = vec![
        DecoderWrapper::from(Replace::new("▁", " ").map_err(|e| tok_err(e.to_string()))?),
        DecoderWrapper::from(ByteFallback::new()),
        DecoderWrapper::from(Fuse::new()),
    ];
    if add_space_prefix {
        decoders.push(DecoderWrapper::from(Strip::new(' ', 1, 0)));
    }
    tok.with_decoder(Some(DecoderWrapper::from(DecoderSequence::new(decoders))));
    tok.with_post_processor(bos_eos_processor(&tokens, add_bos, None)?);
    add_added_tokens(&mut tok, &tokens, Some(token_types));
    Ok(Tokenizer::from_tokenizers(tok))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    /// GPT-2's byte → char table.
    fn byte_chars() -> Vec<String> {
        crate::tokenizer::tests::bytes_to_unicode()
            .iter()
            .map(char::to_string)
            .collect()
    }

    fn tiny_bpe(pre: &str, add_bos: Option<u32>) -> Result<Tokenizer> {
        let mut tokens = vec!["<|bos|>".to_string(), "<|user|>".to_string()];
        tokens.extend(byte_chars());
        tokens.extend(s(&["he", "ll", "hell", "hello", "Ġw", "Ġwo", "12"]));
        let merges = s(&["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o", "1 2", "x y"]);
        let mut types = vec![TOKEN_TYPE_NORMAL; tokens.len()];
        types[0] = TOKEN_TYPE_CONTROL;
        types[1] = TOKEN_TYPE_USER_DEFINED;
        gpt2_bpe(&tokens, &merges, Some(&types), pre, add_bos)
    }

    #[test]
    fn bpe_merges_specials_and_roundtrip() {
        let tok = tiny_bpe("gpt-2", None).unwrap();
        let hello = tok.token_to_id("hello").unwrap();
        let ids = tok.encode("hello world", false).unwrap();
        assert_eq!(ids[0], hello);
        assert_eq!(tok.id_to_token(ids[1]).as_deref(), Some("Ġwo"));
        assert_eq!(tok.decode(&ids, false).unwrap(), "hello world");
        // Control token: one id, skipped when decoding with skip_special_tokens.
        let ids = tok.encode("<|bos|>hello<|user|>", false).unwrap();
        assert_eq!(ids, vec![0, hello, 1]);
        assert_eq!(tok.decode(&ids, true).unwrap(), "hello<|user|>");
        assert_eq!(tok.decode(&ids, false).unwrap(), "<|bos|>hello<|user|>");
        // Multi-byte characters round-trip through byte tokens.
        let text = "héllo 😀\n\tx";
        assert_eq!(
            tok.decode(&tok.encode(text, false).unwrap(), false)
                .unwrap(),
            text
        );
        assert_eq!(tok.encode("hello", true).unwrap(), vec![hello]);
    }

    #[test]
    fn bpe_bos_and_digit_split() {
        let tok = tiny_bpe("smollm", Some(0)).unwrap();
        let ids = tok.encode("12", true).unwrap();
        // smollm splits every digit before merging: "12" never merges.
        assert_eq!(ids.len(), 3);
        assert_eq!(ids[0], 0);
        let gpt2 = tiny_bpe("gpt-2", None).unwrap();
        assert_eq!(
            gpt2.encode("12", false).unwrap(),
            vec![gpt2.token_to_id("12").unwrap()]
        );
        assert!(gpt2_pre_default_add_bos("llama-bpe"));
        assert!(!gpt2_pre_default_add_bos("smollm"));
    }

    #[test]
    fn bpe_errors() {
        let err = tiny_bpe("no-such-pre", None).unwrap_err();
        assert!(matches!(err, HassError::Tokenizer(_)));
        assert!(err.to_string().contains("no-such-pre"), "{err}");
        let err = gpt2_bpe(&s(&["a"]), &s(&["ab"]), None, "gpt-2", None).unwrap_err();
        assert!(err.to_string().contains("merge 0"), "{err}");
        let err = gpt2_bpe(&s(&["a", "b"]), &[], Some(&[1]), "gpt-2", None).unwrap_err();
        assert!(err.to_string().contains("token_type"), "{err}");
        let err = gpt2_bpe(&[], &[], None, "gpt-2", None).unwrap_err();
        assert!(err.to_string().contains("no tokens"), "{err}");
        let err = tiny_bpe("gpt-2", Some(100_000)).unwrap_err();
        assert!(err.to_string().contains("BOS"), "{err}");
    }

    fn tiny_spm(add_space_prefix: bool) -> Tokenizer {
        let mut tokens = s(&["<unk>", "<s>", "</s>"]);
        let mut types = vec![TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL];
        let mut scores = vec![0.0; 3];
        for b in 0..256 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(TOKEN_TYPE_BYTE);
            scores.push(0.0);
        }
        // Scores decide the merge order: "ab" (-1) beats "bc" (-2), so "abc" → ab|c.
        for (i, p) in ["▁", "a", "b", "c", "ab", "bc", "▁ab"].iter().enumerate() {
            tokens.push(p.to_string());
            types.push(TOKEN_TYPE_NORMAL);
            scores.push(match *p {
                "ab" => -1.0,
                "bc" => -2.0,
                "▁ab" => -3.0,
                _ => -10.0 - i as f32,
            });
        }
        llama_spm(&tokens, &scores, &types, Some(1), add_space_prefix).unwrap()
    }

    #[test]
    fn spm_merges_by_score_with_byte_fallback() {
        let tok = tiny_spm(true);
        let id = |t: &str| tok.token_to_id(t).unwrap();
        assert_eq!(tok.encode("abc", false).unwrap(), vec![id("▁ab"), id("c")]);
        assert_eq!(tok.encode("bc", false).unwrap(), vec![id("▁"), id("bc")]);
        assert_eq!(tok.encode("abc", true).unwrap()[0], 1);
        // "é" is not in the vocabulary: UTF-8 bytes.
        assert_eq!(
            tok.encode("é", false).unwrap(),
            vec![id("▁"), id("<0xC3>"), id("<0xA9>")]
        );
        for text in ["abc bc", " abc", "é a\n", ""] {
            let ids = tok.encode(text, true).unwrap();
            assert_eq!(tok.decode(&ids, true).unwrap(), text);
        }
        // Special tokens in text are one id.
        assert_eq!(tok.encode("</s>", false).unwrap(), vec![2]);
        let no_prefix = tiny_spm(false);
        assert_eq!(
            no_prefix.encode("abc", false).unwrap(),
            vec![id("ab"), id("c")]
        );
        assert_eq!(
            no_prefix
                .decode(&no_prefix.encode(" a", false).unwrap(), false)
                .unwrap(),
            " a"
        );
    }

    #[test]
    fn spm_length_errors() {
        let tokens = s(&["<unk>", "a"]);
        let err = llama_spm(&tokens, &[0.0], &[2, 1], None, true).unwrap_err();
        assert!(err.to_string().contains("scores has 1 entries"), "{err}");
        let err = llama_spm(&tokens, &[0.0, 0.0], &[2], None, true).unwrap_err();
        assert!(
            err.to_string().contains("token_type has 1 entries"),
            "{err}"
        );
    }

    #[test]
    fn with_bos_eos_appends() {
        let tok = tiny_spm(true);
        let both = with_bos_eos(&tok, Some(1), Some(2)).unwrap();
        let ids = both.encode("ab", true).unwrap();
        assert_eq!(ids.first(), Some(&1));
        assert_eq!(ids.last(), Some(&2));
        let none = with_bos_eos(&tok, None, None).unwrap();
        assert_eq!(
            none.encode("ab", true).unwrap(),
            tok.encode("ab", false).unwrap()
        );
    }
}
