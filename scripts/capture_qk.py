#!/usr/bin/env python3
"""Capture post-RoPE Q, K and V of a real model into a proxyattn store (schema: DESIGN.md).

The model is a GGUF file of the Llama family or of Gemma-3 (weights F32/F16/BF16, Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0 and the K-quants Q2_K..Q6_K), run in float32 numpy on the CPU, or (when torch and
transformers are installed) a Hugging Face model directory. Shapes, RoPE bases, the sliding window
of Gemma-3's local layers and the tokenizer (byte-level BPE or SentencePiece) all come from the file.

    capture_qk.py --gguf M.gguf --niah --length 8192 [--depth 0.5] --out qk.h5
    capture_qk.py --gguf M.gguf --prompt-file text.txt --layers 0,15,29 --out qk.h5
    capture_qk.py --gguf M.gguf --eval-ppl data/ppl_passage.txt
    capture_qk.py --gguf M.gguf --generate "Write a sentence about rivers." --max-new 30 --chat

Q/K follow the Hugging Face layout (RoPE by rotate_half over the two halves of each head),
which is what transformers produces for the same model; GGUF files store Q/K rows permuted for
llama.cpp's interleaved RoPE, so the loader undoes that permutation (Gemma-3's GGUF keeps the
HF order: llama.cpp runs it with NEOX RoPE). Each layer of the store says what its attention is:
attribute `attention` = "global" (full causal) or "sliding" with `window` = W (key j is visible to
query i when i - W < j <= i).
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

PROG = "capture_qk.py"
SOURCE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = SOURCE_DIR / "data"


def _project_version() -> str:
    try:
        m = re.search(r"project\(proxyattn\s+VERSION\s+([0-9.]+)",
                      (SOURCE_DIR / "CMakeLists.txt").read_text())
        if m:
            return m.group(1)
    except OSError:
        pass
    return "0.1.0"


VERSION = _project_version()
CREATOR = f"proxyattn capture_qk.py {VERSION}"


class CaptureError(Exception):
    """Bad input or unsupported model: reported as one line, non-zero exit."""


# --------------------------------------------------------------------------------------------
# GGUF reading and dequantisation
# --------------------------------------------------------------------------------------------

def _gguf():
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise CaptureError("the 'gguf' package is not installed (pip install -r scripts/requirements.txt)")
    return gguf


SUPPORTED_QTYPE_NAMES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                         "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def supported_qtypes():
    g = _gguf().GGMLQuantizationType
    return {g[n] for n in SUPPORTED_QTYPE_NAMES}


def _qtype_name(qtype) -> str:
    try:
        return _gguf().GGMLQuantizationType(qtype).name
    except ValueError:
        return f"type {int(qtype)}"


def dequantize(raw: np.ndarray, qtype, shape: Sequence[int]) -> np.ndarray:
    """GGUF tensor bytes -> float32 array in numpy order (GGUF `shape` is ne0-first: [cols, rows])."""
    gguf = _gguf()
    if qtype not in supported_qtypes():
        raise CaptureError(f"quantisation {_qtype_name(qtype)} is not supported "
                           f"(supported: {', '.join(SUPPORTED_QTYPE_NAMES)})")
    out = gguf.quants.dequantize(np.asarray(raw), qtype)
    np_shape = tuple(int(s) for s in reversed(list(shape)))
    return np.ascontiguousarray(out, dtype=np.float32).reshape(np_shape)


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's converter permutation of Q/K projection rows.

    The converter maps HF row (s*d/2 + j) of each head to GGUF row (2j + s), so that llama.cpp's
    interleaved RoPE (pairs 2j, 2j+1) equals HF's rotate_half RoPE (pairs j, j + d/2).
    """
    rows = w.shape[0]
    d = rows // n_head
    return np.ascontiguousarray(
        w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


@dataclass
class ModelConfig:
    arch: str
    name: str
    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    n_ctx: int
    vocab_size: int
    rope_linear_factor: float = 1.0
    # Gemma-3 (defaults: Llama)
    layer_windows: tuple = ()        # per layer: 0 = global (full causal), W > 0 = sliding window W
    rope_theta_local: float = 0.0    # RoPE base of the sliding layers (0: rope_theta)
    attn_scale: float = 0.0          # softmax scale of q.k (0: 1/sqrt(head_dim))
    embed_scale: float = 1.0         # the embedding rows are multiplied by this (Gemma: sqrt(n_embd))
    act: str = "silu"                # gated MLP activation: silu (SwiGLU) or gelu_tanh (GeGLU)
    qk_norm: bool = False            # per-head RMSNorm of q and k before RoPE
    sandwich_norm: bool = False      # RMSNorm of the attention and MLP outputs before the residual add
    rope_permuted: bool = True       # Q/K rows permuted by llama.cpp's converter (Llama only)
    final_softcap: float = 0.0       # logits = c * tanh(logits / c) when > 0

    @property
    def group(self) -> int:
        return self.n_head // self.n_head_kv

    def window(self, layer: int) -> int:
        """0: global (full causal) attention; W > 0: sliding window of W keys (self included)."""
        return int(self.layer_windows[layer]) if self.layer_windows else 0

    def scale(self) -> float:
        return self.attn_scale or 1.0 / math.sqrt(self.head_dim)


SUPPORTED_ARCHS = ("llama", "gemma3")


class GGUFHeader:
    """The parts of gguf.GGUFReader that GGUFModel uses (`fields[key].contents()`, `tensors` with
    name, shape, tensor_type and a memory-mapped `data` laid out as GGUFReader lays it out),
    parsed with struct and np.frombuffer: gguf's reader builds a numpy view per array element and
    takes ~30 s on Gemma-3's 262K-token vocabulary, this takes well under a second. Little-endian
    GGUF v2/v3 only; GGUFModel falls back to gguf's reader on anything else."""

    _SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
               10: "<Q", 11: "<q", 12: "<d"}
    _NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
           10: "<u8", 11: "<i8", 12: "<f8"}

    class Field:
        def __init__(self, name: str, value):
            self.name, self._value = name, value

        def contents(self):
            return self._value

    class TensorInfo:
        def __init__(self, name, shape, tensor_type, data):
            self.name, self.shape, self.tensor_type, self.data = name, shape, tensor_type, data

    def __init__(self, path: Path):
        import struct
        gguf = _gguf()
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        buf = mm.tobytes() if mm.size < 4096 else memoryview(mm)  # type: ignore[arg-type]
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("bad magic")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3) or n_tensors > 1 << 24 or n_kv > 1 << 24:
            raise ValueError(f"unsupported GGUF version {version} or absurd counts")
        off = 24

        def string(off: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", buf, off)
            off += 8
            return bytes(buf[off:off + n]).decode("utf-8"), off + n

        def value(vtype: int, off: int):
            if vtype == 8:
                return string(off)
            if vtype in self._SCALAR:
                fmt = self._SCALAR[vtype]
                (v,) = struct.unpack_from(fmt, buf, off)
                return v, off + struct.calcsize(fmt)
            if vtype == 9:
                itype, count = struct.unpack_from("<IQ", buf, off)
                off += 12
                if itype in self._NP:
                    a = np.frombuffer(buf, dtype=self._NP[itype], count=count, offset=off)
                    off += a.nbytes
                    vals = a.astype(bool).tolist() if itype == 7 else a.tolist()
                    return vals, off
                vals = []
                for _ in range(count):
                    v, off = value(itype, off)
                    vals.append(v)
                return vals, off
            raise ValueError(f"unknown GGUF value type {vtype}")

        self.fields: dict[str, GGUFHeader.Field] = {}
        for _ in range(n_kv):
            key, off = string(off)
            (vtype,) = struct.unpack_from("<I", buf, off)
            v, off = value(vtype, off + 4)
            self.fields[key] = self.Field(key, v)
        infos = []
        for _ in range(n_tensors):
            name, off = string(off)
            (nd,) = struct.unpack_from("<I", buf, off)
            dims = list(struct.unpack_from(f"<{nd}Q", buf, off + 4))
            qtype, toff = struct.unpack_from("<IQ", buf, off + 4 + 8 * nd)
            off += 4 + 8 * nd + 12
            infos.append((name, dims, qtype, toff))
        align = int(self.fields["general.alignment"].contents()) if "general.alignment" in self.fields else 32
        start = (off + align - 1) // align * align
        self.tensors = []
        for name, dims, qtype, toff in infos:
            qt = gguf.GGMLQuantizationType(qtype)
            block, tsize = gguf.GGML_QUANT_SIZES[qt]
            np_dims = tuple(reversed(dims))
            n = int(np.prod(dims)) if dims else 1
            if qt in (qt.F32, qt.F16, qt.F64):
                dt = {qt.F32: np.float32, qt.F16: np.float16, qt.F64: np.float64}[qt]
                data = mm[start + toff:start + toff + n * np.dtype(dt).itemsize].view(dt).reshape(np_dims)
            else:
                if dims[0] % block:
                    raise ValueError(f"tensor {name}: row of {dims[0]} not a multiple of {block}")
                nbytes = n // block * tsize
                data = mm[start + toff:start + toff + nbytes].reshape(
                    *np_dims[:-1], np_dims[-1] // block * tsize)
            if start + toff + data.nbytes > mm.size:
                raise ValueError(f"tensor {name} runs past the end of the file")
            self.tensors.append(self.TensorInfo(name, np.array(dims, dtype=np.uint64), qt, data))


class GGUFModel:
    """Metadata, tokenizer and lazily dequantised weights of a Llama-family or Gemma-3 GGUF file."""

    LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                     "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CaptureError(f"--gguf {self.path}: " + ("is a directory" if self.path.is_dir() else "no such file"))
        gguf = _gguf()
        try:
            self.reader = GGUFHeader(self.path)
        except Exception:  # anything unusual (big-endian, ...): the gguf package's own reader
            try:
                self.reader = gguf.GGUFReader(str(self.path), "r")
            except Exception as e:  # the gguf package raises ValueError/struct errors on bad files
                raise CaptureError(f"--gguf {self.path}: not a readable GGUF file ({e})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.cfg = self._read_config()
        self._check_tensors()
        self._cache: dict[str, np.ndarray] | None = None
        self.rope_freq_factors = None
        if "rope_freqs.weight" in self.tensors:
            self.rope_freq_factors = self._load("rope_freqs.weight").reshape(-1)

    # metadata -----------------------------------------------------------------------------
    def field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        if f is None:
            return default
        return f.contents()

    def _need(self, key: str):
        v = self.field(key)
        if v is None:
            raise CaptureError(f"--gguf {self.path}: metadata key '{key}' is missing")
        return v

    def _read_config(self) -> ModelConfig:
        arch = self.field("general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise CaptureError(f"--gguf {self.path}: architecture '{arch}' is not supported "
                               f"(supported: general.architecture = {' or '.join(SUPPORTED_ARCHS)})")
        a = arch
        if any(k.startswith(f"{a}.expert_count") for k in self.reader.fields) and \
                int(self.field(f"{a}.expert_count", 0) or 0) > 0:
            raise CaptureError(f"--gguf {self.path}: mixture-of-experts models are not supported")
        n_embd = int(self._need(f"{a}.embedding_length"))
        n_head_f = self._need(f"{a}.attention.head_count")
        n_head_kv_f = self.field(f"{a}.attention.head_count_kv", n_head_f)
        if isinstance(n_head_f, list) or isinstance(n_head_kv_f, list):
            raise CaptureError(f"--gguf {self.path}: per-layer head counts are not supported")
        n_head, n_head_kv = int(n_head_f), int(n_head_kv_f)
        if n_head < 1 or n_head_kv < 1:
            raise CaptureError(f"--gguf {self.path}: head counts {n_head}/{n_head_kv} must be positive")
        if arch == "gemma3":  # Gemma's head dim is not n_embd / n_head: the file must say it
            head_dim = int(self._need(f"{a}.attention.key_length"))
        else:
            head_dim = int(self.field(f"{a}.attention.key_length", n_embd // n_head))
        v_dim = int(self.field(f"{a}.attention.value_length", head_dim))
        rope_dim = int(self.field(f"{a}.rope.dimension_count", head_dim))
        if v_dim != head_dim or rope_dim != head_dim or head_dim % 2:
            raise CaptureError(f"--gguf {self.path}: head dims k={head_dim} v={v_dim} rope={rope_dim} "
                               "must be equal and even")
        if n_head % n_head_kv:
            raise CaptureError(f"--gguf {self.path}: {n_head} query heads is not a multiple of "
                               f"{n_head_kv} KV heads")
        scaling = self.field(f"{a}.rope.scaling.type", "none")
        factor = 1.0
        if scaling == "linear":
            factor = float(self._need(f"{a}.rope.scaling.factor"))
        elif scaling not in ("none", None, ""):
            raise CaptureError(f"--gguf {self.path}: RoPE scaling '{scaling}' is not supported")
        emb = self.tensors.get("token_embd.weight")
        if emb is None:
            raise CaptureError(f"--gguf {self.path}: tensor token_embd.weight is missing")
        vocab = int(emb.shape[1])
        name = str(self.field("general.name", self.path.stem))
        n_layers = int(self._need(f"{a}.block_count"))
        if n_layers < 1:
            raise CaptureError(f"--gguf {self.path}: {a}.block_count = {n_layers}")
        cfg = ModelConfig(
            arch=arch, name=name,
            n_layers=n_layers, n_embd=n_embd,
            n_ff=int(self._need(f"{a}.feed_forward_length")),
            n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
            rope_theta=float(self.field(f"{a}.rope.freq_base", 10000.0)),
            rms_eps=float(self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            n_ctx=int(self._need(f"{a}.context_length")), vocab_size=vocab,
            rope_linear_factor=factor)
        if arch == "gemma3":
            self._gemma3_config(cfg)
        return cfg

    def _gemma3_config(self, c: ModelConfig) -> None:
        """Gemma-3 as llama.cpp runs it from the same file (the public architecture):
        - local layers use a sliding window (`gemma3.attention.sliding_window`, required) and
          RoPE base `gemma3.rope.freq_base_swa` (10000 when absent); every P-th layer
          (i % P == P - 1, P = 6 unless `gemma3.attention.sliding_window_pattern` says otherwise,
          as a period or a per-layer list of "is sliding") is global with `rope.freq_base` and
          the linear RoPE scaling, if any;
        - attention scale `gemma3.attention.scale`, else query_pre_attn_scalar^-1/2 with
          query_pre_attn_scalar = head_dim (n_embd / n_head for the 62-layer 27B model);
        - embeddings times sqrt(n_embd); per-head q/k RMSNorm; sandwich norms; GeGLU (tanh GELU);
        - norm weights are used as stored: llama.cpp's converter already added Gemma's "+1"
          (HF computes x * (1 + w); the file holds 1 + w)."""
        a, path = "gemma3", self.path
        window = int(self._need(f"{a}.attention.sliding_window"))
        if window < 1:
            raise CaptureError(f"--gguf {path}: {a}.attention.sliding_window = {window} must be positive")
        pattern = self.field(f"{a}.attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):
            if len(pattern) != c.n_layers:
                raise CaptureError(f"--gguf {path}: {a}.attention.sliding_window_pattern has "
                                   f"{len(pattern)} entries for {c.n_layers} layers")
            sliding = [bool(x) for x in pattern]
        else:
            period = int(pattern)
            if period < 1:
                raise CaptureError(f"--gguf {path}: {a}.attention.sliding_window_pattern = {period}")
            sliding = [i % period < period - 1 for i in range(c.n_layers)]
        c.layer_windows = tuple(window if s else 0 for s in sliding)
        c.rope_theta_local = float(self.field(f"{a}.rope.freq_base_swa", 10000.0))
        if c.rope_theta <= 0 or c.rope_theta_local <= 0:
            raise CaptureError(f"--gguf {path}: RoPE bases must be positive")
        scale = self.field(f"{a}.attention.scale")
        if scale is not None and float(scale) > 0:
            c.attn_scale = float(scale)
        else:
            qpas = c.n_embd / c.n_head if c.n_layers == 62 else c.head_dim
            c.attn_scale = 1.0 / math.sqrt(qpas)
        soft = self.field(f"{a}.attn_logit_softcapping")
        if soft is not None and float(soft) > 0:
            raise CaptureError(f"--gguf {path}: attention logit soft-capping is not supported")
        c.final_softcap = float(self.field(f"{a}.final_logit_softcapping", 0.0) or 0.0)
        c.embed_scale = math.sqrt(c.n_embd)
        c.act = "gelu_tanh"
        c.qk_norm = True
        c.sandwich_norm = True
        c.rope_permuted = False

    def _check_tensors(self) -> None:
        c = self.cfg
        E, D = c.n_embd, c.head_dim
        want = {"token_embd.weight": (E, c.vocab_size), "output_norm.weight": (E,)}
        for i in range(c.n_layers):
            p = f"blk.{i}."
            want.update({
                p + "attn_norm.weight": (E,), p + "ffn_norm.weight": (E,),
                p + "attn_q.weight": (E, c.n_head * D), p + "attn_k.weight": (E, c.n_head_kv * D),
                p + "attn_v.weight": (E, c.n_head_kv * D), p + "attn_output.weight": (c.n_head * D, E),
                p + "ffn_gate.weight": (E, c.n_ff), p + "ffn_up.weight": (E, c.n_ff),
                p + "ffn_down.weight": (c.n_ff, E)})
            if c.qk_norm:
                want.update({p + "attn_q_norm.weight": (D,), p + "attn_k_norm.weight": (D,)})
            if c.sandwich_norm:
                want.update({p + "post_attention_norm.weight": (E,), p + "post_ffw_norm.weight": (E,)})
        if "output.weight" in self.tensors:
            want["output.weight"] = (E, c.vocab_size)
        ok = supported_qtypes()
        for name, shape in want.items():
            t = self.tensors.get(name)
            if t is None:
                raise CaptureError(f"--gguf {self.path}: tensor {name} is missing")
            got = tuple(int(s) for s in t.shape)
            if got != shape:
                raise CaptureError(f"--gguf {self.path}: tensor {name} has shape {list(got)}, "
                                   f"expected {list(shape)} from the metadata")
            if t.tensor_type not in ok:
                raise CaptureError(f"--gguf {self.path}: tensor {name} uses quantisation "
                                   f"{_qtype_name(t.tensor_type)}, not supported "
                                   f"(supported: {', '.join(SUPPORTED_QTYPE_NAMES)})")
        for name in self.tensors:
            if re.match(r"blk\.\d+\.(attn_[qkv]|attn_output|ffn_\w+)\.bias$", name):
                raise CaptureError(f"--gguf {self.path}: tensor {name}: projection biases are not "
                                   "supported (not a plain Llama model)")

    # weights ------------------------------------------------------------------------------
    def _load(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return dequantize(t.data, t.tensor_type, t.shape)

    def keep_weights(self) -> None:
        """Keep dequantised weights in memory (generation re-runs the forward many times)."""
        if self._cache is None:
            self._cache = {}

    def weight(self, name: str) -> np.ndarray:
        if self._cache is not None and name in self._cache:
            return self._cache[name]
        w = self._load(name)
        if self._cache is not None:
            self._cache[name] = w
        return w

    def layer(self, i: int) -> dict[str, np.ndarray]:
        """Weights of block i, Q/K rows in the HF (rotate_half) order, QKV fused for one GEMM."""
        key = f"__layer{i}"
        if self._cache is not None and key in self._cache:
            return self._cache[key]  # type: ignore[return-value]
        p = f"blk.{i}."
        c = self.cfg
        wq = self._load(p + "attn_q.weight")
        wk = self._load(p + "attn_k.weight")
        if c.rope_permuted:
            wq = unpermute_rope_rows(wq, c.n_head)
            wk = unpermute_rope_rows(wk, c.n_head_kv)
        wv = self._load(p + "attn_v.weight")
        L = {
            "attn_norm": self._load(p + "attn_norm.weight"),
            "wqkv": np.ascontiguousarray(np.concatenate([wq, wk, wv], axis=0)),
            "wo": self._load(p + "attn_output.weight"),
            "ffn_norm": self._load(p + "ffn_norm.weight"),
            "wgu": np.ascontiguousarray(np.concatenate(
                [self._load(p + "ffn_gate.weight"), self._load(p + "ffn_up.weight")], axis=0)),
            "wd": self._load(p + "ffn_down.weight"),
        }
        if c.qk_norm:
            L["q_norm"] = self._load(p + "attn_q_norm.weight")
            L["k_norm"] = self._load(p + "attn_k_norm.weight")
        if c.sandwich_norm:
            L["post_attn_norm"] = self._load(p + "post_attention_norm.weight")
            L["post_ffn_norm"] = self._load(p + "post_ffw_norm.weight")
        if self._cache is not None:
            self._cache[key] = L  # type: ignore[assignment]
        return L

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Rows of the embedding for `ids` only (dequantising 49K rows for a prompt is waste)."""
        t = self.tensors["token_embd.weight"]
        if np.any(ids < 0) or np.any(ids >= self.cfg.vocab_size):
            raise CaptureError(f"token id out of range 0..{self.cfg.vocab_size - 1}")
        s = np.float32(self.cfg.embed_scale)
        if self._cache is not None and "token_embd.weight" in self._cache:
            x = self._cache["token_embd.weight"][ids]
            return x * s if s != 1 else x  # fancy indexing: already a copy
        uniq, inv = np.unique(ids, return_inverse=True)
        rows = dequantize(np.asarray(t.data)[uniq], t.tensor_type, (t.shape[0], len(uniq)))
        if s != 1:
            rows *= s
        return rows[inv.reshape(-1)]

    def lm_head(self) -> np.ndarray:
        """[vocab, n_embd]; tied to the embedding when the file has no output.weight."""
        return self.weight("output.weight" if "output.weight" in self.tensors else "token_embd.weight")


# --------------------------------------------------------------------------------------------
# Tokenizer from the GGUF vocabulary
# --------------------------------------------------------------------------------------------

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_GPT2 = {"default", "gpt2", "gpt-2", "olmo", "mpt", "jais"}
_PRE_DIGITS = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
_PRE_LLAMA3 = {"llama-bpe", "llama3", "llama-v3"}


def GGUFTokenizer(model: GGUFModel):
    """The file's own tokenizer: byte-level BPE (tokenizer.ggml.model = gpt2) or SentencePiece
    (tokenizer.ggml.model = llama, e.g. Gemma-3)."""
    kind = model.field("tokenizer.ggml.model")
    if kind == "llama":
        return SPMTokenizer(model)
    return BPETokenizer(model)


class BPETokenizer:
    def __init__(self, model: GGUFModel):
        try:
            from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
        except ImportError:
            raise CaptureError("the 'tokenizers' package is not installed "
                               "(pip install -r scripts/requirements.txt)") from None
        path = model.path
        kind = model.field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise CaptureError(f"--gguf {path}: tokenizer model '{kind}' is not supported "
                               "(supported: tokenizer.ggml.model = gpt2 (byte-level BPE) or "
                               "llama (SentencePiece))")
        pre = model.field("tokenizer.ggml.pre", "default")
        tokens = model.field("tokenizer.ggml.tokens")
        merges = model.field("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise CaptureError(f"--gguf {path}: tokenizer vocabulary or merges missing")
        types = model.field("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = []
        for m in merges:
            a, sep, b = m.partition(" ")
            if not sep:
                raise CaptureError(f"--gguf {path}: malformed merge '{m}'")
            pairs.append((a, b))
        tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        if pre in _PRE_GPT2:
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        elif pre in _PRE_DIGITS:
            tk.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        elif pre in _PRE_LLAMA3:
            tk.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            raise CaptureError(f"--gguf {path}: pre-tokenizer '{pre}' is not supported "
                               f"(supported: {', '.join(sorted(_PRE_GPT2 | _PRE_DIGITS | _PRE_LLAMA3))})")
        tk.decoder = decoders.ByteLevel()
        # Control (3) and user-defined (4) tokens are matched whole, as llama.cpp does.
        specials = [AddedToken(tokens[i], special=(types[i] == 3), normalized=False)
                    for i in range(len(tokens)) if types[i] in (3, 4)]
        if specials:
            tk.add_tokens(specials)
        self.tk = tk
        self.vocab_size = len(tokens)
        self.add_bos = bool(model.field("tokenizer.ggml.add_bos_token", False))
        self.bos_id = model.field("tokenizer.ggml.bos_token_id")
        self.eos_id = model.field("tokenizer.ggml.eos_token_id")
        eot = model.field("tokenizer.ggml.eot_token_id")
        self.stop_ids = {int(i) for i in (self.eos_id, eot) if i is not None}
        if "<|im_end|>" in vocab:
            self.stop_ids.add(vocab["<|im_end|>"])
        self.chat_template = model.field("tokenizer.chat_template", "") or ""

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if bos and self.add_bos and self.bos_id is not None:
            ids = [int(self.bos_id)] + ids
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def chat(self, user: str) -> tuple[str, str]:
        """(text before, text after) the user's message in the model's ChatML template."""
        t = self.chat_template
        if "<|im_start|>" not in t:
            raise CaptureError("--chat: the model's chat template is not ChatML (<|im_start|>); "
                               "use a plain prompt")
        # the template's default system message, written with a real or an escaped newline
        m = re.search(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", t, flags=re.S)
        system = f"<|im_start|>system\n{m.group(1)}<|im_end|>\n" if m and "{" not in m.group(1) else ""
        return system + "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"


SPM_SPACE = "\u2581"  # SentencePiece's visible space


class SPMTokenizer:
    """SentencePiece BPE from the GGUF vocabulary and scores (tokenizer.ggml.model = llama), as
    llama.cpp and SentencePiece encode:
    1. user-defined and control tokens (types 4, 3) in the text are matched whole, longest first;
    2. in the rest, spaces become U+2581 (a leading one only with add_space_prefix);
    3. starting from single characters, the adjacent pair whose concatenation is a normal vocabulary
       piece with the highest score is merged, leftmost first on ties, until none is left;
    4. a piece not in the vocabulary falls back to its UTF-8 bytes (<0xXX> tokens).
    Merges never cross a U+2581 that follows another character unless the vocabulary has a piece
    with an inner U+2581; the text is cut into such words (and words are cached), which gives the
    same tokens as merging the whole text at once."""

    def __init__(self, model: GGUFModel):
        path = model.path
        tokens = model.field("tokenizer.ggml.tokens")
        scores = model.field("tokenizer.ggml.scores")
        if not tokens:
            raise CaptureError(f"--gguf {path}: metadata key 'tokenizer.ggml.tokens' is missing")
        if scores is None or len(scores) != len(tokens):
            raise CaptureError(f"--gguf {path}: metadata key 'tokenizer.ggml.scores' is missing or "
                               "does not match the vocabulary (SentencePiece needs the scores)")
        types = model.field("tokenizer.ggml.token_type") or [1] * len(tokens)
        if len(types) != len(tokens):
            raise CaptureError(f"--gguf {path}: tokenizer.ggml.token_type does not match the vocabulary")
        self.tokens = list(tokens)
        self.types = [int(t) for t in types]
        self.vocab_size = len(tokens)
        self.piece = {}                       # normal pieces: text -> (score, id)
        self.byte_id = {}
        specials = []
        for i, (t, ty, sc) in enumerate(zip(tokens, self.types, scores)):
            if ty == 1:
                if t not in self.piece:
                    self.piece[t] = (float(sc), i)
            elif ty == 6:
                m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", t)
                if m:
                    self.byte_id[int(m.group(1), 16)] = i
            elif ty in (3, 4) and t:
                specials.append((t, i))
        self.unk_id = model.field("tokenizer.ggml.unknown_token_id")
        if len(self.byte_id) < 256 and self.unk_id is None:
            raise CaptureError(f"--gguf {path}: SentencePiece vocabulary without byte fallback "
                               "tokens or an unknown token")
        # specials bucketed by first character, longest first
        self.special_by_char: dict[str, list[tuple[str, int]]] = {}
        for t, i in sorted(specials, key=lambda x: -len(x[0])):
            self.special_by_char.setdefault(t[0], []).append((t, i))
        self.special_start = re.compile(
            "[" + "".join(re.escape(ch) for ch in self.special_by_char) + "]") if specials else None
        # (piece, j): piece[j] is a U+2581 after another character, a cut there would split it
        self.inner_space = [(t, j) for t in self.piece for j in range(1, len(t))
                            if t[j] == SPM_SPACE and t[j - 1] != SPM_SPACE]
        self.space_prefix = bool(model.field("tokenizer.ggml.add_space_prefix", True))
        self.add_bos = bool(model.field("tokenizer.ggml.add_bos_token", True))
        self.bos_id = model.field("tokenizer.ggml.bos_token_id")
        self.eos_id = model.field("tokenizer.ggml.eos_token_id")
        eot = model.field("tokenizer.ggml.eot_token_id")
        self.stop_ids = {int(i) for i in (self.eos_id, eot) if i is not None}
        self.turn = "<start_of_turn>" in self.piece or any(
            t == "<start_of_turn>" for t, _ in specials)
        if self.turn:
            for t, i in specials:
                if t == "<end_of_turn>":
                    self.stop_ids.add(i)
        self.chat_template = model.field("tokenizer.chat_template", "") or ""
        self._cache: dict[str, tuple[int, ...]] = {}

    # encoding -----------------------------------------------------------------------------
    def _split_specials(self, text: str) -> list[tuple[str, int | None]]:
        """[(fragment, None) | (special text, id)] in order."""
        out: list[tuple[str, int | None]] = []
        if self.special_start is None:
            return [(text, None)] if text else []
        start = 0
        pos = 0
        n = len(text)
        while pos < n:
            m = self.special_start.search(text, pos)
            if m is None:
                break
            i = m.start()
            hit = None
            for t, tid in self.special_by_char[text[i]]:
                if text.startswith(t, i):
                    hit = (t, tid)
                    break
            if hit is None:
                pos = i + 1
                continue
            if i > start:
                out.append((text[start:i], None))
            out.append(hit)
            start = pos = i + len(hit[0])
        if start < n:
            out.append((text[start:], None))
        return out

    def _words(self, frag: str) -> list[str]:
        """Cuts before each U+2581 that follows a non-U+2581 character; a cut that would split
        a vocabulary piece with an inner U+2581 is not made."""
        cuts = [0]
        for m in re.finditer(SPM_SPACE, frag):
            i = m.start()
            if i == 0 or frag[i - 1] == SPM_SPACE:
                continue
            if any(i >= j and frag.startswith(p, i - j) for p, j in self.inner_space):
                continue
            cuts.append(i)
        cuts.append(len(frag))
        return [frag[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]

    def _bpe(self, word: str) -> tuple[int, ...]:
        got = self._cache.get(word)
        if got is not None:
            return got
        import heapq
        piece = self.piece
        sym = list(word)
        n = len(sym)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        heap: list = []

        def push(a: int, b: int) -> None:
            if a < 0 or b >= n:
                return
            t = sym[a] + sym[b]
            hit = piece.get(t)
            if hit is not None:
                heapq.heappush(heap, (-hit[0], a, b, t))

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, a, b, t = heapq.heappop(heap)
            if nxt[a] != b or sym[a] is None or sym[b] is None or sym[a] + sym[b] != t:
                continue  # stale: one side has been merged since
            sym[a] = t
            sym[b] = None
            nxt[a] = nxt[b]
            if nxt[b] < n:
                prv[nxt[b]] = a
            push(prv[a], a)
            push(a, nxt[a])
        ids: list[int] = []
        i = 0
        while i < n:
            t = sym[i]
            hit = piece.get(t)
            if hit is not None:
                ids.append(hit[1])
            else:
                for byte in t.encode("utf-8"):
                    bid = self.byte_id.get(byte)
                    ids.append(int(self.unk_id) if bid is None else bid)
            i = nxt[i]
        out = tuple(ids)
        if len(self._cache) < 1 << 20:
            self._cache[word] = out
        return out

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids: list[int] = []
        if bos and self.add_bos and self.bos_id is not None:
            ids.append(int(self.bos_id))
        first = True
        for frag, tid in self._split_specials(text):
            if tid is not None:
                ids.append(tid)
            else:
                f = frag.replace(" ", SPM_SPACE)
                if first and self.space_prefix and not f.startswith(SPM_SPACE):
                    f = SPM_SPACE + f
                for w in self._words(f):
                    ids.extend(self._bpe(w))
            first = False
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if self.types[i] == 6:
                out.append(int(self.tokens[i][3:5], 16))
            else:
                out += self.tokens[i].replace(SPM_SPACE, " ").encode("utf-8")
        return out.decode("utf-8", errors="replace")

    def chat(self, user: str) -> tuple[str, str]:
        """(text before, text after) the user's message in Gemma's turn template."""
        if not self.turn:
            raise CaptureError("--chat: the model has no chat turn tokens (<start_of_turn>); "
                               "use a plain prompt")
        return "<start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n"


# --------------------------------------------------------------------------------------------
# Forward pass (float32 numpy)
# --------------------------------------------------------------------------------------------

def rope_cos_sin(n: int, head_dim: int, theta: float, freq_factors: np.ndarray | None = None,
                 linear_factor: float = 1.0, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [N, d] in HF's layout (the d/2 frequencies repeated twice), float32 like HF:
    inverse frequencies and position*frequency products are rounded to float32 before cos/sin."""
    exps = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    inv = (1.0 / (np.float64(theta) ** exps))
    if freq_factors is not None:  # llama3-style per-frequency factors (rope_freqs.weight)
        inv = inv / freq_factors.astype(np.float64)
    inv = (inv / linear_factor).astype(np.float32)  # linear scaling divides the frequencies, as HF
    pos = np.arange(offset, offset + n, dtype=np.float32)
    ang = pos[:, None] * inv[None, :]  # float32 products, as HF's float32 outer product
    ang = np.concatenate([ang, ang], axis=1).astype(np.float64)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """HF apply_rotary_pos_emb: x*cos + rotate_half(x)*sin; x [H, N, d]."""
    h = x.shape[-1] // 2
    rot = np.empty_like(x)
    np.negative(x[..., h:], out=rot[..., :h])
    rot[..., h:] = x[..., :h]
    rot *= sin
    out = x * cos
    out += rot
    return out


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    var = np.einsum("ij,ij->i", x, x) / np.float32(x.shape[1])
    return (x * (1.0 / np.sqrt(var + np.float32(eps)))[:, None].astype(np.float32)) * w


_POOL = None


def _exp_rows(S: np.ndarray, l: np.ndarray, r0: int, r1: int) -> None:
    blk = S[r0:r1]
    blk -= blk.max(axis=1, keepdims=True)
    np.exp(blk, out=blk)
    l[r0:r1] = blk.sum(axis=1)


def _softmax_rows_unnormalised(S: np.ndarray) -> np.ndarray:
    """exp(S - rowmax) in place; returns the row sums [rows, 1]. numpy's exp is single-threaded
    and the largest cost after the GEMMs, so row ranges run on all cores (ufuncs drop the GIL)."""
    global _POOL
    rows = S.shape[0]
    l = np.empty(rows, dtype=np.float32)
    n = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1, 8)
    if n <= 1 or S.size < (1 << 18):
        _exp_rows(S, l, 0, rows)
        return l[:, None]
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor
        _POOL = ThreadPoolExecutor(max_workers=n)
    cuts = [rows * i // n for i in range(n + 1)]
    futs = [_POOL.submit(_exp_rows, S, l, cuts[i], cuts[i + 1]) for i in range(n)]
    for f in futs:
        f.result()
    return l[:, None]


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, chunk: int = 512,
                     q_offset: int = 0, scale: float | None = None, window: int = 0) -> np.ndarray:
    """Softmax(scale q k^T + mask) v with GQA; q [Hq,N,d], k/v [Hkv,M,d] -> [N, Hq*d].

    Query i sits at position q_offset + i (M = q_offset + N; a nonzero offset is decoding with
    cached keys). scale defaults to 1/sqrt(d). window = 0: full causal; W > 0: sliding window,
    query position p sees keys j with p - W < j <= p. Queries go in chunks so the score buffer
    is [group*chunk, keys] (bounded memory); keys outside the chunk's causal span (or window)
    are never touched, so a sliding layer costs O(N * (chunk + W)), not O(N^2).
    """
    Hq, N, d = q.shape
    Hkv = k.shape[0]
    rep = Hq // Hkv
    scale = np.float32(1.0 / math.sqrt(d) if scale is None else scale)
    out = np.empty((N, Hq, d), dtype=np.float32)
    tri = np.triu(np.full((chunk, chunk), -np.inf, dtype=np.float32), 1)
    # one score buffer for every chunk: no fresh (page-faulting) allocation of up to
    # [rep*chunk, M] floats per chunk
    c_max = min(chunk, N)
    keys_max = min(q_offset + N, c_max + window - 1) if window > 0 else q_offset + N
    scratch = np.empty(rep * c_max * keys_max, dtype=np.float32)
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        c = e - s
        ke = q_offset + e  # keys visible to the chunk's last query
        k0 = max(0, q_offset + s - window + 1) if window > 0 else 0
        if window > 0:
            pos = np.arange(q_offset + s, q_offset + e)[:, None] - np.arange(k0, ke)[None, :]
            bias = np.where((pos >= 0) & (pos < window), np.float32(0), np.float32(-np.inf))
        for g in range(Hkv):
            qg = (q[g * rep:(g + 1) * rep, s:e] * scale).reshape(rep * c, d)
            S = scratch[:rep * c * (ke - k0)].reshape(rep * c, ke - k0)
            np.matmul(qg, k[g, k0:ke].T, out=S)                     # [rep*c, ke-k0]
            if window > 0:
                S.reshape(rep, c, ke - k0)[:] += bias
            else:
                S.reshape(rep, c, ke)[:, :, q_offset + s:ke] += tri[:c, :c]
            l = _softmax_rows_unnormalised(S)
            o = S @ v[g, k0:ke]
            o /= l
            out[s:e, g * rep:(g + 1) * rep, :] = o.reshape(rep, c, d).transpose(1, 0, 2)
    return out.reshape(N, Hq * d)


def gelu_tanh_(g: np.ndarray) -> np.ndarray:
    """In place: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) (PyTorch's gelu 'tanh')."""
    t = g * g
    t *= np.float32(0.044715)
    t += np.float32(1.0)
    t *= g
    t *= np.float32(math.sqrt(2.0 / math.pi))
    np.tanh(t, out=t)
    t += np.float32(1.0)
    t *= np.float32(0.5)
    g *= t
    return g


def silu_(g: np.ndarray) -> np.ndarray:
    """In place: g * sigmoid(g)."""
    sig = np.negative(g)
    np.exp(sig, out=sig)
    sig += 1.0
    np.divide(g, sig, out=g)
    return g


def head_rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis of [..., d] (per-head q/k norm)."""
    shape = x.shape
    return rms_norm(np.ascontiguousarray(x).reshape(-1, shape[-1]), w, eps).reshape(shape)


LayerHook = Callable[[int, np.ndarray, np.ndarray, np.ndarray], None]


def forward(model: GGUFModel, ids: Sequence[int], capture: Iterable[int] = (),
            on_layer: LayerHook | None = None, logits: str = "none", chunk: int = 512,
            progress: Callable[[int, float], None] | None = None,
            cache: dict | None = None) -> np.ndarray | None:
    """Runs the model over `ids`. For each layer in `capture` calls on_layer(layer, q, k, v) with
    post-RoPE q [Hq,N,d], k and v [Hkv,N,d] (float32). logits: "none" (stop after the last
    captured layer), "last" ([vocab] for the last token), "all" ([N, vocab]) or "hidden" (the
    final-normed hidden states [N, n_embd]; logits = hidden @ model.lm_head().T).
    cache: a dict kept between calls for incremental decoding ({} to start): `ids` continue the
    tokens of the previous calls, whose keys and values it holds."""
    c = model.cfg
    ids = np.asarray(ids, dtype=np.int64)
    N = len(ids)
    capture = sorted(set(capture))
    last = c.n_layers - 1 if logits != "none" else (capture[-1] if capture else -1)
    offset = cache.get("n", 0) if cache is not None else 0
    x = model.embed(ids)
    D, Hq, Hkv = c.head_dim, c.n_head, c.n_head_kv
    ropes: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def rope_for(window: int):
        """Global layers: rope_theta (+ the file's frequency factors and linear scaling);
        sliding layers: rope_theta_local, unscaled (Gemma-3)."""
        key = 1 if (window > 0 and c.rope_theta_local) else 0
        if key not in ropes:
            if key:
                ropes[key] = rope_cos_sin(N, D, c.rope_theta_local, None, 1.0, offset=offset)
            else:
                ropes[key] = rope_cos_sin(N, D, c.rope_theta, model.rope_freq_factors,
                                          c.rope_linear_factor, offset=offset)
        return ropes[key]

    act = gelu_tanh_ if c.act == "gelu_tanh" else silu_
    for i in range(last + 1):
        t0 = time.perf_counter()
        L = model.layer(i)
        W = c.window(i)
        cos, sin = rope_for(W)
        h = rms_norm(x, L["attn_norm"], c.rms_eps)
        qkv = h @ L["wqkv"].T
        del h
        q = qkv[:, :Hq * D].reshape(N, Hq, D).transpose(1, 0, 2)
        k = qkv[:, Hq * D:(Hq + Hkv) * D].reshape(N, Hkv, D).transpose(1, 0, 2)
        if c.qk_norm:
            q = head_rms_norm(q, L["q_norm"], c.rms_eps)
            k = head_rms_norm(k, L["k_norm"], c.rms_eps)
        q = np.ascontiguousarray(apply_rope(q, cos, sin))
        k = np.ascontiguousarray(apply_rope(k, cos, sin))
        v = np.ascontiguousarray(qkv[:, (Hq + Hkv) * D:].reshape(N, Hkv, D).transpose(1, 0, 2))
        del qkv
        if on_layer is not None and i in capture:
            on_layer(i, q, k, v)
        if i == last and logits == "none":
            # nothing downstream reads this layer's output
            if progress is not None:
                progress(i, time.perf_counter() - t0)
            break
        if cache is not None:
            if i in cache:
                k = np.concatenate([cache[i][0], k], axis=1)
                v = np.concatenate([cache[i][1], v], axis=1)
            cache[i] = (k, v)
        a = causal_attention(q, k, v, chunk, q_offset=offset, scale=c.scale(), window=W)
        del q, k, v
        o = a @ L["wo"].T
        del a
        if c.sandwich_norm:
            o = rms_norm(o, L["post_attn_norm"], c.rms_eps)
        x += o
        del o
        h = rms_norm(x, L["ffn_norm"], c.rms_eps)
        gu = h @ L["wgu"].T
        del h
        g, u = gu[:, :c.n_ff], gu[:, c.n_ff:]
        act(g)
        g *= u
        o = g @ L["wd"].T
        del gu, g, u
        if c.sandwich_norm:
            o = rms_norm(o, L["post_ffn_norm"], c.rms_eps)
        x += o
        del o
        if progress is not None:
            progress(i, time.perf_counter() - t0)
    if cache is not None:
        cache["n"] = offset + N
    if logits == "none":
        return None
    xn = rms_norm(x if logits in ("all", "hidden") else x[-1:], model.weight("output_norm.weight"),
                  c.rms_eps)
    if logits == "hidden":
        return xn
    z = xn @ model.lm_head().T
    z = softcap(z, c.final_softcap)
    return z[0] if logits == "last" else z


def softcap(z: np.ndarray, cap: float) -> np.ndarray:
    if cap > 0:
        z /= np.float32(cap)
        np.tanh(z, out=z)
        z *= np.float32(cap)
    return z


def log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of targets under row-wise softmax(logits), float64."""
    z = logits.astype(np.float64)
    m = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(axis=1)) + m[:, 0]
    return lse - z[np.arange(len(targets)), targets]


def perplexity(model: GGUFModel, ids: Sequence[int]) -> float:
    """exp(mean NLL) of tokens 1..N-1 given their prefixes."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) < 2:
        raise CaptureError("--eval-ppl: the passage must have at least 2 tokens")
    hidden = forward(model, ids, logits="hidden")
    w_out = model.lm_head()
    nll = []
    for s in range(0, len(ids) - 1, 128):  # [128, vocab] logits at a time (Gemma: 262K vocab)
        e = min(len(ids) - 1, s + 128)
        z = softcap(hidden[s:e] @ w_out.T, model.cfg.final_softcap)
        nll.append(log_softmax_nll(z, ids[s + 1:e + 1]))
    return float(np.exp(np.concatenate(nll).mean()))


def generate(model: GGUFModel, ids: Sequence[int], max_new: int, stop_ids: set[int]) -> list[int]:
    """Greedy decoding with a key/value cache."""
    model.keep_weights()
    cache: dict = {}
    return continue_greedy(model, forward(model, ids, logits="last", cache=cache), cache,
                           max_new, stop_ids)


def continue_greedy(model: GGUFModel, logits: np.ndarray, cache: dict, max_new: int,
                    stop_ids: set[int]) -> list[int]:
    """Greedy tokens after a prefill that gave `logits` (last position) and filled `cache`."""
    new: list[int] = []
    for n in range(max_new):
        t = int(np.argmax(logits))
        if t in stop_ids:
            break
        new.append(t)
        if n + 1 < max_new:
            logits = forward(model, [t], logits="last", cache=cache)
    return new


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------

_KEY_ADJ = ["amber", "brisk", "quiet", "silver", "hollow", "gentle", "crimson", "distant",
            "bitter", "lucky", "narrow", "patient", "rustic", "sturdy", "velvet", "wandering"]
_KEY_NOUN = ["harbor", "lantern", "meadow", "orchard", "compass", "falcon", "glacier", "kettle",
             "ledger", "mirror", "pebble", "quarry", "saddle", "thimble", "violin", "willow"]

NIAH_INSTRUCTION = ("A special magic number is hidden somewhere in the long text below. Read the "
                    "text carefully and remember the number, because a question about it "
                    "follows the text.")


@dataclass
class Prompt:
    ids: list[int]
    text: str
    needle_position: int | None = None
    needle_text: str | None = None
    extra: dict = field(default_factory=dict)


def haystack_sentences(files: Sequence[Path]) -> list[tuple[str, bool]]:
    """(sentence, starts a paragraph) from the haystack text files, in order."""
    out: list[tuple[str, bool]] = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            if not para or para.startswith("#"):
                continue
            sents = [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", para) if s]
            for j, s in enumerate(sents):
                out.append((s, j == 0))
    return out


def default_haystack_files() -> list[Path]:
    return sorted((DATA_DIR / "haystack").glob("*.txt"))


def build_niah(tok: GGUFTokenizer, length: int, depth: float, seed: int = 0,
               files: Sequence[Path] | None = None, chat: bool = False) -> Prompt:
    """A RULER single-needle style prompt of exactly `length` tokens."""
    files = list(files) if files else default_haystack_files()
    if not files:
        raise CaptureError(f"no haystack text found under {DATA_DIR / 'haystack'}")
    rng = random.Random(seed)
    key = f"{rng.choice(_KEY_ADJ)}-{rng.choice(_KEY_NOUN)}"
    value = rng.randint(1_000_000, 9_999_999)
    needle = f"One of the special magic numbers for {key} is: {value}."
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    answer = f"The special magic number for {key} mentioned in the provided text is"
    pre_chat, post_chat = tok.chat("") if chat else ("", "")
    prefix = tok.encode(pre_chat + NIAH_INSTRUCTION + "\n\n", bos=True)
    suffix = tok.encode("\n\n" + question + (post_chat if chat else "\n") + answer)
    needle_ids = tok.encode(" " + needle)
    budget = length - len(prefix) - len(suffix) - len(needle_ids)
    if budget < 1:
        raise CaptureError(f"--length {length}: too short for the NIAH prompt "
                           f"(needs more than {length - budget} tokens)")
    sents = haystack_sentences(files)
    if not sents:
        raise CaptureError(f"haystack files {', '.join(map(str, files))} hold no text")
    units = [("" if i == 0 else ("\n\n" if para else " ")) + s for i, (s, para) in enumerate(sents)]
    unit_ids = tok.encode_batch(units)
    # The corpus repeats when the target is longer than it; its first unit then starts a paragraph.
    wrap_ids = tok.encode("\n\n" + sents[0][0])
    hay: list[int] = []
    bounds = [0]
    i = 0
    while len(hay) < budget:
        u = wrap_ids if (i and i % len(units) == 0) else unit_ids[i % len(units)]
        hay.extend(u)
        bounds.append(len(hay))
        i += 1
    hay = hay[:budget]
    bounds = [b for b in bounds if b <= budget]
    target = depth * budget
    cut = min(bounds, key=lambda b: (abs(b - target), b))
    ids = prefix + hay[:cut] + needle_ids + hay[cut:] + suffix
    assert len(ids) == length
    pos = len(prefix) + cut
    return Prompt(ids=ids, text=tok.decode(ids), needle_position=pos, needle_text=needle,
                  extra={"key": key, "value": str(value), "depth": float(depth)})


def parse_layers(spec: str, n_layers: int) -> list[int]:
    out: set[int] = set()
    try:
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if lo > hi:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise CaptureError(f"--layers '{spec}': expected a list like 0,1,5-7") from None
    if not out:
        raise CaptureError(f"--layers '{spec}': no layers selected")
    bad = [l for l in sorted(out) if l < 0 or l >= n_layers]
    if bad:
        raise CaptureError(f"--layers '{spec}': layer {bad[0]} is out of range (model has "
                           f"{n_layers} layers, 0..{n_layers - 1})")
    return sorted(out)


# --------------------------------------------------------------------------------------------
# Store writing (atomic)
# --------------------------------------------------------------------------------------------

class StoreWriter:
    """Writes the store to a temporary file beside `path`; commit() renames it into place.
    Anything else (an exception, a signal) removes the temporary file: no partial store."""

    def __init__(self, path: Path, attrs: dict, dtype: str, chunk_tokens: int = 1024,
                 gzip: bool = False):
        import h5py
        self.path = Path(path)
        if self.path.is_dir():
            raise CaptureError(f"--out {self.path}: is a directory")
        if os.path.lexists(self.path) and not (self.path.is_file() and not self.path.is_symlink()):
            raise CaptureError(f"--out {self.path}: exists and is not a regular file (refusing to replace it)")
        if not self.path.parent.exists():
            raise CaptureError(f"--out {self.path}: folder {self.path.parent} does not exist")
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.dtype = np.float16 if dtype == "float16" else np.float32
        self.chunk = chunk_tokens
        self.gzip = gzip
        try:
            self.f = h5py.File(self.tmp, "w", libver=("v110", "v110"))  # HDF5 1.10's newest format: metadata checksums
        except OSError as e:
            raise CaptureError(f"--out {self.path}: cannot create ({e})") from None
        for k, v in attrs.items():
            self.f.attrs[k] = v
        self.layers = self.f.create_group("layers")

    def _ds(self, grp, name: str, a: np.ndarray) -> None:
        H, N, d = a.shape
        kw = dict(compression="gzip", compression_opts=4, shuffle=True) if self.gzip else {}
        grp.create_dataset(name, data=a.astype(self.dtype), chunks=(1, min(self.chunk, N), d), fletcher32=True, **kw)

    def write_layer(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray | None,
                    window: int = 0) -> None:
        """window 0: attribute attention = "global"; W > 0: attention = "sliding", window = W."""
        g = self.layers.create_group(f"{layer:02d}")
        if window > 0:
            g.attrs["attention"] = "sliding"
            g.attrs["window"] = np.int64(window)
        else:
            g.attrs["attention"] = "global"
        self._ds(g, "q", q)
        self._ds(g, "k", k)
        if v is not None:
            self._ds(g, "v", v)

    def write_tokens(self, ids: Sequence[int]) -> None:
        self.f.create_dataset("tokens", data=np.asarray(ids, dtype=np.int32), fletcher32=True)

    def write_needle(self, position: int, text: str, extra: dict) -> None:
        g = self.f.create_group("needle")
        g.attrs["position"] = np.int64(position)
        g.attrs["text"] = text
        for k, v in extra.items():
            g.attrs[k] = v

    def commit(self) -> None:
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.f.close()
        except Exception:
            pass
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", type=Path, help="GGUF model file (Llama family)")
    src.add_argument("--hf", type=Path, help="Hugging Face model directory (needs torch + transformers)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--prompt-file", type=Path, help="capture on this UTF-8 text")
    mode.add_argument("--niah", action="store_true", help="capture on a needle-in-a-haystack prompt")
    mode.add_argument("--eval-ppl", type=Path, metavar="FILE", help="print the perplexity on FILE")
    mode.add_argument("--generate", metavar="TEXT", help="print a greedy continuation of TEXT")
    ap.add_argument("--length", type=int, default=8192, help="NIAH prompt length in tokens (8192)")
    ap.add_argument("--depth", type=float, default=0.5, help="NIAH needle depth, 0 (start) .. 1 (end)")
    ap.add_argument("--seed", type=int, default=0, help="NIAH key/number seed (0)")
    ap.add_argument("--haystack", type=Path, nargs="+", help="haystack text files (data/haystack/*.txt)")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the model's ChatML template")
    ap.add_argument("--max-new", type=int, default=30, help="--generate: new tokens (30)")
    ap.add_argument("--answer", type=int, default=0, metavar="N",
                    help="--niah: also let the model answer the needle question (N greedy tokens "
                         "after the same prefill; printed and kept in the store's /needle attributes)")
    ap.add_argument("--out", type=Path, help="store to write (.h5)")
    ap.add_argument("--layers", help="layers to capture, e.g. 0,1,5-7 (default: all)")
    ap.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    ap.add_argument("--no-v", action="store_true", help="do not store V")
    ap.add_argument("--gzip", action="store_true", help="shuffle + gzip(4) the datasets")
    ap.add_argument("--chunk-tokens", type=int, default=1024, help="HDF5 chunk length (1024)")
    ap.add_argument("--model-name", help="value of the store's 'model' attribute (default: file name)")
    ap.add_argument("--allow-overlength", action="store_true",
                    help="allow prompts longer than the model's context length")
    ap.add_argument("--device", default="auto", help="--hf: torch device, auto/cpu/cuda (auto)")
    ap.add_argument("--attn-chunk", type=int, default=512, help=argparse.SUPPRESS)
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return ap


def _check_length(n: int, n_ctx: int, allow: bool, what: str) -> None:
    if n > n_ctx and not allow:
        raise CaptureError(f"{what}: {n} tokens exceed the model's context length {n_ctx} "
                           "(pass --allow-overlength to run anyway)")


def run(a: argparse.Namespace) -> int:
    q = a.quiet
    _check_args(a)
    if a.hf is not None:
        return run_hf(a)
    t0 = time.perf_counter()
    model = GGUFModel(a.gguf)
    tok = GGUFTokenizer(model)
    c = model.cfg
    t_open = time.perf_counter() - t0

    def describe():  # only once the input is known to be good: an error stays one line
        _log(q, f"{model.path.name}: {c.n_layers} layers, {c.n_head} q heads, {c.n_head_kv} kv "
                f"heads, head dim {c.head_dim}, rope theta {c.rope_theta:g}, context {c.n_ctx} "
                f"({t_open:.1f} s to open)")

    if a.eval_ppl is not None:
        text = _read_prompt(a.eval_ppl, "--eval-ppl")
        ids = tok.encode(text, bos=True)
        _check_length(len(ids), c.n_ctx, a.allow_overlength, f"--eval-ppl {a.eval_ppl}")
        describe()
        ppl = perplexity(model, ids)
        print(f"perplexity {ppl:.3f} over {len(ids) - 1} predicted tokens "
              f"(chance {c.vocab_size}) on {a.eval_ppl}")
        return 0
    if a.generate is not None:
        pre, post = tok.chat("") if a.chat else ("", "")
        ids = tok.encode(pre + a.generate + post, bos=True)
        _check_length(len(ids) + a.max_new, c.n_ctx, a.allow_overlength, "--generate")
        describe()
        new = generate(model, ids, a.max_new, tok.stop_ids)
        print(tok.decode(new))
        return 0

    layers = parse_layers(a.layers, c.n_layers) if a.layers is not None else list(range(c.n_layers))
    prompt = _build_prompt(a, tok, c.n_ctx)
    describe()
    meta = dict(model=a.model_name or model.path.stem, source=str(a.gguf), num_layers=c.n_layers,
                num_q_heads=c.n_head, num_kv_heads=c.n_head_kv, head_dim=c.head_dim,
                rope_theta=c.rope_theta,
                layer_windows=[c.window(i) for i in range(c.n_layers)])
    last = c.n_layers - 1 if a.answer else layers[-1]
    answer: dict = {}

    def capture(on_layer):
        def progress(i, dt):
            _log(q, f"layer {i + 1}/{last + 1} done in {dt:.1f} s"
                    + (" (captured)" if i in layers else ""))
        if not a.answer:
            forward(model, prompt.ids, layers, on_layer, chunk=a.attn_chunk, progress=progress)
            return
        # the same prefill gives the store and the model's answer to the needle question
        model.keep_weights()  # the decoding steps re-read every weight
        cache: dict = {}
        z = forward(model, prompt.ids, layers, on_layer, logits="last", chunk=a.attn_chunk,
                    progress=progress, cache=cache)
        t1 = time.perf_counter()
        text = tok.decode(continue_greedy(model, z, cache, a.answer, tok.stop_ids))
        del cache
        answer.update(text=text, correct=str(prompt.extra.get("value", "")) in text,
                      seconds=time.perf_counter() - t1)

    def finish(w):
        if answer:
            g = w.f["needle"]
            g.attrs["answer"] = answer["text"]
            g.attrs["answer_correct"] = np.bool_(answer["correct"])

    _write_store(a, prompt, meta, layers, capture, finish)
    if answer:
        print(f"needle {prompt.extra.get('key')} = {prompt.extra.get('value')}; model answers "
              f"{answer['text'].strip()!r} ({'correct' if answer['correct'] else 'wrong'}; "
              f"{a.answer} new tokens in {answer['seconds']:.1f} s)")
    _log(q, f"total {time.perf_counter() - t0:.1f} s")
    return 0


def _build_prompt(a: argparse.Namespace, tok, n_ctx: int) -> Prompt:
    if a.niah:
        _check_length(a.length, n_ctx, a.allow_overlength, f"--length {a.length}")
        return build_niah(tok, a.length, a.depth, a.seed, a.haystack, a.chat)
    text = _read_prompt(a.prompt_file, "--prompt-file")
    if a.chat:
        pre, post = tok.chat("")
        text = pre + text + post
    ids = tok.encode(text, bos=True)
    _check_length(len(ids), n_ctx, a.allow_overlength, f"--prompt-file {a.prompt_file}")
    return Prompt(ids=ids, text=text)


def _write_store(a: argparse.Namespace, prompt: Prompt, meta: dict, layers: list[int],
                 capture: Callable[[LayerHook], None], finish: Callable | None = None) -> None:
    """Writes the store atomically; capture(on_layer) must call on_layer for every layer."""
    N = len(prompt.ids)
    attrs = {
        "model": meta["model"],
        "source": meta["source"],
        "num_layers": np.int64(meta["num_layers"]),
        "num_q_heads": np.int64(meta["num_q_heads"]),
        "num_kv_heads": np.int64(meta["num_kv_heads"]),
        "head_dim": np.int64(meta["head_dim"]),
        "seq_len": np.int64(N),
        "rope_theta": np.float64(meta["rope_theta"]),
        "rope_applied": np.bool_(True),
        "dtype": a.dtype,
        "prompt_sha256": hashlib.sha256(prompt.text.encode("utf-8")).hexdigest(),
        "creator": CREATOR,
    }
    _log(a.quiet, f"prompt: {N} tokens" + (f", needle at token {prompt.needle_position}"
                                           if prompt.needle_position is not None else "")
         + f"; capturing {len(layers)} layer(s) into {a.out}")
    t0 = time.perf_counter()
    w = StoreWriter(a.out, attrs, a.dtype, a.chunk_tokens, a.gzip)
    try:
        w.write_tokens(prompt.ids)
        if prompt.needle_position is not None:
            w.write_needle(prompt.needle_position, prompt.needle_text or "", prompt.extra)
        written = []

        windows = meta.get("layer_windows") or [0] * int(meta["num_layers"])

        def on_layer(i, qq, kk, vv):
            w.write_layer(i, qq, kk, None if a.no_v else vv, window=int(windows[i]))
            written.append(i)

        capture(on_layer)
        if sorted(written) != list(layers):
            raise CaptureError(f"internal: captured layers {written}, expected {layers}")
        if finish is not None:
            finish(w)
        w.commit()
    except BaseException:
        w.abort()
        raise
    _log(a.quiet, f"wrote {a.out}: {len(layers)} layer(s) x {N} tokens in "
                  f"{time.perf_counter() - t0:.1f} s")


def _check_args(a: argparse.Namespace) -> None:
    """Everything that can be checked before the model is opened."""
    if a.eval_ppl is not None:
        _read_prompt(a.eval_ppl, "--eval-ppl")
        return
    if a.generate is not None:
        if not a.generate.strip():
            raise CaptureError("--generate: the prompt is empty")
        if a.max_new < 1:
            raise CaptureError(f"--max-new {a.max_new}: must be at least 1")
        return
    if a.out is None:
        raise CaptureError("--out is required to capture (or use --eval-ppl / --generate)")
    if a.out.is_dir():
        raise CaptureError(f"--out {a.out}: is a directory")
    if not a.out.resolve().parent.is_dir():
        raise CaptureError(f"--out {a.out}: folder {a.out.parent} does not exist")
    if not a.niah and a.prompt_file is None:
        raise CaptureError("choose a prompt: --prompt-file FILE or --niah")
    if a.chunk_tokens < 1:
        raise CaptureError(f"--chunk-tokens {a.chunk_tokens}: must be positive")
    if a.attn_chunk < 1:
        raise CaptureError(f"--attn-chunk {a.attn_chunk}: must be positive")
    if a.answer < 0:
        raise CaptureError(f"--answer {a.answer}: must be 0 (off) or a number of tokens")
    if a.answer and not a.niah:
        raise CaptureError("--answer needs --niah")
    if a.answer and a.hf is not None:
        raise CaptureError("--answer needs --gguf")
    if a.niah:
        if a.length < 1:
            raise CaptureError(f"--length {a.length}: must be positive")
        if not 0.0 <= a.depth <= 1.0:
            raise CaptureError(f"--depth {a.depth}: must be within 0..1")
        for f in a.haystack or []:
            if not f.is_file():
                raise CaptureError(f"--haystack {f}: " + ("is a directory" if f.is_dir() else "no such file"))
    else:
        _read_prompt(a.prompt_file, "--prompt-file")


def _read_prompt(path: Path, flag: str) -> str:
    if path.is_dir():
        raise CaptureError(f"{flag} {path}: is a directory")
    if not path.is_file():
        raise CaptureError(f"{flag} {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CaptureError(f"{flag} {path}: not UTF-8 text") from None
    if not text.strip():
        raise CaptureError(f"{flag} {path}: the prompt is empty")
    return text


class HFTokenizerAdapter:
    """The few GGUFTokenizer methods the prompt builders use, over a transformers tokenizer."""

    def __init__(self, tok):
        self.tk = tok
        probe = tok("a", add_special_tokens=True)["input_ids"]
        self.bos_id = tok.bos_token_id
        self.add_bos = self.bos_id is not None and len(probe) > 0 and probe[0] == self.bos_id
        self.chat_template = tok.chat_template or ""

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self.tk(text, add_special_tokens=False)["input_ids"]
        return ([int(self.bos_id)] + ids) if (bos and self.add_bos) else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    chat = BPETokenizer.chat


def run_hf(a: argparse.Namespace) -> int:
    """Hugging Face directory: forward through transformers, Q/K/V taken by hooks
    (check_capture_torch.torch_capture, the same code the GGUF check uses)."""
    if a.eval_ppl is not None or a.generate is not None:
        raise CaptureError("--hf: only capture is supported (use --gguf for --eval-ppl/--generate)")
    if not a.hf.is_dir():
        raise CaptureError(f"--hf {a.hf}: no such directory")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise CaptureError(f"--hf needs torch and transformers ({e})") from None
    import check_capture_torch as ct
    from transformers import AutoTokenizer
    device = a.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    try:
        torch_, model, hfcfg = ct.load_hf_model(a.hf, None, device)
        tok = HFTokenizerAdapter(AutoTokenizer.from_pretrained(str(a.hf)))
    except (OSError, ValueError) as e:
        raise CaptureError(f"--hf {a.hf}: cannot load the model ({str(e).splitlines()[0]})") from None
    n_layers, n_head, n_kv, hd, theta, n_ctx = ct.hf_shape(hfcfg)
    layers = parse_layers(a.layers, n_layers) if a.layers is not None else list(range(n_layers))
    prompt = _build_prompt(a, tok, n_ctx or 1 << 62)
    _log(a.quiet, f"{a.hf}: {n_layers} layers, {n_head} q heads, {n_kv} kv heads, head dim {hd}, "
                  f"rope theta {theta:g} on {device} ({time.perf_counter() - t0:.1f} s to open)")
    meta = dict(model=a.model_name or a.hf.resolve().name, source=str(a.hf), num_layers=n_layers,
                num_q_heads=n_head, num_kv_heads=n_kv, head_dim=hd, rope_theta=theta)
    types, sw = getattr(hfcfg, "layer_types", None), getattr(hfcfg, "sliding_window", None)
    if types and sw and len(types) == n_layers:  # e.g. Gemma-3: sliding_attention / full_attention
        meta["layer_windows"] = [int(sw) if t == "sliding_attention" else 0 for t in types]

    def capture(on_layer):
        got, _ = ct.torch_capture(torch_, model, prompt.ids, layers)
        for i in layers:
            on_layer(i, *got[i])

    _write_store(a, prompt, meta, layers, capture)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        return run(a)
    except CaptureError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted; no store written", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"{PROG}: error: out of memory (try a shorter prompt or --layers)", file=sys.stderr)
        return 1


def _raise_interrupt(*_):
    raise KeyboardInterrupt


if __name__ == "__main__":
    # A polite kill must still remove the temporary store: turn SIGTERM into an exception.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    sys.exit(main())
