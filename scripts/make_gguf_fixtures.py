#!/usr/bin/env python3
"""Writes the small GGUF fixtures that `hass-models/tests/gguf.rs` reads.

Needs the PyPI packages `gguf`, `numpy` and `safetensors`
(`python3 -m pip install gguf numpy safetensors`). Deterministic: the same package
versions give byte-identical files. `scripts/fetch_assets.sh gguf-fixtures` runs it
(installing the packages if needed) into `$HASS_CACHE/gguf-fixtures/`, where the tests
look; by hand:

    python3 scripts/make_gguf_fixtures.py OUT_DIR

Outputs (in OUT_DIR):

* `types.gguf` + `types.ref.safetensors`: one tensor per supported ggml type (F32, F16,
  BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K), a 3-D tensor, an unsupported
  (Q2_K) tensor, and metadata of every GGUF value type (nested array included). The
  reference holds, under the same names, the f32 values `gguf.quants.dequantize` gives,
  in the PyTorch/HF shape (GGUF dims reversed). Types the python package cannot
  quantize (the K-quants) are random raw blocks with sane f16 scales.
* `tiny_llama.gguf` + `tiny_llama.ref.safetensors`: a 2-layer `llama`-architecture model
  written the way llama.cpp's `convert_hf_to_gguf.py` writes one (Q/K rows permuted by
  `LlamaModel.permute`, q/k/v biases, tied embeddings, linear rope scaling). The
  reference holds the original HF-named, HF-layout (un-permuted) tensors.
* `tiny_qwen2.gguf` + `tiny_qwen2.ref.safetensors`: a 1-layer `qwen2` model (not
  permuted, untied `output.weight`, biases), reference in HF names.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from safetensors.numpy import save_file

def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def f16_bytes(vals: np.ndarray) -> np.ndarray:
    return vals.astype(np.float16).view(np.uint8).reshape(vals.shape[0], 2)


def random_kquant_blocks(qtype: T, n_blocks: int, r: np.random.Generator) -> np.ndarray:
    """Random but well-formed K-quant blocks (finite, moderate f16 scales)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = r.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    d = f16_bytes(r.uniform(0.001, 0.05, n_blocks))
    dmin = f16_bytes(r.uniform(0.001, 0.05, n_blocks))
    if qtype in (T.Q4_K, T.Q5_K):
        # layout: d (f16), dmin (f16), scales[12], ...
        raw[:, 0:2] = d
        raw[:, 2:4] = dmin
    elif qtype == T.Q6_K:
        # layout: ql[128], qh[64], scales[16] (int8), d (f16)
        raw[:, type_size - 2:] = d
    else:
        raise ValueError(qtype)
    return raw


def write_types(out: Path) -> None:
    r = rng(1234)
    w = gguf.GGUFWriter(str(out / "types.gguf"), arch="test")
    # metadata of every value type
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4_000_000_000)
    w.add_int32("test.i32", -2_000_000_000)
    w.add_float32("test.f32", 0.25)
    w.add_bool("test.bool_true", True)
    w.add_bool("test.bool_false", False)
    w.add_string("test.string", "héllo GGUF ✓")
    w.add_uint64("test.u64", 2**40 + 7)
    w.add_int64("test.i64", -(2**40) - 7)
    w.add_float64("test.f64", 3.141592653589793)
    w.add_key_value("test.array_u32", [1, 2, 3, 4_000_000_000], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT32)
    w.add_key_value("test.array_i32", [-1, 0, 7], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
    w.add_array("test.array_str", ["a", "bc", "", "déf"])
    w.add_array("test.array_f32", [0.5, -1.5])
    w.add_array("test.array_bool", [True, False, True])
    w.add_array("test.array_nested", [[1, 2], [3]])
    w.add_custom_alignment(64)  # non-default alignment (sets general.alignment and pads to it)

    ref: dict[str, np.ndarray] = {}

    def add_quantized(name: str, qtype: T, data: np.ndarray) -> None:
        if qtype == T.F32:
            q = data.astype(np.float32)
            w.add_tensor(name, q)
        elif qtype == T.F16:
            q = data.astype(np.float16)
            w.add_tensor(name, q)
        else:
            q = gguf.quants.quantize(data.astype(np.float32), qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
        ref[name] = np.ascontiguousarray(gguf.quants.dequantize(q, qtype).astype(np.float32))
        assert ref[name].shape == data.shape, (name, ref[name].shape, data.shape)

    def add_raw(name: str, qtype: T, rows: int, n_blocks_per_row: int) -> None:
        raw = random_kquant_blocks(qtype, rows * n_blocks_per_row, r)
        raw = raw.reshape(rows, -1)
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        ref[name] = np.ascontiguousarray(gguf.quants.dequantize(raw, qtype).astype(np.float32))

    f32 = r.standard_normal((5, 7)).astype(np.float32)
    add_quantized("t.f32", T.F32, f32)
    f16 = r.standard_normal((3, 16)).astype(np.float32)
    # exact f16 corner cases: subnormals, negative zero, max, tiny normal
    f16[0, :6] = [6e-8, -6e-8, -0.0, 65504.0, 6.103515625e-05, 1e-6]
    add_quantized("t.f16", T.F16, f16)
    add_quantized("t.bf16", T.BF16, r.standard_normal((2, 24)).astype(np.float32) * 100)
    for name, qtype in [
        ("t.q8_0", T.Q8_0),
        ("t.q4_0", T.Q4_0),
        ("t.q4_1", T.Q4_1),
        ("t.q5_0", T.Q5_0),
        ("t.q5_1", T.Q5_1),
    ]:
        add_quantized(name, qtype, r.standard_normal((3, 64)).astype(np.float32))
    add_raw("t.q4_k", T.Q4_K, rows=2, n_blocks_per_row=2)
    add_raw("t.q5_k", T.Q5_K, rows=2, n_blocks_per_row=1)
    add_raw("t.q6_k", T.Q6_K, rows=3, n_blocks_per_row=1)
    add_quantized("t.f32_3d", T.F32, r.standard_normal((2, 3, 4)).astype(np.float32))
    # a type hass does not dequantize: raw Q2_K bytes (no reference)
    q2k_size = gguf.GGML_QUANT_SIZES[T.Q2_K][1]
    w.add_tensor("t.q2_k", np.zeros((1, q2k_size), dtype=np.uint8), raw_shape=(1, q2k_size), raw_dtype=T.Q2_K)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file(ref, str(out / "types.ref.safetensors"))


def llama_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """`LlamaModel.permute` from llama.cpp's convert_hf_to_gguf.py, verbatim (numpy)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_model(
    out: Path,
    stem: str,
    arch: str,
    *,
    seed: int,
    layers: int,
    hidden: int,
    ffn: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    n_tokens: int,
    tied: bool,
    permute: bool,
    rope_base: float,
    eps: float,
    extra_kv,
) -> None:
    r = rng(seed)
    head_dim = hidden // heads
    hf: dict[str, np.ndarray] = {}

    def rnd(*shape: int) -> np.ndarray:
        return (r.standard_normal(shape) * 0.1).astype(np.float32)

    hf["model.embed_tokens.weight"] = rnd(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        hf[p + "input_layernorm.weight"] = 1.0 + rnd(hidden)
        hf[p + "self_attn.q_proj.weight"] = rnd(heads * head_dim, hidden)
        hf[p + "self_attn.k_proj.weight"] = rnd(kv_heads * head_dim, hidden)
        hf[p + "self_attn.v_proj.weight"] = rnd(kv_heads * head_dim, hidden)
        hf[p + "self_attn.q_proj.bias"] = rnd(heads * head_dim)
        hf[p + "self_attn.k_proj.bias"] = rnd(kv_heads * head_dim)
        hf[p + "self_attn.v_proj.bias"] = rnd(kv_heads * head_dim)
        hf[p + "self_attn.o_proj.weight"] = rnd(hidden, heads * head_dim)
        hf[p + "post_attention_layernorm.weight"] = 1.0 + rnd(hidden)
        hf[p + "mlp.gate_proj.weight"] = rnd(ffn, hidden)
        hf[p + "mlp.up_proj.weight"] = rnd(ffn, hidden)
        hf[p + "mlp.down_proj.weight"] = rnd(hidden, ffn)
    hf["model.norm.weight"] = 1.0 + rnd(hidden)
    if not tied:
        hf["lm_head.weight"] = rnd(vocab, hidden)

    w = gguf.GGUFWriter(str(out / f"{stem}.gguf"), arch=arch)
    w.add_name(stem)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(eps)
    w.add_rope_freq_base(rope_base)
    w.add_rope_dimension_count(head_dim)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(n_tokens)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    extra_kv(w)

    # HF name -> GGUF name, as gguf.TensorNameMap maps them
    def gguf_name(name: str) -> str:
        simple = {
            "model.embed_tokens.weight": "token_embd.weight",
            "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight",
        }
        if name in simple:
            return simple[name]
        parts = name.split(".")
        bid, rest = parts[2], ".".join(parts[3:])
        table = {
            "input_layernorm.weight": "attn_norm.weight",
            "self_attn.q_proj.weight": "attn_q.weight",
            "self_attn.k_proj.weight": "attn_k.weight",
            "self_attn.v_proj.weight": "attn_v.weight",
            "self_attn.q_proj.bias": "attn_q.bias",
            "self_attn.k_proj.bias": "attn_k.bias",
            "self_attn.v_proj.bias": "attn_v.bias",
            "self_attn.o_proj.weight": "attn_output.weight",
            "post_attention_layernorm.weight": "ffn_norm.weight",
            "mlp.gate_proj.weight": "ffn_gate.weight",
            "mlp.up_proj.weight": "ffn_up.weight",
            "mlp.down_proj.weight": "ffn_down.weight",
        }
        return f"blk.{bid}.{table[rest]}"

    for name, t in hf.items():
        data = t
        if permute and name.endswith(("q_proj.weight", "q_proj.bias")):
            data = llama_permute(data, heads, heads)
        if permute and name.endswith(("k_proj.weight", "k_proj.bias")):
            data = llama_permute(data, heads, kv_heads)
        # MLP matrices as F16 (as a converter would for an f16 model); the reference
        # is then the f16-rounded value
        if ".mlp." in name:
            data = data.astype(np.float16)
            hf[name] = data.astype(np.float32)
        w.add_tensor(gguf_name(name), np.ascontiguousarray(data))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file({k: np.ascontiguousarray(v) for k, v in hf.items()}, str(out / f"{stem}.ref.safetensors"))


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    OUT = Path(sys.argv[1])
    OUT.mkdir(parents=True, exist_ok=True)
    write_types(OUT)

    def llama_kv(w: gguf.GGUFWriter) -> None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(2.0)
        w.add_eot_token_id(3)

    tiny_model(
        OUT, "tiny_llama", "llama", seed=7, layers=2, hidden=32, ffn=48, heads=4, kv_heads=2,
        vocab=40, n_tokens=40, tied=True, permute=True, rope_base=100000.0, eps=1e-5, extra_kv=llama_kv,
    )
    tiny_model(
        OUT, "tiny_qwen2", "qwen2", seed=8, layers=1, hidden=32, ffn=48, heads=4, kv_heads=2,
        vocab=40, n_tokens=36, tied=False, permute=False, rope_base=1000000.0, eps=1e-6,
        extra_kv=lambda w: None,
    )
    total = 0
    for f in sorted(OUT.iterdir()):
        total += f.stat().st_size
        print(f"{f.name:32} {f.stat().st_size:8} bytes")
    print(f"{'total':32} {total:8} bytes")


if __name__ == "__main__":
    main()
