#!/usr/bin/env python3
"""Make reference fixtures for the EAGLE-1/2 / HASS draft head (spec §2) for the hass Rust tests.

Dependencies: the same as scripts/make_hf_fixtures.py (`python3 -m pip install -r
scripts/requirements.txt`; CPU-only torch is enough). The draft pairs with the tiny llama3 target
fixture, so that must exist first (tests/fixtures/models/llama3/, made by make_hf_fixtures.py).

Run from the repository root (takes a few seconds on CPU):

    python3 scripts/make_draft_fixtures.py            # writes tests/fixtures/draft/{eagle_llama3,eagle_llama3_bin}/
    python3 scripts/make_draft_fixtures.py --verify   # reloads the files and re-checks everything
    python3 scripts/make_draft_fixtures.py --out DIR  # write somewhere else

Deterministic (fixed seeds): running it twice gives byte-identical safetensors/json files with the
same library versions (`pytorch_model.bin` is a torch zip pickle; its bytes may vary with the torch
version, its tensors do not).

What it writes
--------------
`<out>/eagle_llama3/`:

* `config.json`: an EAGLE `EConfig` / LlamaConfig look-alike (H 64, I 192, 8 heads, 2 KV heads,
  1 layer, eps 1e-5, rope_theta 5e5 with no rope_scaling, V 512, `"bias": true`, no `head_dim`:
  head_dim = hidden_size / num_attention_heads = 8).
* `model.safetensors` (float32) in the EAGLE key layout of spec §2.3: `embed_tokens.weight` [512,64]
  (= the llama3 target's `model.embed_tokens.weight`, bf16 -> f32, the draft shares the target's
  embedding), `fc.weight` [64,128] (columns 0..63 act on the embedding, 64..127 on the feature),
  `fc.bias` [64], `layers.0.self_attn.{q,k,v,o}_proj.weight`, `layers.0.mlp.{gate,up,down}_proj.weight`,
  `layers.0.post_attention_layernorm.weight`. No input_layernorm, no final norm, no lm_head.
* `expected.safetensors` (batch dim removed; float32 / int64):
  - `prefix.features` [8,64] (random N(0,1), stand-ins for target features f_0..f_7),
    `prefix.input_ids` [8] (the paired tokens x_1..x_8), `prefix.positions` [8] = 0..7,
    `prefix.out` [8,64]: draft outputs f^ with a plain causal mask, no cache.
  - `logits.prefix` [8,512] = prefix.out @ lm_head^T, lm_head = the target's `lm_head.weight` (bf16 -> f32).
  - `step.features` [2,64], `step.input_ids` [2], `step.positions` [2] = 8,9, `step.out` [2,64]:
    the last 2 rows of a 10-row causal run (prefix ++ step), i.e. an incremental step on a cache of
    the 8 prefix rows.
  - Tree growth on top of the 8 prefix rows (spec §4.3):
    level A: `treeA.features` [3,64] (3 copies of prefix.out[7], the draft's last hidden h),
    `treeA.input_ids` [3] (the top-3 tokens of logits.prefix[7]), `treeA.positions` [3] = 8,8,8,
    `treeA.mask` [3,3] = I (over the tree columns), `treeA.out` [3,64];
    level B: `treeB.parent_rows` [3] = [0,0,2] (the level-A row each B row expands),
    `treeB.features` [3,64] = treeA.out[parent_rows], `treeB.input_ids` [3] (top-1/top-2 children of
    A0 and the top-1 child of A2), `treeB.positions` [3] = 9,9,9, `treeB.mask` [3,6] over the 6 tree
    columns (3 A then 3 B) = 1 at the parent's A column and the row's own B column, `treeB.out` [3,64].
    Ground truth per row: an ordinary causal forward (no cache) of prefix rows (positions 0..7) ++
    its ancestor rows ++ itself with explicit position ids, last row.

`<out>/eagle_llama3_bin/`: the same state dict as a published-style `pytorch_model.bin`
(`torch.save` of a flat dict, float32) + the same `config.json`. hass must refuse to load the pickle
and name scripts/convert_eagle_checkpoint.py; converting it must give exactly `eagle_llama3/model.safetensors`.

Reference and self-checks
-------------------------
The stored outputs are computed in float64 from the float32 weights (exact upcast) by a hand-written
implementation of spec §2.2 and rounded to float32, so an f32 implementation should match to ~1e-5.
Asserted self-checks (printed as max abs diffs):

* per-row ground truth (f64) == one batched f32 forward of all 14 rows (prefix + A + B) with explicit
  position ids and a 4D additive mask;
* == the EAGLE inference path in f32: prefix run -> KV cache (keys after RoPE), then level A / level B
  with `past_kv` and `tree_mask` applied to the last rows x cols block of a causal mask (spec §2.2);
  and the step rows on the prefix cache;
* == transformers' `LlamaDecoderLayer` (eager attention, `input_layernorm` replaced by Identity,
  `LlamaRotaryEmbedding`) fed with fc(concat[E, F]), with the same 4D mask;
* "mutation" checks: each of the usual mistakes (an input_layernorm on layer 0, a final norm,
  [feature, embedding] concat order, no fc bias, tiled instead of repeat-interleaved GQA,
  rope_theta 1e4, causal instead of tree mask, position 9 instead of 8 for level A) changes the
  outputs by far more than the tolerance, so the fixture catches them.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "draft"
TARGET_DIR = REPO_ROOT / "tests" / "fixtures" / "models" / "llama3"
CONVERTER = REPO_ROOT / "scripts" / "convert_eagle_checkpoint.py"

SEED = 20250
P = 8                    # prefix rows
K = 3                    # tree width (top_k)
PARENT_ROWS = [0, 0, 2]  # level-B row -> level-A row
TOL = 1e-5               # f32 paths vs the f64 reference
MUTATION_MIN = 1e-3      # every mutation must move some output by more than this

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "bias": True,
    "bos_token_id": 4,
    "eos_token_id": 5,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 192,
    "max_position_embeddings": 256,
    "model_type": "llama",
    "num_attention_heads": 8,
    "num_hidden_layers": 1,
    "num_key_value_heads": 2,
    "pad_token_id": 0,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": "4.28.1",
    "use_cache": True,
    "vocab_size": 512,
}

KEYS = [
    "embed_tokens.weight",
    "fc.weight",
    "fc.bias",
    "layers.0.self_attn.q_proj.weight",
    "layers.0.self_attn.k_proj.weight",
    "layers.0.self_attn.v_proj.weight",
    "layers.0.self_attn.o_proj.weight",
    "layers.0.mlp.gate_proj.weight",
    "layers.0.mlp.up_proj.weight",
    "layers.0.mlp.down_proj.weight",
    "layers.0.post_attention_layernorm.weight",
]

# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def load_target_head(target_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(embed_tokens [V,H], lm_head [V,H]) of the llama3 target fixture, bf16 -> f32."""
    index = json.loads((target_dir / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    out = []
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        t = load_file(str(target_dir / wm[name]))[name]
        assert t.dtype == torch.bfloat16, (name, t.dtype)
        out.append(t.float())
    return out[0], out[1]


def make_weights(embed: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    c = CONFIG
    H, I = c["hidden_size"], c["intermediate_size"]
    nH, nKV = c["num_attention_heads"], c["num_key_value_heads"]
    hd = H // nH
    assert embed.shape == (c["vocab_size"], H)

    def rn(*shape, std=0.1):
        return std * torch.randn(*shape, generator=gen, dtype=torch.float32)

    w = {
        "embed_tokens.weight": embed.clone(),
        "fc.weight": rn(H, 2 * H),
        "fc.bias": rn(H, std=0.1),
        "layers.0.self_attn.q_proj.weight": rn(nH * hd, H, std=0.15),
        "layers.0.self_attn.k_proj.weight": rn(nKV * hd, H, std=0.15),
        "layers.0.self_attn.v_proj.weight": rn(nKV * hd, H),
        "layers.0.self_attn.o_proj.weight": rn(H, nH * hd),
        "layers.0.mlp.gate_proj.weight": rn(I, H),
        "layers.0.mlp.up_proj.weight": rn(I, H),
        "layers.0.mlp.down_proj.weight": rn(H, I),
        "layers.0.post_attention_layernorm.weight": 1.0 + rn(H),
    }
    assert list(w) == KEYS
    return {k: v.contiguous() for k, v in w.items()}


# --------------------------------------------------------------------------------------------
# Hand-written draft forward (spec §2.2)
# --------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(torch.float32) if x.dtype != torch.float64 else x
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype) * w


def rope_cos_sin(positions: torch.Tensor, hd: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """HF Llama default rope: inv_freq[i] = 1/theta^(2i/hd), emb = cat(freqs, freqs)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).to(torch.float64) / hd))
    freqs = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def causal_additive(T: int, past: int, dtype) -> torch.Tensor:
    """[T, past+T]: 0 for past columns and on/below the diagonal, fp32-min above it (EAGLE style)."""
    m = torch.zeros(T, past + T, dtype=dtype)
    upper = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    m[:, past:].masked_fill_(upper, torch.finfo(torch.float32).min)
    return m


def allowed_to_additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(torch.float32).min)


def draft_forward(W: dict, F: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
                  mask: torch.Tensor | None = None, past: tuple | None = None,
                  dtype=torch.float64, mut: frozenset = frozenset()):
    """One EAGLE-1/2 draft forward. F [T,H], ids [T], positions [T];
    mask: additive [T, past+T] (None = causal incl. past); past: (k, v) [nKV, S, hd] after RoPE.
    Returns (out [T,H], (k, v) incl. the new rows).

    `mut` switches on deliberate mistakes, used only to check that the fixture is discriminative."""
    c = CONFIG
    H = c["hidden_size"]
    nH, nKV = c["num_attention_heads"], c["num_key_value_heads"]
    hd = H // nH
    eps = c["rms_norm_eps"]
    theta = 1e4 if "theta1e4" in mut else c["rope_theta"]
    W = {k: v.to(dtype) for k, v in W.items()}
    F = F.to(dtype)
    T = F.shape[0]

    E = W["embed_tokens.weight"][ids]
    cat = torch.cat([F, E], -1) if "swap_concat" in mut else torch.cat([E, F], -1)
    X = cat @ W["fc.weight"].T
    if "no_fc_bias" not in mut:
        X = X + W["fc.bias"]

    # layer 0: no input_layernorm
    resid = X
    if "input_norm" in mut:
        X = rms_norm(X, torch.ones(H, dtype=dtype), eps)
    q = (X @ W["layers.0.self_attn.q_proj.weight"].T).view(T, nH, hd).transpose(0, 1)   # [nH,T,hd]
    k = (X @ W["layers.0.self_attn.k_proj.weight"].T).view(T, nKV, hd).transpose(0, 1)  # [nKV,T,hd]
    v = (X @ W["layers.0.self_attn.v_proj.weight"].T).view(T, nKV, hd).transpose(0, 1)
    cos, sin = rope_cos_sin(positions, hd, theta, dtype)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    if past is not None:
        k = torch.cat([past[0], k], dim=1)
        v = torch.cat([past[1], v], dim=1)
    S = k.shape[1]
    if mask is None:
        mask = causal_additive(T, S - T, dtype)
    assert mask.shape == (T, S), (mask.shape, T, S)
    g = nH // nKV
    if "tile_gqa" in mut:
        kk, vv = k.repeat(g, 1, 1), v.repeat(g, 1, 1)
    else:
        kk, vv = k.repeat_interleave(g, dim=0), v.repeat_interleave(g, dim=0)   # head h -> kv h // g
    scores = q @ kk.transpose(1, 2) / (hd ** 0.5) + mask.to(dtype)[None]
    sm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    p = torch.softmax(scores.to(sm_dtype), dim=-1).to(dtype)
    a = (p @ vv).transpose(0, 1).reshape(T, nH * hd)
    X = resid + a @ W["layers.0.self_attn.o_proj.weight"].T

    resid = X
    h = rms_norm(X, W["layers.0.post_attention_layernorm.weight"], eps)
    m = (torch.nn.functional.silu(h @ W["layers.0.mlp.gate_proj.weight"].T)
         * (h @ W["layers.0.mlp.up_proj.weight"].T)) @ W["layers.0.mlp.down_proj.weight"].T
    X = resid + m
    if "final_norm" in mut:
        X = rms_norm(X, torch.ones(H, dtype=dtype), eps)
    return X, (k, v)


# --------------------------------------------------------------------------------------------
# Expected outputs
# --------------------------------------------------------------------------------------------


def tree_rows(exp: dict) -> list[dict]:
    """Each tree row as a path of (feature, id, position) from level A down to itself."""
    rows = []
    for a in range(K):
        rows.append({"name": f"A{a}", "path": [("treeA", a)]})
    for b, par in enumerate(exp["treeB.parent_rows"].tolist()):
        rows.append({"name": f"B{b}", "path": [("treeA", par), ("treeB", b)]})
    return rows


def per_row_reference(W: dict, exp: dict, dtype=torch.float64, mut: frozenset = frozenset()) -> dict:
    """Ground truth: every output from an ordinary causal run (no cache) of its own context."""
    pf, pid, ppos = exp["prefix.features"], exp["prefix.input_ids"], exp["prefix.positions"]
    res = {}
    res["prefix.out"], _ = draft_forward(W, pf, pid, ppos, dtype=dtype, mut=mut)
    F = torch.cat([pf, exp["step.features"]])
    ids = torch.cat([pid, exp["step.input_ids"]])
    pos = torch.cat([ppos, exp["step.positions"]])
    out, _ = draft_forward(W, F, ids, pos, dtype=dtype, mut=mut)
    res["step.out"] = out[-exp["step.input_ids"].numel():]
    for lvl in ("treeA", "treeB"):
        res[f"{lvl}.out"] = torch.zeros(K, CONFIG["hidden_size"], dtype=dtype)
    for row in tree_rows(exp):
        feats, ids_, poss = [pf], [pid], [ppos]
        for lvl, r in row["path"]:
            feats.append(exp[f"{lvl}.features"][r:r + 1])
            ids_.append(exp[f"{lvl}.input_ids"][r:r + 1])
            poss.append(exp[f"{lvl}.positions"][r:r + 1])
        out, _ = draft_forward(W, torch.cat(feats), torch.cat(ids_), torch.cat(poss), dtype=dtype, mut=mut)
        lvl, r = row["path"][-1]
        res[f"{lvl}.out"][r] = out[-1]
    return res


def batched_allowed(exp: dict) -> torch.Tensor:
    """[P+2K, P+2K] bool: causal prefix; tree rows see the prefix + (tree mask over the tree columns)."""
    n = P + 2 * K
    allowed = torch.zeros(n, n, dtype=torch.bool)
    allowed[:P, :P] = torch.tril(torch.ones(P, P, dtype=torch.bool))
    allowed[P:, :P] = True
    allowed[P:P + K, P:P + K] = exp["treeA.mask"].bool()
    allowed[P + K:, P:] = exp["treeB.mask"].bool()
    return allowed


def batched_4d(W: dict, exp: dict, dtype=torch.float32) -> dict:
    """All 14 rows (prefix, A, B) in one forward with explicit positions and an additive mask."""
    F = torch.cat([exp["prefix.features"], exp["treeA.features"], exp["treeB.features"]])
    ids = torch.cat([exp["prefix.input_ids"], exp["treeA.input_ids"], exp["treeB.input_ids"]])
    pos = torch.cat([exp["prefix.positions"], exp["treeA.positions"], exp["treeB.positions"]])
    mask = allowed_to_additive(batched_allowed(exp), dtype)
    out, _ = draft_forward(W, F, ids, pos, mask=mask, dtype=dtype)
    return {"prefix.out": out[:P], "treeA.out": out[P:P + K], "treeB.out": out[P + K:]}


def tree_mask_additive(T: int, past: int, tree_mask: torch.Tensor, dtype) -> torch.Tensor:
    """EAGLE's mask: causal incl. past, then the last rows x cols block set to fp32-min where
    tree_mask == 0 (entries where it is 1 are left as they were)."""
    m = causal_additive(T, past, dtype)
    tr, tc = tree_mask.shape
    blk = m[-tr:, -tc:]
    blk.masked_fill_(tree_mask == 0, torch.finfo(torch.float32).min)
    return m


def eagle_incremental(W: dict, exp: dict, dtype=torch.float32) -> dict:
    """The inference path: prefix -> stable KV; step rows on it; tree levels with past + tree_mask."""
    res = {}
    res["prefix.out"], kv = draft_forward(W, exp["prefix.features"], exp["prefix.input_ids"],
                                          exp["prefix.positions"], dtype=dtype)
    res["step.out"], _ = draft_forward(W, exp["step.features"], exp["step.input_ids"], exp["step.positions"],
                                       past=kv, dtype=dtype)
    mA = tree_mask_additive(K, P, exp["treeA.mask"], dtype)
    res["treeA.out"], kv = draft_forward(W, exp["treeA.features"], exp["treeA.input_ids"], exp["treeA.positions"],
                                         mask=mA, past=kv, dtype=dtype)
    mB = tree_mask_additive(K, P + K, exp["treeB.mask"], dtype)
    res["treeB.out"], _ = draft_forward(W, exp["treeB.features"], exp["treeB.input_ids"], exp["treeB.positions"],
                                        mask=mB, past=kv, dtype=dtype)
    return res


def hf_layer_batched(W: dict, exp: dict) -> dict:
    """Cross-check with transformers' LlamaDecoderLayer (input_layernorm -> Identity), eager attention."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    c = CONFIG
    cfg = LlamaConfig(
        hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_attention_heads=c["num_attention_heads"], num_key_value_heads=c["num_key_value_heads"],
        num_hidden_layers=1, rms_norm_eps=c["rms_norm_eps"], vocab_size=c["vocab_size"],
        max_position_embeddings=c["max_position_embeddings"], hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": c["rope_theta"]},
        attention_bias=False, mlp_bias=False,
    )
    cfg._attn_implementation = "eager"
    layer = LlamaDecoderLayer(cfg, layer_idx=0).eval()
    layer.input_layernorm = torch.nn.Identity()
    sd = {k[len("layers.0."):]: v for k, v in W.items() if k.startswith("layers.0.")}
    missing, unexpected = layer.load_state_dict(sd, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    rope = LlamaRotaryEmbedding(cfg)

    F = torch.cat([exp["prefix.features"], exp["treeA.features"], exp["treeB.features"]])
    ids = torch.cat([exp["prefix.input_ids"], exp["treeA.input_ids"], exp["treeB.input_ids"]])
    pos = torch.cat([exp["prefix.positions"], exp["treeA.positions"], exp["treeB.positions"]])[None]
    fc = torch.nn.Linear(2 * c["hidden_size"], c["hidden_size"], bias=True)
    fc.load_state_dict({"weight": W["fc.weight"], "bias": W["fc.bias"]})
    emb = torch.nn.Embedding(c["vocab_size"], c["hidden_size"])
    emb.load_state_dict({"weight": W["embed_tokens.weight"]})
    with torch.no_grad():
        X = fc(torch.cat([emb(ids[None]), F[None]], dim=-1))
        mask = allowed_to_additive(batched_allowed(exp), torch.float32)[None, None]
        out = layer(X, attention_mask=mask, position_ids=pos, position_embeddings=rope(X, pos))
    out = out[0] if isinstance(out, tuple) else out
    out = out[0]
    return {"prefix.out": out[:P], "treeA.out": out[P:P + K], "treeB.out": out[P + K:]}


def topk_ids(logits_row: torch.Tensor, k: int) -> list[int]:
    return torch.topk(logits_row, k).indices.tolist()


def compute_expected(W: dict, lm_head: torch.Tensor, gen: torch.Generator) -> dict:
    H, V = CONFIG["hidden_size"], CONFIG["vocab_size"]
    exp: dict[str, torch.Tensor] = {}
    exp["prefix.features"] = torch.randn(P, H, generator=gen)
    exp["prefix.input_ids"] = torch.randint(12, V, (P,), generator=gen, dtype=torch.int64)
    exp["prefix.positions"] = torch.arange(P, dtype=torch.int64)
    exp["step.features"] = torch.randn(2, H, generator=gen)
    exp["step.input_ids"] = torch.randint(12, V, (2,), generator=gen, dtype=torch.int64)
    exp["step.positions"] = torch.arange(P, P + 2, dtype=torch.int64)

    lm64 = lm_head.double()
    pref, _ = draft_forward(W, exp["prefix.features"], exp["prefix.input_ids"], exp["prefix.positions"])  # f64
    exp["prefix.out"] = pref.float()
    exp["logits.prefix"] = (pref @ lm64.T).float()

    # level A: k copies of the last hidden h = f^_8, the top-k tokens of lm_head(h), all at position P
    h = exp["prefix.out"][-1]
    exp["treeA.features"] = h[None].repeat(K, 1).contiguous()
    exp["treeA.input_ids"] = torch.tensor(topk_ids(pref[-1] @ lm64.T, K), dtype=torch.int64)
    exp["treeA.positions"] = torch.full((K,), P, dtype=torch.int64)
    exp["treeA.mask"] = torch.eye(K, dtype=torch.int64)
    # level B placeholders so that per_row_reference can run level A first
    exp["treeB.parent_rows"] = torch.tensor(PARENT_ROWS, dtype=torch.int64)
    exp["treeB.features"] = torch.zeros(K, H)
    exp["treeB.input_ids"] = torch.zeros(K, dtype=torch.int64)
    exp["treeB.positions"] = torch.full((K,), P + 1, dtype=torch.int64)
    ref = per_row_reference(W, exp)
    exp["step.out"] = ref["step.out"].float()
    exp["treeA.out"] = ref["treeA.out"].float()

    # level B: children of A rows PARENT_ROWS; features = parent's output; ids = the parent's top
    # children in order (rank 0, 1, ... per parent)
    a_logits = ref["treeA.out"] @ lm64.T
    b_ids, rank = [], {}
    for par in PARENT_ROWS:
        r = rank.get(par, 0)
        rank[par] = r + 1
        b_ids.append(topk_ids(a_logits[par], r + 1)[r])
    exp["treeB.features"] = exp["treeA.out"][PARENT_ROWS].contiguous()
    exp["treeB.input_ids"] = torch.tensor(b_ids, dtype=torch.int64)
    mB = torch.zeros(K, 2 * K, dtype=torch.int64)
    for b, par in enumerate(PARENT_ROWS):
        mB[b, par] = 1
        mB[b, K + b] = 1
    exp["treeB.mask"] = mB
    ref = per_row_reference(W, exp)
    assert torch.equal(ref["treeA.out"].float(), exp["treeA.out"])
    exp["treeB.out"] = ref["treeB.out"].float()
    order = ["prefix.features", "prefix.input_ids", "prefix.positions", "prefix.out", "logits.prefix",
             "step.features", "step.input_ids", "step.positions", "step.out",
             "treeA.features", "treeA.input_ids", "treeA.positions", "treeA.mask", "treeA.out",
             "treeB.parent_rows", "treeB.features", "treeB.input_ids", "treeB.positions", "treeB.mask",
             "treeB.out"]
    assert sorted(order) == sorted(exp)
    return {k: exp[k].contiguous() for k in order}


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def check_close(what: str, a: torch.Tensor, b: torch.Tensor, tol: float, diffs: dict) -> None:
    d = maxdiff(a, b)
    diffs[what] = max(diffs.get(what, 0.0), d)
    assert d < tol, f"{what}: max abs diff {d:.3e} >= {tol:.1e}"


OUT_KEYS = ["prefix.out", "step.out", "treeA.out", "treeB.out"]


def check_all(W: dict, exp: dict, lm_head: torch.Tensor, embed: torch.Tensor, diffs: dict) -> None:
    # consistency of the stored inputs
    assert torch.equal(W["embed_tokens.weight"], embed), "draft embedding != target embedding"
    assert torch.equal(exp["treeA.features"], exp["prefix.out"][-1:].repeat(K, 1))
    assert torch.equal(exp["treeB.features"], exp["treeA.out"][exp["treeB.parent_rows"]])
    assert exp["treeA.mask"].dtype == torch.int64 and torch.equal(exp["treeA.mask"], torch.eye(K, dtype=torch.int64))
    for b, par in enumerate(exp["treeB.parent_rows"].tolist()):
        want = torch.zeros(2 * K, dtype=torch.int64)
        want[par] = 1
        want[K + b] = 1
        assert torch.equal(exp["treeB.mask"][b], want)
    assert torch.equal(exp["prefix.positions"], torch.arange(P))
    assert exp["treeA.positions"].tolist() == [P] * K and exp["treeB.positions"].tolist() == [P + 1] * K
    assert exp["step.positions"].tolist() == [P, P + 1]

    ref = per_row_reference(W, exp)  # f64 ground truth
    for k in OUT_KEYS:
        check_close(f"stored {k} vs per-row f64 recompute", exp[k], ref[k], 1e-6, diffs)
    check_close("stored logits.prefix vs recompute", exp["logits.prefix"],
                ref["prefix.out"] @ lm_head.double().T, 1e-5, diffs)
    ref32 = per_row_reference(W, exp, dtype=torch.float32)
    for k in OUT_KEYS:
        check_close(f"per-row f32 vs f64: {k}", ref32[k], ref[k], TOL, diffs)
    b = batched_4d(W, exp)
    for k, v in b.items():
        check_close(f"batched 4D-mask f32 vs per-row: {k}", v, ref[k], TOL, diffs)
    b64 = batched_4d(W, exp, dtype=torch.float64)
    for k, v in b64.items():
        check_close(f"batched 4D-mask f64 vs per-row: {k}", v, ref[k], 1e-12, diffs)
    inc = eagle_incremental(W, exp)
    for k, v in inc.items():
        check_close(f"EAGLE KV+tree_mask f32 vs per-row: {k}", v, ref[k], TOL, diffs)
    hf = hf_layer_batched(W, exp)
    for k, v in hf.items():
        check_close(f"HF LlamaDecoderLayer f32 vs per-row: {k}", v, ref[k], TOL, diffs)

    # discriminative power: each classic mistake moves the outputs well beyond the tolerance
    for m in ["input_norm", "final_norm", "swap_concat", "no_fc_bias", "tile_gqa", "theta1e4"]:
        mref = per_row_reference(W, exp, mut=frozenset([m]))
        d = min(maxdiff(mref[k], ref[k]) for k in OUT_KEYS)
        diffs[f"mutation {m} (min over cases of max|diff|)"] = d
        assert d > MUTATION_MIN, f"mutation {m} only changes outputs by {d:.3e}"
    # tree mask ignored (plain causal over A+B) / level A at position 9
    F = torch.cat([exp["prefix.features"], exp["treeA.features"], exp["treeB.features"]])
    ids = torch.cat([exp["prefix.input_ids"], exp["treeA.input_ids"], exp["treeB.input_ids"]])
    pos = torch.cat([exp["prefix.positions"], exp["treeA.positions"], exp["treeB.positions"]])
    out, _ = draft_forward(W, F, ids, pos)
    d = min(maxdiff(out[P:P + K][1:], ref["treeA.out"][1:]), maxdiff(out[P + K:], ref["treeB.out"]))
    diffs["mutation causal-instead-of-tree-mask"] = d
    assert d > MUTATION_MIN
    out, _ = draft_forward(W, torch.cat([exp["prefix.features"], exp["treeA.features"][:1]]),
                           torch.cat([exp["prefix.input_ids"], exp["treeA.input_ids"][:1]]),
                           torch.arange(P + 1).index_fill_(0, torch.tensor([P]), P + 1))
    d = maxdiff(out[-1], ref["treeA.out"][0])
    diffs["mutation level-A position P+1"] = d
    assert d > MUTATION_MIN
    # the k level-A rows differ (different tokens, same feature and position)
    assert min(maxdiff(exp["treeA.out"][i], exp["treeA.out"][j]) for i in range(K) for j in range(i)) > MUTATION_MIN


def load_converter():
    spec = importlib.util.spec_from_file_location("convert_eagle_checkpoint", CONVERTER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def check_bin_and_converter(root: Path, diffs: dict) -> None:
    st = load_file(str(root / "eagle_llama3" / "model.safetensors"))
    sd = torch.load(str(root / "eagle_llama3_bin" / "pytorch_model.bin"), map_location="cpu", weights_only=True)
    assert list(sd) == KEYS, list(sd)
    for k in KEYS:
        assert sd[k].dtype == st[k].dtype == torch.float32 and torch.equal(sd[k], st[k]), k
    assert (root / "eagle_llama3_bin" / "config.json").read_bytes() == (root / "eagle_llama3" / "config.json").read_bytes()
    assert not (root / "eagle_llama3_bin" / "model.safetensors").exists()
    conv = load_converter()
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "converted"
        conv.convert(root / "eagle_llama3_bin", dst, dtype=None, quiet=True)
        got = load_file(str(dst / "model.safetensors"))
        assert sorted(got) == sorted(KEYS)
        for k in KEYS:
            assert got[k].dtype == torch.float32 and torch.equal(got[k], st[k]), k
        assert (dst / "config.json").read_bytes() == (root / "eagle_llama3" / "config.json").read_bytes()
        diffs["converter(bin) vs model.safetensors (exact)"] = max(maxdiff(got[k], st[k]) for k in KEYS)


# --------------------------------------------------------------------------------------------
# Writing / verifying
# --------------------------------------------------------------------------------------------


def write_config(path: Path) -> None:
    path.write_text(json.dumps(CONFIG, indent=2, sort_keys=False) + "\n")


def make(root: Path) -> dict:
    embed, lm_head = load_target_head(TARGET_DIR)
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    W = make_weights(embed, gen)
    exp = compute_expected(W, lm_head, torch.Generator().manual_seed(SEED + 1))

    d = root / "eagle_llama3"
    dbin = root / "eagle_llama3_bin"
    for x in (d, dbin):
        if x.exists():
            shutil.rmtree(x)
        x.mkdir(parents=True)
    write_config(d / "config.json")
    save_file(W, str(d / "model.safetensors"), metadata={"format": "pt"})
    save_file(exp, str(d / "expected.safetensors"), metadata={"format": "pt"})
    write_config(dbin / "config.json")
    torch.save({k: W[k].clone() for k in KEYS}, str(dbin / "pytorch_model.bin"))
    for f in list(d.iterdir()) + list(dbin.iterdir()):
        f.chmod(0o644)  # safetensors writes 0600 files
    return verify(root)


def verify(root: Path) -> dict:
    d = root / "eagle_llama3"
    cfg = json.loads((d / "config.json").read_text())
    assert cfg == CONFIG, "config.json differs from CONFIG"
    W = load_file(str(d / "model.safetensors"))
    assert sorted(W) == sorted(KEYS), sorted(W)
    for k, v in W.items():
        assert v.dtype == torch.float32, (k, v.dtype)
    exp = load_file(str(d / "expected.safetensors"))
    embed, lm_head = load_target_head(TARGET_DIR)
    diffs: dict = {}
    check_all(W, exp, lm_head, embed, diffs)
    check_bin_and_converter(root, diffs)
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
    warnings.filterwarnings("ignore", category=FutureWarning)
    import transformers
    transformers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")

    if args.verify:
        diffs = verify(args.out)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        diffs = make(args.out)
        for sub in ("eagle_llama3", "eagle_llama3_bin"):
            dd = args.out / sub
            print(f"\n== {dd}")
            for f in sorted(dd.iterdir()):
                print(f"  {f.name:24s} {f.stat().st_size:9d} B  sha256 {hashlib.sha256(f.read_bytes()).hexdigest()[:16]}")
        exp = load_file(str(args.out / "eagle_llama3" / "expected.safetensors"))
        print("\nexpected.safetensors:")
        for k in exp:
            v = exp[k]
            print(f"  {k:20s} {str(v.dtype).replace('torch.', ''):8s} {list(v.shape)}")
        print(f"  prefix.out std {exp['prefix.out'].std().item():.3f}, logits.prefix std "
              f"{exp['logits.prefix'].std().item():.3f}")
        for k in ("treeA.input_ids", "treeB.input_ids", "treeB.parent_rows"):
            print(f"  {k} = {exp[k].tolist()}")
        print(f"\ntotal size of {args.out}: {dir_size(args.out) / 1e6:.3f} MB")
        assert dir_size(args.out) < 1_000_000
    print("\nself-checks (max abs diff):")
    for k, v in diffs.items():
        print(f"  {k:62s} {v:.3e}")
    print("verify OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
