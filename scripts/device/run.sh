#!/usr/bin/env bash
# On the GPU machine, after stash.sh has gathered every piece: checks the pieces, then
# runs each step under its own timeout, writing logs and results to $OUT (at most 8
# files come back, 16 MiB each). A failing step is logged and the next one runs.
#
#   scripts/device/run.sh [STEP ...]   steps: env check speed eval train (default: all)
set -uo pipefail
cd "$(dirname "$0")/../.."
stash="${HASS_DEVICE_STASH:-/root/hass-stash}"
out="${OUT:-/tmp/hass-device-out}"
mkdir -p "$out"
log="$out/run.log"
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(env check speed eval train)
say() { echo "[$(date +%T)] $*" | tee -a "$log"; }

# Pieces: every file's sha256 as pack.sh recorded it, then the joined model's.
work=/root/hass-work
mkdir -p "$work/bin"
(cd "$stash" && sha256sum -c --quiet <(grep -v 'SmolLM2-135M-Instruct.Q4_1.gguf$' MANIFEST)) >>"$log" 2>&1 ||
    { say "pieces missing or damaged in $stash (stash.sh lists them)"; exit 1; }
model="$work/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -s "$model" ] || cat "$stash"/model/part-* > "$model"
(cd "$work" && sha256sum -c --quiet <(grep 'SmolLM2-135M-Instruct.Q4_1.gguf$' "$stash/MANIFEST")) >>"$log" 2>&1 ||
    { say "joined model does not match its sha256"; exit 1; }
for f in "$stash"/bin/*.xz; do
    b="$work/bin/$(basename "$f" .xz)"
    [ -x "$b" ] || { xz -dc "$f" > "$b" && chmod +x "$b"; }
done
export PATH="$work/bin:$PATH"
# CUDA compiles its kernels at run time with NVRTC.
nvrtc="$(find / -name 'libnvrtc.so*' -not -path '/proc/*' 2>/dev/null | xargs -r -n1 dirname | sort -u | paste -sd:)"
export LD_LIBRARY_PATH="${nvrtc}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export HASS_HOME="$PWD" HASS_CACHE="$work/cache"
mkdir -p "$HASS_CACHE"

step() { # step NAME SECONDS CMD...: one step under its own timeout, logged
    local name=$1 secs=$2; shift 2
    say "step $name (timeout ${secs}s): $*"
    local t0=$SECONDS
    timeout "$secs" "$@" >>"$log" 2>&1
    say "step $name: exit $? after $((SECONDS - t0)) s"
}

# Timeouts fit one call (10 minutes at most) per group of steps: `env check speed` in
# one call, `eval` or `train` in the next (README.md beside this file).
for s in "${steps[@]}"; do
    case "$s" in
        env) step env 30 bash -c 'nvidia-smi || true; echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"' ;;
        # T = 0: `identical output: true` when speculative equals vanilla; τ; tokens/s.
        check)
            step generate 60 generate --model "$model" --max-new-tokens 64
            step speculate-oracle 90 speculate --model "$model" --draft oracle --max-new-tokens 128
            step speculate-head 120 speculate --model "$model" --draft heads/smollm2-hass-v8k-long \
                --tree 10,3,3 --max-new-tokens 128 ;;
        speed) step speed 150 hass-bench speed --model "$model" --verify 1,2,4,8,16,32,64 \
                --json "$out/speed.json" ;;
        eval) step eval 300 hass-bench eval --model "$model" --head hass-v8k-long=heads/smollm2-hass-v8k-long \
                --sets mt_bench --limit 10 --temperatures 0 --max-new-tokens 128 --out "$out/eval" ;;
        train)
            step datagen 180 hass-train datagen --model "$model" --corpus "$stash/data/sharegpt.jsonl" \
                --limit "${DEVICE_DATAGEN_LIMIT:-0}" --max-len 1024 --out "$work/data"
            # One epoch per invocation: a timeout loses at most the epoch under way.
            step train 300 hass-train train --model "$model" --data "$work/data" \
                --config configs/smollm2-hass-v8k-gpu.json --stop-after-epochs 1 --out "$work/run"
            head="$(ls -d "$work"/run/stage* 2>/dev/null | tail -1)"
            if [ -n "$head" ]; then
                step export 30 hass-train export --model "$model" --head "$head" --dtype int8-rows --out "$out/head"
                cp "$head/log.jsonl" "$out/train-log.jsonl" 2>/dev/null
            fi ;;
        *) say "unknown step $s (env check speed eval train)" ;;
    esac
done
say "done; files in $out:"
find "$out" -type f | sort | xargs -r du -b | tee -a "$log"
