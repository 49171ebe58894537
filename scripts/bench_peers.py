#!/usr/bin/env python3
"""Peer kernels on the same shapes, the same masks and in the same run as proxyattn-bench.

Times (CUDA events, L2 flushed before each repetition, median/min/max of repetitions):
  sdpa_flash      torch SDPA, FlashAttention-2 backend, causal
  sdpa_cudnn      torch SDPA, cuDNN backend, causal
  sdpa_efficient  torch SDPA, memory-efficient backend, causal
  flex_dense      FlexAttention, causal block mask (create_block_mask)
  flex_sparse     FlexAttention on OUR exported masks (proxyattn-bench --export-masks DIR), through
                  BlockMask.from_kv_blocks: off-diagonal blocks as full blocks, the diagonal block
                  as a partial block with the causal mask_mod
  xattn_estimate  a torch re-implementation of XAttention's antidiagonal estimator (ALGORITHMS.md:
                  strided scores, causal softmax, block sums, tau = 0.9 selection), chunked over rows
KV heads are expanded to the query heads for every peer (as PERFORMANCE.md's anchors were measured).
Inputs are seeded normal bf16 values (dense timing does not depend on the data's structure).

Check (--check DIR, written by proxyattn-bench --export-check DIR): FlexAttention's output on our
mask, our kernel's output and a float64 numpy reference of dense attention with the expanded mask
must agree within bf16 tolerance; the result is in peers.json["checks"] and the exit status is 1 if
it fails.

Writes OUT/peers.json, OUT/peers.csv, OUT/peers.md with the row schema of proxyattn-bench
(apps/bench/bench.hpp). speedup_vs_full / pct_of_full are relative to sdpa_flash at the same N.

  python3 scripts/bench_peers.py --sweep configs/sweeps/fig4_speedup.json --masks M --check C --out R

Prefill (a sweep of kind "prefill", or --prefill): the peer of proxyattn-bench's prefill mode, the
same random-weight model (configs/models/*.json with the whole-model fields; Llama family:
embeddings, RMSNorm, RoPE, GQA attention, SwiGLU MLP, final norm, lm_head of the last token) as a
plain torch forward, batch 1, bf16, attention by SDPA causal with the cuDNN (torch_sdpa_cudnn) or
flash (torch_sdpa_flash) backend. Time to first token (CUDA events, median/min/max of the whole
forward) with its stages (linear, elementwise, attention, logits: events between the ops of the
same runs; attention per layer in the JSON), the projections' TFLOP/s beside a cuBLAS GEMM ceiling
measured in the same run, and peak memory. Shapes that do not fit are skipped before allocating.
Writes OUT/prefill_peers.{json,csv,md} with the columns of proxyattn-bench's prefill.csv.
--device cpu runs it on the CPU with SDPA's math backend (the tests' tiny models).

  python3 scripts/bench_peers.py --sweep configs/sweeps/prefill.json --out R
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

COLUMNS = [
    "source", "device", "family", "method", "n", "dtype", "q_heads", "kv_heads", "head_dim", "block",
    "density_target", "density", "element_density", "gamma", "estimation_ms", "kernel_ms", "total_ms",
    "total_ms_min", "total_ms_max", "reps", "tflops_done", "tflops_effective", "speedup_vs_full",
    "pct_of_full", "status", "reason",
]
PEER_METHODS = ["sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex_dense", "flex_sparse", "xattn_estimate"]
MASK_MAGIC = b"PXMASK01"


class PeerError(Exception):
    """Bad input: printed as one line, exit status 2."""


# ---------------------------------------------------------------- torch-free helpers (tested on CPU)

def parse_length(v) -> int:
    if isinstance(v, bool):
        raise PeerError(f"length {v!r} is not an integer")
    if isinstance(v, int):
        n = v
    else:
        s = str(v).strip().upper()
        mult = 1
        if s.endswith("K"):
            mult, s = 1024, s[:-1]
        elif s.endswith("M"):
            mult, s = 1024 * 1024, s[:-1]
        if not s.isdigit():
            raise PeerError(f"length {v!r} is not a positive integer (suffix K or M allowed)")
        n = int(s) * mult
    if n < 1:
        raise PeerError(f"length {v!r} must be at least 1")
    return n


def length_label(n: int) -> str:
    if n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}M"
    if n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)


def load_json(path: str) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            j = json.load(f)
    except FileNotFoundError:
        raise PeerError(f"{path}: no such file")
    except json.JSONDecodeError as e:
        raise PeerError(f"{path}: invalid JSON: {e}")
    if not isinstance(j, dict):
        raise PeerError(f"{path}: expected a JSON object at the top level")
    return j


def model_config(m, sweep_path: str) -> dict:
    """A model config: an inline object, or a file path as given, beside the sweep or from the
    repository root (configs/models/NAME.json)."""
    if isinstance(m, dict):
        return {"name": "inline", **m}
    cands = [Path(m)]
    if sweep_path:
        d = Path(sweep_path).parent
        cands += [d / m, d / ".." / ".." / m]
    for c in cands:
        if c.exists():
            return load_json(str(c))
    raise PeerError(f"{sweep_path or 'sweep'}: model file {m!r} not found")


def load_model(sweep: dict, sweep_path: str) -> dict:
    j = model_config(sweep.get("model", "configs/models/llama-3.1-8b.json"), sweep_path)
    return {"name": j["name"], "num_q_heads": int(j["num_q_heads"]),
            "num_kv_heads": int(j["num_kv_heads"]), "head_dim": int(j["head_dim"])}


def read_mask(path: str) -> dict:
    """A .pxm mask file (apps/bench/masks.hpp) -> dict(heads, block, n, nb, indptr, indices)."""
    data = Path(path).read_bytes() if Path(path).is_file() else None
    if data is None:
        raise PeerError(f"{path}: no such mask file")
    if len(data) < 40 or data[:8] != MASK_MAGIC:
        raise PeerError(f"{path}: not a proxyattn mask file (magic PXMASK01 missing)")
    heads, block = np.frombuffer(data, "<i4", 2, 8)
    (n,) = np.frombuffer(data, "<i8", 1, 16)
    (nb,) = np.frombuffer(data, "<i4", 1, 24)
    (nnz,) = np.frombuffer(data, "<i8", 1, 32)
    rows = int(heads) * int(nb) + 1
    if len(data) != 40 + 4 * (rows + int(nnz)):
        raise PeerError(f"{path}: size {len(data)} bytes does not match its header")
    if int(nb) != -(-int(n) // int(block)):
        raise PeerError(f"{path}: num_blocks {nb} does not match seq_len {n} / block {block}")
    indptr = np.frombuffer(data, "<i4", rows, 40).astype(np.int64)
    indices = np.frombuffer(data, "<i4", int(nnz), 40 + 4 * rows).astype(np.int64)
    if indptr[0] != 0 or indptr[-1] != nnz or np.any(np.diff(indptr) < 0):
        raise PeerError(f"{path}: malformed indptr")
    row_of = np.repeat(np.arange(rows - 1) % int(nb), np.diff(indptr))
    if np.any(indices > row_of) or np.any(indices < 0):
        raise PeerError(f"{path}: a block index is outside the causal range")
    return {"heads": int(heads), "block": int(block), "n": int(n), "nb": int(nb),
            "indptr": indptr, "indices": indices}


def causal_mask(n: int, block: int, heads: int = 1) -> dict:
    """Every causal block (full attention) in the read_mask layout."""
    nb = -(-n // block)
    counts = np.tile(np.arange(1, nb + 1), heads)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    indices = np.concatenate([np.arange(i + 1) for i in range(nb)] * heads).astype(np.int64)
    return {"heads": heads, "block": block, "n": n, "nb": nb, "indptr": indptr, "indices": indices}


def mask_bitmap(mask: dict) -> np.ndarray:
    """[heads, Nb, Nb] bool."""
    h, nb = mask["heads"], mask["nb"]
    bm = np.zeros((h * nb, nb), dtype=bool)
    rows = np.repeat(np.arange(h * nb), np.diff(mask["indptr"]))
    bm[rows, mask["indices"]] = True
    return bm.reshape(h, nb, nb)


def element_density(mask: dict) -> float:
    """Causal (q, k) pairs a block-sparse kernel computes / (N (N + 1) / 2), averaged over heads."""
    n, b, nb = mask["n"], mask["block"], mask["nb"]
    rows_in = np.minimum(b, n - np.arange(nb) * b)  # tokens per block
    bm = mask_bitmap(mask)
    i_idx, j_idx = np.meshgrid(np.arange(nb), np.arange(nb), indexing="ij")
    pairs = np.where(j_idx < i_idx, rows_in[:, None] * rows_in[None, :], 0).astype(np.float64)
    diag = rows_in * (rows_in + 1) / 2.0
    pairs[np.arange(nb), np.arange(nb)] = diag
    return float((bm * pairs[None]).sum() / (mask["heads"] * n * (n + 1) / 2.0))


def read_bf16(path: Path, shape) -> np.ndarray:
    raw = np.fromfile(path, dtype="<u2")
    if raw.size != int(np.prod(shape)):
        raise PeerError(f"{path}: {raw.size} values, expected {int(np.prod(shape))} for shape {shape}")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)


def round_bf16(x: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(np.float32)


def reference_masked_attention(q, k, v, mask) -> np.ndarray:
    """float64 dense attention, keys allowed by the block mask and causality. q [Hq,N,d], k/v [Hkv,N,d]."""
    hq, n, d = q.shape
    r = hq // k.shape[0]
    b = mask["block"]
    bm = mask_bitmap(mask)
    tok_block = np.arange(n) // b
    causal = np.tril(np.ones((n, n), dtype=bool))
    out = np.empty((hq, n, d), dtype=np.float64)
    for h in range(hq):
        allowed = bm[h][tok_block[:, None], tok_block[None, :]] & causal
        s = (q[h].astype(np.float64) @ k[h // r].astype(np.float64).T) / math.sqrt(d)
        s = np.where(allowed, s, -np.inf)
        s -= s.max(axis=1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=1, keepdims=True)
        out[h] = p @ v[h // r].astype(np.float64)
    return out


def compare(x: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> dict:
    x = x.astype(np.float64)
    err = np.abs(x - ref)
    bad = int(np.count_nonzero(~(err <= atol + rtol * np.abs(ref))))  # NaN counts as bad
    return {"rel_fro": float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300)),
            "max_abs": float(np.nanmax(err)) if err.size else 0.0,
            "mean_abs": float(np.nanmean(err)) if err.size else 0.0,
            "over_tolerance": bad, "nan": int(np.count_nonzero(np.isnan(x)))}


def load_check(check_dir: str) -> dict:
    d = Path(check_dir)
    info = load_json(str(d / "check.json"))
    hq, hkv, n, dim = info["q_heads"], info["kv_heads"], info["n"], info["head_dim"]
    f = info["files"]
    return {"info": info,
            "q": read_bf16(d / f["q"], (hq, n, dim)), "k": read_bf16(d / f["k"], (hkv, n, dim)),
            "v": read_bf16(d / f["v"], (hkv, n, dim)), "o": read_bf16(d / f["o"], (hq, n, dim)),
            "mask": read_mask(str(d / f["mask"]))}


def check_outputs(chk: dict, others: dict, atol=1e-2, rtol=2e-2, rel_fro_max=1e-2) -> dict:
    """Our output and each of `others` (name -> [Hq,N,d] array) against the float64 reference, and
    each of `others` against ours. Pass: nothing over tolerance and rel_fro <= rel_fro_max."""
    ref = reference_masked_attention(chk["q"], chk["k"], chk["v"], chk["mask"])
    res = {"n": chk["info"]["n"], "method": chk["info"].get("method"), "producer": chk["info"].get("producer"),
           "density": chk["info"].get("density"), "atol": atol, "rtol": rtol, "rel_fro_max": rel_fro_max,
           "comparisons": {}}
    res["comparisons"]["ours_vs_reference"] = compare(chk["o"], ref, atol, rtol)
    for name, x in others.items():
        res["comparisons"][f"{name}_vs_reference"] = compare(x, ref, atol, rtol)
        res["comparisons"][f"{name}_vs_ours"] = compare(x, chk["o"].astype(np.float64), atol, rtol)
    res["passed"] = all(c["over_tolerance"] == 0 and c["rel_fro"] <= rel_fro_max
                        for c in res["comparisons"].values())
    return res


def dense_causal_flops(n, d, h) -> float:
    return 4.0 * n * n * d * h / 2.0


def finish_rows(rows: list) -> None:
    """TFLOP/s, speedup and % relative to sdpa_flash at the same (n, dtype)."""
    full = {(r["n"], r["dtype"]): r["total_ms"] for r in rows
            if r["family"] == "sdpa_flash" and r["status"] == "ok" and r["total_ms"]}
    for r in rows:
        if r["status"] != "ok" or not r["total_ms"]:
            continue
        dense = dense_causal_flops(r["n"], r["head_dim"], r["q_heads"])
        if not r["family"].endswith("estimate"):
            r["tflops_effective"] = dense / (r["total_ms"] * 1e-3) / 1e12
            kern = r["kernel_ms"] or r["total_ms"]
            if r["element_density"]:
                r["tflops_done"] = dense * r["element_density"] / (kern * 1e-3) / 1e12
        ref = full.get((r["n"], r["dtype"]))
        if ref:
            r["speedup_vs_full"] = ref / r["total_ms"]
            r["pct_of_full"] = 100.0 * r["total_ms"] / ref


def new_row(model: dict, family: str, method: str, n: int, block: int, dtype="bf16") -> dict:
    r = {c: None for c in COLUMNS}
    r.update(source="bench_peers", device="cuda", family=family, method=method, n=n, dtype=dtype,
             q_heads=model["num_q_heads"], kv_heads=model["num_kv_heads"], head_dim=model["head_dim"],
             block=block, reps=0, status="ok", reason="")
    return r


def rows_to_csv(rows, columns=COLUMNS) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if r.get(c) is None else (f"{r[c]:.9g}" if isinstance(r[c], float) else r[c])
                     for c in columns])
    return buf.getvalue()


def rows_to_markdown(rows, ctx) -> str:
    def f(v, spec="{:.3f}"):
        return "–" if v is None else spec.format(v)
    out = [f"# bench_peers: {ctx.get('sweep', 'run')}\n",
           f"Device: {ctx.get('device_name', '?')} · torch {ctx.get('torch', '?')} · {ctx.get('date', '?')} · "
           f"timing: {ctx.get('timing', '?')}\n",
           "| method | N | density | est. ms | kernel ms | total ms (min–max) | TFLOP/s done | eff. TFLOP/s | "
           "speedup vs sdpa_flash |", "|---|---|---|---|---|---|---|---|---|"]
    skipped = []
    for r in rows:
        if r["status"] != "ok":
            skipped.append(r)
            continue
        tot = (f"{r['total_ms']:.3f} ({r['total_ms_min']:.3f}–{r['total_ms_max']:.3f})"
               if r["total_ms"] is not None else "–")
        out.append(f"| {r['method']} | {r['n']} | {f(r['density'], '{:.4f}')} | {f(r['estimation_ms'])} | "
                   f"{f(r['kernel_ms'])} | {tot} | {f(r['tflops_done'], '{:.1f}')} | "
                   f"{f(r['tflops_effective'], '{:.1f}')} | {f(r['speedup_vs_full'], '{:.2f}×')} |")
    if skipped:
        out.append("\nNot run:\n")
        out += [f"- {r['method']} N={r['n']}: {r['status']} — {r['reason']}" for r in skipped]
    return "\n".join(out) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def git_sha() -> str:
    # PROXYATTN_GIT_SHA overrides (a copy of the tree without its .git, as the C++ tools do)
    if os.environ.get("PROXYATTN_GIT_SHA"):
        return os.environ["PROXYATTN_GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def nvidia_smi() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,"
             "power.draw,power.limit,temperature.gpu,pstate", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:
        return ""


def _axes(sweep: dict, sweep_path: str, args, default_methods: list, valid: list) -> dict:
    """Lengths, peer methods, repetitions and warmup from the command line, else the sweep's
    'peers' section, else the sweep itself."""
    peers = sweep.get("peers", {})
    if not isinstance(peers, dict):
        raise PeerError(f"{sweep_path}: 'peers' must be an object")
    lengths = getattr(args, "lengths", None) or peers.get("lengths") or sweep.get("lengths")
    if not lengths:
        raise PeerError(f"{sweep_path or 'command line'}: no lengths")
    lengths = sorted({parse_length(x) for x in (lengths if isinstance(lengths, list) else [lengths])})
    methods = getattr(args, "methods", None) or peers.get("methods") or default_methods
    if not methods:
        raise PeerError("no peer methods")
    for m in methods:
        if m not in valid:
            raise PeerError(f"unknown peer method {m!r} (valid: {', '.join(valid)})")
    reps = getattr(args, "reps", None) or int(peers.get("repetitions", sweep.get("repetitions", 5)))
    warmup = getattr(args, "warmup", None)
    warmup = warmup if warmup is not None else int(peers.get("warmup", sweep.get("warmup", 1)))
    if reps < 1 or warmup < 0:
        raise PeerError("repetitions must be >= 1 and warmup >= 0")
    return {"peers": peers, "lengths": lengths, "methods": list(methods), "reps": reps, "warmup": warmup}


def is_prefill(sweep: dict, args=None) -> bool:
    return sweep.get("kind") == "prefill" or bool(getattr(args, "prefill", False))


def plan(sweep: dict, sweep_path: str, args) -> dict:
    """Axes of the peer run from the sweep's 'peers' section and the command line (a sweep of
    kind "prefill": prefill_plan)."""
    if is_prefill(sweep, args):
        return prefill_plan(sweep, sweep_path, args)
    a = _axes(sweep, sweep_path, args, ["sdpa_flash", "sdpa_cudnn"], PEER_METHODS)
    peers, lengths = a.pop("peers"), a["lengths"]
    flex_lengths = peers.get("flex_lengths")
    flex_lengths = sorted({parse_length(x) for x in flex_lengths}) if flex_lengths else lengths
    strides = [int(s) for s in peers.get("xattn_strides", [8])]
    return {**a, "kind": "attention", "flex_lengths": flex_lengths,
            "flex_masks": list(peers.get("flex_masks", ["sparse@", "proxyattn@"])),
            "xattn_strides": strides, "block": int(sweep.get("block", 128)), "seed": int(sweep.get("seed", 1))}


# ---------------------------------------------------------------- prefill: the whole model (torch-free)
#
# The peer of proxyattn-bench's prefill mode: the same random-weight model (Llama family:
# embeddings, RMSNorm, RoPE, GQA attention, SwiGLU MLP, final norm, lm_head of the last token)
# as a plain torch forward with SDPA, batch 1, bf16. Columns as prefill.csv of proxyattn-bench.

PREFILL_COLUMNS = [
    "source", "device", "model", "method", "n", "dtype", "layers", "density", "ttft_ms", "ttft_ms_min",
    "ttft_ms_max", "reps", "linear_ms", "elementwise_ms", "estimation_ms", "attention_ms", "logits_ms",
    "linear_tflops", "gemm_ceiling_tflops", "linear_pct_of_ceiling", "peak_mem_gib", "speedup_vs_full",
    "status", "reason",
]
PREFILL_STAGES = ["linear", "elementwise", "estimation", "attention", "logits"]
PREFILL_PEER_METHODS = ["torch_sdpa_cudnn", "torch_sdpa_flash"]
PREFILL_MODEL_FIELDS = ["num_layers", "num_q_heads", "num_kv_heads", "head_dim", "hidden_size",
                        "intermediate_size", "vocab_size"]


def prefill_model(spec, sweep_path: str) -> dict:
    """A model config with the whole-model fields the prefill needs, checked."""
    j = model_config(spec, sweep_path)
    name = j.get("name", "inline")
    missing = [k for k in PREFILL_MODEL_FIELDS if k not in j]
    if missing:
        raise PeerError(f"model {name}: no {', '.join(missing)} (the prefill needs the whole-model fields)")
    m = {"name": str(name)}
    for k in PREFILL_MODEL_FIELDS:
        v = j[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PeerError(f"model {name}: {k} = {v!r} must be a positive integer")
        m[k] = v
    if m["num_q_heads"] % m["num_kv_heads"]:
        raise PeerError(f"model {name}: num_kv_heads {m['num_kv_heads']} does not divide "
                        f"num_q_heads {m['num_q_heads']}")
    m["rope_theta"] = float(j.get("rope_theta", 10000.0))
    m["rms_norm_eps"] = float(j.get("rms_norm_eps", 1e-5))
    m["qkv_bias"] = bool(j.get("qkv_bias", False))
    if not (m["rope_theta"] > 0 and m["rms_norm_eps"] > 0):
        raise PeerError(f"model {name}: rope_theta and rms_norm_eps must be positive")
    return m


def prefill_plan(sweep: dict, sweep_path: str, args) -> dict:
    """Models, lengths, peer methods and timing of the prefill peer run."""
    a = _axes(sweep, sweep_path, args, PREFILL_PEER_METHODS, PREFILL_PEER_METHODS)
    a.pop("peers")
    models = getattr(args, "model", None)
    models = models.split(",") if models else (sweep.get("models") or
                                               ([sweep["model"]] if "model" in sweep else None))
    if not models or not isinstance(models, list):
        raise PeerError(f"{sweep_path or 'command line'}: no models (a list 'models' or --model)")
    chunk = getattr(args, "token_chunk", None)
    chunk = chunk if chunk is not None else sweep.get("token_chunk", 16384)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise PeerError(f"token_chunk {chunk!r} must be a positive integer (tokens)")
    device = getattr(args, "device", None) or "cuda"
    if device not in ("cuda", "cpu"):
        raise PeerError(f"device {device!r} must be cuda or cpu")
    max_mem = getattr(args, "max_mem_gib", None)
    if max_mem is not None and not max_mem > 0:
        raise PeerError(f"--max-mem-gib {max_mem} must be positive")
    return {**a, "kind": "prefill", "models": [prefill_model(m, sweep_path) for m in models],
            "token_chunk": chunk, "seed": int(sweep.get("seed", 1)), "device": device, "max_mem_gib": max_mem}


def _layer_linear_params(m: dict) -> int:
    h, d = m["hidden_size"], m["head_dim"]
    qkv = h * (m["num_q_heads"] + 2 * m["num_kv_heads"]) * d
    return qkv + m["num_q_heads"] * d * h + 3 * h * m["intermediate_size"]


def prefill_param_count(m: dict) -> int:
    """Parameters of the model as built here: untied embeddings and lm_head, fused QKV (+ bias)."""
    h = m["hidden_size"]
    bias = (m["num_q_heads"] + 2 * m["num_kv_heads"]) * m["head_dim"] if m["qkv_bias"] else 0
    return 2 * m["vocab_size"] * h + h + m["num_layers"] * (_layer_linear_params(m) + bias + 2 * h)


def prefill_linear_flops(m: dict, n: int) -> float:
    """FLOPs of every projection over N tokens (QKV, O, gate/up, down); the lm_head is in logits."""
    return 2.0 * n * _layer_linear_params(m) * m["num_layers"]


def prefill_memory_bytes(m: dict, n: int, mlp_chunk: int) -> tuple[int, int]:
    """(weights, activations) in bytes of the torch forward at N tokens, bf16: a generous bound
    (the activations of one layer all live at once, GQA's expanded K/V included, MLP on chunks of
    mlp_chunk tokens), plus 1 GiB for the library workspaces."""
    h, d, hq, hkv = m["hidden_size"], m["head_dim"], m["num_q_heads"], m["num_kv_heads"]
    c = min(n, mlp_chunk)
    weights = 2 * prefill_param_count(m)
    act = 2 * (3 * n * h                      # residual, normed input, O projection
               + n * (hq + 2 * hkv) * d       # fused QKV
               + 3 * n * hq * d + n * hkv * d  # Q, K after RoPE and RoPE's temporaries
               + 2 * n * hq * d               # K/V expanded to the query heads (if SDPA cannot do GQA)
               + n * hq * d                   # attention output
               + 2 * n * d                    # cos/sin
               + c * (4 * m["intermediate_size"] + 2 * h))  # MLP chunk: gate/up, activation, down, norm
    act += 4 * hq * n + 4 * n * d             # softmax statistics, float32 angles
    return weights, act + (1 << 30)


def prefill_fit(m: dict, n: int, mlp_chunk: int, avail_bytes: float) -> str:
    """'' when the case fits in 90 % of avail_bytes, else the reason it is skipped."""
    w, a = prefill_memory_bytes(m, n, mlp_chunk)
    if w + a <= 0.9 * avail_bytes:
        return ""
    return (f"would not fit memory: needs {(w + a) / 2**30:.1f} GiB (weights {w / 2**30:.1f}, activations "
            f"{a / 2**30:.1f}), {avail_bytes / 2**30:.1f} GiB available")


def prefill_row(m: dict, method: str, n: int, device: str) -> dict:
    r = {c: None for c in PREFILL_COLUMNS}
    r.update(source="bench_peers", device=device, model=m["name"], method=method, n=n, dtype="bf16",
             layers=m["num_layers"], density=1.0, reps=0, status="ok", reason="")
    return r


def fill_prefill_row(r: dict, m: dict, totals: list, stages: list, ceiling=None, peak_bytes=None) -> None:
    """TTFT median/min/max of the repetitions, the median of each stage (stages: one dict per
    repetition, stage -> ms), linear TFLOP/s and its share of the GEMM ceiling."""
    r["reps"] = len(totals)
    r["ttft_ms"], r["ttft_ms_min"], r["ttft_ms_max"] = float(np.median(totals)), float(min(totals)), float(max(totals))
    for st in PREFILL_STAGES:
        vals = [s[st] for s in stages if s.get(st) is not None]
        r[f"{st}_ms"] = float(np.median(vals)) if vals else None
    if r["linear_ms"]:
        r["linear_tflops"] = prefill_linear_flops(m, r["n"]) / (r["linear_ms"] * 1e-3) / 1e12
    if ceiling:
        r["gemm_ceiling_tflops"] = ceiling
        if r["linear_tflops"]:
            r["linear_pct_of_ceiling"] = 100.0 * r["linear_tflops"] / ceiling
    if peak_bytes is not None:
        r["peak_mem_gib"] = peak_bytes / 2**30


def prefill_markdown(rows, ctx) -> str:
    def f(v, spec="{:.1f}"):
        return "–" if v is None else spec.format(v)
    out = [f"# bench_peers prefill: {ctx.get('sweep', 'run')}\n",
           f"Device: {ctx.get('device_name', '?')} · torch {ctx.get('torch', '?')} · {ctx.get('date', '?')} · "
           f"timing: {ctx.get('timing', '?')}\n",
           "| model | method | N | TTFT ms (min–max) | linear ms | elementwise ms | attention ms | logits ms | "
           "linear TFLOP/s (% of GEMM ceiling) | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    skipped = []
    for r in rows:
        if r["status"] != "ok":
            skipped.append(r)
            continue
        pct = f" ({r['linear_pct_of_ceiling']:.0f} %)" if r["linear_pct_of_ceiling"] is not None else ""
        out.append(f"| {r['model']} | {r['method']} | {length_label(r['n'])} | {r['ttft_ms']:.1f} "
                   f"({r['ttft_ms_min']:.1f}–{r['ttft_ms_max']:.1f}) | {f(r['linear_ms'])} | "
                   f"{f(r['elementwise_ms'])} | {f(r['attention_ms'])} | {f(r['logits_ms'], '{:.2f}')} | "
                   f"{f(r['linear_tflops'])}{pct} | {f(r['peak_mem_gib'])} |")
    if skipped:
        out.append("\nNot run:\n")
        out += [f"- {r['model']} {r['method']} N={length_label(r['n'])}: {r['status']} — {r['reason']}"
                for r in skipped]
    return "\n".join(out) + "\n"


def write_prefill(out: Path, doc: dict) -> str:
    """prefill_peers.{json,csv,md} in out, each written atomically; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "prefill_peers.json", json.dumps(doc, indent=2, default=float) + "\n")
    write_atomic(out / "prefill_peers.csv", rows_to_csv(doc["rows"], PREFILL_COLUMNS))
    md = prefill_markdown(doc["rows"], doc["context"])
    write_atomic(out / "prefill_peers.md", md)
    return md


# ---------------------------------------------------------------- torch part (GPU machine)

def run_gpu(args, sweep, sweep_path, model, p) -> int:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not torch.cuda.is_available():
        raise PeerError("no CUDA device visible to torch")
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20) or (50 << 20)
    flush_buf = torch.empty(int(2 * l2), dtype=torch.int8, device=dev)
    hq, hkv, d, block = model["num_q_heads"], model["num_kv_heads"], model["head_dim"], p["block"]
    ctx = {"tool": "bench_peers", "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "host": socket.gethostname(), "command": " ".join(sys.argv), "git_sha": git_sha(),
           "device": "cuda", "device_name": props.name, "sm_count": props.multi_processor_count,
           "global_mem_gib": props.total_memory / 2**30, "l2_mib": l2 / 2**20,
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version(), "nvidia_smi_start": nvidia_smi(),
           "sweep": sweep.get("name", "cli"), "figure": sweep.get("figure", ""), "model": model["name"],
           "q_heads": hq, "kv_heads": hkv, "head_dim": d,
           "timing": "CUDA events, L2 flushed before each repetition, median of repetitions",
           "kv_heads_expanded": True, "full_reference": "sdpa_flash",
           "inputs": "seeded normal bf16", "flops": "dense causal 4 N^2 d Hq / 2"}
    try:
        import triton  # noqa: F401
        ctx["triton"] = triton.__version__
    except Exception:
        pass

    def timed(fn, reps, warmup):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            flush_buf.zero_()
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        return ts

    def fill(row, ts):
        row["reps"] = len(ts)
        row["total_ms"] = float(np.median(ts))
        row["total_ms_min"] = float(min(ts))
        row["total_ms_max"] = float(max(ts))

    def free_bytes():
        torch.cuda.synchronize()
        return torch.cuda.mem_get_info()[0]

    # FlexAttention (compiled once; recompiles per shape).
    flex = None
    if any(m.startswith("flex") for m in p["methods"]):
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False)

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        def flex_block_mask(mask: dict):
            """Our CSR -> BlockMask: j < i full blocks, the diagonal partial (causal mask_mod)."""
            h, nb = mask["heads"], mask["nb"]
            indptr = torch.as_tensor(mask["indptr"], device=dev)
            idx = torch.as_tensor(mask["indices"], device=dev)
            counts = indptr[1:] - indptr[:-1]
            row = torch.repeat_interleave(torch.arange(h * nb, device=dev), counts)
            pos = torch.arange(idx.numel(), device=dev) - indptr[:-1][row]
            is_diag = idx == (row % nb)
            # Indices are sorted, so the diagonal (j = i) is each row's last entry: the other
            # entries' positions are already compact.
            full_idx = torch.zeros(h * nb, nb, dtype=torch.int32, device=dev)
            part_idx = torch.zeros(h * nb, nb, dtype=torch.int32, device=dev)
            nd = ~is_diag
            full_idx[row[nd], pos[nd]] = idx[nd].to(torch.int32)
            part_idx[row[is_diag], 0] = idx[is_diag].to(torch.int32)
            full_cnt = torch.zeros(h * nb, dtype=torch.int32, device=dev).index_add_(
                0, row[nd], torch.ones_like(row[nd], dtype=torch.int32))
            part_cnt = torch.zeros(h * nb, dtype=torch.int32, device=dev).index_add_(
                0, row[is_diag], torch.ones_like(row[is_diag], dtype=torch.int32))
            return BlockMask.from_kv_blocks(
                part_cnt.view(1, h, nb), part_idx.view(1, h, nb, nb),
                full_cnt.view(1, h, nb), full_idx.view(1, h, nb, nb),
                BLOCK_SIZE=mask["block"], mask_mod=causal)

    manifest = None
    if "flex_sparse" in p["methods"]:
        if not args.masks:
            raise PeerError("flex_sparse needs --masks DIR (proxyattn-bench --export-masks DIR)")
        manifest = load_json(str(Path(args.masks) / "manifest.json"))

    rows = []
    checks = []
    gen = torch.Generator(device=dev)
    for n in p["lengths"]:
        es = 2
        need = 4 * hq * n * d * es + (64 << 20)
        if "flex_sparse" in p["methods"] or "flex_dense" in p["methods"]:
            nb = -(-n // block)
            need += 2 * hq * nb * nb * 4 + 2 * hq * nb * 4
        if need > 0.9 * free_bytes():
            for m in p["methods"]:
                r = new_row(model, m, m, n, block)
                r["status"], r["reason"] = "skipped", (
                    f"would not fit GPU memory: needs {need / 2**30:.1f} GiB, "
                    f"{free_bytes() / 2**30:.1f} GiB free")
                rows.append(r)
            continue
        gen.manual_seed(p["seed"] * 1000 + n)
        q = torch.randn(1, hq, n, d, device=dev, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16, generator=gen)
        v = torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16, generator=gen)
        ke = k.repeat_interleave(hq // hkv, dim=1)
        ve = v.repeat_interleave(hq // hkv, dim=1)
        for m in p["methods"]:
            print(f"bench_peers: {m} N={length_label(n)}", file=sys.stderr, flush=True)
            if m.startswith("sdpa"):
                backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                           "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}[m]
                r = new_row(model, m, m, n, block)
                r["density"] = r["element_density"] = 1.0
                try:
                    with sdpa_kernel(backend):
                        ts = timed(lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=True),
                                   p["reps"], p["warmup"])
                    fill(r, ts)
                    r["kernel_ms"] = r["total_ms"]
                except Exception as e:  # a backend may refuse a shape: record, go on
                    r["status"], r["reason"] = "error", f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                rows.append(r)
            elif m == "flex_dense":
                if n not in p["flex_lengths"]:
                    continue
                r = new_row(model, m, m, n, block)
                r["density"] = r["element_density"] = 1.0
                try:
                    # Built like the sparse masks (no N x N evaluation of the mask_mod), one head
                    # broadcast to all.
                    bm = flex_block_mask(causal_mask(n, block, heads=1))
                    t0 = time.time()
                    flex(q, ke, ve, block_mask=bm)
                    torch.cuda.synchronize()
                    r_extra = {"first_call_s": time.time() - t0}
                    fill(r, timed(lambda: flex(q, ke, ve, block_mask=bm), p["reps"], p["warmup"]))
                    r["kernel_ms"] = r["total_ms"]
                    r["extra"] = r_extra
                except Exception as e:
                    r["status"], r["reason"] = "error", f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                rows.append(r)
            elif m == "flex_sparse":
                if n not in p["flex_lengths"]:
                    continue
                for e in manifest.get("masks", []):
                    if e.get("n") != n or not any(str(e.get("method", "")).startswith(pre) for pre in p["flex_masks"]):
                        continue
                    r = new_row(model, "flex_sparse", f"flex_sparse:{e['method']}", n, block)
                    try:
                        mk = read_mask(str(Path(args.masks) / e["file"]))
                        if mk["heads"] != hq or mk["n"] != n:
                            raise PeerError(f"{e['file']}: mask is {mk['heads']} heads x N={mk['n']}")
                        r["block"] = mk["block"]
                        r["density"] = e.get("density")
                        r["density_target"] = e.get("density_target")
                        r["element_density"] = e.get("element_density")
                        bm = flex_block_mask(mk)
                        t0 = time.time()
                        flex(q, ke, ve, block_mask=bm)
                        torch.cuda.synchronize()
                        r["extra"] = {"first_call_s": time.time() - t0, "mask_file": e["file"]}
                        fill(r, timed(lambda: flex(q, ke, ve, block_mask=bm), p["reps"], p["warmup"]))
                        r["kernel_ms"] = r["total_ms"]
                        del bm
                    except Exception as ex:
                        r["status"], r["reason"] = "error", f"{type(ex).__name__}: {str(ex).splitlines()[0][:300]}"
                    rows.append(r)
            elif m == "xattn_estimate":
                for s in p["xattn_strides"]:
                    r = new_row(model, "xattn_estimate", f"xattn_estimate[S={s}]", n, block)
                    r["gamma"] = 0.9
                    try:
                        holder = {}

                        def est():
                            holder["m"] = xattn_estimate_torch(torch, F, q[0], ke[0], s, block, 0.9)
                        fill(r, timed(est, p["reps"], p["warmup"]))
                        r["estimation_ms"] = r["total_ms"]
                        sel = holder["m"]
                        nbk = sel.shape[-1]
                        r["density"] = float(sel.sum().item() / (hq * nbk * (nbk + 1) / 2))
                        r["extra"] = {"implementation": "torch re-implementation (ALGORITHMS.md), chunked rows"}
                    except Exception as ex:
                        r["status"], r["reason"] = "error", f"{type(ex).__name__}: {str(ex).splitlines()[0][:300]}"
                    rows.append(r)
        del q, k, v, ke, ve
        torch.cuda.empty_cache()

    # Numerical check: FlexAttention on our mask vs our kernel vs float64 reference.
    status = 0
    if args.check:
        chk = load_check(args.check)
        others = {}
        if flex is not None:
            from torch.nn.attention.flex_attention import flex_attention as flex_eager  # noqa: F401
            info = chk["info"]
            r_ = info["q_heads"] // info["kv_heads"]
            to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev).to(torch.bfloat16)[None]  # noqa: E731
            qt, kt, vt = to_t(chk["q"]), to_t(chk["k"]), to_t(chk["v"])
            kt = kt.repeat_interleave(r_, dim=1)
            vt = vt.repeat_interleave(r_, dim=1)
            ot = flex(qt, kt, vt, block_mask=flex_block_mask(chk["mask"]))
            others["flex"] = ot[0].float().cpu().numpy()
        res = check_outputs(chk, others)
        checks.append(res)
        print(f"bench_peers: check N={res['n']} {res['method']}: " + ("PASSED" if res["passed"] else "FAILED") +
              " " + "; ".join(f"{k} rel_fro {v['rel_fro']:.2e} max {v['max_abs']:.2e} over {v['over_tolerance']}"
                              for k, v in res["comparisons"].items()), file=sys.stderr)
        if not res["passed"]:
            status = 1

    finish_rows(rows)
    ctx["nvidia_smi_end"] = nvidia_smi()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"schema_version": 1, "tool": "bench_peers", "context": ctx, "config": {"sweep": sweep, "plan": p},
           "columns": COLUMNS, "rows": rows, "checks": checks}
    write_atomic(out / "peers.json", json.dumps(doc, indent=2, default=float) + "\n")
    write_atomic(out / "peers.csv", rows_to_csv(rows))
    md = rows_to_markdown(rows, ctx)
    if checks:
        md += "\nCheck (FlexAttention on our mask vs our kernel vs float64 reference): " + (
            "PASSED" if all(c["passed"] for c in checks) else "FAILED") + "\n"
    write_atomic(out / "peers.md", md)
    print(md)
    if any(r["status"] == "error" for r in rows):
        print("bench_peers: error: some peer cases failed (reasons in peers.json)", file=sys.stderr)
    return status


def xattn_estimate_torch(torch, F, q, k, stride, block, tau, chunk_bytes=2 << 30):
    """XAttention antidiagonal estimation (ALGORITHMS.md), q [H, N, d], k [H, N, d] (expanded).
    Returns the selected blocks [H, Nb, Nb] bool. Rows are processed in chunks of query blocks so
    memory stays O(H * chunk * N / S)."""
    h, n, d = q.shape
    s = stride
    if n % block or block % s:
        raise ValueError("xattn_estimate: N must be a multiple of the block and the block of the stride")
    ns, nb, per = n // s, n // block, block // s
    qr = q.view(h, ns, s, d).flip(2).reshape(h, ns, s * d)
    kr = k.view(h, ns, s, d).reshape(h, ns, s * d)
    scale = 1.0 / (math.sqrt(d) * s)
    # Query blocks per chunk so that one chunk's float32 scores stay under chunk_bytes.
    chunk_blocks = max(1, int(chunk_bytes // (4 * h * ns * per)))
    w = torch.zeros(h, nb, nb, dtype=torch.float32, device=q.device)
    for b0 in range(0, nb, chunk_blocks):
        b1 = min(nb, b0 + chunk_blocks)
        a0, a1 = b0 * per, b1 * per
        sc = torch.matmul(qr[:, a0:a1], kr[:, :a1].transpose(1, 2)).float() * scale  # [h, a1-a0, a1]
        ai = torch.arange(a0, a1, device=q.device)[:, None]
        bi = torch.arange(a1, device=q.device)[None, :]
        sc.masked_fill_(bi > ai, float("-inf"))
        pr = torch.softmax(sc, dim=-1)
        w[:, b0:b1, :b1] = pr.view(h, b1 - b0, per, b1, per).sum(dim=(2, 4)) / per
    # Selection: block 0 and the diagonal first, then descending mass until tau of the row.
    idx = torch.arange(nb, device=q.device)
    pri = w.clone()
    pri[:, :, 0] = float("inf")
    pri[:, idx, idx] = float("inf")
    pri.masked_fill_(idx[None, None, :] > idx[None, :, None], float("-inf"))
    order = torch.argsort(pri, dim=-1, descending=True)
    ws = torch.gather(w, -1, order)
    before = torch.cumsum(ws, dim=-1) - ws
    keep_sorted = before < tau * w.sum(dim=-1, keepdim=True)
    psorted = torch.gather(pri, -1, order)
    keep_sorted |= psorted == float("inf")  # sink and diagonal always
    keep_sorted &= psorted > float("-inf")
    sel = torch.zeros_like(keep_sorted)
    sel.scatter_(-1, order, keep_sorted)
    return sel


# ---------------------------------------------------------------- prefill: torch part

class StageTimer:
    """Marks inside one forward; the time since the previous mark goes to the named stage. CUDA
    events on a GPU (read after the forward's last event completes, so timing adds no
    synchronisation), perf_counter on the CPU (its ops are synchronous)."""

    def __init__(self, torch, cuda: bool):
        self.torch, self.cuda = torch, cuda
        self.marks = []

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        e = self.torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def start(self):
        self.marks = [(None, None, self._now())]

    def mark(self, stage: str, layer=None):
        self.marks.append((stage, layer, self._now()))

    def read(self) -> tuple[float, dict, dict]:
        """(total ms, stage -> ms, layer -> attention ms)."""
        if self.cuda:
            self.marks[-1][2].synchronize()
            ms = lambda a, b: a.elapsed_time(b)  # noqa: E731
        else:
            ms = lambda a, b: (b - a) * 1e3  # noqa: E731
        stages, per_layer = {}, {}
        for (_, _, t0), (stage, layer, t1) in zip(self.marks, self.marks[1:]):
            dt = ms(t0, t1)
            stages[stage] = stages.get(stage, 0.0) + dt
            if stage == "attention":
                per_layer[layer] = per_layer.get(layer, 0.0) + dt
        return ms(self.marks[0][2], self.marks[-1][2]), stages, per_layer


class _NoTimer:
    def start(self):
        pass

    def mark(self, stage, layer=None):
        pass


def prefill_weights(torch, m: dict, device, seed: int) -> dict:
    """Seeded random bf16 weights, nn.Linear layout [out, in]: N(0, 0.02) everywhere, norm weights
    1 (activations stay finite at any depth). Untied embeddings and lm_head, fused QKV and
    gate/up projections."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    h, d, i = m["hidden_size"], m["head_dim"], m["intermediate_size"]
    qkv_out = (m["num_q_heads"] + 2 * m["num_kv_heads"]) * d

    def normal(*shape):
        return torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0.0, 0.02, generator=gen)

    def ones(*shape):
        return torch.ones(shape, dtype=torch.bfloat16, device=device)

    w = {"embed": normal(m["vocab_size"], h), "norm": ones(h), "lm_head": normal(m["vocab_size"], h), "layers": []}
    for _ in range(m["num_layers"]):
        w["layers"].append({"attn_norm": ones(h), "qkv": normal(qkv_out, h),
                            "qkv_bias": normal(qkv_out) if m["qkv_bias"] else None,
                            "o": normal(h, m["num_q_heads"] * d), "mlp_norm": ones(h),
                            "gate_up": normal(2 * i, h), "down": normal(h, i)})
    return w


def prefill_forward(torch, F, w: dict, m: dict, tokens, attend, timer=None, mlp_chunk: int = 16384,
                    layers=None):
    """The whole model on tokens [N] (batch 1), logits [1, vocab] of the last token. attend(q, k, v)
    takes [1, Hq, N, d] and [1, Hkv, N, d] and returns [1, Hq, N, d]. layers: the layers to run
    (default all; warm-up runs one: every layer has the same shapes)."""
    timer = timer or _NoTimer()
    n, hq, hkv, d = tokens.numel(), m["num_q_heads"], m["num_kv_heads"], m["head_dim"]
    eps = m["rms_norm_eps"]

    def rms(x, weight):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    x = w["embed"][tokens]  # [N, H]
    inv = 1.0 / (m["rope_theta"] ** (torch.arange(0, d, 2, device=tokens.device, dtype=torch.float32) / d))
    ang = torch.outer(torch.arange(n, device=tokens.device, dtype=torch.float32), inv)
    ang = torch.cat((ang, ang), dim=-1)[:, None, :]  # [N, 1, d]
    cos, sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
    del ang

    def rope(t):  # [N, H, d], HF's rotate_half
        t1, t2 = t[..., : d // 2], t[..., d // 2:]
        return t * cos + torch.cat((-t2, t1), dim=-1) * sin

    def attention_block(li, lw):
        h = rms(x, lw["attn_norm"])
        timer.mark("elementwise")
        qkv = F.linear(h, lw["qkv"], lw["qkv_bias"])
        del h
        timer.mark("linear")
        q = rope(qkv[:, : hq * d].view(n, hq, d))
        k = rope(qkv[:, hq * d:(hq + hkv) * d].view(n, hkv, d))
        v = qkv[:, (hq + hkv) * d:].view(n, hkv, d)
        timer.mark("elementwise")
        o = attend(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None])
        del q, k, v, qkv
        timer.mark("attention", li)
        o = o[0].transpose(0, 1).reshape(n, hq * d)  # a view when SDPA's output is token-major
        timer.mark("elementwise")
        o = F.linear(o, lw["o"])
        timer.mark("linear")
        x.add_(o)
        timer.mark("elementwise")

    def mlp_block(lw):
        for s in range(0, n, mlp_chunk):
            xs = x[s:s + mlp_chunk]
            h = rms(xs, lw["mlp_norm"])
            timer.mark("elementwise")
            gu = F.linear(h, lw["gate_up"])
            timer.mark("linear")
            g, u = gu.chunk(2, dim=-1)
            a = F.silu(g) * u
            del gu, g, u
            timer.mark("elementwise")
            dn = F.linear(a, lw["down"])
            del a
            timer.mark("linear")
            xs.add_(dn)
            timer.mark("elementwise")

    timer.mark("elementwise")  # embeddings and the RoPE table
    for li in (range(m["num_layers"]) if layers is None else layers):
        attention_block(li, w["layers"][li])
        mlp_block(w["layers"][li])
    logits = F.linear(rms(x[-1:], w["norm"]), w["lm_head"])
    timer.mark("logits")
    return logits


def make_attend(torch, F, notes: dict):
    """torch SDPA, causal, GQA through enable_gqa; where the active backend refuses that, K/V
    expanded to the query heads (repeat_interleave, what a user would do next), noted in notes."""
    notes.setdefault("gqa", "enable_gqa")

    def attend(q, k, v):
        if notes["gqa"] == "enable_gqa" or q.shape[1] == k.shape[1]:
            try:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
            except RuntimeError as e:
                if q.shape[1] == k.shape[1] or isinstance(e, torch.cuda.OutOfMemoryError):
                    raise
                notes["gqa"] = "expanded K/V (repeat_interleave)"
                notes["gqa_refused"] = str(e).splitlines()[0][:300]
        r = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1),
                                              is_causal=True)
    return attend


def gemm_ceiling(torch, dev, size: int = 8192, reps: int = 10) -> dict:
    """A plain cuBLAS bf16 GEMM in the same run (torch.nn.functional.linear, as the projections),
    m = n = k = 8192, median of 10: proxyattn-bench prefill's ceiling."""
    a = torch.randn(size, size, device=dev, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        torch.nn.functional.linear(a, b)
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        torch.nn.functional.linear(a, b)
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1))
    ms = float(np.median(ts))
    return {"tflops": 2.0 * size ** 3 / (ms * 1e-3) / 1e12, "m": size, "n": size, "k": size, "ms": ms}


def available_bytes(torch, cuda: bool) -> int:
    if cuda:
        torch.cuda.synchronize()
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def run_prefill(args, sweep: dict, p: dict) -> int:
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as e:
        raise PeerError(f"the prefill peer needs torch ({e})")
    cuda = p["device"] == "cuda"
    if cuda and not torch.cuda.is_available():
        raise PeerError("no CUDA device visible to torch (--device cpu runs the forward on the CPU)")
    dev = torch.device(p["device"])
    backends = {"torch_sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "torch_sdpa_flash": SDPBackend.FLASH_ATTENTION}
    if not cuda:  # the CPU has neither: the code path is tested with the math backend
        backends = {k: SDPBackend.MATH for k in backends}
    props = torch.cuda.get_device_properties(0) if cuda else None
    ctx = {"tool": "bench_peers", "kind": "prefill",
           "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "host": socket.gethostname(), "command": " ".join(sys.argv), "git_sha": git_sha(),
           "device": p["device"], "device_name": props.name if cuda else "cpu",
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if cuda else None,
           "nvidia_smi_start": nvidia_smi() if cuda else "", "sweep": sweep.get("name", "cli"),
           "models": [mm["name"] for mm in p["models"]], "token_chunk": p["token_chunk"], "seed": p["seed"],
           "sdpa_backends": {k: v.name for k, v in backends.items()},
           "timing": ("CUDA events" if cuda else "perf_counter") + f", median of {p['reps']} repetitions of the "
                     f"whole forward after {p['warmup']} warm-up run(s) of one layer (+ logits) at the same shapes; "
                     "stages from marks between the ops of the same runs",
           "model_build": "torch forward: fused QKV (+ bias) and gate/up linears, F.rms_norm, RoPE rotate_half "
                          "(theta from the config, no frequency scaling), "
                          "SDPA causal (enable_gqa), SwiGLU, MLP in chunks of token_chunk tokens, final norm + "
                          "lm_head of the last token; bf16 weights N(0, 0.02), norms 1, untied lm_head; "
                          "embedding lookup and RoPE table counted as elementwise",
           "gemm_ceiling": {}}
    if cuda:
        ctx["global_mem_gib"] = props.total_memory / 2**30
    rows = []
    t_start = time.time()

    def save() -> str:
        """The files as they stand (after every case: a run cut short keeps what it measured)."""
        ctx["elapsed_s"] = time.time() - t_start
        return write_prefill(Path(args.out), {
            "schema_version": 1, "tool": "bench_peers", "kind": "prefill", "context": ctx,
            "config": {"sweep": sweep, "plan": p}, "columns": PREFILL_COLUMNS, "rows": rows})

    ctx["complete"] = False
    for m in p["models"]:
        avail = p["max_mem_gib"] * 2**30 if p["max_mem_gib"] else available_bytes(torch, cuda)
        reasons = {n: prefill_fit(m, n, p["token_chunk"], avail) for n in p["lengths"]}
        for n in p["lengths"]:
            if reasons[n]:
                for meth in p["methods"]:
                    r = prefill_row(m, meth, n, p["device"])
                    r["status"], r["reason"] = "skipped", reasons[n]
                    rows.append(r)
        if all(reasons.values()):
            continue
        print(f"bench_peers: prefill {m['name']}: weights ({prefill_param_count(m) / 1e6:.1f} M parameters)",
              file=sys.stderr, flush=True)
        w = prefill_weights(torch, m, dev, p["seed"])
        ceiling = None
        if cuda:  # measured again beside each model's runs
            ctx["gemm_ceiling"][m["name"]] = gemm_ceiling(torch, dev)
            ceiling = ctx["gemm_ceiling"][m["name"]]["tflops"]
        gen = torch.Generator(device=dev)
        for n in p["lengths"]:
            if reasons[n]:
                continue
            gen.manual_seed(p["seed"] * 1000003 + n)
            tokens = torch.randint(0, m["vocab_size"], (n,), device=dev, generator=gen)
            for meth in p["methods"]:
                print(f"bench_peers: prefill {m['name']} {meth} N={length_label(n)}", file=sys.stderr, flush=True)
                r = prefill_row(m, meth, n, p["device"])
                notes = {"sdpa_backend": backends[meth].name}
                attend = make_attend(torch, F, notes)
                try:
                    with torch.inference_mode(), sdpa_kernel(backends[meth]):
                        for _ in range(p["warmup"]):
                            prefill_forward(torch, F, w, m, tokens, attend, mlp_chunk=p["token_chunk"], layers=[0])
                        if cuda:
                            torch.cuda.synchronize()
                            torch.cuda.reset_peak_memory_stats()
                        totals, stages, layer_ms = [], [], []
                        for _ in range(p["reps"]):
                            timer = StageTimer(torch, cuda)
                            timer.start()
                            prefill_forward(torch, F, w, m, tokens, attend, timer, p["token_chunk"])
                            tot, st, per_layer = timer.read()
                            totals.append(tot)
                            stages.append(st)
                            layer_ms.append([per_layer[i] for i in sorted(per_layer)])
                    fill_prefill_row(r, m, totals, stages, ceiling,
                                     torch.cuda.max_memory_allocated() if cuda else None)
                    notes["attention_ms_per_layer"] = [float(x) for x in np.median(np.array(layer_ms), axis=0)]
                except Exception as e:  # a backend may refuse a shape, memory may run out: record, go on
                    r["status"], r["reason"] = "error", f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                r["extra"] = notes
                rows.append(r)
                save()
                if cuda:
                    torch.cuda.empty_cache()
            del tokens
        del w
        if cuda:
            torch.cuda.empty_cache()
    ctx["complete"] = True
    ctx["nvidia_smi_end"] = nvidia_smi() if cuda else ""
    print(save())
    if any(r["status"] == "error" for r in rows):
        print("bench_peers: error: some prefill cases failed (reasons in prefill_peers.json)", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", help="sweep file (configs/sweeps/NAME.json); its 'peers' section is read")
    ap.add_argument("--model", "--models", dest="model",
                    help="model config (overrides the sweep's; prefill: a comma-separated list)")
    ap.add_argument("--lengths", type=lambda s: [x for x in s.split(",") if x], help="e.g. 4K,32K,131072")
    ap.add_argument("--methods", type=lambda s: [x for x in s.split(",") if x],
                    help=f"{', '.join(PEER_METHODS)}; prefill: {', '.join(PREFILL_PEER_METHODS)}")
    ap.add_argument("--prefill", action="store_true", help="the whole model's prefill (also a sweep of kind "
                                                           "\"prefill\"): prefill_peers.{json,csv,md}")
    ap.add_argument("--device", choices=["cuda", "cpu"], help="prefill only: cpu runs the forward on the CPU "
                                                             "with SDPA's math backend (tests)")
    ap.add_argument("--token-chunk", type=int, help="prefill: the MLP over chunks of this many tokens (the "
                                                    "sweep's token_chunk, default 16384)")
    ap.add_argument("--max-mem-gib", type=float, help="prefill: memory to plan for instead of what the device "
                                                      "reports free")
    ap.add_argument("--masks", help="proxyattn-bench --export-masks directory (for flex_sparse)")
    ap.add_argument("--check", help="proxyattn-bench --export-check directory (numerical check)")
    ap.add_argument("--check-only", action="store_true", help="only run the check (numpy reference, no torch needed "
                                                              "unless FlexAttention is requested)")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--out", help="output directory (peers.json, peers.csv, peers.md; prefill_peers.*)")
    args = ap.parse_args(argv)
    try:
        if args.check_only:
            if not args.check:
                raise PeerError("--check-only needs --check DIR")
            res = check_outputs(load_check(args.check), {})
            print(json.dumps(res, indent=2))
            return 0 if res["passed"] else 1
        sweep = load_json(args.sweep) if args.sweep else {}
        if is_prefill(sweep, args):
            p = prefill_plan(sweep, args.sweep or "", args)
            if not args.out:
                raise PeerError("--out DIR is required")
            return run_prefill(args, sweep, p)
        if args.device or args.token_chunk is not None or args.max_mem_gib is not None:
            raise PeerError("--device, --token-chunk and --max-mem-gib are for the prefill (--prefill)")
        if args.model:
            sweep["model"] = args.model
        model = load_model(sweep, args.sweep or "")
        p = plan(sweep, args.sweep or "", args)
        if not args.out:
            raise PeerError("--out DIR is required")
        return run_gpu(args, sweep, args.sweep or "", model, p)
    except PeerError as e:
        print(f"bench_peers: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
