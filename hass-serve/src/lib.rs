//! An OpenAI-compatible HTTP server for hass: `POST /v1/chat/completions` and
//! `/v1/completions` (streamed or not), `GET /v1/models` and `GET /health`, decoded
//! speculatively with a draft head when one is given and plainly otherwise (the same
//! text at temperature 0 either way).
//!
//! One engine thread owns the model ([`engine`]); HTTP handlers ([`server`]) validate
//! and tokenize requests, queue them in a bounded queue (full: 503) and stream the
//! engine's text back. A client that disconnects stops its generation.

pub mod api;
pub mod engine;
pub mod server;
pub mod stop;
