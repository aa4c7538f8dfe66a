//! Conversation corpora: the ShareGPT JSON array (streamed, truncation tolerant) and
//! JSONL files of the user's own data, normalised to [`Conversation`]s.
//!
//! Validation follows the reference `ge_data` scripts (spec §1.3): a leading message
//! that is not from the user is dropped, the remaining roles must alternate
//! user/assistant/user/..., and at least one assistant turn is required. Records that
//! fail are skipped and counted in [`ReadReport`], never fatal; a corpus from which no
//! conversation survives is an error.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use hass_core::{ChatMessage, HassError, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Deserialize;
use serde_json::Value;

/// One dialogue: an optional leading `system` message, then `user`/`assistant`
/// messages alternating, starting with `user`, with at least one `assistant`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub id: String,
    pub messages: Vec<ChatMessage>,
}

impl Conversation {
    /// Builds a conversation, checking the role structure (see [`Conversation::validate`]).
    pub fn new(id: impl Into<String>, messages: Vec<ChatMessage>) -> Result<Self> {
        let c = Self {
            id: id.into(),
            messages,
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks the structure: roles are `system` (first only), `user`, `assistant`;
    /// after the optional system message they alternate starting with `user`; there is
    /// at least one assistant message.
    pub fn validate(&self) -> Result<()> {
        let body = match self.messages.first() {
            Some(m) if m.role == "system" => &self.messages[1..],
            _ => &self.messages[..],
        };
        for (j, m) in body.iter().enumerate() {
            let want = if j % 2 == 0 { "user" } else { "assistant" };
            if m.role != want {
                return Err(HassError::InvalidArgument(format!(
                    "conversation `{}`: message {} has role `{}` where `{want}` was expected \
                     (roles must alternate user/assistant after an optional system message)",
                    self.id,
                    j + self.messages.len() - body.len(),
                    m.role
                )));
            }
        }
        if !body.iter().any(|m| m.role == "assistant") {
            return Err(HassError::InvalidArgument(format!(
                "conversation `{}` has no assistant turn: there is nothing to train on",
                self.id
            )));
        }
        Ok(())
    }

    /// Number of assistant messages.
    pub fn assistant_turns(&self) -> usize {
        self.messages
            .iter()
            .filter(|m| m.role == "assistant")
            .count()
    }
}

/// What a reader saw. `read` counts complete records (kept + skipped); a record cut
/// off by the end of the file is not in `read` but sets `truncated_tail`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadReport {
    /// Complete records parsed from the file (kept + skipped).
    pub read: usize,
    /// Records dropped: `malformed + no_assistant + non_alternating`.
    pub skipped: usize,
    /// The file ended inside a record (the ShareGPT dump does).
    pub truncated_tail: bool,
    /// Not valid JSON, not an object with a message list, non-string text, unknown role.
    pub malformed: usize,
    /// No assistant message (after dropping a leading non-user message).
    pub no_assistant: usize,
    /// Roles do not alternate user/assistant.
    pub non_alternating: usize,
}

impl ReadReport {
    /// Conversations kept.
    pub fn kept(&self) -> usize {
        self.read - self.skipped
    }

    fn skip(&mut self, why: Skip) {
        self.skipped += 1;
        match why {
            Skip::Malformed => self.malformed += 1,
            Skip::NoAssistant => self.no_assistant += 1,
            Skip::NonAlternating => self.non_alternating += 1,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Skip {
    Malformed,
    NoAssistant,
    NonAlternating,
}

/// How a leading system message is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SystemPolicy {
    /// ShareGPT: the reference drops whatever leading message is not from the human.
    Drop,
    /// User data: a leading system message is kept.
    Keep,
}

/// A message in either of the two accepted spellings.
#[derive(Deserialize)]
struct RawMessage {
    #[serde(alias = "role")]
    from: Option<Value>,
    #[serde(alias = "content")]
    value: Option<Value>,
}

#[derive(Deserialize)]
struct RawRecord {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    conversations: Option<Vec<RawMessage>>,
    #[serde(default)]
    messages: Option<Vec<RawMessage>>,
}

fn map_role(role: &str) -> Option<&'static str> {
    match role.to_ascii_lowercase().as_str() {
        "human" | "user" => Some("user"),
        "gpt" | "assistant" | "chatgpt" | "bing" | "bard" | "model" => Some("assistant"),
        "system" => Some("system"),
        _ => None,
    }
}

/// Parses and validates one record; `fallback_id` names it when it has no `id`.
fn parse_record(
    bytes: &[u8],
    fallback_id: &str,
    policy: SystemPolicy,
) -> std::result::Result<Conversation, Skip> {
    let rec: RawRecord = serde_json::from_slice(bytes).map_err(|_| Skip::Malformed)?;
    let raw = match (rec.conversations, rec.messages) {
        (Some(c), _) => c,
        (None, Some(m)) => m,
        (None, None) => return Err(Skip::Malformed),
    };
    let id = match rec.id {
        Some(Value::String(s)) => s,
        Some(Value::Number(n)) => n.to_string(),
        _ => fallback_id.to_string(),
    };
    let mut messages = Vec::with_capacity(raw.len());
    for m in raw {
        let (Some(Value::String(role)), Some(Value::String(text))) = (m.from, m.value) else {
            return Err(Skip::Malformed);
        };
        let role = map_role(&role).ok_or(Skip::Malformed)?;
        messages.push(ChatMessage::new(role, text));
    }
    normalise(id, messages, policy)
}

fn normalise(
    id: String,
    mut messages: Vec<ChatMessage>,
    policy: SystemPolicy,
) -> std::result::Result<Conversation, Skip> {
    let system =
        if policy == SystemPolicy::Keep && messages.first().is_some_and(|m| m.role == "system") {
            Some(messages.remove(0))
        } else {
            None
        };
    // The reference: `if roles[source[0]["from"]] != conv.roles[0]: source = source[1:]`.
    if messages.first().is_some_and(|m| m.role != "user") {
        messages.remove(0);
    }
    if !messages.iter().any(|m| m.role == "assistant") {
        return Err(Skip::NoAssistant);
    }
    for (j, m) in messages.iter().enumerate() {
        let want = if j % 2 == 0 { "user" } else { "assistant" };
        if m.role != want {
            return Err(Skip::NonAlternating);
        }
    }
    if let Some(s) = system {
        messages.insert(0, s);
    }
    Ok(Conversation { id, messages })
}

fn empty_corpus(path: &Path, report: &ReadReport) -> HassError {
    HassError::InvalidArgument(format!(
        "{}: no usable conversation ({} records read, {} skipped: {} malformed, {} without an \
         assistant turn, {} with non-alternating roles{})",
        path.display(),
        report.read,
        report.skipped,
        report.malformed,
        report.no_assistant,
        report.non_alternating,
        if report.truncated_tail {
            ", and a truncated record at the end"
        } else {
            ""
        }
    ))
}

/// Streams the elements of a top-level JSON array: yields each element's bytes,
/// keeping only one element in memory. Tracks strings (with escapes) and nesting so
/// that commas and brackets inside values are not element boundaries.
struct ArrayScanner<R: Read> {
    bytes: std::io::Bytes<BufReader<R>>,
    path: String,
    done: bool,
}

enum Element {
    Complete(Vec<u8>),
    /// The input ended before the closing `]` (inside a record or between records).
    Truncated,
    End,
}

impl<R: Read> ArrayScanner<R> {
    fn new(reader: R, path: &Path) -> Result<Self> {
        let mut s = Self {
            bytes: BufReader::with_capacity(1 << 20, reader).bytes(),
            path: path.display().to_string(),
            done: false,
        };
        // Skip a UTF-8 BOM and whitespace, expect `[`.
        loop {
            match s.next_byte()? {
                Some(b' ' | b'\t' | b'\r' | b'\n' | 0xEF | 0xBB | 0xBF) => continue,
                Some(b'[') => break,
                Some(other) => {
                    return Err(HassError::malformed(
                        &s.path,
                        format!(
                            "expected a JSON array of conversations, found `{}` first \
                             (use the JSONL reader for one conversation per line)",
                            other as char
                        ),
                    ))
                }
                None => {
                    return Err(HassError::malformed(
                        &s.path,
                        "empty file (expected a JSON array)",
                    ))
                }
            }
        }
        Ok(s)
    }

    fn next_byte(&mut self) -> Result<Option<u8>> {
        match self.bytes.next() {
            None => Ok(None),
            Some(Ok(b)) => Ok(Some(b)),
            Some(Err(e)) => Err(HassError::io(&self.path, e)),
        }
    }

    fn next_element(&mut self) -> Result<Element> {
        if self.done {
            return Ok(Element::End);
        }
        let mut buf = Vec::new();
        let mut depth = 0usize;
        let mut in_string = false;
        let mut escaped = false;
        loop {
            let Some(b) = self.next_byte()? else {
                // The array never closed: the file was cut (inside a record, or
                // between records).
                self.done = true;
                return Ok(Element::Truncated);
            };
            if in_string {
                buf.push(b);
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                } else if b == b'"' {
                    in_string = false;
                }
                continue;
            }
            match b {
                b'"' => {
                    in_string = true;
                    buf.push(b);
                }
                b'{' | b'[' => {
                    depth += 1;
                    buf.push(b);
                }
                b'}' | b']' if depth > 0 => {
                    depth -= 1;
                    buf.push(b);
                }
                b']' => {
                    // End of the top-level array.
                    self.done = true;
                    return Ok(if buf.iter().all(u8::is_ascii_whitespace) {
                        Element::End
                    } else {
                        Element::Complete(buf)
                    });
                }
                // An empty element (`[,` or `,,`) comes back empty and fails to parse.
                b',' if depth == 0 => return Ok(Element::Complete(buf)),
                b' ' | b'\t' | b'\r' | b'\n' if buf.is_empty() => {}
                _ => buf.push(b),
            }
        }
    }
}

/// Reads a ShareGPT-style JSON array (`[{"id", "conversations": [{"from", "value"}]}, ...]`)
/// record by record, with bounded memory. Every complete record is parsed; a file cut
/// off inside a record (the public `ShareGPT_V3_unfiltered_cleaned_split.json` is)
/// stops cleanly with `truncated_tail = true`. `from` values `human`/`user` map to
/// `user`, `gpt`/`chatgpt`/`bing`/`bard`/`assistant` to `assistant`; any leading
/// non-human message (including `system`) is dropped, as the reference does.
///
/// Errors: I/O, a file that is not a JSON array, or no usable conversation at all.
pub fn read_sharegpt(path: impl AsRef<Path>) -> Result<(Vec<Conversation>, ReadReport)> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|e| HassError::io(path, e))?;
    let mut scanner = ArrayScanner::new(file, path)?;
    let mut report = ReadReport::default();
    let mut out = Vec::new();
    loop {
        match scanner.next_element()? {
            Element::Complete(bytes) => {
                report.read += 1;
                let fallback = format!("record{}", report.read - 1);
                match parse_record(&bytes, &fallback, SystemPolicy::Drop) {
                    Ok(c) => out.push(c),
                    Err(why) => report.skip(why),
                }
            }
            Element::Truncated => {
                report.truncated_tail = true;
                break;
            }
            Element::End => break,
        }
    }
    if out.is_empty() {
        return Err(empty_corpus(path, &report));
    }
    Ok((out, report))
}

/// Reads one conversation per line: `{"conversations": [{"from", "value"}, ...]}`
/// (ShareGPT style) or `{"messages": [{"role", "content"}, ...]}` (OpenAI style),
/// with an optional `id` (default `line<N>`, 1-based). Blank lines are ignored. A
/// leading `system` message is kept; otherwise validation is the ShareGPT one. A last
/// line without a newline that does not parse counts as a truncated tail.
pub fn read_jsonl(path: impl AsRef<Path>) -> Result<(Vec<Conversation>, ReadReport)> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|e| HassError::io(path, e))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut report = ReadReport::default();
    let mut out = Vec::new();
    let mut line = Vec::new();
    let mut lineno = 0usize;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| HassError::io(path, e))?;
        if n == 0 {
            break;
        }
        lineno += 1;
        let complete = line.last() == Some(&b'\n');
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let fallback = format!("line{lineno}");
        match parse_record(&line, &fallback, SystemPolicy::Keep) {
            Ok(c) => {
                report.read += 1;
                out.push(c);
            }
            Err(Skip::Malformed) if !complete => report.truncated_tail = true,
            Err(why) => {
                report.read += 1;
                report.skip(why);
            }
        }
    }
    if out.is_empty() {
        return Err(empty_corpus(path, &report));
    }
    Ok((out, report))
}

/// Reads `path` with [`read_jsonl`] when it ends in `.jsonl`, else [`read_sharegpt`].
pub fn read_corpus(path: impl AsRef<Path>) -> Result<(Vec<Conversation>, ReadReport)> {
    let path = path.as_ref();
    if path.extension().is_some_and(|e| e == "jsonl") {
        read_jsonl(path)
    } else {
        read_sharegpt(path)
    }
}

/// Shuffles conversations deterministically (the reference shuffles ShareGPT with
/// seed 42 before taking its first 68,000 records; HF `datasets`' permutation itself
/// is not reproduced).
pub fn shuffle_conversations(conversations: &mut [Conversation], seed: u64) {
    conversations.shuffle(&mut StdRng::seed_from_u64(seed));
}
