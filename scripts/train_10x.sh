#!/usr/bin/env bash
# The SmolLM2 heads on scripts/data_10x.sh's training set, at equal budget: the
# EAGLE objective (1 forward, no Top-K loss), HASS (3 forwards, Top-K loss in stage 2)
# and the paper's ablation, Top-K only (1 forward) and alignment only (3 forwards).
# Same data, stages, epochs, seed and 8,192-token draft vocabulary
# (configs/smollm2-10x-*.json). Stage 1 of a Top-K-only run is the EAGLE run's stage 1
# (the same plan), and alignment-only shares HASS's: each is trained once and copied.
# Resumable: run it again after an interruption (checkpoints every 10 minutes inside
# an epoch); finished stages are kept. Then every head on the held-out set.
#
#   scripts/train_10x.sh [RUNS_DIR=runs/10x] [DATA_DIR=data]
#
# Cost on the 2-vCPU dev machine: ~1,070 training tokens/s with 1 forward, ~350 with
# 3, over 3.0 M tokens per epoch: ~10 h in all.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-runs/10x}"
data="${2:-data}"
model="${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
cargo build --release -p hass-train
bin=target/release/hass-train
train() { # NAME [STAGE1_FROM]
    local out="$runs/$1"
    if [ -n "${2:-}" ] && [ ! -f "$out/stage1/state.json" ]; then
        mkdir -p "$out"
        cp -r "$runs/$2/stage1" "$out/stage1"
    fi
    "$bin" train --model "$model" --data "$data/sharegpt-train-10x" \
        --config "configs/smollm2-10x-$1.json" --out "$out"
}
train eagle
train topk eagle
train hass
train align hass
heads=()
for n in eagle topk hass align; do heads+=(--head "$n=$runs/$n/stage2"); done
"$bin" evaluate --model "$model" --data "$data/sharegpt-heldout" "${heads[@]}" \
    | tee "$runs/heldout.md"
