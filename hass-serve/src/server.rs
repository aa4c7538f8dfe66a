//! The HTTP routes: OpenAI's `/v1/chat/completions`, `/v1/completions` and
//! `/v1/models`, plus `/health`.
//!
//! Requests are validated and tokenized here, so that a bad request gets its 400 at
//! once instead of after waiting in the queue; generation happens on the engine
//! thread. Every response carries the request's decoding statistics in a `hass`
//! field (τ, rounds, tokens/s), which OpenAI clients keep as an extra field.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hass_infer::GenerationConfig;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::api::{parse, ApiError, ChatRequest, CompletionRequest, Params, Validated};
use crate::engine::{Engine, Event, Job, ModelInfo, SubmitError, Summary};

/// Everything the handlers share.
pub struct AppState {
    pub engine: Engine,
    pub info: ModelInfo,
    /// The model name clients send (`model`) and `/v1/models` lists.
    pub model_id: String,
    /// `max_tokens` when a request gives none (cut to what the context leaves).
    pub default_max_tokens: usize,
    created: u64,
    next_id: AtomicU64,
}

impl AppState {
    pub fn new(
        engine: Engine,
        info: ModelInfo,
        model_id: String,
        default_max_tokens: usize,
    ) -> Self {
        AppState {
            engine,
            info,
            model_id,
            default_max_tokens,
            created: unix_now(),
            next_id: AtomicU64::new(0),
        }
    }

    /// A response id unique within this server's life (prefix + start time + count).
    fn response_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}{n:06x}", self.created)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A seed for requests that give none: sampled output then differs between requests,
/// as with OpenAI.
fn random_seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The router of the server.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                ..ApiError::invalid(None, "unknown route")
            }
            .with_code("not_found")
        })
        .with_state(state)
}

async fn health(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "model": state.model_id,
        "speculative": state.info.head.is_some(),
        "engine": state.engine.stats(),
    }))
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_id,
            "object": "model",
            "created": state.created,
            "owned_by": "hass",
        }],
    }))
}

/// Chat or text completion: what differs in the response format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

impl Kind {
    fn id_prefix(self) -> &'static str {
        match self {
            Kind::Chat => "chatcmpl",
            Kind::Text => "cmpl",
        }
    }

    fn object(self, stream: bool) -> &'static str {
        match (self, stream) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    /// One choice holding `text` (a whole message, or a stream delta).
    fn choice(self, text: &str, stream: bool, finish: Option<Value>) -> Value {
        match (self, stream) {
            (Kind::Chat, false) => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": null,
            }),
            (Kind::Chat, true) if text.is_empty() => {
                json!({"index": 0, "delta": {}, "finish_reason": finish, "logprobs": null})
            }
            (Kind::Chat, true) => json!({
                "index": 0,
                "delta": {"content": text},
                "finish_reason": finish,
                "logprobs": null,
            }),
            (Kind::Text, _) => {
                json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": null})
            }
        }
    }
}

fn usage(s: &Summary) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
    })
}

async fn chat_completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let request = match parse::<ChatRequest>(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let prompt = request.chat_messages().and_then(|messages| {
        let text = state
            .info
            .template
            .render(&messages, true)
            .map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
        // The rendered template holds its special tokens as text.
        encode(&state, &text, false)
    });
    respond(state, Kind::Chat, &request.params, prompt).await
}

async fn completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let request = match parse::<CompletionRequest>(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let prompt = request.prompt_text().and_then(|p| encode(&state, p, true));
    respond(state, Kind::Text, &request.params, prompt).await
}

fn encode(state: &AppState, text: &str, special: bool) -> Result<Vec<u32>, ApiError> {
    state
        .info
        .tokenizer
        .encode(text, special)
        .map_err(|e| ApiError::invalid(Some("prompt"), e.to_string()))
}

/// Validates, queues and answers one request.
async fn respond(
    state: Arc<AppState>,
    kind: Kind,
    params: &Params,
    prompt: Result<Vec<u32>, ApiError>,
) -> Response {
    match start(&state, params, prompt) {
        Ok((v, rx)) if v.stream => stream(state, kind, v, rx).into_response(),
        Ok((_, rx)) => complete(state, kind, rx).await,
        Err(e) => e.into_response(),
    }
}

fn start(
    state: &AppState,
    params: &Params,
    prompt: Result<Vec<u32>, ApiError>,
) -> Result<(Validated, mpsc::UnboundedReceiver<Event>), ApiError> {
    if let Some(model) = params.model.as_deref().filter(|m| *m != state.model_id) {
        return Err(ApiError::invalid(
            Some("model"),
            format!(
                "the model `{model}` does not exist; this server has `{}`",
                state.model_id
            ),
        )
        .with_code("model_not_found"));
    }
    let prompt = prompt?;
    let v = params.validate(
        prompt.len(),
        state.info.context,
        state.default_max_tokens,
        random_seed(),
    )?;
    let (events, rx) = mpsc::unbounded_channel();
    let job = Job {
        prompt,
        config: GenerationConfig {
            max_new_tokens: v.max_tokens,
            sampling: v.sampling,
            stop_tokens: vec![],
        },
        stop: v.stop.clone(),
        events,
    };
    state.engine.submit(job).map_err(|e| match e {
        SubmitError::Busy(_) => ApiError::server(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("server busy: {e}; retry later"),
        )
        .with_code("overloaded"),
        SubmitError::Stopped => ApiError::server(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    })?;
    Ok((v, rx))
}

/// A non-streamed answer: waits for the whole text. If the client goes away, this
/// future is dropped with `rx`, which stops the generation.
async fn complete(
    state: Arc<AppState>,
    kind: Kind,
    mut rx: mpsc::UnboundedReceiver<Event>,
) -> Response {
    let mut text = String::new();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Text(t) => text += &t,
            Event::Failed(msg) => {
                return ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, msg).into_response()
            }
            Event::Done(summary) => {
                return Json(json!({
                    "id": state.response_id(kind.id_prefix()),
                    "object": kind.object(false),
                    "created": unix_now(),
                    "model": state.model_id,
                    "choices": [kind.choice(&text, false, Some(json!(summary.finish_reason)))],
                    "usage": usage(&summary),
                    "hass": summary,
                }))
                .into_response()
            }
        }
    }
    ApiError::server(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the engine dropped the request",
    )
    .into_response()
}

/// A streamed answer (server-sent events, as OpenAI sends them): the engine's events
/// are turned into chunks by a task whose channel the response body reads. When the
/// client disconnects the body is dropped, the task's next send fails and it drops
/// the engine's receiver, which stops the generation.
fn stream(
    state: Arc<AppState>,
    kind: Kind,
    v: Validated,
    mut rx: mpsc::UnboundedReceiver<Event>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let (tx, out) = mpsc::channel::<SseEvent>(16);
    tokio::spawn(async move {
        let id = state.response_id(kind.id_prefix());
        let created = unix_now();
        let chunk = |choices: Value| {
            json!({
                "id": id,
                "object": kind.object(true),
                "created": created,
                "model": state.model_id,
                "choices": choices,
            })
        };
        let sse = |value: Value| SseEvent::default().data(value.to_string());
        if kind == Kind::Chat {
            let first = json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null, "logprobs": null}]);
            if tx.send(sse(chunk(first))).await.is_err() {
                return;
            }
        }
        while let Some(event) = rx.recv().await {
            let mut tail = vec![];
            match event {
                Event::Text(t) => tail.push(chunk(json!([kind.choice(&t, true, None)]))),
                Event::Failed(msg) => {
                    tail.push(ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, msg).body())
                }
                Event::Done(summary) => {
                    let finish = Some(json!(summary.finish_reason));
                    let mut last = chunk(json!([kind.choice("", true, finish)]));
                    last["hass"] = json!(summary);
                    tail.push(last);
                    if v.include_usage {
                        let mut u = chunk(json!([]));
                        u["usage"] = usage(&summary);
                        tail.push(u);
                    }
                }
            }
            for value in tail {
                if tx.send(sse(value)).await.is_err() {
                    return;
                }
            }
        }
        let _ = tx.send(SseEvent::default().data("[DONE]")).await;
    });
    let body = futures_util::stream::unfold(out, |mut out| async move {
        out.recv().await.map(|e| (Ok(e), out))
    });
    Sse::new(body)
}
