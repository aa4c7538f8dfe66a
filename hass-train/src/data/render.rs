//! Conversation → `(input_ids, loss_mask)` with the target's own chat template, the
//! mask set **by segment**: 1 exactly on the tokens of assistant replies (with the
//! end-of-turn token that closes each reply), 0 on BOS, system and user text and role
//! headers.
//!
//! For every assistant message `i` the prefix up to its header
//! (`render(messages[..i], add_generation_prompt = true)`) and the prefix including
//! it (`render(messages[..=i], false)`) are rendered and tokenised; when both token
//! sequences are prefixes of the full conversation's tokens, the reply is the token
//! range between them. When a boundary merges tokens (BPE across the header/reply
//! seam), the rendered *texts* must still be prefixes of the full text and the range
//! comes from the tokenizer's byte offsets instead (a token is in the reply when it
//! overlaps the reply's bytes). Trailing whitespace-only tokens of the range (the
//! `\n` after ChatML's `<|im_end|>`) are left out: the model stops at the end-of-turn
//! token and never predicts them. A template that renders a prefix differently from
//! the full conversation cannot be aligned and is an error.
//!
//! The reference (spec §1.3) finds the same segments with hard-coded token offsets;
//! the result agrees with it to within about one token at each boundary.

use hass_core::{ChatMessage, ChatTemplate, HassError, Result, Tokenizer};

use super::corpus::Conversation;

/// The Llama-2 default system prompt, which the reference `ge_data` puts in front of
/// every ShareGPT conversation, for Llama-3 targets too (spec §1.3).
pub const LLAMA2_SYSTEM_PROMPT: &str = "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question does not make any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't know the answer to a question, please don't share false information.";

/// How conversations become token sequences.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderOptions {
    /// Samples are truncated to this many tokens (the reference trains on 2048).
    pub max_len: usize,
    /// Put in front as a `system` message when the conversation has none. `None`
    /// leaves it to the template (which may add its own default, as SmolLM2's does).
    /// The reference uses [`LLAMA2_SYSTEM_PROMPT`].
    pub system_prompt: Option<String>,
    /// Prepend a space to every assistant message, as the reference does (a quirk;
    /// templates that trim content, like Llama-3's, drop it again). Off by default:
    /// it puts the target off its own distribution under templates that keep it.
    pub assistant_leading_space: bool,
    /// Let the tokenizer's post-processor add its special tokens. Off, as in
    /// `apply_chat_template(tokenize=True)`: templates render BOS themselves.
    pub add_special_tokens: bool,
}

impl Default for RenderOptions {
    fn default() -> Self {
        Self {
            max_len: 2048,
            system_prompt: None,
            assistant_leading_space: false,
            add_special_tokens: false,
        }
    }
}

/// One tokenised training sequence.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sample {
    pub input_ids: Vec<u32>,
    /// 1 on assistant-reply tokens, 0 elsewhere; same length as `input_ids`.
    pub loss_mask: Vec<u8>,
}

impl Sample {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of positions with `loss_mask == 1`.
    pub fn masked_tokens(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m != 0).count()
    }

    /// The maximal runs `[start, end)` of masked positions.
    pub fn masked_spans(&self) -> Vec<std::ops::Range<usize>> {
        let mut spans = Vec::new();
        let mut start = None;
        for (i, &m) in self.loss_mask.iter().chain(std::iter::once(&0)).enumerate() {
            match (m != 0, start) {
                (true, None) => start = Some(i),
                (false, Some(s)) => {
                    spans.push(s..i);
                    start = None;
                }
                _ => {}
            }
        }
        spans
    }
}

struct Encoded {
    ids: Vec<u32>,
    offsets: Vec<(usize, usize)>,
}

fn encode(tokenizer: &Tokenizer, text: &str, add_special: bool) -> Result<Encoded> {
    let enc = tokenizer
        .inner()
        .encode(text, add_special)
        .map_err(|e| HassError::Tokenizer(format!("encode: {e}")))?;
    Ok(Encoded {
        ids: enc.get_ids().to_vec(),
        offsets: enc.get_offsets().to_vec(),
    })
}

/// The messages as rendered: optional default system prompt, optional leading space.
fn prepare(conv: &Conversation, opts: &RenderOptions) -> Vec<ChatMessage> {
    let mut msgs = Vec::with_capacity(conv.messages.len() + 1);
    if let Some(sys) = &opts.system_prompt {
        if conv.messages.first().is_none_or(|m| m.role != "system") {
            msgs.push(ChatMessage::system(sys.clone()));
        }
    }
    for m in &conv.messages {
        if opts.assistant_leading_space && m.role == "assistant" {
            msgs.push(ChatMessage::assistant(format!(" {}", m.content)));
        } else {
            msgs.push(m.clone());
        }
    }
    msgs
}

/// Drops trailing tokens of `range` that decode to whitespace only (or nothing).
fn trim_trailing_whitespace(
    tokenizer: &Tokenizer,
    ids: &[u32],
    mut range: std::ops::Range<usize>,
) -> Result<std::ops::Range<usize>> {
    while range.end > range.start {
        let text = tokenizer.decode(&ids[range.end - 1..range.end], false)?;
        if text.trim().is_empty() {
            range.end -= 1;
        } else {
            break;
        }
    }
    Ok(range)
}

/// Renders and tokenises `conv`, with the loss mask on its assistant replies, truncated
/// to `opts.max_len` tokens.
///
/// Errors: a conversation that breaks the role structure or has no assistant turn
/// ([`HassError::InvalidArgument`]), a template error, or a template whose prefixes do
/// not align with the full rendering ([`HassError::Template`] naming the conversation
/// and turn).
pub fn render_sample(
    conv: &Conversation,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    opts: &RenderOptions,
) -> Result<Sample> {
    conv.validate()?;
    if opts.max_len == 0 {
        return Err(HassError::InvalidArgument(
            "max_len must be at least 1".into(),
        ));
    }
    let msgs = prepare(conv, opts);
    let add = opts.add_special_tokens;
    let full_text = template.render(&msgs, false)?;
    let full = encode(tokenizer, &full_text, add)?;
    let ids = &full.ids;
    let mut mask = vec![0u8; ids.len()];
    let misaligned = |i: usize, what: &str| {
        HassError::Template(format!(
            "conversation `{}`: cannot align assistant message {i} with the full rendering \
             ({what}); the chat template renders a conversation prefix differently from \
             the whole conversation",
            conv.id
        ))
    };
    for (i, m) in msgs.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = template.render(&msgs[..i], true)?;
        let through = template.render(&msgs[..=i], false)?;
        let a = encode(tokenizer, &before, add)?;
        let b = encode(tokenizer, &through, add)?;
        let range =
            if b.ids.len() >= a.ids.len() && ids.starts_with(&b.ids) && b.ids.starts_with(&a.ids) {
                a.ids.len()..b.ids.len()
            } else {
                // Token boundaries moved at a seam: fall back to byte offsets.
                if !full_text.starts_with(&through) {
                    return Err(misaligned(
                        i,
                        "the text up to this reply is not a prefix of the full text",
                    ));
                }
                if !through.starts_with(&before) {
                    return Err(misaligned(
                        i,
                        "the text up to this reply's header is not a prefix of the text through it",
                    ));
                }
                let (lo, hi) = (before.len(), through.len());
                let mut first = None;
                let mut last = 0;
                for (j, &(s, e)) in full.offsets.iter().enumerate() {
                    if e > lo && s < hi && e > s {
                        first.get_or_insert(j);
                        last = j + 1;
                    }
                }
                match first {
                    Some(f) => f..last,
                    None if hi == lo => 0..0,
                    None => return Err(misaligned(i, "no token covers the reply's text")),
                }
            };
        let range = trim_trailing_whitespace(tokenizer, ids, range)?;
        mask[range].fill(1);
    }
    let mut input_ids = full.ids;
    input_ids.truncate(opts.max_len);
    mask.truncate(opts.max_len);
    Ok(Sample {
        input_ids,
        loss_mask: mask,
    })
}

/// Counts of [`render_corpus`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RenderReport {
    /// Samples returned.
    pub rendered: usize,
    /// Conversations that could not be rendered or aligned (skipped).
    pub failed: usize,
    /// Conversations whose mask is all zero after truncation (skipped: they carry no
    /// training signal).
    pub empty_mask: usize,
    /// Tokens in the returned samples.
    pub tokens: usize,
    /// Masked (trained-on) tokens in the returned samples.
    pub masked_tokens: usize,
    /// The first failure, for the log.
    pub first_error: Option<String>,
}

/// [`render_sample`] over a corpus, in order. Conversations that fail are skipped and
/// counted (the first error is kept), as are samples left with no masked token after
/// truncation. Errors when nothing is left.
pub fn render_corpus(
    conversations: &[Conversation],
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    opts: &RenderOptions,
) -> Result<(Vec<Sample>, RenderReport)> {
    let mut report = RenderReport::default();
    let mut out = Vec::with_capacity(conversations.len());
    for conv in conversations {
        match render_sample(conv, tokenizer, template, opts) {
            Ok(s) if s.masked_tokens() == 0 => report.empty_mask += 1,
            Ok(s) => {
                report.rendered += 1;
                report.tokens += s.len();
                report.masked_tokens += s.masked_tokens();
                out.push(s);
            }
            Err(e) => {
                report.failed += 1;
                report.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    if out.is_empty() {
        return Err(HassError::InvalidArgument(format!(
            "no trainable sample among {} conversations ({} failed{}, {} with no assistant \
             token within max_len = {})",
            conversations.len(),
            report.failed,
            report
                .first_error
                .as_deref()
                .map(|e| format!(", first: {e}"))
                .unwrap_or_default(),
            report.empty_mask,
            opts.max_len
        )));
    }
    Ok((out, report))
}
