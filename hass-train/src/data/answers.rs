//! Conversations whose assistant turns the target writes itself.
//!
//! At T = 0 speculative decoding drafts for text the target produces, not for what
//! ShareGPT's (mostly GPT-3.5/4) assistants wrote; training on the target's own answers
//! to the same user turns matches that distribution. Each user turn is answered
//! greedily with the conversation so far (the target's earlier answers included) as
//! context; a conversation ends early where the next answer would not fit `max_len`.

use std::io::Write;
use std::path::Path;

use hass_core::chat::{ChatMessage, ChatTemplate};
use hass_core::tokenizer::Tokenizer;
use hass_core::{HassError, Result};
use hass_infer::{GenerationConfig, StopReason, VanillaGenerator};
use hass_models::backend::HassBackend;
use hass_models::llama::Llama;

use super::corpus::Conversation;

/// How answers are generated.
#[derive(Debug, Clone)]
pub struct AnswerOptions {
    /// New tokens per assistant turn at most.
    pub max_new_tokens: usize,
    /// Tokens of a whole rendered conversation at most (datagen's `--max-len`).
    pub max_len: usize,
}

/// What [`answer`] produced: the rewritten conversation (`None` when not even the first
/// turn fits) and the tokens generated.
pub struct Answered {
    pub conversation: Option<Conversation>,
    pub new_tokens: usize,
}

/// `conv` with each assistant turn replaced by the target's greedy answer to the
/// conversation so far; turns after one that would overflow `max_len` are dropped.
pub fn answer<B: HassBackend>(
    target: &Llama<B>,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    conv: &Conversation,
    opts: &AnswerOptions,
) -> Result<Answered> {
    let mut messages: Vec<ChatMessage> = Vec::new();
    let mut new_tokens = 0;
    let generator = VanillaGenerator::new(target);
    for m in &conv.messages {
        match m.role.as_str() {
            "assistant" => {
                let text = template.render(&messages, true)?;
                let prompt = tokenizer.encode(&text, false)?;
                if prompt.len() + opts.max_new_tokens > opts.max_len {
                    break;
                }
                let config = GenerationConfig {
                    max_new_tokens: opts.max_new_tokens,
                    ..Default::default()
                };
                let out = generator.generate(&prompt, &config, |_| true)?;
                new_tokens += out.tokens.len();
                let kept = match out.stop_reason {
                    StopReason::Stop => &out.tokens[..out.tokens.len() - 1],
                    _ => &out.tokens[..],
                };
                messages.push(ChatMessage::assistant(tokenizer.decode(kept, true)?));
            }
            _ => messages.push(m.clone()),
        }
    }
    // Drop a trailing user turn left unanswered.
    if messages.last().is_some_and(|m| m.role == "user") {
        messages.pop();
    }
    let conversation = if messages.iter().any(|m| m.role == "assistant") {
        Some(Conversation::new(conv.id.clone(), messages)?)
    } else {
        None
    };
    Ok(Answered {
        conversation,
        new_tokens,
    })
}

/// One conversation as a JSONL line (`{"id", "messages": [{"role", "content"}]}`), the
/// format [`super::corpus::read_jsonl`] reads.
pub fn jsonl_line(conv: &Conversation) -> String {
    let messages: Vec<_> = conv
        .messages
        .iter()
        .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
        .collect();
    serde_json::json!({"id": conv.id, "messages": messages}).to_string()
}

/// Conversations already answered in `path` (complete lines): a rerun skips that many
/// inputs. A partial last line (an interrupted write) is cut off.
pub fn resume_point(path: &Path) -> Result<usize> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(0);
    };
    let complete = text.rfind('\n').map_or(0, |i| i + 1);
    if complete < text.len() {
        std::fs::write(path, &text[..complete]).map_err(|e| HassError::io(path, e))?;
    }
    Ok(text[..complete].lines().count())
}

/// Appends `line` and a newline to `path`, flushed (a kill loses at most this line).
pub fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| HassError::io(path, e))?;
    writeln!(f, "{line}").map_err(|e| HassError::io(path, e))?;
    f.flush().map_err(|e| HassError::io(path, e))
}
