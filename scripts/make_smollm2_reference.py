"""Reference logits of SmolLM2-135M-Instruct (Q4_1 GGUF) from HF transformers.

transformers loads the GGUF dequantised to float32 (`gguf_file=`), which is exactly
what hass computes in its f32 path, so the two can be compared logit for logit.
For 3 short prompts this writes the HF token ids and, per position, the top-20 logits
(ids and values) plus the greedy continuation, to
`tests/fixtures/smollm2/reference.json` (small enough to commit).

    python3 -m pip install -r scripts/requirements.txt gguf
    scripts/fetch_assets.sh smollm2
    python3 scripts/make_smollm2_reference.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
"""
import json
import os
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]
TOP = 20
GREEDY = 8


def main():
    if len(sys.argv) > 1:
        path = sys.argv[1]
    else:
        path = subprocess.check_output([os.path.join(REPO, "scripts/fetch_assets.sh"), "smollm2"], text=True).strip()
    d, f = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    cases = []
    for text in PROMPTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
            greedy = model.generate(torch.tensor([ids]), max_new_tokens=GREEDY, do_sample=False)[0, len(ids):]
        vals, idx = logits.topk(TOP, dim=-1)
        cases.append({
            "text": text,
            "ids": ids,
            "top_ids": idx.tolist(),
            "top_logits": vals.tolist(),
            "greedy": greedy.tolist(),
            "greedy_text": tok.decode(greedy),
        })
        print(repr(text), ids, "->", repr(tok.decode(greedy)))
    out = os.path.join(REPO, "tests/fixtures/smollm2/reference.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        json.dump({"model": f, "transformers": __import__("transformers").__version__, "cases": cases}, fh)
    print("wrote", out)


if __name__ == "__main__":
    main()
