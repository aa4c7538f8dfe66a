//! Fuzz harnesses for every reader of untrusted input in hass: GGUF files and their
//! dequantisation, safetensors model directories, the GGUF tokenizer builders, chat
//! templates and draft-head directories.
//!
//! Each harness takes arbitrary bytes and must return without panicking, hanging or
//! allocating without bound: a parser answers bad input with an error. The
//! `fuzz/fuzz_targets/` binaries (cargo-fuzz) hand libFuzzer's inputs to them;
//! `tests/replay.rs` runs the seed corpus (`fuzz/corpus/<target>/`) and every input
//! that once crashed (`fuzz/regressions/<target>/`) through them on stable Rust as
//! part of `cargo test --workspace`, so CI needs no nightly.
//!
//! Inputs made of several files or strings use [`parts`]: each part is a
//! little-endian `u32` length followed by that many bytes (the last part may be
//! short), which keeps the seeds easy to write (`fuzz/make_seeds.py`) and lets the fuzzer
//! mutate each part on its own.

use std::cell::OnceCell;
use std::path::Path;

use hass_core::chat::{ChatMessage, ChatTemplate};
use hass_core::tokenizer::Tokenizer;
use hass_core::tokenizer_builders::{gpt2_bpe, llama_spm, supported_bpe_pre_tokenizers};
use hass_models::gguf::{config_from_gguf, dequantize_raw, GgmlType, GgufFile, GgufWeights};
use hass_models::gguf_tokenizer::{chat_template_from_gguf, tokenizer_from_gguf};
use hass_models::{load_hf_model, DraftHead, Llama, WeightSource};

type B = burn::backend::Flex;

/// Tensors larger than this are not read back: a fuzzed header may declare a tensor
/// far larger than the file, which the readers must reject, but a legitimate one
/// just as large would only slow the fuzzer down.
const MAX_READ_ELEMENTS: usize = 1 << 16;

/// Splits `data` into length-prefixed parts (see the crate docs).
pub fn parts(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let len = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let rest = &data[4..];
        let (part, tail) = rest.split_at(len.min(rest.len()));
        out.push(part);
        data = tail;
    }
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Encodes and decodes `sample` (also streamed token by token): what generation does
/// with a tokenizer read from a file.
fn exercise_tokenizer(tok: &Tokenizer, sample: &str) {
    let Ok(ids) = tok.encode(sample, true) else {
        return;
    };
    let _ = tok.decode(&ids, true);
    let _ = tok.decode(&ids, false);
    let mut stream = tok.stream(true);
    for &id in &ids {
        if stream.push(id).is_err() {
            return;
        }
    }
    let _ = stream.finish();
}

/// Reads every small tensor of `source`, as floats and as ids.
fn read_all(source: &dyn WeightSource) {
    for name in source.tensor_names() {
        let small = source.shape(&name).is_some_and(|s| {
            s.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) <= Some(MAX_READ_ELEMENTS)
        });
        if small {
            let _ = source.read_f32(&name);
            let _ = source.read_ids(&name);
        }
    }
}

/// A GGUF file (input starting with `GGUF`): header, metadata, model config,
/// tokenizer, chat template, tensor dequantisation and the full model load.
/// Anything else is one dequantisation: the first byte is the ggml type id and the
/// rest its blocks.
pub fn gguf(data: &[u8]) {
    if !data.starts_with(b"GGUF") {
        if let Some((&ty, blocks)) = data.split_first() {
            if let Some(ty) = GgmlType::from_id(u32::from(ty)) {
                let n = blocks.len() / ty.type_size().max(1) * ty.block_size();
                let _ = dequantize_raw(ty, blocks, n);
                let _ = dequantize_raw(ty, blocks, n + 1);
            }
        }
        return;
    }
    let Ok(file) = GgufFile::from_bytes(data.to_vec(), "fuzz.gguf") else {
        return;
    };
    let _ = config_from_gguf(&file);
    if let Ok(tok) = tokenizer_from_gguf(&file) {
        exercise_tokenizer(&tok, "Hello world! 123 <s> ünïcödé\n\t  x");
    }
    if let Some(src) = chat_template_from_gguf(&file) {
        if let Ok(t) = ChatTemplate::new(src, Some("<s>"), Some("</s>")) {
            let _ = t.render(&[ChatMessage::user("hi")], true);
        }
    }
    for info in file.tensors() {
        if info.n_elements() <= MAX_READ_ELEMENTS {
            let _ = file.dequantize_info(info);
        }
    }
    let Ok(weights) = GgufWeights::from_file(file) else {
        return;
    };
    read_all(&weights);
    let config = weights.config().clone();
    let _ = Llama::<B>::load(&weights, config, &Default::default());
}

/// Writes `files` (name, contents) into a fresh temporary directory.
fn write_dir(files: &[(&str, &[u8])]) -> Option<tempfile::TempDir> {
    // /dev/shm keeps the fuzzer's many small writes off the disk where it exists.
    let dir = if Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm")
    } else {
        tempfile::tempdir()
    }
    .ok()?;
    for (name, bytes) in files {
        std::fs::write(dir.path().join(name), bytes).ok()?;
    }
    Some(dir)
}

/// A Hugging Face model directory: part 0 is `config.json`, part 1 the
/// `model.safetensors.index.json` (empty: a single `model.safetensors`, part 2), and
/// parts 2.. the shards `model-0000N.safetensors`. The directory is opened, every
/// small tensor read, and the model loaded from it.
pub fn safetensors_dir(data: &[u8]) {
    let p = parts(data);
    let (Some(config), Some(index)) = (p.first(), p.get(1)) else {
        return;
    };
    let names: Vec<String> = (0..p.len().saturating_sub(2))
        .map(|i| format!("model-{:05}.safetensors", i + 1))
        .collect();
    let mut files: Vec<(&str, &[u8])> = vec![("config.json", config)];
    if index.is_empty() {
        files.push(("model.safetensors", p.get(2).copied().unwrap_or_default()));
    } else {
        files.push(("model.safetensors.index.json", index));
        files.extend(names.iter().map(String::as_str).zip(p[2..].iter().copied()));
    }
    let Some(dir) = write_dir(&files) else {
        return;
    };
    if let Ok(st) = hass_models::SafetensorsDir::open(dir.path()) {
        read_all(&st);
    }
    let _ = load_hf_model::<B>(dir.path(), &Default::default());
}

/// A tokenizer built as from GGUF vocabulary metadata. Part 0: byte 0 selects the
/// builder (even: byte-level BPE, odd: SentencePiece), byte 1 the BPE pre-tokenizer,
/// byte 2 flags (bit 0: add BOS, bit 1: add a space prefix, bit 2: token types
/// given). Part 1: the tokens, one per line. Part 2: BPE merges, one per line, or
/// SentencePiece scores as little-endian f32s. Part 3: token types, one signed byte
/// each. Part 4: text to encode and decode.
pub fn tokenizer(data: &[u8]) {
    let p = parts(data);
    let get = |i: usize| p.get(i).copied().unwrap_or_default();
    let (sel, pre, flags) = match get(0) {
        [a, b, c, ..] => (*a, *b, *c),
        _ => return,
    };
    let tokens: Vec<String> = text(get(1)).split('\n').map(str::to_owned).collect();
    let types: Vec<i32> = get(3).iter().map(|&b| i32::from(b as i8)).collect();
    let add_bos = (flags & 1 != 0).then_some(0);
    let built = if sel % 2 == 0 {
        let merges: Vec<String> = text(get(2)).split('\n').map(str::to_owned).collect();
        let pres = supported_bpe_pre_tokenizers();
        let pre = pres[usize::from(pre) % pres.len()];
        let types = (flags & 4 != 0).then_some(types.as_slice());
        gpt2_bpe(&tokens, &merges, types, pre, add_bos)
    } else {
        let scores: Vec<f32> = get(2)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        llama_spm(&tokens, &scores, &types, add_bos, flags & 2 != 0)
    };
    if let Ok(tok) = built {
        exercise_tokenizer(&tok, &text(get(4)));
    }
}

/// A chat template (part 0) rendered with the messages in parts 1.. (role, content
/// pairs), with and without the generation prompt, and with extra variables.
pub fn chat_template(data: &[u8]) {
    let p = parts(data);
    let Some(source) = p.first() else {
        return;
    };
    let Ok(template) = ChatTemplate::new(text(source), Some("<s>"), Some("</s>")) else {
        return;
    };
    let messages: Vec<ChatMessage> = p[1..]
        .chunks(2)
        .map(|m| ChatMessage::new(text(m[0]), text(m.get(1).copied().unwrap_or_default())))
        .collect();
    let _ = template.render(&messages, true);
    let _ = template.render(&messages, false);
    let _ = template.render_with(&messages, true, [("tools", "[]"), ("bos_token", "")]);
}

/// The small LLaMA-3-style target of the repository's test fixtures, loaded once per
/// thread (Burn tensors are not `Sync`).
fn with_target(f: impl FnOnce(&Llama<B>)) {
    thread_local! {
        static TARGET: OnceCell<Llama<B>> = const { OnceCell::new() };
    }
    TARGET.with(|cell| {
        let target = cell.get_or_init(|| {
            let dir = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../tests/fixtures/models/llama3"
            );
            load_hf_model::<B>(dir, &Default::default()).expect("the llama3 test fixture loads")
        });
        f(target)
    });
}

/// A draft-head directory for the llama3 fixture target: part 0 is `config.json`,
/// part 1 `model.safetensors`.
pub fn draft_head(data: &[u8]) {
    let p = parts(data);
    let (Some(config), Some(weights)) = (p.first(), p.get(1)) else {
        return;
    };
    let Some(dir) = write_dir(&[("config.json", config), ("model.safetensors", weights)]) else {
        return;
    };
    with_target(|target| {
        let _ = DraftHead::load(dir.path(), target);
    });
}
