//! The OpenAI request bodies hass understands, their validation, and OpenAI-style
//! error responses.
//!
//! Fields hass does not implement are ignored when they cannot change the text
//! (`user`, `frequency_penalty` at its default, ...) and refused when they would
//! (`n` > 1, `logprobs`), so a client never gets silently different behaviour.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use hass_core::chat::ChatMessage;
use hass_core::sampling::SamplingParams;
use serde::Deserialize;
use serde_json::json;

/// OpenAI's limit on stop strings per request.
const MAX_STOP_STRINGS: usize = 4;

/// An error answered with an OpenAI-style body:
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error` about `param`.
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// A server-side failure with `status` (500 or 503).
    pub fn server(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        response
    }
}

/// Parses a JSON request body, answering malformed JSON or wrong field types with a
/// 400 that quotes serde's message (line, column, field).
pub fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, format!("invalid request body: {e}")))
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling and length fields that chat and text completions share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Params {
    pub model: Option<String>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub max_tokens: Option<i64>,
    /// The newer name of `max_tokens` in the chat API.
    pub max_completion_tokens: Option<i64>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub n: Option<i64>,
    pub logprobs: Option<serde_json::Value>,
}

/// `messages[].content`: a string, or a list of parts of which only text is supported.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    #[serde(flatten)]
    pub params: Params,
}

/// `prompt` of a text completion: one string (a list is accepted when it holds one).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    One(String),
    Many(Vec<String>),
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    #[serde(flatten)]
    pub params: Params,
}

impl ChatRequest {
    /// The messages as the chat template takes them.
    pub fn chat_messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                Some("messages"),
                "messages must not be empty",
            ));
        }
        self.messages
            .iter()
            .map(|m| {
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => parts
                        .iter()
                        .map(|p| match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => Ok(t.as_str()),
                            (kind, _) => Err(ApiError::invalid(
                                Some("messages"),
                                format!(
                                    "content parts of type `{kind}` are not supported (text only)"
                                ),
                            )),
                        })
                        .collect::<Result<String, _>>()?,
                };
                Ok(ChatMessage::new(m.role.clone(), content))
            })
            .collect()
    }
}

impl CompletionRequest {
    pub fn prompt_text(&self) -> Result<&str, ApiError> {
        match &self.prompt {
            Prompt::One(p) => Ok(p),
            Prompt::Many(list) if list.len() == 1 => Ok(&list[0]),
            Prompt::Many(_) => Err(ApiError::invalid(
                Some("prompt"),
                "exactly one prompt per request is supported",
            )),
        }
    }
}

/// A request's validated generation settings.
#[derive(Debug, Clone)]
pub struct Validated {
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

impl Params {
    /// Checks the fields against the model's `context` for a prompt of
    /// `prompt_tokens`; `default_max_tokens` applies when the request sets no limit
    /// (cut to what the context leaves). `random_seed` is used when `seed` is absent.
    pub fn validate(
        &self,
        prompt_tokens: usize,
        context: usize,
        default_max_tokens: usize,
        random_seed: u64,
    ) -> Result<Validated, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid(Some("n"), "only n = 1 is supported"));
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|l| !l.is_null() && l != &json!(false))
        {
            return Err(ApiError::invalid(
                Some("logprobs"),
                "logprobs are not supported",
            ));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                Some("temperature"),
                format!("temperature must be between 0 and 2, got {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                Some("top_p"),
                format!("top_p must be in (0, 1], got {top_p}"),
            ));
        }
        let seed = self.seed.map_or(random_seed, |s| s as u64);
        let sampling = SamplingParams::new(temperature, 0, top_p, seed)
            .map_err(|e| ApiError::invalid(Some("temperature"), e.to_string()))?;
        if prompt_tokens == 0 {
            return Err(ApiError::invalid(Some("prompt"), "the prompt is empty"));
        }
        let room = context.saturating_sub(prompt_tokens);
        let requested = self.max_completion_tokens.or(self.max_tokens);
        let max_tokens = match requested {
            Some(m) if m < 1 => {
                return Err(ApiError::invalid(
                    Some("max_tokens"),
                    format!("max_tokens must be at least 1, got {m}"),
                ))
            }
            Some(m) if m as u64 > room as u64 => {
                return Err(ApiError::invalid(
                    Some("max_tokens"),
                    format!(
                        "this model's context is {context} tokens; the prompt has {prompt_tokens} \
                         and max_tokens asks for {m} more (at most {room} fit)"
                    ),
                )
                .with_code("context_length_exceeded"))
            }
            Some(m) => m as usize,
            None if room == 0 => {
                return Err(ApiError::invalid(
                    Some("messages"),
                    format!("the prompt's {prompt_tokens} tokens fill the context of {context}"),
                )
                .with_code("context_length_exceeded"))
            }
            None => default_max_tokens.min(room),
        };
        let stop = match &self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(list)) => list.clone(),
        };
        if stop.len() > MAX_STOP_STRINGS {
            return Err(ApiError::invalid(
                Some("stop"),
                format!(
                    "at most {MAX_STOP_STRINGS} stop strings, got {}",
                    stop.len()
                ),
            ));
        }
        Ok(Validated {
            sampling,
            max_tokens,
            stop,
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(json: &str) -> Params {
        parse::<Params>(json.as_bytes()).unwrap()
    }

    #[test]
    fn defaults_fit_the_context() {
        let v = params("{}").validate(10, 100, 256, 7).unwrap();
        assert_eq!(v.max_tokens, 90);
        assert_eq!(v.sampling.seed, 7);
        assert_eq!(v.sampling.temperature, 1.0);
        assert!(v.stop.is_empty() && !v.stream);
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            (r#"{"temperature": -0.5}"#, "temperature"),
            (r#"{"temperature": 2.5}"#, "temperature"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"max_tokens": 0}"#, "max_tokens"),
            (r#"{"max_tokens": 91}"#, "max_tokens"),
            (r#"{"n": 2}"#, "n"),
            (r#"{"logprobs": true}"#, "logprobs"),
            (r#"{"stop": ["a", "b", "c", "d", "e"]}"#, "stop"),
        ];
        for (body, field) in cases {
            let e = params(body).validate(10, 100, 256, 0).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param, Some(field), "{body}: {e}");
            assert_eq!(e.body()["error"]["type"], "invalid_request_error");
        }
        let e = params(r#"{"max_tokens": 91}"#)
            .validate(10, 100, 256, 0)
            .unwrap_err();
        assert_eq!(e.code, Some("context_length_exceeded"));
    }

    #[test]
    fn request_values_are_taken() {
        let v = params(r#"{"temperature": 0, "top_p": 0.5, "max_tokens": 90, "stop": "x", "seed": 3, "stream": true, "stream_options": {"include_usage": true}}"#)
            .validate(10, 100, 256, 0)
            .unwrap();
        assert_eq!(
            (v.max_tokens, v.sampling.seed, v.sampling.top_p),
            (90, 3, 0.5)
        );
        assert_eq!(v.stop, vec!["x".to_string()]);
        assert!(v.stream && v.include_usage);
    }

    #[test]
    fn malformed_json_is_a_400() {
        let e = parse::<ChatRequest>(b"{\"messages\": [").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = parse::<ChatRequest>(br#"{"messages": [], "temperature": "hot"}"#).unwrap_err();
        assert!(e.message.contains("invalid"), "{e}");
    }

    #[test]
    fn chat_content_parts_are_joined_and_images_refused() {
        let r: ChatRequest = parse(
            br#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}"#,
        )
        .unwrap();
        assert_eq!(r.chat_messages().unwrap()[0].content, "ab");
        let r: ChatRequest =
            parse(br#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#)
                .unwrap();
        assert_eq!(r.chat_messages().unwrap_err().param, Some("messages"));
    }
}
