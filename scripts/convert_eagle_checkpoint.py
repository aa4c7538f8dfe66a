#!/usr/bin/env python3
"""Convert a published EAGLE-1/2 or HASS draft head (`pytorch_model.bin`) to `model.safetensors`.

hass never unpickles checkpoints; it reads safetensors only. Published EAGLE / HASS heads ship as
a torch pickle (`pytorch_model.bin`, a flat state dict, spec §2.3). This script converts one:

    python3 scripts/convert_eagle_checkpoint.py SRC_DIR DST_DIR [--dtype f32|f16|bf16] [--force]
    python3 scripts/convert_eagle_checkpoint.py --self-test

* SRC_DIR holds `pytorch_model.bin` (or shards + `pytorch_model.bin.index.json`) and usually
  `config.json`; SRC may also be the path of a `.bin` file itself.
* The pickle is read with `torch.load(..., map_location="cpu", weights_only=True)`: only tensors and
  plain containers are accepted, arbitrary pickled code is never executed.
* A `module.` prefix (from DDP / accelerate wrapping) is stripped from every key.
* dtypes are kept (published heads are fp16) unless `--dtype` casts every floating tensor.
* Writes DST_DIR/model.safetensors (metadata {"format": "pt"}) and copies config.json, then prints
  the key list with shapes and dtypes.
* Refuses (exit 2) when the keys do not look like an EAGLE-1/2 head: no `fc.weight`, `fc.weight`
  not [H, 2H], EAGLE-3 keys (`midlayer.*`, `d2t`, `t2d`), or keys outside the EAGLE-1/2 layout
  (`--force` converts those anyway).

`--self-test` converts the fixture tests/fixtures/draft/eagle_llama3_bin (made by
scripts/make_draft_fixtures.py) and checks the result equals tests/fixtures/draft/eagle_llama3/
model.safetensors bit for bit, then checks prefix stripping, --dtype and the refusals on temp files.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}

# EAGLE-1/2 / HASS layout (spec §2.3); layer 0 has no input_layernorm, layers >= 1 do.
KNOWN = [
    r"embed_tokens\.weight",
    r"fc\.weight",
    r"fc\.bias",
    r"layers\.\d+\.self_attn\.[qkvo]_proj\.weight",
    r"layers\.\d+\.self_attn\.[qkv]_proj\.bias",          # qkv_bias (Qwen2 heads)
    r"layers\.\d+\.mlp\.(gate|up|down)_proj\.weight",
    r"layers\.\d+\.(input|post_attention)_layernorm\.weight",
]
EAGLE3 = [r"midlayer\..*", r"d2t", r"t2d"]


class ConvertError(Exception):
    pass


def _match(key: str, pats: list[str]) -> bool:
    return any(re.fullmatch(p, key) for p in pats)


def _torch_load(path: Path) -> dict:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ConvertError(f"{path}: cannot be read with torch.load(weights_only=True) "
                           f"(refusing to unpickle arbitrary objects): {e}") from e
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: expected a flat state dict, got {type(obj).__name__}")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ConvertError(f"{path}: entry {k!r} is not a named tensor ({type(v).__name__})")
    return obj


def load_state_dict(src: Path) -> tuple[dict, Path | None]:
    """(state dict, directory holding config.json or None)."""
    if src.is_file():
        return _torch_load(src), src.parent
    if not src.is_dir():
        raise ConvertError(f"{src}: no such file or directory")
    single = src / "pytorch_model.bin"
    index = src / "pytorch_model.bin.index.json"
    if single.is_file():
        return _torch_load(single), src
    if index.is_file():
        wm = json.loads(index.read_text())["weight_map"]
        sd: dict = {}
        for shard in sorted(set(wm.values())):
            part = _torch_load(src / shard)
            dup = set(part) & set(sd)
            if dup:
                raise ConvertError(f"{shard}: duplicate keys {sorted(dup)[:5]}")
            sd.update(part)
        return sd, src
    if (src / "model.safetensors").is_file():
        raise ConvertError(f"{src}: already has model.safetensors and no pytorch_model.bin; nothing to convert")
    raise ConvertError(f"{src}: no pytorch_model.bin (or pytorch_model.bin.index.json) found")


def normalize(sd: dict, dtype: torch.dtype | None, force: bool) -> dict:
    out = {}
    for k, v in sd.items():
        nk = k[len("module."):] if k.startswith("module.") else k
        if nk in out:
            raise ConvertError(f"key {nk!r} appears both with and without the 'module.' prefix")
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[nk] = v.contiguous().clone()  # unshare storage (safetensors refuses shared tensors)
    keys = sorted(out)
    e3 = [k for k in keys if _match(k, EAGLE3)]
    if e3:
        raise ConvertError(f"this looks like an EAGLE-3 head (keys {e3[:4]}); only EAGLE-1/2/HASS heads are supported")
    if "fc.weight" not in out:
        hint = ""
        if any(k.startswith("model.") for k in keys):
            hint = "; keys carry a 'model.' prefix: is this a full target model rather than a draft head?"
        raise ConvertError(f"no 'fc.weight' key: not an EAGLE-1/2/HASS draft head (keys: {keys[:8]}"
                           f"{' ...' if len(keys) > 8 else ''}){hint}")
    fw = out["fc.weight"]
    if fw.dim() != 2 or fw.shape[1] != 2 * fw.shape[0]:
        raise ConvertError(f"fc.weight has shape {list(fw.shape)}, expected [H, 2H] for an EAGLE-1/2 head")
    if not any(k.startswith("layers.0.") for k in keys):
        raise ConvertError("no 'layers.0.*' keys: not an EAGLE-1/2/HASS draft head")
    unknown = [k for k in keys if not _match(k, KNOWN)]
    if unknown and not force:
        raise ConvertError(f"unexpected keys for an EAGLE-1/2 head: {unknown[:8]} (use --force to convert anyway)")
    return out


def convert(src: Path, dst: Path, dtype: torch.dtype | None = None, force: bool = False,
            quiet: bool = False) -> dict:
    src, dst = Path(src), Path(dst)
    sd, cfg_dir = load_state_dict(src)
    sd = normalize(sd, dtype, force)
    dst.mkdir(parents=True, exist_ok=True)
    out = dst / "model.safetensors"
    save_file(sd, str(out), metadata={"format": "pt"})
    cfg = cfg_dir / "config.json" if cfg_dir is not None else None
    if cfg is not None and cfg.is_file():
        if cfg.resolve() != (dst / "config.json").resolve():
            shutil.copyfile(cfg, dst / "config.json")
    elif not quiet:
        print(f"warning: no config.json next to {src}; copy the head's config.json to {dst} by hand",
              file=sys.stderr)
    if not quiet:
        print(f"wrote {out} ({out.stat().st_size} B), {len(sd)} tensors:")
        for k in sorted(sd):
            v = sd[k]
            print(f"  {k:48s} {str(v.dtype).replace('torch.', ''):9s} {list(v.shape)}")
        if "embed_tokens.weight" not in sd:
            print("note: no embed_tokens.weight; hass must take the embedding from the target model")
        print("fc.bias " + ("present" if "fc.bias" in sd else "absent (fc without bias)"))
    return sd


# --------------------------------------------------------------------------------------------
# Self-test on the draft fixture
# --------------------------------------------------------------------------------------------


def self_test() -> None:
    fx = REPO_ROOT / "tests" / "fixtures" / "draft"
    ref = load_file(str(fx / "eagle_llama3" / "model.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # 1. the fixture pickle converts to exactly the fixture safetensors
        got = convert(fx / "eagle_llama3_bin", tmp / "a")
        got = load_file(str(tmp / "a" / "model.safetensors"))
        assert sorted(got) == sorted(ref), (sorted(got), sorted(ref))
        for k in ref:
            assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
        assert (tmp / "a" / "config.json").read_bytes() == (fx / "eagle_llama3" / "config.json").read_bytes()
        print("self-test: fixture bin -> safetensors: all tensors bit-identical, config copied")

        sd = torch.load(str(fx / "eagle_llama3_bin" / "pytorch_model.bin"), map_location="cpu", weights_only=True)
        # 2. 'module.' prefix stripped, --dtype f16, shards via the index, .bin path as SRC
        d = tmp / "prefixed"
        d.mkdir()
        torch.save({"module." + k: v.half() for k, v in sd.items()}, str(d / "pytorch_model.bin"))
        got = convert(d / "pytorch_model.bin", tmp / "b", quiet=True)
        assert sorted(got) == sorted(ref) and all(v.dtype == torch.float16 for v in got.values())
        got = convert(d, tmp / "c", dtype=torch.float32, quiet=True)
        for k in ref:
            assert got[k].dtype == torch.float32 and torch.equal(got[k], ref[k].half().float()), k
        d = tmp / "sharded"
        d.mkdir()
        keys = list(sd)
        torch.save({k: sd[k] for k in keys[:5]}, str(d / "pytorch_model-00001-of-00002.bin"))
        torch.save({k: sd[k] for k in keys[5:]}, str(d / "pytorch_model-00002-of-00002.bin"))
        wm = {k: f"pytorch_model-0000{1 if i < 5 else 2}-of-00002.bin" for i, k in enumerate(keys)}
        (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
        got = convert(d, tmp / "d", dtype=torch.bfloat16, quiet=True)
        for k in ref:
            assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], ref[k].bfloat16()), k
        print("self-test: module. prefix stripped, --dtype f16/f32/bf16, sharded index, file SRC: OK")

        # 3. refusals
        def refused(obj, what):
            dd = tmp / f"bad_{what}"
            dd.mkdir()
            torch.save(obj, str(dd / "pytorch_model.bin"))
            try:
                convert(dd, tmp / f"out_{what}", quiet=True)
            except ConvertError as e:
                print(f"self-test: refused ({what}): {e}")
                return
            raise AssertionError(f"{what}: not refused")

        refused({k: v for k, v in sd.items() if k != "fc.weight"}, "no_fc")
        refused({"model." + k: v for k, v in sd.items()}, "model_prefix")
        refused({**sd, "fc.weight": torch.zeros(64, 192)}, "eagle3_fc_shape")
        refused({**sd, "midlayer.hidden_norm.weight": torch.ones(64), "d2t": torch.zeros(4, dtype=torch.int64)},
                "eagle3_keys")
        refused({**sd, "lm_head.weight": torch.zeros(512, 64)}, "unknown_key")
        refused([1, 2, 3], "not_a_dict")

        class Evil:
            def __reduce__(self):
                return (print, ("!!! arbitrary code executed !!!",))
        refused({"fc.weight": torch.zeros(2, 4), "x": Evil()}, "pickle_object")
        got = convert(tmp / "bad_unknown_key", tmp / "forced", force=True, quiet=True)
        assert "lm_head.weight" in got
    print("self-test OK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", nargs="?", type=Path, help="dir with pytorch_model.bin (or the .bin file)")
    ap.add_argument("dst", nargs="?", type=Path, help="output dir for model.safetensors + config.json")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors (default: keep)")
    ap.add_argument("--force", action="store_true", help="convert even with keys outside the EAGLE-1/2 layout")
    ap.add_argument("--self-test", action="store_true", help="check against tests/fixtures/draft")
    args = ap.parse_args()
    if args.self_test:
        self_test()
        return 0
    if args.src is None or args.dst is None:
        ap.error("SRC_DIR and DST_DIR are required")
    try:
        convert(args.src, args.dst, DTYPES.get(args.dtype), args.force)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
