//! The release binary copied into an empty directory: it must find its data at run
//! time ($HASS_HOME, next to the executable) or say where it looked and how to point
//! it at the data, never fall back to the source tree it was built in.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use hass_models::assets::{ensure, Asset, DEFAULT_HEAD};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A temporary directory holding only a copy of `serve`.
fn copied_binary() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("serve");
    std::fs::copy(env!("CARGO_BIN_EXE_serve"), &exe).unwrap();
    (dir, exe)
}

/// `exe` run from its own directory with `cache` as $HASS_CACHE and no $HASS_HOME.
fn command(exe: &Path, cache: &Path) -> Command {
    let mut c = Command::new(exe);
    c.current_dir(exe.parent().unwrap())
        .env_remove("HASS_HOME")
        .env("HASS_CACHE", cache)
        .args(["--port", "0", "--tree", "1,0,1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Runs `c` to its end (it must fail) and returns its stderr.
fn failure(mut c: Command) -> String {
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "expected a failure, got: {err}");
    err
}

/// Waits for the "serving ... on http://ADDR" line, checks `/health` there, and
/// returns the health body; the server is killed either way.
fn serves(mut child: Child) -> String {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut log = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            log += &line;
            log.push('\n');
            if let Some(at) = line.find("http://") {
                let _ = tx.send(Ok(line[at + 7..].trim().to_string()));
                return;
            }
        }
        let _ = tx.send(Err(log));
    });
    let addr = rx.recv_timeout(Duration::from_secs(180));
    let body = addr.map(|a| a.map(|a| health(&a)));
    let _ = child.kill();
    let _ = child.wait();
    match body {
        Ok(Ok(body)) => body,
        Ok(Err(log)) => panic!("serve exited without listening:\n{log}"),
        Err(e) => panic!("serve did not start: {e}"),
    }
}

fn health(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

#[test]
fn without_data_it_names_every_place_it_looked() {
    let (dir, exe) = copied_binary();
    let err = failure(command(&exe, &dir.path().join("cache")));
    for needle in [
        "scripts/fetch_assets.sh not found",
        "$HASS_HOME (unset)",
        "the current directory",
        "the executable's directory",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "--model",
    ] {
        assert!(err.contains(needle), "`{needle}` missing from: {err}");
    }
}

#[test]
fn with_the_model_cached_it_asks_for_the_head() {
    let model = ensure(Asset::SmolLm2).unwrap();
    let (_dir, exe) = copied_binary();
    let err = failure(command(&exe, model.parent().unwrap()));
    for needle in [&format!("{DEFAULT_HEAD} not found"), "HASS_HOME", "--draft"] {
        assert!(err.contains(needle), "`{needle}` missing from: {err}");
    }
}

#[test]
fn it_finds_heads_next_to_the_executable() {
    let model = ensure(Asset::SmolLm2).unwrap();
    let (dir, exe) = copied_binary();
    let head = dir.path().join(DEFAULT_HEAD);
    std::fs::create_dir_all(&head).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(repo().join(DEFAULT_HEAD).join(f), head.join(f)).unwrap();
    }
    let child = command(&exe, model.parent().unwrap()).spawn().unwrap();
    assert!(serves(child).contains(r#""speculative":true"#));
}

#[test]
fn it_finds_heads_through_hass_home() {
    let model = ensure(Asset::SmolLm2).unwrap();
    let (_dir, exe) = copied_binary();
    let child = command(&exe, model.parent().unwrap())
        .env("HASS_HOME", repo())
        .spawn()
        .unwrap();
    assert!(serves(child).contains(r#""speculative":true"#));
}
