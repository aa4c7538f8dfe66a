#!/usr/bin/env bash
# Starts `serve` twice on loopback ports (SmolLM2 with the committed HASS head, and
# vanilla), runs the openai-client tests and the bounded load test against them, and
# stops both servers, whatever happens. Used by .ci/run; needs the release `serve`
# binary (SERVE, default target/release/serve) and `pip install -r
# tests/serve/requirements.txt`.
#
# The tree is fixed to the one `--tree auto` picks on the development machine
# (1,0,1: one draft token) so that CI does not spend ~15 s tuning it.
set -euo pipefail
cd "$(dirname "$0")/../.."
serve="${SERVE:-${CARGO_TARGET_DIR:-target}/release/serve}"
logs="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
}
trap cleanup EXIT

# start NAME ARGS...: runs serve on a free loopback port; sets $url once it listens.
start() {
  local name="$1"; shift
  "$serve" --host 127.0.0.1 --port 0 "$@" >"$logs/$name.log" 2>&1 &
  pids+=($!)
  url=""
  for _ in $(seq 600); do  # loading takes seconds; give up after 120 s
    url="$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$logs/$name.log" | head -1 || true)"
    [ -n "$url" ] && break
    kill -0 "${pids[-1]}" 2>/dev/null || { cat "$logs/$name.log"; echo "serve ($name) exited" >&2; exit 1; }
    sleep 0.2
  done
  [ -n "$url" ] || { cat "$logs/$name.log"; echo "serve ($name) did not start in 120 s" >&2; exit 1; }
  echo "serve ($name): $url" >&2
}

start spec --tree 1,0,1
spec="$url"
start vanilla --draft none
vanilla="$url"
HASS_SERVE_URL="$spec" HASS_SERVE_VANILLA_URL="$vanilla" timeout 600 python3 -m pytest -q tests/serve/test_openai.py
timeout 600 python3 tests/serve/load_test.py "$spec" 16 3
