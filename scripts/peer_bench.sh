#!/usr/bin/env bash
# hass against llama.cpp on the same GGUF and thread count, back to back in one run:
# `speed` (512-token prefill, 128 decoded tokens, peak RSS) and the first N MT-bench
# questions (both turns, greedy, <= 128 new tokens per turn, prefill included; hass
# vanilla and speculative with the default head and tuned tree). hass keeps the file's
# quantized blocks (`--dtype auto`), as llama.cpp does. Prints a Markdown table; the
# raw reports stay in OUT.
#
#   scripts/peer_bench.sh [N=20] [OUT=bench-out/peer]
#
# Run it on an idle machine: a parallel build cuts either engine's speed severalfold.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
n="${1:-20}"
out="${2:-bench-out/peer}"
threads="${THREADS:-2}"
mkdir -p "$out"
model="$(scripts/fetch_assets.sh smollm2 | tail -1)"
python3 -c "import llama_cpp" 2>/dev/null || {
    echo "installing llama-cpp-python (builds llama.cpp for this CPU: several minutes)" >&2
    CMAKE_ARGS="-DGGML_NATIVE=ON" python3 -m pip install --quiet llama-cpp-python==0.3.36
}
cargo build --release -p hass-bench >&2
bench=target/release/hass-bench
export RAYON_NUM_THREADS="$threads"

python3 scripts/peer_llamacpp.py speed --model "$model" --threads "$threads" --out "$out" >/dev/null
$bench speed --model "$model" --dtype auto --verify 1,4 --json "$out/hass-speed.json" >/dev/null
python3 scripts/peer_llamacpp.py eval --model "$model" --threads "$threads" --sets mt_bench \
    --limit "$n" --max-new-tokens 128 --out "$out" >/dev/null 2>&1
/usr/bin/time -f "%M" -o "$out/hass-eval-maxrss-kb" $bench eval --model "$model" --dtype auto \
    --head hass-v8k-long=heads/smollm2-hass-v8k-long --sets mt_bench --limit "$n" \
    --temperatures 0 --max-new-tokens 128 --out "$out/hass-eval" >/dev/null

python3 - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
ps = json.loads((out / "peer-speed.json").read_text())
hs = json.loads((out / "hass-speed.json").read_text())
pe = json.loads((out / "peer-eval.json").read_text())
he = json.loads((out / "hass-eval" / "results.json").read_text())
rss = int((out / "hass-eval-maxrss-kb").read_text().split()[-1]) / 1024
peer_q = statistics.mean(q["tokens_per_s"] for q in pe["questions"])
def mean_tps(method):
    qs = [q for q in he["questions"] if q["method"] == method and q["temperature"] == 0]
    return statistics.mean(sum(t["new_tokens"] for t in q["turns"]) /
                           max(sum(t["wall_s"] for t in q["turns"]), 1e-12) for q in qs), qs
print(f"| engine | decode tok/s | prefill tok/s | peak RSS MB (speed) | MT-bench {pe['summary']['questions']} tok/s | vs llama.cpp |")
print("| --- | --- | --- | --- | --- | --- |")
print(f"| llama.cpp | {ps['decode_tokens_per_s']:.1f} | {ps['prefill_tokens_per_s']:.1f} | {ps['peak_rss_mb']:.0f} | {peer_q:.1f} | 1 |")
methods = sorted({q["method"] for q in he["questions"]}, key=lambda m: m != "vanilla")
for m in methods:
    tps, qs = mean_tps(m)
    same = all(q.get("identical_to_vanilla") in (None, True) for q in qs)
    label = "hass vanilla" if m == "vanilla" else f"hass speculative ({m}{'' if same else ', DIFFERS from vanilla'})"
    speed = (f"{hs['decode_tokens_per_s']:.1f} | {hs['prefill_tokens_per_s']:.1f} | {hs['peak_rss_mb']:.0f}"
             if m == "vanilla" else "| |")
    print(f"| {label} | {speed} | {tps:.1f} | {tps / peer_q:.2f}× |")
print(f"\nhass eval peak RSS {rss:.0f} MB; llama.cpp speed peak RSS {ps['peak_rss_mb']:.0f} MB")
PY
