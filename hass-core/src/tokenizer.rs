//! Text ⇄ token ids through a Hugging Face `tokenizer.json`, and an incremental
//! detokenizer for streaming generated text.
//!
//! Streaming cannot decode one token at a time: byte-level BPE (LLaMA-3, Qwen) and
//! byte-fallback (LLaMA-2) vocabularies split one multi-byte character over several
//! tokens, and SentencePiece-style decoders strip or merge spaces depending on the
//! neighbouring tokens. [`TokenStream`] therefore decodes a small window of recent
//! tokens and emits only the text that is complete, as text-generation-inference does.

use std::path::Path;
use std::sync::Arc;

use crate::error::{HassError, Result};

/// A Hugging Face tokenizer. Cloning is cheap (the vocabulary is shared), so a
/// [`TokenStream`] can own one.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

fn tok_err(context: &str, e: impl std::fmt::Display) -> HassError {
    HassError::Tokenizer(format!("{context}: {e}"))
}

impl Tokenizer {
    /// Loads a `tokenizer.json`. A missing file is an I/O error naming the path; a
    /// file the `tokenizers` crate cannot parse is a [`HassError::Tokenizer`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| HassError::io(path, e))?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            HassError::Tokenizer(msg) => HassError::Tokenizer(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parses the JSON text of a `tokenizer.json`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| tok_err("cannot parse tokenizer.json", e))?;
        Ok(Self::from_tokenizers(inner))
    }

    /// Wraps an already-built `tokenizers::Tokenizer`.
    pub fn from_tokenizers(inner: tokenizers::Tokenizer) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The wrapped tokenizer, for anything this wrapper does not expose.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Token ids of `text`. With `add_special_tokens` the tokenizer's post-processor
    /// adds BOS (and whatever else it is configured with). A rendered chat template
    /// already contains its special tokens: encode it with `false`, as
    /// `apply_chat_template(tokenize=True)` does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| tok_err("encode", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`. Incomplete UTF-8 sequences come out as U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| tok_err("decode", e))
    }

    /// Id of a token given by its vocabulary string (added tokens included), e.g.
    /// `"<|eot_id|>"`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary string of `id` (the raw piece, e.g. `"Ġthe"` or `"<0x0A>"`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of tokens, added tokens included. The model's embedding table may be
    /// larger (padded); it is never smaller for a matching tokenizer.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// A streaming detokenizer over this tokenizer.
    pub fn stream(&self, skip_special_tokens: bool) -> TokenStream {
        TokenStream::new(self.clone(), skip_special_tokens)
    }
}

/// Incremental detokenizer: feed generated ids one at a time, get back the text
/// they complete.
///
/// Keeps the ids seen so far and two offsets into them: text for
/// `ids[..read_offset]` has been emitted, and `ids[prefix_offset..read_offset]` is
/// the context decoded again with each new token so that space handling and
/// multi-token characters come out as in a full decode. New text is emitted only
/// when the window decodes to something longer than its prefix that does not end in
/// U+FFFD (an incomplete UTF-8 sequence). The emitted pieces concatenate to
/// `decode(all ids)` as long as the tokenizer's decoder is local (true for
/// byte-level, byte-fallback and Metaspace decoders).
#[derive(Debug, Clone)]
pub struct TokenStream {
    tokenizer: Tokenizer,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl TokenStream {
    pub fn new(tokenizer: Tokenizer, skip_special_tokens: bool) -> Self {
        Self {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// A stream whose first emitted text continues `context` (typically the end
    /// of the prompt), which is never emitted itself. Without context, a
    /// SentencePiece decoder strips the leading space of the first generated word.
    pub fn with_context(tokenizer: Tokenizer, skip_special_tokens: bool, context: &[u32]) -> Self {
        // A few tokens are enough context for any decoder we know of.
        let tail = &context[context.len().saturating_sub(4)..];
        Self {
            tokenizer,
            skip_special_tokens,
            ids: tail.to_vec(),
            prefix_offset: 0,
            read_offset: tail.len(),
        }
    }

    /// Appends `id`; returns the newly completed text, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = self.decode_range(self.prefix_offset, self.read_offset)?;
        let full = self.decode_range(self.prefix_offset, self.ids.len())?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            // The window normally extends its prefix; if a decoder rewrote the
            // prefix, fall back to emitting from the first differing char.
            let start = common_prefix_len(&prefix, &full);
            let text = full[start..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(text))
        } else {
            Ok(None)
        }
    }

    /// Text still held back at the end of generation (an incomplete character,
    /// emitted with its U+FFFD replacement), if any. The stream stays usable.
    pub fn finish(&mut self) -> Result<Option<String>> {
        if self.read_offset == self.ids.len() {
            return Ok(None);
        }
        let prefix = self.decode_range(self.prefix_offset, self.read_offset)?;
        let full = self.decode_range(self.prefix_offset, self.ids.len())?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        let start = common_prefix_len(&prefix, &full);
        Ok((start < full.len()).then(|| full[start..].to_string()))
    }

    /// Every id pushed so far, preceded by the context tail kept by
    /// [`TokenStream::with_context`].
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Forgets all ids; the next push starts a fresh text.
    pub fn clear(&mut self) {
        self.ids.clear();
        self.prefix_offset = 0;
        self.read_offset = 0;
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    fn decode_range(&self, from: usize, to: usize) -> Result<String> {
        if from >= to {
            return Ok(String::new());
        }
        self.tokenizer
            .decode(&self.ids[from..to], self.skip_special_tokens)
    }
}

/// Length in bytes of the longest common prefix of `a` and `b`, on a char boundary.
fn common_prefix_len(a: &str, b: &str) -> usize {
    if b.starts_with(a) {
        return a.len();
    }
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| a.len().min(b.len()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// GPT-2's byte → printable-char table used by byte-level BPE.
    pub(crate) fn bytes_to_unicode() -> Vec<char> {
        let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
            .chain(0xA1..=0xAC)
            .chain(0xAE..=0xFF)
            .collect();
        let mut cs = bs.clone();
        let mut n = 0;
        for b in 0..256u32 {
            if !bs.contains(&b) {
                bs.push(b);
                cs.push(256 + n);
                n += 1;
            }
        }
        let mut table = vec!['\0'; 256];
        for (b, c) in bs.into_iter().zip(cs) {
            table[b as usize] = char::from_u32(c).unwrap();
        }
        table
    }

    /// A byte-level BPE (LLaMA-3/Qwen style) with all 256 byte tokens, a few merges
    /// and a `<|eot|>` special token. No merge joins the bytes of "é" or "😀", so
    /// those characters are split over several tokens.
    fn byte_level_tokenizer() -> Tokenizer {
        let table = bytes_to_unicode();
        let mut vocab = serde_json::Map::new();
        for (i, c) in table.iter().enumerate() {
            vocab.insert(c.to_string(), json!(i));
        }
        let merges = [
            ("h", "e"),
            ("l", "l"),
            ("he", "ll"),
            ("hell", "o"),
            ("Ġ", "w"),
        ];
        let mut next = 256;
        for (a, b) in merges {
            vocab.insert(format!("{a}{b}"), json!(next));
            next += 1;
        }
        let eot = next;
        vocab.insert("<|eot|>".into(), json!(eot));
        let merges: Vec<String> = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
        let spec = json!({
            "version": "1.0",
            "added_tokens": [{"id": eot, "content": "<|eot|>", "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false,
                "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true,
                "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges}
        });
        Tokenizer::from_bytes(spec.to_string().as_bytes()).unwrap()
    }

    /// A LLaMA-2 style SentencePiece BPE: Metaspace pieces, `<0xNN>` byte fallback,
    /// BOS added by the post-processor, and a decoder that strips the leading space.
    fn byte_fallback_tokenizer() -> Tokenizer {
        let mut vocab = serde_json::Map::new();
        vocab.insert("<unk>".into(), json!(0));
        vocab.insert("<s>".into(), json!(1));
        vocab.insert("</s>".into(), json!(2));
        for b in 0..256 {
            vocab.insert(format!("<0x{b:02X}>"), json!(3 + b));
        }
        let pieces = [
            "▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "▁w", "ll", "▁hell", "▁hello", "or",
            "▁wor", "ld", "▁world",
        ];
        let mut next = 259;
        for p in pieces {
            vocab.insert(p.into(), json!(next));
            next += 1;
        }
        let merges = [
            "▁ h",
            "▁ w",
            "l l",
            "▁h e",
            "▁he ll",
            "▁hell o",
            "o r",
            "▁w or",
            "l d",
            "▁wor ld",
        ];
        // "▁he" is needed as an intermediate piece.
        vocab.insert("▁he".into(), json!(next));
        let special = |id: u32, content: &str| {
            json!({"id": id, "content": content,
            "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        };
        let spec = json!({
            "version": "1.0",
            "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
            "pre_tokenizer": null,
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": vocab, "merges": merges}
        });
        Tokenizer::from_bytes(spec.to_string().as_bytes()).unwrap()
    }

    fn stream_all(tok: &Tokenizer, ids: &[u32], skip_special: bool) -> Vec<String> {
        let mut s = tok.stream(skip_special);
        let mut out = Vec::new();
        for &id in ids {
            if let Some(t) = s.push(id).unwrap() {
                out.push(t);
            }
        }
        if let Some(t) = s.finish().unwrap() {
            out.push(t);
        }
        out
    }

    #[test]
    fn byte_level_roundtrip_and_lookups() {
        let tok = byte_level_tokenizer();
        assert_eq!(tok.vocab_size(), 256 + 5 + 1);
        let ids = tok.encode("hello world", false).unwrap();
        // "hello" merges fully; " w" merges; "orld" stays as bytes.
        assert_eq!(tok.id_to_token(ids[0]).as_deref(), Some("hello"));
        assert_eq!(tok.id_to_token(ids[1]).as_deref(), Some("Ġw"));
        assert_eq!(ids.len(), 2 + 4);
        assert_eq!(tok.decode(&ids, false).unwrap(), "hello world");
        assert_eq!(tok.token_to_id("<|eot|>"), Some(261));
        assert_eq!(tok.token_to_id("not-a-token"), None);
        let with_eot = tok.encode("hi<|eot|>", false).unwrap();
        assert_eq!(*with_eot.last().unwrap(), 261);
        assert_eq!(tok.decode(&with_eot, true).unwrap(), "hi");
        assert_eq!(tok.decode(&with_eot, false).unwrap(), "hi<|eot|>");
    }

    #[test]
    fn byte_level_stream_holds_back_split_characters() {
        let tok = byte_level_tokenizer();
        let text = "hello é😀 world";
        let ids = tok.encode(text, false).unwrap();
        // é is 2 bytes, 😀 is 4: all byte tokens.
        let pieces = stream_all(&tok, &ids, false);
        assert_eq!(pieces.concat(), text);
        for p in &pieces {
            assert!(
                !p.contains('\u{FFFD}'),
                "partial character leaked: {pieces:?}"
            );
        }
        assert!(
            pieces.contains(&" é".to_string()) || pieces.contains(&"é".to_string()),
            "{pieces:?}"
        );
        assert!(pieces.contains(&"😀".to_string()), "{pieces:?}");
        // Fewer pieces than tokens: the 4 bytes of 😀 come out as one piece.
        assert!(pieces.len() < ids.len());
    }

    #[test]
    fn stream_pieces_arrive_as_soon_as_complete() {
        let tok = byte_level_tokenizer();
        let ids = tok.encode("😀", false).unwrap();
        assert_eq!(ids.len(), 4);
        let mut s = tok.stream(false);
        for &id in &ids[..3] {
            assert_eq!(s.push(id).unwrap(), None);
        }
        assert_eq!(s.push(ids[3]).unwrap().as_deref(), Some("😀"));
        assert_eq!(s.finish().unwrap(), None);
    }

    #[test]
    fn finish_flushes_incomplete_character() {
        let tok = byte_level_tokenizer();
        let ids = tok.encode("a😀", false).unwrap();
        let mut s = tok.stream(false);
        let mut got = String::new();
        for &id in &ids[..3] {
            if let Some(t) = s.push(id).unwrap() {
                got.push_str(&t);
            }
        }
        assert_eq!(got, "a");
        let rest = s.finish().unwrap().unwrap();
        assert!(rest.contains('\u{FFFD}'));
    }

    #[test]
    fn stream_special_tokens() {
        let tok = byte_level_tokenizer();
        let ids = tok.encode("hi<|eot|>", false).unwrap();
        assert_eq!(stream_all(&tok, &ids, false).concat(), "hi<|eot|>");
        assert_eq!(stream_all(&tok, &ids, true).concat(), "hi");
    }

    #[test]
    fn byte_fallback_stream_matches_full_decode() {
        let tok = byte_fallback_tokenizer();
        let text = "hello world é😀 hello";
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(ids[0], 1, "BOS from the post-processor");
        assert!(tok.encode(text, false).unwrap()[0] != 1);
        assert!(
            ids.contains(&tok.token_to_id("<0xC3>").unwrap()),
            "é falls back to bytes"
        );
        let full = tok.decode(&ids, true).unwrap();
        assert_eq!(full, text);
        let pieces = stream_all(&tok, &ids, true);
        assert_eq!(pieces.concat(), full);
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        // Word pieces carry their leading space (the decoder's Strip only removes
        // the very first one).
        assert!(pieces.contains(&" world".to_string()), "{pieces:?}");
    }

    #[test]
    fn stream_with_context_keeps_leading_space() {
        let tok = byte_fallback_tokenizer();
        let prompt = tok.encode("hello", true).unwrap();
        let gen = tok.encode("world", false).unwrap(); // "▁world"
        let mut s = TokenStream::with_context(tok.clone(), true, &prompt);
        let mut out = String::new();
        for &id in &gen {
            if let Some(t) = s.push(id).unwrap() {
                out.push_str(&t);
            }
        }
        assert_eq!(out, " world");
        // Without context the decoder strips it.
        assert_eq!(stream_all(&tok, &gen, true).concat(), "world");
    }

    #[test]
    fn from_file_errors() {
        let err = Tokenizer::from_file("/nonexistent/tokenizer.json").unwrap_err();
        assert!(matches!(err, HassError::Io { .. }), "{err}");
        let dir = std::env::temp_dir().join(format!("hass-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("tokenizer.json");
        std::fs::write(&bad, "{not json").unwrap();
        let err = Tokenizer::from_file(&bad).unwrap_err();
        assert!(matches!(err, HassError::Tokenizer(_)), "{err}");
        assert!(err.to_string().contains("tokenizer.json"));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn common_prefix() {
        assert_eq!(common_prefix_len("abc", "abcd"), 3);
        assert_eq!(common_prefix_len("abx", "abcd"), 2);
        assert_eq!(common_prefix_len("é", "e"), 0);
        assert_eq!(common_prefix_len("", "x"), 0);
    }
}
