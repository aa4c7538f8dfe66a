#!/usr/bin/env bash
# Prepares, on this machine, what a GPU machine needs for scripts/device/run.sh, in
# .device/ (ignored through .git/info/exclude; carried by the device calls):
#   .device/bin/*.xz     stripped, xz-compressed binaries (generate, speculate,
#                        hass-bench, hass-train) built with the chosen backend feature
#   .device/model/part-* the SmolLM2 GGUF split into pieces that fit a call
#   .device/data/        a ShareGPT slice (1,000 conversations, ~7 MB) for datagen there
#   .device/MANIFEST     sha256 of every piece and of the joined model
#
#   scripts/device/pack.sh [cuda|wgpu|cpu] [PART_MIB]    (default: cuda, 30)
# `cpu` builds the same package from CPU binaries: a dry run of run.sh here.
set -euo pipefail
cd "$(dirname "$0")/../.."
backend="${1:-cuda}"
part_mib="${2:-30}"
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
rm -rf .device && mkdir -p .device/bin .device/model .device/data

features=()
case "$backend" in
    cuda) features=(--features hass-models/cuda); export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13000}" ;;
    wgpu) features=(--features hass-models/wgpu) ;;
    cpu) ;;
    *) echo "backend: cuda, wgpu or cpu" >&2; exit 2 ;;
esac
# Its own target directory: a GPU build must not replace the CPU binaries in target/.
target="target/device-$backend"
CARGO_TARGET_DIR="$target" cargo build --release -p hass-examples -p hass-bench -p hass-train \
    "${features[@]}" --bin generate --bin speculate --bin hass-bench --bin hass-train
for b in generate speculate hass-bench hass-train; do
    strip -o ".device/bin/$b" "$target/release/$b"
    xz -9 -T0 ".device/bin/$b"
done

model="$(scripts/fetch_assets.sh smollm2 | tail -1)"
split -b "${part_mib}M" -d -a 2 "$model" .device/model/part-
sha256sum "$model" | sed 's|  .*|  SmolLM2-135M-Instruct.Q4_1.gguf|' > .device/MANIFEST

sharegpt="$(scripts/fetch_assets.sh sharegpt | tail -1)"
# Conversations 0..N of the file: datagen there shuffles with its own seed.
python3 scripts/sharegpt_subset.py --sharegpt "$sharegpt" --contains '' --limit "${DEVICE_CONVERSATIONS:-1000}" \
    --out .device/data/sharegpt.jsonl
(cd .device && find bin data model -type f | sort | xargs sha256sum) >> .device/MANIFEST
du -sh .device/* | sed 's/^/packed: /'
