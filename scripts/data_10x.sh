#!/usr/bin/env bash
# Features for the 10x-data SmolLM2 heads: a fixed held-out set of ShareGPT
# conversations that no new head trains on, and a training set ten times the committed
# heads' (~3.4 M tokens), both from the seed-42 shuffle, never overlapping, and both
# after its first 200 conversations (the committed heads' data; their stage on the
# seed-43 shuffle shares ~3 conversations with the held-out set). Resumable:
# run it again after an interruption and complete shards are kept (at ~300 tokens/s on
# 2 cores the training set takes ~3 h; `hass-train datagen` prints its rate).
#
#   scripts/data_10x.sh [OUT_DIR]    # default: data/
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-data}"
model="${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
used=200      # seed 42's first 200: the committed heads' data
heldout=200   # conversations held out for every head's report
train=4000    # ~3.4 M tokens at --max-len 1024
cargo build --release -p hass-train
bin=target/release/hass-train
"$bin" datagen --model "$model" --corpus sharegpt --skip "$used" --limit "$heldout" \
    --max-len 1024 --out "$out/sharegpt-heldout"
"$bin" datagen --model "$model" --corpus sharegpt --skip $((used + heldout)) --limit "$train" \
    --max-len 1024 --out "$out/sharegpt-train-10x"
