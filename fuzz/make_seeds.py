#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpus into fuzz/corpus/<target>/ (committed; rerun
only to change the seeds). Needs numpy, safetensors and gguf (as
scripts/make_gguf_fixtures.py does) and the GGUF fixtures in $HASS_CACHE
(scripts/fetch_assets.sh gguf-fixtures). Multi-part inputs use the harnesses' format:
each part is a little-endian u32 length, then its bytes (see hass-fuzz/src/lib.rs)."""

import json
import os
import struct
import sys

import numpy as np
from safetensors.numpy import save

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CACHE = os.environ.get("HASS_CACHE", os.path.join(REPO, "models"))


def parts(*items):
    out = b""
    for item in items:
        if isinstance(item, str):
            item = item.encode()
        out += struct.pack("<I", len(item)) + item
    return out


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def gguf_seeds():
    fixtures = os.path.join(CACHE, "gguf-fixtures")
    for name in ["tiny_llama.gguf", "tiny_qwen2.gguf", "types.gguf"]:
        with open(os.path.join(fixtures, name), "rb") as f:
            write("gguf", name.replace(".gguf", ""), f.read())
    rng = np.random.default_rng(0)
    # Raw dequantisation inputs: ggml type id, then blocks (F32, F16, Q4_0, Q4_1, Q8_0,
    # Q4_K, Q6_K, BF16).
    for ty, size in [(0, 64), (1, 64), (2, 36), (3, 40), (8, 68), (12, 288), (14, 420), (30, 64)]:
        write("gguf", f"raw_type{ty}", bytes([ty]) + rng.integers(0, 256, size, dtype=np.uint8).tobytes())


def tiny_llama(hidden=8, inter=16, vocab=16, layers=1, heads=2, kv=1):
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": 32,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    rng = np.random.default_rng(1)
    hd = hidden // heads
    t = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({
            p + "self_attn.q_proj.weight": (heads * hd, hidden),
            p + "self_attn.k_proj.weight": (kv * hd, hidden),
            p + "self_attn.v_proj.weight": (kv * hd, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * hd),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
    tensors = {k: rng.standard_normal(s).astype(np.float16) for k, s in t.items()}
    return json.dumps(config), tensors


def safetensors_seeds():
    config, tensors = tiny_llama()
    write("safetensors_dir", "single", parts(config, b"", save(tensors)))
    names = sorted(tensors)
    half = len(names) // 2
    shards = [{k: tensors[k] for k in names[:half]}, {k: tensors[k] for k in names[half:]}]
    weight_map = {k: f"model-{i + 1:05}.safetensors" for i, s in enumerate(shards) for k in s}
    index = json.dumps({"metadata": {}, "weight_map": weight_map})
    write("safetensors_dir", "sharded", parts(config, index, *[save(s) for s in shards]))


def tokenizer_seeds():
    # Byte-level BPE: the 256 byte symbols of GPT-2's byte-to-unicode map, a few merges,
    # two control tokens.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_tokens = [chr(c) for c in cs]
    tokens = byte_tokens + ["he", "ll", "hell", "hello", "Ġw", "<s>", "</s>"]
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w"]
    types = [1] * (len(tokens) - 2) + [3, 3]
    for pre in range(3):
        write("tokenizer", f"bpe_pre{pre}",
              parts(bytes([0, pre, 5]), "\n".join(tokens), "\n".join(merges), struct.pack(f"{len(types)}b", *types),
                    "hello world <s> 123 ünï"))
    # SentencePiece: <unk>, <s>, </s>, 256 byte tokens, a few pieces with scores.
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "▁h", "▁he", "llo", "▁hello", "o", "l", "e", "h"]
    scores = [0.0] * 259 + [-1.0, -2.0, -1.5, -3.0, -0.5, -4.0, -4.0, -4.0, -4.0]
    types = [2, 3, 3] + [6] * 256 + [1] * 9
    write("tokenizer", "spm",
          parts(bytes([1, 0, 3]), "\n".join(pieces), struct.pack(f"<{len(scores)}f", *scores),
                struct.pack(f"{len(types)}b", *types), "hello hello  world\n<s>"))


def chat_seeds():
    msgs = ["system", "Be brief.", "user", "Hi {{ x }} {% raw %}", "assistant", "Hello!", "user", "What is 2+2?"]
    for model in ["llama3", "qwen2"]:
        with open(os.path.join(REPO, "tests/fixtures/models", model, "tokenizer_config.json")) as f:
            write("chat_template", model, parts(json.load(f)["chat_template"], *msgs))
    import gguf  # noqa: E402 (only this seed needs it)
    r = gguf.GGUFReader(os.path.join(CACHE, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    field = r.fields["tokenizer.chat_template"]
    write("chat_template", "smollm2", parts(bytes(field.parts[field.data[0]]), *msgs))
    write("chat_template", "raise", parts(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
        "{% for m in messages %}{{ m.content | tojson }}{{ m.role.strip().upper() }}{% endfor %}", *msgs))


def draft_seeds():
    src = os.path.join(REPO, "tests/fixtures/draft/eagle_llama3")
    from safetensors.numpy import load_file
    tensors = {k: v.astype(np.float16) for k, v in load_file(os.path.join(src, "model.safetensors")).items()}
    with open(os.path.join(src, "config.json")) as f:
        config = f.read()
    write("draft_head", "eagle_llama3_f16", parts(config, save(tensors)))


if __name__ == "__main__":
    gguf_seeds()
    safetensors_seeds()
    tokenizer_seeds()
    chat_seeds()
    draft_seeds()
    print("seeds written to", os.path.join(HERE, "corpus"), file=sys.stderr)
