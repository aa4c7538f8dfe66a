#!/usr/bin/env bash
# Fetches llama.cpp's vocabulary-only GGUFs and their tokenizer test vectors
# (`ggml-vocab-*.gguf` + `.gguf.inp` / `.gguf.out`), the fixtures of
# `hass-models/tests/gguf_tokenizer.rs`, into `$HASS_CACHE/llama.cpp-vocab/`
# (`$HASS_CACHE` defaults to `models/`, ignored by git). Idempotent. The tests run it
# through `scripts/fetch_assets.sh vocab` when the directory is missing.
#
# Source: the source package of `llama-cpp-python==0.3.36` on PyPI, which vendors
# llama.cpp (MIT, its LICENSE is copied alongside) under `vendor/llama.cpp/`. Nothing
# is fetched from a model hub.
#
# The `.out` files hold the ids Hugging Face `tokenizers` gives for each `.inp` case
# (llama.cpp's `convert_hf_to_gguf_update.py` writes them; llama.cpp's
# `tests/test-tokenizer-0` checks its own tokenizer against them).
set -euo pipefail

VERSION=0.3.36

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${HASS_CACHE:-$repo/models}"
vocab_cache="$cache/llama.cpp-vocab"
py="${PYTHON:-python3}"

if [[ -s "$vocab_cache/LICENSE" ]]; then
    echo "$vocab_cache"
    exit 0
fi
mkdir -p "$cache"
sdist="$cache/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$sdist" ]]; then
    # The sdist's metadata step needs cmake and scikit-build-core importable
    # (--no-build-isolation), but nothing is compiled.
    "$py" -m pip install --quiet cmake scikit-build-core >&2
    "$py" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation \
        "llama-cpp-python==$VERSION" -d "$cache" >&2
fi

prefix="llama_cpp_python-$VERSION/vendor/llama.cpp"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
tar -xzf "$sdist" -C "$tmp" --wildcards \
    "$prefix/models/ggml-vocab-*" "$prefix/LICENSE"
mkdir -p "$tmp/out"
cp "$tmp/$prefix"/models/ggml-vocab-* "$tmp/out/"
# LICENSE last: its presence marks a complete directory.
cp "$tmp/$prefix/LICENSE" "$tmp/out/LICENSE"
rm -rf "$vocab_cache"
mv "$tmp/out" "$vocab_cache"
echo "cached $(ls "$vocab_cache" | grep -c '\.gguf$') vocab GGUFs in $vocab_cache" >&2
echo "$vocab_cache"
