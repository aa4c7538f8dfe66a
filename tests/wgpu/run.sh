#!/usr/bin/env bash
# The wgpu backend end to end on lavapipe, Mesa's software Vulkan driver: a real Vulkan
# device on a machine without a GPU. Runs the backend-generic tests built with the wgpu
# feature (parity with transformers on the fixture models, vanilla and speculative
# decoding, training), then a crate outside the workspace that decodes a fixture model
# on wgpu and on the CPU in one process and needs the two identical, then checks that a
# wgpu build without any adapter fails with an error naming the backend.
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$SECONDS

icd() { ls /usr/share/vulkan/icd.d/lvp_icd*.json 2>/dev/null | head -1; }
if [ -z "$(icd)" ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get install -y --no-install-recommends mesa-vulkan-drivers libvulkan1 >/dev/null ||
        { $sudo apt-get update >/dev/null && $sudo apt-get install -y --no-install-recommends \
            mesa-vulkan-drivers libvulkan1 >/dev/null; }
fi
# lavapipe only, so a machine that also has a GPU tests the same device as CI.
export VK_ICD_FILENAMES="$(icd)"
test -n "$VK_ICD_FILENAMES" || { echo "no lavapipe ICD after installing mesa-vulkan-drivers" >&2; exit 1; }
# The Vulkan loader refuses to start without it.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
# One target directory for the workspace and the downstream crate: built once.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

cargo test --release -p hass-models -p hass-infer -p hass-train --features hass-models/wgpu \
    --test parity_hf --test vanilla --test speculative_fixture --test train
echo "wgpu tests: $((SECONDS - start)) s"

cargo run --release --manifest-path tests/downstream/Cargo.toml --features wgpu

# No adapter at all: a clear error naming the backend, not a panic.
bin="$CARGO_TARGET_DIR/release/hass-downstream"
if out=$(VK_ICD_FILENAMES=/nonexistent/icd.json "$bin" 2>&1); then
    echo "expected the downstream run to fail without a Vulkan adapter; it printed:" >&2
    echo "$out" >&2
    exit 1
fi
if ! grep -q "wgpu backend has no usable device" <<<"$out" || grep -q "panicked" <<<"$out"; then
    echo "without a Vulkan adapter: expected a clear error, got:" >&2
    echo "$out" >&2
    exit 1
fi
echo "no adapter: $(grep -m1 'no usable device' <<<"$out")"
echo "wgpu on lavapipe: $((SECONDS - start)) s"
