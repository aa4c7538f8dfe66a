#!/usr/bin/env python3
"""llama.cpp (through llama-cpp-python) on the protocol `hass-bench` uses, for
side-by-side figures on the same GGUF and thread count.

    scripts/peer_llamacpp.py eval  --model M.gguf --sets mt_bench --limit 20 --out DIR
    scripts/peer_llamacpp.py speed --model M.gguf --out DIR

`eval`: every turn of each question through the GGUF's own chat template, greedy, at
most --max-new-tokens per turn, the KV cache reset before each turn (hass re-reads
the whole conversation each turn too); a question's speed is its new tokens over its
wall time, prefill included, as `hass-bench eval` reports it. `speed`: prefill of a
--prompt-tokens synthetic prompt, then --decode-tokens greedy steps, as `hass-bench
speed`. Both write JSON (`peer-eval.json`, `peer-speed.json`) and print a summary.

Needs `pip install llama-cpp-python==0.3.36` (built from source with the machine's
CPU features: several minutes on two cores); `scripts/peer_bench.sh` installs it.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import llama_cpp
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

REPO = Path(__file__).resolve().parent.parent


def load(args):
    t0 = time.perf_counter()
    llm = Llama(
        model_path=args.model,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ctx=args.ctx,
        n_batch=512,
        verbose=False,
    )
    return llm, time.perf_counter() - t0


def last_logits(llm):
    """The logits of the last evaluated token (llama.cpp's own buffer, no copy)."""
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def greedy(llm, prompt, max_new, stop):
    """Prefill `prompt`, then greedy tokens until `stop` or `max_new`; the new ids."""
    llm.reset()
    llm.eval(prompt)
    out = []
    while len(out) < max_new:
        tok = int(np.argmax(last_logits(llm)))
        if tok == stop:
            break
        out.append(tok)
        if len(out) < max_new:
            llm.eval([tok])
    return out


def cmd_eval(args):
    llm, load_s = load(args)
    meta = llm.metadata
    eos = llm.token_eos()
    fmt = Jinja2ChatFormatter(
        template=meta["tokenizer.chat_template"],
        eos_token=llm.detokenize([eos], special=True).decode(),
        bos_token=llm.detokenize([llm.token_bos()], special=True).decode(),
    )
    results = []
    for set_name in args.sets.split(","):
        path = Path(args.prompts) / f"{set_name}.jsonl"
        questions = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for q in questions[: args.limit]:
            turns, messages = [], []
            qturns = q.get("turns") or [q.get("prompt") or q.get("question")]
            for text in qturns:
                messages.append({"role": "user", "content": text})
                prompt_text = fmt(messages=messages).prompt
                prompt = llm.tokenize(prompt_text.encode(), add_bos=False, special=True)
                t0 = time.perf_counter()
                new = greedy(llm, prompt, args.max_new_tokens, eos)
                wall = time.perf_counter() - t0
                answer = llm.detokenize(new).decode(errors="replace").strip()
                turns.append({"prompt_tokens": len(prompt), "new_tokens": len(new), "wall_s": wall})
                messages.append({"role": "assistant", "content": answer})
            n = sum(t["new_tokens"] for t in turns)
            w = sum(t["wall_s"] for t in turns)
            results.append({"set": set_name, "question_id": q.get("question_id"), "turns": turns,
                            "tokens_per_s": n / max(w, 1e-12)})
            print(f"{set_name} {q.get('question_id')}: {n} tokens, {n / max(w, 1e-12):.1f} tokens/s",
                  file=sys.stderr)
    summary = {
        "engine": "llama.cpp (llama-cpp-python)",
        "model": args.model,
        "threads": args.threads,
        "load_s": load_s,
        "questions": len(results),
        "mean_tokens_per_s": statistics.mean(r["tokens_per_s"] for r in results),
        "new_tokens": sum(t["new_tokens"] for r in results for t in r["turns"]),
        "wall_s": sum(t["wall_s"] for r in results for t in r["turns"]),
    }
    write(args.out, "peer-eval.json", {"summary": summary, "questions": results})
    print(json.dumps(summary, indent=2))


def cmd_speed(args):
    llm, load_s = load(args)
    vocab = llm.n_vocab()
    # hass_infer::tuning::synthetic_tokens: the same prompt hass-bench speed times.
    prompt = [(i * 7919 + 13) % vocab for i in range(args.prompt_tokens)]
    greedy(llm, prompt[:32], 4, -1)  # warm-up: page the weights in
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - t0
    tok = int(np.argmax(last_logits(llm)))
    t0 = time.perf_counter()
    for _ in range(args.decode_tokens):
        llm.eval([tok])
        tok = int(np.argmax(last_logits(llm)))
    decode_s = time.perf_counter() - t0
    report = {
        "engine": "llama.cpp (llama-cpp-python)",
        "model": args.model,
        "threads": args.threads,
        "load_s": load_s,
        "prefill_tokens": args.prompt_tokens,
        "prefill_tokens_per_s": args.prompt_tokens / prefill_s,
        "decode_tokens": args.decode_tokens,
        "decode_tokens_per_s": args.decode_tokens / decode_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    write(args.out, "peer-speed.json", report)
    print(json.dumps(report, indent=2))


def write(out, name, obj):
    if out:
        os.makedirs(out, exist_ok=True)
        Path(out, name).write_text(json.dumps(obj, indent=2))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("eval", "speed"):
        s = sub.add_parser(name)
        s.add_argument("--model", required=True)
        s.add_argument("--threads", type=int, default=2)
        s.add_argument("--ctx", type=int, default=2048)
        s.add_argument("--out")
        if name == "eval":
            s.add_argument("--sets", default="mt_bench")
            s.add_argument("--limit", type=int, default=20)
            s.add_argument("--max-new-tokens", type=int, default=128)
            s.add_argument("--prompts", default=str(REPO / "bench-prompts"))
        else:
            s.add_argument("--prompt-tokens", type=int, default=512)
            s.add_argument("--decode-tokens", type=int, default=128)
    args = p.parse_args()
    {"eval": cmd_eval, "speed": cmd_speed}[args.cmd](args)


if __name__ == "__main__":
    main()
