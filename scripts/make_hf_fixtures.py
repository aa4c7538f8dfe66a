#!/usr/bin/env python3
"""Make tiny reference fixtures from HF `transformers` for the hass Rust parity tests.

Install the dependencies (CPU-only torch is enough):

    python3 -m pip install -r scripts/requirements.txt

Generate the fixtures (from the repository root; takes well under a minute on CPU):

    python3 scripts/make_hf_fixtures.py            # writes tests/fixtures/models/{llama2,llama3,qwen2}/
    python3 scripts/make_hf_fixtures.py --verify   # reloads each model dir and re-checks the expected outputs
    python3 scripts/make_hf_fixtures.py --out DIR  # write somewhere else

The output is deterministic (fixed seeds, CPU float32 reference): running the script twice
gives byte-identical files with the same library versions.

Three tiny random models, each in HF layout in `<out>/<name>/`:

* `llama2`: LlamaForCausalLM, LLaMA-2 style (MHA, rope_theta 1e4, eps 1e-6, untied),
  one float32 `model.safetensors`, no chat template.
* `llama3`: LlamaForCausalLM, LLaMA-3 style (GQA 8/2, rope_theta 5e5, llama3 rope scaling,
  untied), two bfloat16 shards + `model.safetensors.index.json`, LLaMA-3 chat template.
* `qwen2`: Qwen2ForCausalLM (QKV bias, tied embeddings, rope_theta 1e6), one float16
  `model.safetensors`, ChatML chat template.

All three share one byte-level BPE tokenizer (vocab exactly 512, trained here on embedded text)
that differs only in its post-processor (BOS or not) and `tokenizer_config.json`.

Every model dir also gets `expected.safetensors` (batch dim removed; float32 / int64):

* `prefill.input_ids` [P], `prefill.logits` [P,V], `prefill.features` [P,H]
  (features = post-final-norm last hidden state = the input of `lm_head`).
* `decode.{i}.input_ids` [1], `decode.{i}.logits` [1,V], `decode.{i}.features` [1,H], i = 0..3:
  step i feeds one token at position P+i through the HF KV cache (prefill + earlier steps).
* `tree.input_ids` [T], `tree.parents` [T] (-1 = root), `tree.positions` [T] (= P + depth),
  `tree.mask` [T,T] (1 where the column is the row node or one of its ancestors),
  `tree.logits` [T,V], `tree.features` [T,H]: a tree forward on top of the P prefill tokens only.
  Ground truth = for each node, an ordinary causal forward (no cache) of prefill ++ root->node path,
  last position. Cross-checked against HF with a 4D custom mask + position_ids over the prefill cache.
* `long.input_ids` [100], `long.logits` [100,V], `long.features` [100,H]: plain causal prefill
  (positions past the llama3 `original_max_position_embeddings` = 64).

For the bf16 / f16 models the references are computed in float32 from the weights read back from
disk (so the rounded weights), i.e. an f32 implementation that upcasts the stored weights must
match to ~1e-5.

Plus `expected_text.json`: tokenizer encodings and rendered chat templates for a few strings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "models"

VOCAB = 512
P = 10  # prefill length
N_DECODE = 4
LONG = 100
TREE_PARENTS = [-1, 0, 0, 1, 1, 3, 2]  # depth 0,1,1,2,2,3,2
TOL = 1e-5

# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

SPECIAL_TOKENS = [
    "<unk>",                 # 0
    "<s>",                   # 1  llama2 bos
    "</s>",                  # 2  llama2 eos
    "<pad>",                 # 3
    "<|begin_of_text|>",     # 4  llama3 bos
    "<|end_of_text|>",       # 5  llama3 eos (base)
    "<|start_header_id|>",   # 6
    "<|end_header_id|>",     # 7
    "<|eot_id|>",            # 8  llama3 eos (chat)
    "<|endoftext|>",         # 9  qwen2 bos / pad
    "<|im_start|>",          # 10
    "<|im_end|>",            # 11 qwen2 eos
]
SPECIAL_ID = {t: i for i, t in enumerate(SPECIAL_TOKENS)}

CORPUS = """\
The quick brown fox jumps over the lazy dog. A small language model reads one token at a time,
and each token is a short piece of text: a whole word, part of a word, a space, or a single byte.
When the model has read the prompt, it writes the answer one token after another, and every new
token is fed back as input for the next step. This is slow, because a large model has to read all
of its weights from memory for every single token it produces.

Speculative decoding makes this faster without changing the answer. A small draft model guesses
several tokens ahead, arranged as a tree of likely continuations. The large target model then checks
the whole tree in one forward pass, with a special attention mask so that every node only sees the
prompt and its own ancestors. The longest path that the target agrees with is accepted, and the
first token where they disagree is replaced by the target's own choice. In the best case many tokens
are accepted at once; in the worst case one token is still produced, just as before.

The draft in this family of methods is not a separate language model. It is a single transformer
layer that reads the hidden features of the target, the vectors just before its output head, together
with the embedding of the next token, and predicts the next feature. The target's head turns that
predicted feature into a distribution over the vocabulary. Training the draft on its own outputs,
not only on the target's features, helps it stay accurate deeper into the tree.

Once upon a time, in a quiet village by the sea, there lived an old fisherman and his daughter.
Every morning they walked down to the harbour, checked the nets, and talked about the weather.
"The wind is turning," she said one day, "and the clouds over the hills look heavy." He laughed,
pointed at the gulls, and said that the birds always knew better than any of us. They went out
anyway, caught more fish than ever before, and came home just as the first drops of rain began to fall.

Numbers and symbols matter too: 0 1 2 3 4 5 6 7 8 9, 10, 42, 100, 2048, 3.14159, 1e-6, (a + b) * c,
x = y / 2; {key: "value"}, [1, 2, 3], <tag>, #include, fn main() { println!("hello"); }
Question: What is the capital of France? Answer: Paris is the capital of France.
User: Can you help me write a short poem about the rain? Assistant: Of course! Here it is.
"""


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    paragraphs = [p for p in CORPUS.split("\n\n") if p.strip()]
    tok.train_from_iterator(paragraphs, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB, f"tokenizer vocab {tok.get_vocab_size()} != {VOCAB}"
    for t, i in SPECIAL_ID.items():
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t), i)
    return tok


def tokenizer_for(base, bos: str | None):
    """A copy of `base` whose post-processor prepends `bos` (or adds nothing)."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_str(base.to_str())
    if bos is None:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, SPECIAL_ID[bos])],
        )
    return tok


LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

CHATML_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def added_tokens_decoder():
    return {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(SPECIAL_TOKENS)
    }


def write_tokenizer(out: Path, base, spec: dict) -> None:
    tok = tokenizer_for(base, spec["tok_bos"])
    tok.save(str(out / "tokenizer.json"), pretty=True)
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 256,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": spec["tok_bos"] is not None,
        "add_eos_token": False,
        "bos_token": spec["tok_bos"],
        "eos_token": spec["tok_eos"],
        "pad_token": spec["tok_pad"],
        "unk_token": None,
        "added_tokens_decoder": added_tokens_decoder(),
    }
    if spec["chat_template"] is not None:
        cfg["chat_template"] = spec["chat_template"]
    with open(out / "tokenizer_config.json", "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")
    # special_tokens_map.json for older readers
    stm = {k: v for k, v in (("bos_token", cfg["bos_token"]), ("eos_token", cfg["eos_token"]),
                             ("pad_token", cfg["pad_token"])) if v is not None}
    with open(out / "special_tokens_map.json", "w") as f:
        json.dump(stm, f, indent=2)
        f.write("\n")


TEXT_SAMPLES = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, tabs\tand\nnewlines; unicode: café naïve 日本語 🙂",
    "<|im_start|>user\nhi<|im_end|>",
]
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": " Paris. "},
    {"role": "user", "content": "Thanks!"},
]


def write_text_expectations(out: Path, spec: dict) -> dict:
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == VOCAB, len(tok)
    enc = []
    for s in TEXT_SAMPLES:
        ids = tok(s)["input_ids"]
        enc.append({"text": s, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)})
    res = {"encode": enc, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    if spec["chat_template"] is not None:
        chats = []
        for gen in (False, True):
            msgs = CHAT if not gen else CHAT[:2]
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            chats.append({"messages": msgs, "add_generation_prompt": gen, "text": text, "ids": ids})
        res["chat"] = chats
    with open(out / "expected_text.json", "w") as f:
        json.dump(res, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return res


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

MODELS = {
    "llama2": dict(
        seed=1002,
        cls=LlamaForCausalLM,
        config=lambda: LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            rms_norm_eps=1e-6,
            max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False,
            bos_token_id=SPECIAL_ID["<s>"],
            eos_token_id=SPECIAL_ID["</s>"],
            pad_token_id=None,
            hidden_act="silu",
        ),
        dtype=torch.float32,
        shard=None,
        tok_bos="<s>",
        tok_eos="</s>",
        tok_pad=None,
        chat_template=None,
    ),
    "llama3": dict(
        seed=1003,
        cls=LlamaForCausalLM,
        config=lambda: LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            max_position_embeddings=256,
            # head_dim 8 -> base wavelengths 6.3, 167.6, 4443, 1.2e5. With the stock
            # low/high_freq_factor = 1/4 and original_max 64 the band edges are 16 and 64, so no
            # frequency would fall in the smoothly interpolated band. low_freq_factor = 0.25 moves
            # the low edge to 256: freq 0 unchanged, freq 1 interpolated, freqs 2-3 divided by 8.
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 0.25,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            tie_word_embeddings=False,
            bos_token_id=SPECIAL_ID["<|begin_of_text|>"],
            eos_token_id=[SPECIAL_ID["<|end_of_text|>"], SPECIAL_ID["<|eot_id|>"]],
            pad_token_id=None,
            hidden_act="silu",
        ),
        dtype=torch.bfloat16,
        shard="250KB",
        tok_bos="<|begin_of_text|>",
        tok_eos="<|eot_id|>",
        tok_pad=None,
        chat_template=LLAMA3_CHAT_TEMPLATE,
    ),
    "qwen2": dict(
        seed=1004,
        cls=Qwen2ForCausalLM,
        config=lambda: Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=True,
            use_sliding_window=False,
            bos_token_id=SPECIAL_ID["<|endoftext|>"],
            eos_token_id=SPECIAL_ID["<|im_end|>"],
            pad_token_id=None,
            hidden_act="silu",
        ),
        dtype=torch.float16,
        shard=None,
        tok_bos=None,
        tok_eos="<|im_end|>",
        tok_pad="<|endoftext|>",
        chat_template=CHATML_CHAT_TEMPLATE,
    ),
}


def randomize_(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Overwrite all parameters with non-trivial random values (deterministic order).

    Scales give logits with std ~0.8 (features ~1 per dim after the final norm, lm_head std 0.1),
    so the parity tests see non-trivial distributions without f32 noise from huge logits.
    """
    tied = model.config.tie_word_embeddings
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("embed_tokens.weight"):
                # tied: it is also the lm_head, so keep it at the lm_head scale
                new = (0.1 if tied else 0.5) * torch.randn(p.shape, generator=gen)
            elif name.endswith("norm.weight"):
                new = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            elif name.endswith(".bias"):
                new = 0.1 * torch.randn(p.shape, generator=gen)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                new = 0.15 * torch.randn(p.shape, generator=gen)
            elif name.endswith(".weight"):
                new = 0.1 * torch.randn(p.shape, generator=gen)
            else:
                raise ValueError(f"unexpected parameter {name}")
            p.copy_(new.to(p.dtype))


def fixed_ids(gen: torch.Generator, n: int, first: int | None = None) -> torch.Tensor:
    """n token ids in [len(SPECIAL_TOKENS), VOCAB), optionally starting with `first`."""
    ids = torch.randint(len(SPECIAL_TOKENS), VOCAB, (n,), generator=gen, dtype=torch.int64)
    if first is not None:
        ids[0] = first
    return ids


def tree_depths(parents):
    depth = []
    for i, p in enumerate(parents):
        assert p < i
        depth.append(0 if p < 0 else depth[p] + 1)
    return depth


def tree_path(parents, i):
    path = []
    while i >= 0:
        path.append(i)
        i = parents[i]
    return path[::-1]


@torch.no_grad()
def forward(model, ids: torch.Tensor, **kw):
    out = model(input_ids=ids.unsqueeze(0), output_hidden_states=True, **kw)
    return out.logits[0].float(), out.hidden_states[-1][0].float(), out


def lm_head_weight(model) -> torch.Tensor:
    return model.get_output_embeddings().weight.float()


def check_close(what: str, a: torch.Tensor, b: torch.Tensor, tol: float, diffs: dict) -> None:
    d = (a - b).abs().max().item()
    diffs[what] = max(diffs.get(what, 0.0), d)
    assert d < tol, f"{what}: max abs diff {d:.3e} >= {tol:.1e}"


@torch.no_grad()
def compute_expected(model, spec: dict, gen: torch.Generator, diffs: dict) -> dict:
    """All reference outputs, from a float32 eager model."""
    cfg = model.config
    bos = cfg.bos_token_id if spec["tok_bos"] is not None else None
    W = lm_head_weight(model)
    exp = {}

    # --- prefill
    pre_ids = fixed_ids(gen, P, first=bos)
    logits, feats, out = forward(model, pre_ids, use_cache=True)
    check_close("features@lm_head.T == logits", feats @ W.T, logits, 1e-4, diffs)
    # hidden_states[-1] must be post-norm: recompute norm(last layer output) via a hook-free path
    exp["prefill.input_ids"] = pre_ids
    exp["prefill.logits"] = logits
    exp["prefill.features"] = feats
    cache = out.past_key_values

    # --- incremental decode through the cache
    dec_ids = fixed_ids(gen, N_DECODE)
    seq = pre_ids.clone()
    for i in range(N_DECODE):
        tid = dec_ids[i : i + 1]
        logits, feats, out = forward(model, tid, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        exp[f"decode.{i}.input_ids"] = tid.clone()
        exp[f"decode.{i}.logits"] = logits
        exp[f"decode.{i}.features"] = feats
        # sanity: equals the last row of a full cache-free forward
        seq = torch.cat([seq, tid])
        full_logits, full_feats, _ = forward(model, seq, use_cache=False)
        check_close("decode vs full forward (logits)", logits[0], full_logits[-1], TOL, diffs)
        check_close("decode vs full forward (features)", feats[0], full_feats[-1], TOL, diffs)

    # --- tree on top of the prefill prefix only
    T = len(TREE_PARENTS)
    tree_ids = fixed_ids(gen, T)
    depth = tree_depths(TREE_PARENTS)
    positions = torch.tensor([P + d for d in depth], dtype=torch.int64)
    mask = torch.zeros(T, T, dtype=torch.int64)
    t_logits = torch.zeros(T, cfg.vocab_size)
    t_feats = torch.zeros(T, cfg.hidden_size)
    for i in range(T):
        path = tree_path(TREE_PARENTS, i)
        mask[i, path] = 1
        seq = torch.cat([pre_ids, tree_ids[path]])
        lg, ft, _ = forward(model, seq, use_cache=False)
        t_logits[i] = lg[-1]
        t_feats[i] = ft[-1]
    exp["tree.input_ids"] = tree_ids
    exp["tree.parents"] = torch.tensor(TREE_PARENTS, dtype=torch.int64)
    exp["tree.positions"] = positions
    exp["tree.mask"] = mask
    exp["tree.logits"] = t_logits
    exp["tree.features"] = t_feats

    # cross-check: HF with a 4D additive mask + explicit position ids over a fresh prefill cache
    _, _, out = forward(model, pre_ids, use_cache=True)
    allowed = torch.cat([torch.ones(T, P, dtype=torch.bool), mask.bool()], dim=1)  # [T, P+T]
    add_mask = torch.zeros(T, P + T, dtype=torch.float32)
    add_mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
    lg, ft, _ = forward(
        model,
        tree_ids,
        past_key_values=out.past_key_values,
        attention_mask=add_mask[None, None],
        position_ids=positions[None],
        use_cache=True,
    )
    check_close("tree 4D-mask forward vs path forwards (logits)", lg, t_logits, TOL, diffs)
    check_close("tree 4D-mask forward vs path forwards (features)", ft, t_feats, TOL, diffs)

    # --- long causal prefill
    long_ids = fixed_ids(gen, LONG, first=bos)
    logits, feats, _ = forward(model, long_ids, use_cache=False)
    exp["long.input_ids"] = long_ids
    exp["long.logits"] = logits
    exp["long.features"] = feats

    for k, v in exp.items():
        assert v.dtype in (torch.float32, torch.int64), (k, v.dtype)
        if v.dtype == torch.int64 and k.endswith("input_ids"):
            assert int(v.min()) >= 0 and int(v.max()) < VOCAB, k
        exp[k] = v.contiguous()
    return exp


def check_post_norm(model, diffs: dict) -> None:
    """hidden_states[-1] == final_norm(output of the last decoder layer), computed by hand."""
    ids = torch.arange(20, 30, dtype=torch.int64)
    captured = {}
    h = model.model.layers[-1].register_forward_hook(
        lambda m, i, o: captured.__setitem__("x", o[0] if isinstance(o, tuple) else o)
    )
    try:
        _, feats, _ = forward(model, ids, use_cache=False)
    finally:
        h.remove()
    x = captured["x"][0].float()
    w = model.model.norm.weight.float()
    eps = model.config.rms_norm_eps
    manual = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    check_close("hidden_states[-1] == final_norm(last layer)", feats, manual, 1e-5, diffs)


def rope_report(model) -> dict:
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    theta = cfg.rope_parameters["rope_theta"]
    plain = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    used = model.model.rotary_emb.inv_freq.float()
    return {"plain_inv_freq": plain.tolist(), "inv_freq": used.tolist(),
            "wavelengths": (2 * math.pi / plain).tolist()}


def load_f32(path: Path):
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


def make_model(name: str, spec: dict, out: Path, base_tok, diffs: dict) -> dict:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    torch.manual_seed(spec["seed"])
    gen = torch.Generator().manual_seed(spec["seed"])
    config = spec["config"]()
    model = spec["cls"](config).eval()
    randomize_(model, gen)
    model = model.to(spec["dtype"])
    save_kw = {}
    if spec["shard"] is not None:
        save_kw["max_shard_size"] = spec["shard"]
    model.save_pretrained(str(out), **save_kw)
    write_tokenizer(out, base_tok, spec)

    # Reference = what is on disk, read back and upcast to float32.
    ref = load_f32(out)
    sd_disk = {}
    for f in sorted(out.glob("model*.safetensors")):
        sd_disk.update(load_file(str(f)))
    for k, v in sd_disk.items():
        assert v.dtype == spec["dtype"], (k, v.dtype)
    # the f32 reference holds exactly the stored (rounded) weights
    ref_sd = ref.state_dict()
    for k, v in sd_disk.items():
        assert torch.equal(ref_sd[k], v.float()), k
    if config.tie_word_embeddings:
        assert "lm_head.weight" not in sd_disk
        assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
    else:
        assert "lm_head.weight" in sd_disk

    check_post_norm(ref, diffs)
    exp_gen = torch.Generator().manual_seed(spec["seed"] + 100)
    exp = compute_expected(ref, spec, exp_gen, diffs)
    save_file(exp, str(out / "expected.safetensors"), metadata={"format": "pt"})
    text = write_text_expectations(out, spec)
    return {"exp": exp, "rope": rope_report(ref), "text": text}


def verify(root: Path) -> dict:
    """Reload each model dir as plain `from_pretrained(dir, dtype=float32)` (default attention
    implementation, i.e. not the eager one used to make the references) and re-check."""
    diffs = {}
    for name in MODELS:
        d = root / name
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
        exp = load_file(str(d / "expected.safetensors"))
        logits, feats, out = forward(model, exp["prefill.input_ids"], use_cache=True)
        check_close(f"{name}: verify prefill.logits", logits, exp["prefill.logits"], TOL, diffs)
        check_close(f"{name}: verify prefill.features", feats, exp["prefill.features"], TOL, diffs)
        cache = out.past_key_values
        for i in range(N_DECODE):
            logits, feats, out = forward(model, exp[f"decode.{i}.input_ids"], past_key_values=cache,
                                         use_cache=True)
            cache = out.past_key_values
            check_close(f"{name}: verify decode.*.logits", logits, exp[f"decode.{i}.logits"], TOL, diffs)
            check_close(f"{name}: verify decode.*.features", feats, exp[f"decode.{i}.features"], TOL, diffs)
        logits, feats, _ = forward(model, exp["long.input_ids"], use_cache=False)
        check_close(f"{name}: verify long.logits", logits, exp["long.logits"], TOL, diffs)
        check_close(f"{name}: verify long.features", feats, exp["long.features"], TOL, diffs)
        P_ = exp["prefill.input_ids"].numel()
        T_ = exp["tree.input_ids"].numel()
        _, _, out = forward(model, exp["prefill.input_ids"], use_cache=True)
        allowed = torch.cat([torch.ones(T_, P_, dtype=torch.bool), exp["tree.mask"].bool()], dim=1)
        add_mask = torch.zeros(T_, P_ + T_).masked_fill_(~allowed, torch.finfo(torch.float32).min)
        logits, feats, _ = forward(model, exp["tree.input_ids"], past_key_values=out.past_key_values,
                                   attention_mask=add_mask[None, None],
                                   position_ids=exp["tree.positions"][None], use_cache=True)
        check_close(f"{name}: verify tree.logits (4D mask)", logits, exp["tree.logits"], TOL, diffs)
        check_close(f"{name}: verify tree.features (4D mask)", feats, exp["tree.features"], TOL, diffs)
        tok = AutoTokenizer.from_pretrained(str(d))
        text = json.loads((d / "expected_text.json").read_text())
        for e in text["encode"]:
            assert tok(e["text"])["input_ids"] == e["ids"], (name, e["text"])
    return diffs


def dir_size(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--verify", action="store_true", help="only re-check existing fixtures")
    args = ap.parse_args()

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)

    if args.verify:
        diffs = verify(args.out)
        for k, v in diffs.items():
            print(f"  {k:58s} max|diff| = {v:.3e}")
        print("verify OK")
        return 0

    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    base_tok = build_tokenizer()
    args.out.mkdir(parents=True, exist_ok=True)
    diffs: dict = {}
    for name, spec in MODELS.items():
        md: dict = {}
        res = make_model(name, spec, args.out / name, base_tok, md)
        diffs.update({f"{name}: {k}": v for k, v in md.items()})
        d = args.out / name
        print(f"\n== {name} ({spec['cls'].__name__}, {str(spec['dtype']).replace('torch.', '')}) -> {d}")
        for f in sorted(d.iterdir()):
            print(f"  {f.name:40s} {f.stat().st_size:9d} B  sha256 {hashlib.sha256(f.read_bytes()).hexdigest()[:16]}")
        for k, v in res["exp"].items():
            print(f"  {k:22s} {str(v.dtype).replace('torch.', ''):8s} {list(v.shape)}")
        lg = res["exp"]["prefill.logits"]
        print(f"  prefill.logits std {lg.std().item():.3f}, max|.| {lg.abs().max().item():.3f}")
        r = res["rope"]
        print("  rope wavelengths  ", [f"{x:.4g}" for x in r["wavelengths"]])
        print("  rope plain inv_freq", [f"{x:.6g}" for x in r["plain_inv_freq"]])
        print("  rope used inv_freq ", [f"{x:.6g}" for x in r["inv_freq"]])
        if name == "llama3":
            changed = [not math.isclose(a, b, rel_tol=1e-6) for a, b in zip(r["plain_inv_freq"], r["inv_freq"])]
            smooth = [not math.isclose(a / 8, b, rel_tol=1e-4) and c for a, b, c in
                      zip(r["plain_inv_freq"], r["inv_freq"], changed)]
            assert any(changed) and any(smooth), "llama3 rope scaling must change frequencies"
            print(f"  llama3 scaling changed freqs {changed}, interpolated band {smooth}")
    print("\nself-checks (max abs diff):")
    for k, v in diffs.items():
        print(f"  {k:58s} {v:.3e}")
    print("verify (reload with from_pretrained(dir, dtype=float32), default attention):")
    for k, v in verify(args.out).items():
        print(f"  {k:58s} {v:.3e}")
    print(f"\ntotal size of {args.out}: {dir_size(args.out) / 1e6:.3f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
