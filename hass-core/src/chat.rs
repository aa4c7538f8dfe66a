//! Chat prompts: Hugging Face Jinja chat templates rendered with `minijinja`, set up
//! the way `transformers`' `apply_chat_template` sets up Jinja2, so that the prompt
//! (and hence the token ids the model sees) is the one the model was tuned on.
//!
//! transformers' environment: `trim_blocks` and `lstrip_blocks` on, trailing newline
//! dropped, loop controls (`break`/`continue`), a `raise_exception(msg)` global and a
//! `tojson` filter that is plain `json.dumps` (no HTML escaping). Templates also call
//! Python `str`/`dict` methods (`.strip()`, `.startswith()`, `.items()`), provided by
//! `minijinja-contrib`'s pycompat callback. `strftime_now` is deliberately not
//! defined: templates that use it test `is defined` and fall back to a fixed date,
//! which keeps prompts reproducible.

use std::path::Path;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::error::{HassError, Result};
use crate::tokenizer::Tokenizer;

/// One turn of a conversation. `role` is usually `system`, `user` or `assistant`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

const TEMPLATE_NAME: &str = "chat_template";

/// The most template instructions one render may execute. A model file's template
/// is code: nested loops over strings can take hours (fuzzing found one), so a
/// render that runs out of fuel fails instead of hanging the caller. Real templates
/// use a few dozen instructions per message, so this leaves room for conversations
/// of many thousand turns while stopping a runaway render within about a second.
/// Fuel bounds time, not memory: a template that doubles a string in a recursive
/// macro still exhausts memory in a few dozen instructions (minijinja has no size
/// limit), so a template is only as safe as the model file it comes from.
const TEMPLATE_FUEL: u64 = 20_000_000;

/// Meta's LLaMA-2-chat template, as shipped in `meta-llama/Llama-2-7b-chat-hf`.
/// The generation prompt is implicit: a prompt ends with ` [/INST]`.
const LLAMA2_CHAT: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

/// Meta's LLaMA-3-Instruct template, as shipped in `meta-llama/Meta-Llama-3-8B-Instruct`.
const LLAMA3_INSTRUCT: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

/// The plain ChatML template (no default system message).
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A compiled chat template plus the special tokens it may refer to.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

fn template_err(e: Error) -> HassError {
    HassError::Template(e.to_string())
}

impl ChatTemplate {
    /// Compiles `source`. A `None` token is left undefined in the template, as
    /// transformers does for special tokens the tokenizer does not set (it renders
    /// as the empty string).
    pub fn new(
        source: impl Into<String>,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_keep_trailing_newline(false);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(template_err)?;
        Ok(Self {
            env,
            source,
            bos_token: bos_token.map(str::to_owned),
            eos_token: eos_token.map(str::to_owned),
        })
    }

    /// Reads the template of a Hugging Face `tokenizer_config.json`.
    ///
    /// `chat_template` is either a string or a list of `{name, template}` (the one
    /// named `default` is used). Newer checkpoints keep it in a `chat_template.jinja`
    /// beside the config instead; that file is used when the config has none.
    /// `bos_token`/`eos_token` may be strings or `{"content": ...}` objects.
    /// Returns `Ok(None)` when there is no template at all.
    pub fn from_tokenizer_config(path: impl AsRef<Path>) -> Result<Option<Self>> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| HassError::io(path, e))?;
        let config: Json = serde_json::from_str(&text).map_err(|source| HassError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let source = match config.get("chat_template") {
            Some(Json::String(s)) => Some(s.clone()),
            Some(Json::Array(list)) => {
                let named = |n: &Json| n.get("name").and_then(Json::as_str).map(str::to_owned);
                let default = list
                    .iter()
                    .find(|t| named(t).as_deref() == Some("default"))
                    .ok_or_else(|| {
                        let names: Vec<String> = list.iter().filter_map(named).collect();
                        HassError::Template(format!(
                            "{}: chat_template list has no `default` entry (found {names:?})",
                            path.display()
                        ))
                    })?;
                let t = default
                    .get("template")
                    .and_then(Json::as_str)
                    .ok_or_else(|| {
                        HassError::Template(format!(
                            "{}: `default` chat template has no `template` string",
                            path.display()
                        ))
                    })?;
                Some(t.to_owned())
            }
            None | Some(Json::Null) => {
                let sibling = path.with_file_name("chat_template.jinja");
                match std::fs::read_to_string(&sibling) {
                    Ok(s) => Some(s),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => return Err(HassError::io(sibling, e)),
                }
            }
            Some(other) => {
                return Err(HassError::Template(format!(
                    "{}: chat_template must be a string or a list, found {other}",
                    path.display()
                )))
            }
        };
        let Some(source) = source else {
            return Ok(None);
        };
        let token = |key: &str| match config.get(key) {
            Some(Json::String(s)) => Some(s.clone()),
            Some(Json::Object(o)) => o.get("content").and_then(Json::as_str).map(str::to_owned),
            _ => None,
        };
        Self::new(
            source,
            token("bos_token").as_deref(),
            token("eos_token").as_deref(),
        )
        .map(Some)
        .map_err(|e| match e {
            HassError::Template(msg) => HassError::Template(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// LLaMA-2-chat: `<s>[INST] <<SYS>>\n{sys}\n<</SYS>>\n\n{user} [/INST] {assistant} </s>`.
    pub fn llama2_chat() -> Self {
        Self::new(LLAMA2_CHAT, Some("<s>"), Some("</s>")).expect("built-in template compiles")
    }

    /// LLaMA-3-Instruct: `<|begin_of_text|>` then
    /// `<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>` per message.
    pub fn llama3_instruct() -> Self {
        Self::new(
            LLAMA3_INSTRUCT,
            Some("<|begin_of_text|>"),
            Some("<|eot_id|>"),
        )
        .expect("built-in template compiles")
    }

    /// ChatML: `<|im_start|>{role}\n{content}<|im_end|>\n` per message.
    pub fn chatml() -> Self {
        Self::new(CHATML, None, Some("<|im_end|>")).expect("built-in template compiles")
    }

    /// A built-in template for a model whose tokenizer has no template, chosen by
    /// the special tokens its vocabulary has: ChatML if `<|im_start|>`, LLaMA-3 if
    /// `<|start_header_id|>`, LLaMA-2 otherwise.
    pub fn guess_builtin(has_token: impl Fn(&str) -> bool) -> Self {
        if has_token("<|im_start|>") {
            Self::chatml()
        } else if has_token("<|start_header_id|>") {
            Self::llama3_instruct()
        } else {
            Self::llama2_chat()
        }
    }

    /// [`ChatTemplate::guess_builtin`] over a tokenizer's vocabulary.
    pub fn guess_builtin_for(tokenizer: &Tokenizer) -> Self {
        Self::guess_builtin(|t| tokenizer.token_to_id(t).is_some())
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Renders the prompt for `messages`. With `add_generation_prompt` the text ends
    /// with the header of an assistant turn, ready for generation. The result holds
    /// its special tokens as text: encode it without adding special tokens.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, ())
    }

    /// [`ChatTemplate::render`] with extra template variables (e.g. `tools`,
    /// `date_string`), given as anything that serialises to a map. As in
    /// transformers, they override `bos_token`/`eos_token`; `messages` and
    /// `add_generation_prompt` always come from the arguments.
    pub fn render_with<S: Serialize>(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: S,
    ) -> Result<String> {
        let mut ctx: Vec<(String, Value)> = Vec::new();
        if let Some(b) = &self.bos_token {
            ctx.push(("bos_token".into(), Value::from(b.as_str())));
        }
        if let Some(e) = &self.eos_token {
            ctx.push(("eos_token".into(), Value::from(e.as_str())));
        }
        let extra = Value::from_serialize(&extra);
        match extra.kind() {
            ValueKind::Map => {
                for key in extra.try_iter().map_err(template_err)? {
                    let v = extra.get_item(&key).map_err(template_err)?;
                    let key = key
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| key.to_string());
                    ctx.retain(|(k, _)| *k != key);
                    ctx.push((key, v));
                }
            }
            ValueKind::None | ValueKind::Undefined => {}
            other => {
                return Err(HassError::Template(format!(
                    "extra template variables must be a map, found {other}"
                )))
            }
        }
        ctx.retain(|(k, _)| k != "messages" && k != "add_generation_prompt");
        ctx.push(("messages".into(), Value::from_serialize(messages)));
        ctx.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        let ctx: Value = ctx.into_iter().collect();
        let tmpl = self.env.get_template(TEMPLATE_NAME).map_err(template_err)?;
        tmpl.render(ctx).map_err(template_err)
    }
}

/// transformers' `raise_exception(message)`: aborts rendering with the template's
/// own message (e.g. "Conversation roles must alternate ...").
fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, byte-for-byte, so tool schemas in prompts
/// match Python's (`", "`/`": "` separators, no HTML escaping, insertion order).
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_owned()),
            None => {
                let n = i64::try_from(v.clone()).map_err(|_| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        format!("tojson: bad indent {v}"),
                    )
                })?;
                Some(" ".repeat(n.max(0) as usize))
            }
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(s) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: separators must be a pair, got {s:?}"),
            ))
        }
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let w = PyJson {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    w.write(&value, 0, &mut out)?;
    Ok(Value::from(out))
}

/// Python's `json.dumps` layout.
struct PyJson {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl PyJson {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    }

    fn string(&self, s: &str, out: &mut String) {
        let quoted = serde_json::to_string(s).expect("strings serialise");
        if self.ensure_ascii {
            for c in quoted.chars() {
                if c.is_ascii() {
                    out.push(c);
                } else {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
            }
        } else {
            out.push_str(&quoted);
        }
    }

    fn write(&self, v: &Value, level: usize, out: &mut String) -> std::result::Result<(), Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                let s = serde_json::to_string(v)
                    .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
                out.push_str(&s);
            }
            ValueKind::String => self.string(v.as_str().unwrap_or_default(), out),
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                if self.sort_keys {
                    keys.sort();
                }
                out.push('{');
                for (i, key) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    match key.as_str() {
                        Some(s) => self.string(s, out),
                        None => self.string(&key.to_string(), out),
                    }
                    out.push_str(&self.key_sep);
                    self.write(&v.get_item(key)?, level + 1, out)?;
                }
                self.newline(level, out);
                out.push('}');
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.write(item, level + 1, out)?;
                }
                self.newline(level, out);
                out.push(']');
            }
            _ => self.string(&v.to_string(), out),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conv() -> Vec<ChatMessage> {
        vec![
            ChatMessage::system("You are terse."),
            ChatMessage::user("Hi there"),
            ChatMessage::assistant("Hello!"),
            ChatMessage::user("What is 2+2?"),
        ]
    }

    #[test]
    fn a_runaway_template_fails_instead_of_hanging() {
        // Ten billion iterations without the fuel bound; the fuzzer's version nested
        // loops over the characters of strings.
        let t = ChatTemplate::new(
            "{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let start = std::time::Instant::now();
        let err = t.render(&conv(), true).unwrap_err();
        assert!(
            matches!(err, HassError::Template(ref m) if m.contains("fuel")),
            "{err}"
        );
        assert!(start.elapsed().as_secs() < 30);
    }

    #[test]
    fn fuel_leaves_room_for_long_conversations() {
        let turns: Vec<ChatMessage> = (0..5000)
            .map(|i| match i % 2 {
                0 => ChatMessage::user(format!("question {i}")),
                _ => ChatMessage::assistant(format!("answer {i}")),
            })
            .collect();
        for t in [
            ChatTemplate::llama2_chat(),
            ChatTemplate::llama3_instruct(),
            ChatTemplate::chatml(),
        ] {
            let text = t.render(&turns, true).unwrap();
            assert!(text.contains("answer 4999"));
        }
    }

    #[test]
    fn llama2_exact() {
        let t = ChatTemplate::llama2_chat();
        let got = t.render(&conv(), true).unwrap();
        assert_eq!(
            got,
            "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello! </s><s>[INST] What is 2+2? [/INST]"
        );
        // No system message; generation prompt has no effect; content is stripped.
        let got = t.render(&[ChatMessage::user("  Hi \n")], false).unwrap();
        assert_eq!(got, "<s>[INST] Hi [/INST]");
    }

    #[test]
    fn llama2_rejects_non_alternating_roles() {
        let t = ChatTemplate::llama2_chat();
        let err = t
            .render(&[ChatMessage::user("a"), ChatMessage::user("b")], true)
            .unwrap_err();
        assert!(matches!(err, HassError::Template(_)));
        assert!(
            err.to_string()
                .contains("Conversation roles must alternate"),
            "{err}"
        );
    }

    #[test]
    fn llama3_exact() {
        let t = ChatTemplate::llama3_instruct();
        let got = t.render(&conv(), true).unwrap();
        assert_eq!(
            got,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let got = t.render(&[ChatMessage::user(" x ")], false).unwrap();
        assert_eq!(
            got,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nx<|eot_id|>"
        );
    }

    #[test]
    fn chatml_exact() {
        let t = ChatTemplate::chatml();
        let got = t.render(&conv(), true).unwrap();
        assert_eq!(
            got,
            "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        let got = t.render(&[ChatMessage::user("x")], false).unwrap();
        assert_eq!(got, "<|im_start|>user\nx<|im_end|>\n");
    }

    /// `chat_template` of HuggingFaceTB/SmolLM2-*-Instruct, as a JSON string value.
    const SMOLLM2_JSON: &str = r#""{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}""#;

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("hass-chat-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn smollm2_template_from_tokenizer_config() {
        let dir = temp_dir("smol");
        let path = dir.join("tokenizer_config.json");
        let config = format!(
            r#"{{"add_prefix_space": false, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                "pad_token": "<|im_end|>", "chat_template": {SMOLLM2_JSON}, "model_max_length": 8192}}"#
        );
        std::fs::write(&path, config).unwrap();
        let t = ChatTemplate::from_tokenizer_config(&path).unwrap().unwrap();
        assert_eq!(t.bos_token(), Some("<|im_start|>"));
        assert_eq!(t.eos_token(), Some("<|im_end|>"));
        let got = t
            .render(&[ChatMessage::user("What is the capital of France?")], true)
            .unwrap();
        assert_eq!(
            got,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
        // An explicit system message replaces the default one.
        let got = t
            .render(
                &[ChatMessage::system("Be brief."), ChatMessage::user("Hi")],
                false,
            )
            .unwrap();
        assert_eq!(
            got,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn tokenizer_config_variants() {
        let dir = temp_dir("variants");
        let path = dir.join("tokenizer_config.json");

        // List form, token objects.
        std::fs::write(
            &path,
            json!({
                "bos_token": {"content": "<s>", "lstrip": false, "__type": "AddedToken"},
                "eos_token": {"content": "</s>"},
                "chat_template": [
                    {"name": "tool_use", "template": "TOOLS"},
                    {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"}
                ]
            })
            .to_string(),
        )
        .unwrap();
        let t = ChatTemplate::from_tokenizer_config(&path).unwrap().unwrap();
        assert_eq!(
            t.render(&[ChatMessage::user("x")], false).unwrap(),
            "<s>x</s>"
        );

        // No default in the list.
        std::fs::write(
            &path,
            json!({"chat_template": [{"name": "rag", "template": "x"}]}).to_string(),
        )
        .unwrap();
        let err = ChatTemplate::from_tokenizer_config(&path).unwrap_err();
        assert!(err.to_string().contains("default"), "{err}");

        // No template, null bos: Ok(None).
        std::fs::write(
            &path,
            json!({"bos_token": null, "eos_token": "<|endoftext|>"}).to_string(),
        )
        .unwrap();
        assert!(ChatTemplate::from_tokenizer_config(&path)
            .unwrap()
            .is_none());

        // Sibling chat_template.jinja; bos undefined renders empty.
        std::fs::write(
            dir.join("chat_template.jinja"),
            "[{{ bos_token }}]{{ eos_token }}\n",
        )
        .unwrap();
        let t = ChatTemplate::from_tokenizer_config(&path).unwrap().unwrap();
        assert_eq!(t.bos_token(), None);
        assert_eq!(t.render(&[], false).unwrap(), "[]<|endoftext|>");

        // Syntax error names the file.
        std::fs::write(&path, json!({"chat_template": "{% for %}"}).to_string()).unwrap();
        let err = ChatTemplate::from_tokenizer_config(&path).unwrap_err();
        assert!(matches!(err, HassError::Template(_)));
        assert!(err.to_string().contains("tokenizer_config.json"), "{err}");

        // Missing file and bad JSON.
        assert!(matches!(
            ChatTemplate::from_tokenizer_config(dir.join("nope.json")).unwrap_err(),
            HassError::Io { .. }
        ));
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(
            ChatTemplate::from_tokenizer_config(&path).unwrap_err(),
            HassError::Json { .. }
        ));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn jinja_environment_matches_transformers() {
        // trim_blocks + lstrip_blocks: block tags on their own lines leave no blank lines.
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}\n";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert_eq!(
            t.render(&[ChatMessage::user("a"), ChatMessage::user("b")], false)
                .unwrap(),
            "U:a\nU:b\n"
        );

        // Python string methods, loop controls, namespace, slicing.
        let src = "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.content.startswith('skip') %}{% continue %}{% endif %}\
                   {% set ns.n = ns.n + 1 %}{{ m.content.strip().upper() }}|{{ m['content'].replace('a', 'b')|trim }};{% endfor %}{{ ns.n }}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        let msgs = [
            ChatMessage::user(" abc "),
            ChatMessage::user("skip me"),
            ChatMessage::user("xa"),
        ];
        assert_eq!(t.render(&msgs, false).unwrap(), "ABC|bbc;XA|xb;2");

        // Extra variables (e.g. tools) and transformers' tojson (Python separators,
        // insertion order, no HTML escaping).
        let src = "{{ tools | tojson }}\n{{ tools[0] | tojson(indent=2) }}\n{{ date_string }}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        #[derive(Serialize)]
        struct Tool {
            name: &'static str,
            description: &'static str,
            args: Vec<u32>,
            empty: Vec<u32>,
        }
        #[derive(Serialize)]
        struct Extra {
            tools: Vec<Tool>,
            date_string: &'static str,
        }
        let extra = Extra {
            tools: vec![Tool {
                name: "z<é>",
                description: "a & b",
                args: vec![1, 2],
                empty: vec![],
            }],
            date_string: "26 Jul 2024",
        };
        let got = t.render_with(&[], false, &extra).unwrap();
        assert_eq!(
            got,
            "[{\"name\": \"z<é>\", \"description\": \"a & b\", \"args\": [1, 2], \"empty\": []}]\n\
             {\n  \"name\": \"z<é>\",\n  \"description\": \"a & b\",\n  \"args\": [\n    1,\n    2\n  ],\n  \"empty\": []\n}\n\
             26 Jul 2024"
        );

        // strftime_now is left undefined so templates fall back deterministically.
        let t = ChatTemplate::new(
            "{% if strftime_now is defined %}now{% else %}fixed{% endif %}",
            None,
            None,
        )
        .unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "fixed");

        // Extra variables override bos/eos but never messages.
        let t =
            ChatTemplate::new("{{ bos_token }}{{ messages|length }}", Some("<s>"), None).unwrap();
        let got = t
            .render_with(
                &[ChatMessage::user("x")],
                false,
                json!({"bos_token": "B", "messages": []}),
            )
            .unwrap();
        assert_eq!(got, "B1");
        assert!(t.render_with(&[], false, vec![1]).is_err());
    }

    #[test]
    fn guess_builtin_by_vocab() {
        let has = |toks: &'static [&'static str]| move |t: &str| toks.contains(&t);
        assert_eq!(
            ChatTemplate::guess_builtin(has(&["<|im_start|>", "<|im_end|>"])).source(),
            CHATML
        );
        assert_eq!(
            ChatTemplate::guess_builtin(has(&["<|start_header_id|>"])).source(),
            LLAMA3_INSTRUCT
        );
        assert_eq!(
            ChatTemplate::guess_builtin(has(&["<s>"])).source(),
            LLAMA2_CHAT
        );
    }

    #[test]
    fn chat_message_serde() {
        let m: ChatMessage = serde_json::from_str(r#"{"role":"user","content":"hi"}"#).unwrap();
        assert_eq!(m, ChatMessage::user("hi"));
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"role":"user","content":"hi"}"#
        );
    }
}
