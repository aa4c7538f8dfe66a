//! `serve`: an OpenAI-compatible server on one model (default: SmolLM2-135M-Instruct
//! with the committed HASS head, on 127.0.0.1:8000).
//!
//! ```text
//! cargo run --release -p hass-serve -- --port 8000
//! curl http://127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' \
//!   -d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi!"}], "temperature": 0}'
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use hass_infer::tuning::TreeSpec;
use hass_models::WeightDtype;
use hass_serve::engine::{Draft, Engine, EngineOptions};
use hass_serve::server::{router, AppState};

#[derive(Parser, Debug)]
#[command(about = "OpenAI-compatible server (chat and text completions) with speculative decoding")]
struct Args {
    /// A Hugging Face model directory or a .gguf file [default: SmolLM2-135M-Instruct
    /// Q4_1, fetched on first use into $HASS_CACHE]
    #[arg(long)]
    model: Option<PathBuf>,
    /// Draft head directory, or `none` for vanilla decoding [default: the committed
    /// heads/smollm2-hass-v8k-long for the default model, found through $HASS_HOME,
    /// the current directory or the executable's location; vanilla for other models]
    #[arg(long)]
    draft: Option<String>,
    /// Draft tree: `auto` (tuned for this machine and head once, cached) or
    /// total_tokens,depth,top_k.
    #[arg(long, default_value = "auto")]
    tree: TreeSpec,
    /// Storage dtype of the weight matrices.
    #[arg(long, default_value = "f16")]
    dtype: WeightDtype,
    /// Address to listen on (loopback by default: the server has no authentication).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Requests that may wait while one is generated; more get 503.
    #[arg(long, default_value_t = 8)]
    queue: usize,
    /// The model name clients must send [default: the model file's or directory's name].
    #[arg(long)]
    model_name: Option<String>,
    /// max_tokens of requests that set none (cut to what the context leaves).
    #[arg(long, default_value_t = 256)]
    default_max_tokens: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let draft = match args.draft.as_deref() {
        None => Draft::Default,
        Some("none") => Draft::None,
        Some(dir) => Draft::Dir(dir.into()),
    };
    let options = EngineOptions {
        model: args.model,
        draft,
        tree: args.tree,
        dtype: args.dtype,
        queue: args.queue,
    };
    let (engine, info) = tokio::task::spawn_blocking(move || Engine::start(options)).await??;
    let model_id = args.model_name.unwrap_or_else(|| {
        let stem = info.path.file_stem().unwrap_or(info.path.as_os_str());
        let name = stem.to_string_lossy();
        // SmolLM2-135M-Instruct.Q4_1.gguf → SmolLM2-135M-Instruct
        name.split('.').next().unwrap_or(&name).to_string()
    });
    let decoding = match &info.head {
        Some(h) => format!("speculative, head {}", h.display()),
        None => "vanilla".into(),
    };
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| format!("--host {} --port {}", args.host, args.port))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let bound = listener.local_addr()?;
    let state = Arc::new(AppState::new(
        engine,
        info,
        model_id.clone(),
        args.default_max_tokens,
    ));
    eprintln!("serving {model_id} ({decoding}) on http://{bound}");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown())
        .await?;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
