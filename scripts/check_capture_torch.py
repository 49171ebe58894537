#!/usr/bin/env python3
"""Check a capture_qk.py store against transformers running the same GGUF model.

    python3 scripts/check_capture_torch.py --gguf M.gguf --store qk.h5 [--device cuda|cpu]

Loads the GGUF through transformers' GGUF support (which dequantises it and undoes llama.cpp's
Q/K row permutation), feeds the store's /tokens, and takes each layer's Q/K/V from the model's
own q_proj/k_proj/v_proj outputs with the model's own RoPE (the cos/sin that the decoder passes
to the attention and transformers' apply_rotary_pos_emb). Prints, per layer, the relative error
||ours - theirs||_F / ||theirs||_F of Q, K and V and fails (exit 1) above --tol (2e-3).

Needs torch, transformers, h5py, numpy and the pure-Python `gguf` package. Where `gguf` is not
installed (the GPU machine reaches no registry), a wheel is taken from --wheel-dir
(default cache/wheels/, fill it here with `pip download --no-deps gguf -d cache/wheels`).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

PROG = "check_capture_torch.py"
SOURCE_DIR = Path(__file__).resolve().parent.parent


class CheckError(Exception):
    pass


def ensure_gguf(wheel_dir: Path | None) -> str:
    """Makes `import gguf` work, from a carried wheel if need be. Must run before transformers
    is imported: transformers decides once, at import, whether GGUF support is available."""
    try:
        import gguf  # noqa: F401
        return "installed"
    except ImportError:
        pass
    wd = Path(wheel_dir or SOURCE_DIR / "cache" / "wheels")
    wheels = sorted(glob.glob(str(wd / "gguf-*.whl")))
    if not wheels:
        raise CheckError(f"the 'gguf' package is not installed and no gguf-*.whl is in {wd} "
                         "(on a machine with PyPI: pip download --no-deps gguf -d cache/wheels)")
    # A wheel is a zip of the package and its dist-info: unpacked onto sys.path it imports and
    # importlib.metadata finds its version (transformers checks it).
    dest = Path(tempfile.mkdtemp(prefix="proxyattn-gguf-"))
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extractall(dest)
    sys.path.insert(0, str(dest))
    import importlib
    importlib.invalidate_caches()
    import gguf  # noqa: F401
    return f"from {Path(wheels[-1]).name}"


def load_hf_model(path: Path, gguf_file: str | None, device: str):
    """(torch, model, config) in float32, eager attention, on `device`."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 must mean float32 for a 2e-3 check
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    kw = dict(attn_implementation="eager")
    if gguf_file is not None:
        kw["gguf_file"] = gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32, **kw)
    model = model.to(device).eval()
    return torch, model, model.config


def hf_shape(cfg):
    """(layers, q heads, kv heads, head dim, rope theta, context) from a transformers config."""
    n_head = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        rp = getattr(cfg, "rope_parameters", None) or {}
        theta = rp.get("rope_theta", 10000.0) if isinstance(rp, dict) else 10000.0
    return (int(cfg.num_hidden_layers), n_head, n_kv, int(hd), float(theta),
            int(getattr(cfg, "max_position_embeddings", 0) or 0))


def _decoder_layers(model):
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise CheckError(f"{type(model).__name__}: no .model.layers (not a Llama-style model)")
    return inner, layers


def torch_capture(torch, model, ids, layers, with_loss: bool = False):
    """Forward `ids` once; returns ({layer: (q [Hq,N,d], k, v [Hkv,N,d]) float32 numpy}, info).

    q/k are the projections of the layer's own q_proj/k_proj with RoPE applied by transformers'
    apply_rotary_pos_emb and the (cos, sin) the decoder hands to the attention module.
    info["rope_fn"] holds, when transformers' module-level apply_rotary_pos_emb is what the
    attention calls, q/k recorded from inside that call, as a second, independent path."""
    from transformers.models.llama import modeling_llama as ml
    inner, dec = _decoder_layers(model)
    cfg = model.config
    _, n_head, n_kv, hd, _, _ = hf_shape(cfg)
    want = set(layers)
    raw: dict[int, dict] = {i: {} for i in want}
    hooks = []

    def proj_hook(i, name):
        def h(_m, _inp, out):
            raw[i][name] = out.detach()
        return h

    def attn_pre_hook(i):
        def h(_m, args, kwargs):
            pe = kwargs.get("position_embeddings")
            if pe is not None:
                raw[i]["cos"], raw[i]["sin"] = pe[0].detach(), pe[1].detach()
        return h

    for i in want:
        att = dec[i].self_attn
        hooks.append(att.q_proj.register_forward_hook(proj_hook(i, "q")))
        hooks.append(att.k_proj.register_forward_hook(proj_hook(i, "k")))
        hooks.append(att.v_proj.register_forward_hook(proj_hook(i, "v")))
        hooks.append(att.register_forward_pre_hook(attn_pre_hook(i), with_kwargs=True))

    # Second path: record what transformers' own RoPE function returns, call by call.
    rope_calls = []
    orig = ml.apply_rotary_pos_emb

    def recording_rope(q, k, cos, sin, *a, **kw):
        qe, ke = orig(q, k, cos, sin, *a, **kw)
        rope_calls.append((qe.detach().float().cpu(), ke.detach().float().cpu()))
        return qe, ke

    ml.apply_rotary_pos_emb = recording_rope
    dev = next(model.parameters()).device
    x = torch.tensor([list(ids)], dtype=torch.long, device=dev)
    info = {}
    try:
        with torch.no_grad():
            out = model(input_ids=x, labels=x if with_loss else None, use_cache=False)
        if with_loss:
            info["loss"] = float(out.loss)
    finally:
        ml.apply_rotary_pos_emb = orig
        for h in hooks:
            h.remove()

    N = x.shape[1]
    res = {}
    for i in sorted(want):
        r = raw[i]
        if not all(n in r for n in ("q", "k", "v")):
            raise CheckError(f"layer {i}: q/k/v projections were not captured")
        q = r["q"].view(1, N, n_head, hd).transpose(1, 2)
        k = r["k"].view(1, N, n_kv, hd).transpose(1, 2)
        v = r["v"].view(1, N, n_kv, hd).transpose(1, 2)
        if "cos" in r:
            cos, sin = r["cos"], r["sin"]
        else:  # older transformers: the attention computes its own; ask the model's rotary_emb
            pos = torch.arange(N, device=dev)[None]
            cos, sin = inner.rotary_emb(v, pos)
        qe, ke = ml.apply_rotary_pos_emb(q, k, cos, sin)
        res[i] = tuple(t[0].float().cpu().numpy() for t in (qe, ke, v))
    # The recording path is usable only if it saw exactly one call per decoder layer.
    if len(rope_calls) == len(dec):
        info["rope_fn"] = {i: (rope_calls[i][0][0].numpy(), rope_calls[i][1][0].numpy())
                           for i in sorted(want)}
    info["rope_fn_calls"] = len(rope_calls)
    return res, info


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, required=True, help="the GGUF the store was captured from")
    ap.add_argument("--store", type=Path, required=True, help="store written by capture_qk.py")
    ap.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
    ap.add_argument("--tol", type=float, default=2e-3, help="max relative error per tensor (2e-3)")
    ap.add_argument("--layers", help="compare only these store layers, e.g. 0,15,29")
    ap.add_argument("--wheel-dir", type=Path, help="folder with a gguf-*.whl (cache/wheels)")
    ap.add_argument("--json", type=Path, help="also write the table as JSON here")
    a = ap.parse_args(argv)
    try:
        return check(a)
    except CheckError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


def check(a) -> int:
    import h5py
    if not a.gguf.is_file():
        raise CheckError(f"--gguf {a.gguf}: no such file")
    if not a.store.is_file():
        raise CheckError(f"--store {a.store}: no such file")
    how = ensure_gguf(a.wheel_dir)
    try:
        import torch
        import transformers
    except ImportError as e:
        raise CheckError(f"needs torch and transformers ({e})") from None
    device = a.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with h5py.File(a.store, "r") as f:
        ids = f["tokens"][()].astype(np.int64).tolist()
        store_layers = sorted(int(k) for k in f["layers"].keys())
        attrs = {k: f.attrs[k] for k in f.attrs}
    layers = store_layers
    if a.layers:
        pick = {int(x) for x in a.layers.split(",") if x.strip()}
        missing = sorted(pick - set(store_layers))
        if missing:
            raise CheckError(f"--layers: layer {missing[0]} is not in {a.store}")
        layers = sorted(pick)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, gguf {how}, "
          f"device {device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
    t0 = time.perf_counter()
    torch_, model, cfg = load_hf_model(a.gguf.resolve().parent, a.gguf.name, device)
    shape = hf_shape(cfg)
    print(f"model: {shape[0]} layers, {shape[1]} q heads, {shape[2]} kv heads, head dim {shape[3]}, "
          f"rope theta {shape[4]:g} (loaded in {time.perf_counter() - t0:.1f} s)")
    want = (int(attrs["num_layers"]), int(attrs["num_q_heads"]), int(attrs["num_kv_heads"]),
            int(attrs["head_dim"]))
    if tuple(shape[:4]) != want:
        raise CheckError(f"{a.store}: shape {want} (layers, q heads, kv heads, head dim) differs "
                         f"from the model's {tuple(shape[:4])}")
    t0 = time.perf_counter()
    ref, info = torch_capture(torch_, model, ids, layers, with_loss=True)
    print(f"forward over {len(ids)} tokens in {time.perf_counter() - t0:.1f} s; transformers "
          f"perplexity on the store's tokens {np.exp(info['loss']):.3f}; "
          f"apply_rotary_pos_emb calls seen: {info['rope_fn_calls']}")

    rows = []
    worst = 0.0
    with h5py.File(a.store, "r") as f:
        hdr = f"{'layer':>5}  {'q rel':>10}  {'k rel':>10}  {'v rel':>10}"
        if "rope_fn" in info:
            hdr += f"  {'q rel(fn)':>10}  {'k rel(fn)':>10}"
        print(hdr + "  status")
        for i in layers:
            g = f["layers"][f"{i:02d}"]
            q_ref, k_ref, v_ref = ref[i]
            eq = rel_err(g["q"][()], q_ref)
            ek = rel_err(g["k"][()], k_ref)
            ev = rel_err(g["v"][()], v_ref) if "v" in g else float("nan")
            row = {"layer": i, "q": eq, "k": ek, "v": ev}
            errs = [eq, ek] + ([ev] if "v" in g else [])
            line = f"{i:>5}  {eq:>10.2e}  {ek:>10.2e}  {ev:>10.2e}"
            if "rope_fn" in info:
                fq, fk = info["rope_fn"][i]
                row["q_fn"] = rel_err(g["q"][()], fq)
                row["k_fn"] = rel_err(g["k"][()], fk)
                errs += [row["q_fn"], row["k_fn"]]
                line += f"  {row['q_fn']:>10.2e}  {row['k_fn']:>10.2e}"
            ok = max(errs) <= a.tol
            worst = max(worst, max(errs))
            row["ok"] = ok
            rows.append(row)
            print(line + ("  ok" if ok else "  FAIL"))
    bad = [r["layer"] for r in rows if not r["ok"]]
    verdict = "PASS" if not bad else f"FAIL (layers {bad})"
    print(f"{verdict}: worst relative error {worst:.2e} over {len(rows)} layer(s), tolerance {a.tol:g}")
    if a.json:
        import json
        a.json.write_text(json.dumps({"store": str(a.store), "gguf": str(a.gguf), "device": device,
                                      "torch": torch.__version__,
                                      "transformers": transformers.__version__,
                                      "tol": a.tol, "worst": worst, "rows": rows,
                                      "hf_perplexity": float(np.exp(info["loss"]))}, indent=1))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
