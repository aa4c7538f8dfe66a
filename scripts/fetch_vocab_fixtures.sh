#!/usr/bin/env bash
# Fetches llama.cpp's vocabulary-only GGUFs and their tokenizer test vectors
# (`ggml-vocab-*.gguf` + `.gguf.inp` / `.gguf.out`), the fixtures of
# `hass-models/tests/gguf_tokenizer.rs`.
#
# Source: the source package of `llama-cpp-python==0.3.36` on PyPI, which vendors
# llama.cpp (MIT) under `vendor/llama.cpp/`. Nothing is fetched from a model hub.
#
#   scripts/fetch_vocab_fixtures.sh            # cache everything, refresh the committed subset
#   scripts/fetch_vocab_fixtures.sh --cache-only
#
# * Every vocab of the package is extracted to `$HASS_CACHE/llama.cpp-vocab/`
#   (`$HASS_CACHE` defaults to `data/`, ignored by git). Point the extended test at it
#   with `HASS_VOCAB_DIR=$PWD/data/llama.cpp-vocab cargo test --release -p hass-models
#   --test gguf_tokenizer`.
# * The small subset the tests always run on (below, ~8.4 MB) is copied to
#   `tests/fixtures/vocab/`, together with llama.cpp's LICENSE; these are committed.
#
# The `.out` files hold the ids Hugging Face `tokenizers` gives for each `.inp` case
# (llama.cpp's `convert_hf_to_gguf_update.py` writes them; llama.cpp's
# `tests/test-tokenizer-0` checks its own tokenizer against them).
set -euo pipefail

VERSION=0.3.36
COMMITTED=(llama-spm starcoder qwen2)

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${HASS_CACHE:-$repo/data}"
vocab_cache="$cache/llama.cpp-vocab"
fixtures="$repo/tests/fixtures/vocab"
cache_only=0
[[ "${1:-}" == "--cache-only" ]] && cache_only=1

mkdir -p "$cache" "$vocab_cache"
sdist="$cache/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$sdist" ]]; then
    # The sdist's metadata step needs cmake and scikit-build-core importable
    # (--no-build-isolation), but nothing is compiled.
    python3 -m pip install --quiet cmake scikit-build-core
    python3 -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation \
        "llama-cpp-python==$VERSION" -d "$cache"
fi

prefix="llama_cpp_python-$VERSION/vendor/llama.cpp"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
tar -xzf "$sdist" -C "$tmp" --wildcards \
    "$prefix/models/ggml-vocab-*" "$prefix/LICENSE"
cp "$tmp/$prefix"/models/ggml-vocab-* "$vocab_cache/"
cp "$tmp/$prefix/LICENSE" "$vocab_cache/LICENSE"
echo "cached $(ls "$vocab_cache" | grep -c '\.gguf$') vocab GGUFs in $vocab_cache"

if [[ $cache_only == 0 ]]; then
    mkdir -p "$fixtures"
    cp "$vocab_cache/LICENSE" "$fixtures/LICENSE"
    for name in "${COMMITTED[@]}"; do
        for ext in gguf gguf.inp gguf.out; do
            cp "$vocab_cache/ggml-vocab-$name.$ext" "$fixtures/"
        done
    done
    echo "copied ${COMMITTED[*]} to $fixtures ($(du -sh "$fixtures" | cut -f1))"
fi
