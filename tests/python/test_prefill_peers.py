"""scripts/bench_peers.py's prefill mode (issue 16): the plan, the model's sizes, the memory check,
the rows and their CSV/Markdown without torch; with torch (absent from the project venv: those
tests skip), the forward on the CPU (SDPA's math backend) against a numpy reference built from
scripts/capture_qk.py's primitives, and a whole CPU run through the command line."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SRC = Path(os.environ.get("PROXYATTN_SOURCE_DIR", Path(__file__).resolve().parents[2]))
SCRIPT = SRC / "scripts" / "bench_peers.py"
SWEEP = SRC / "configs" / "sweeps" / "prefill.json"
sys.path.insert(0, str(SRC / "scripts"))
import bench_peers as bp  # noqa: E402

TINY = {"name": "tiny", "num_layers": 2, "num_q_heads": 6, "num_kv_heads": 2, "head_dim": 16, "hidden_size": 80,
        "intermediate_size": 112, "vocab_size": 97, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "qkv_bias": True}


def args(**kw):
    base = {"lengths": None, "methods": None, "reps": None, "warmup": None, "model": None, "token_chunk": None,
            "device": None, "max_mem_gib": None, "prefill": False}
    base.update(kw)
    return type("A", (), base)()


def write_model(tmp_path, **fields) -> Path:
    p = tmp_path / "tiny.json"
    p.write_text(json.dumps({**TINY, **fields}))
    return p


def run_script(*a):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, a)], capture_output=True, text=True, timeout=600)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- torch-free

def test_peer_prefill_plan_of_the_shipped_sweep():
    sw = json.loads(SWEEP.read_text())
    p = bp.plan(sw, str(SWEEP), args())  # the generic entry point dispatches on the kind
    assert p["kind"] == "prefill" and p["device"] == "cuda"
    assert [m["name"] for m in p["models"]] == ["llama-3.1-8b", "qwen2.5-7b"]
    assert p["lengths"] == [8192 << i for i in range(6)]
    assert p["methods"] == ["torch_sdpa_cudnn", "torch_sdpa_flash"]
    assert (p["reps"], p["warmup"], p["seed"], p["token_chunk"]) == (3, 1, 1, 16384)
    # The published parameter counts: the model built here has the real models' sizes.
    llama, qwen = p["models"]
    assert bp.prefill_param_count(llama) == 8_030_261_248
    assert bp.prefill_param_count(qwen) == 7_615_616_512
    assert qwen["qkv_bias"] and not llama["qkv_bias"] and llama["rope_theta"] == 500000.0


def test_peer_prefill_plan_command_line_overrides(tmp_path):
    m = write_model(tmp_path)
    p = bp.prefill_plan({}, "", args(model=f"{m},{m}", lengths=["1K", "100"], methods=["torch_sdpa_flash"],
                                     reps=2, warmup=0, token_chunk=64, device="cpu"))
    assert len(p["models"]) == 2 and p["models"][0]["num_q_heads"] == 6
    assert (p["lengths"], p["methods"], p["reps"], p["warmup"], p["token_chunk"], p["device"]) == (
        [100, 1024], ["torch_sdpa_flash"], 2, 0, 64, "cpu")


@pytest.mark.parametrize("sweep,kw,fields,message", [
    ({"models": ["@M"], "lengths": [64]}, {"methods": ["sdpa_flash"]}, {}, "unknown peer method 'sdpa_flash'"),
    ({"models": ["@M"], "lengths": [64]}, {}, {"hidden_size": None}, "no hidden_size"),
    ({"models": ["@M"], "lengths": [64]}, {}, {"vocab_size": 0}, "vocab_size = 0"),
    ({"models": ["@M"], "lengths": [64]}, {}, {"num_kv_heads": 4}, "does not divide"),
    ({"models": ["@M"], "lengths": [64], "token_chunk": 0}, {}, {}, "token_chunk 0"),
    ({"models": ["nowhere.json"], "lengths": [64]}, {}, {}, "'nowhere.json' not found"),
    ({"lengths": [64]}, {}, {}, "no models"),
    ({"models": ["@M"]}, {}, {}, "no lengths"),
    ({"models": ["@M"], "lengths": ["4Q"]}, {}, {}, "length '4Q'"),
])
def test_peer_prefill_plan_bad_input(tmp_path, sweep, kw, fields, message):
    fields = {k: v for k, v in {**TINY, **fields}.items() if v is not None}
    (tmp_path / "m.json").write_text(json.dumps(fields))
    sweep = {**sweep, "kind": "prefill"}
    if "models" in sweep:
        sweep["models"] = [str(tmp_path / "m.json") if x == "@M" else x for x in sweep["models"]]
    with pytest.raises(bp.PeerError, match=message.replace("(", r"\(")):
        bp.prefill_plan(sweep, str(tmp_path / "sweep.json"), args(**kw))


@pytest.mark.parametrize("flags,message", [
    (["--methods", "torch_magic"], "unknown peer method 'torch_magic'"),
    (["--model", "missing.json"], "'missing.json' not found"),
    (["--token-chunk", "0"], "token_chunk 0"),
    (["--max-mem-gib", "-1"], "--max-mem-gib -1"),
])
def test_peer_prefill_cli_bad_input_is_one_line(tmp_path, flags, message):
    out = tmp_path / "o"
    p = run_script("--sweep", SWEEP, "--out", out, "--device", "cpu", *flags)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench_peers: error:") and message in lines[0], p.stderr
    assert not out.exists(), "no output on bad input"


def test_peer_prefill_flags_need_the_prefill_mode(tmp_path):
    p = run_script("--lengths", "1K", "--device", "cpu", "--out", tmp_path / "o")
    assert p.returncode == 2 and "are for the prefill" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_peer_prefill_memory_check():
    sw = json.loads(SWEEP.read_text())
    llama, qwen = (bp.prefill_model(m, str(SWEEP)) for m in sw["models"])
    w, a = bp.prefill_memory_bytes(llama, 262144, 16384)
    assert w == 2 * 8_030_261_248
    assert 20 * 2**30 < a < 40 * 2**30  # residual, QKV, expanded K/V ... of one layer at 256K
    h200 = 139 * 2**30
    assert bp.prefill_fit(llama, 262144, 16384, h200) == "" and bp.prefill_fit(qwen, 262144, 16384, h200) == ""
    reason = bp.prefill_fit(llama, 8192, 16384, 16 * 2**30)  # the weights alone are 15 GiB
    assert reason.startswith("would not fit memory: needs ") and "weights 15.0" in reason and "16.0 GiB" in reason
    # Activations grow with N; the MLP chunk bounds the MLP's share.
    assert bp.prefill_memory_bytes(llama, 65536, 16384)[1] < bp.prefill_memory_bytes(llama, 131072, 16384)[1]
    assert bp.prefill_memory_bytes(llama, 131072, 4096)[1] < bp.prefill_memory_bytes(llama, 131072, 131072)[1]


def test_peer_prefill_linear_flops():
    m = bp.prefill_model(dict(TINY), "")
    h, d = m["hidden_size"], m["head_dim"]
    per_layer = h * (6 + 2 * 2) * d + 6 * d * h + 3 * h * m["intermediate_size"]
    assert bp.prefill_linear_flops(m, 300) == 2.0 * 300 * per_layer * 2
    # Every parameter but the embeddings, lm_head, norms and biases is a projection weight.
    assert bp.prefill_param_count(m) - 2 * 97 * h - h - 2 * (2 * h + 10 * d) == 2 * per_layer


def test_peer_prefill_rows_csv_markdown(tmp_path):
    m = bp.prefill_model(dict(TINY), "")
    ok = bp.prefill_row(m, "torch_sdpa_cudnn", 4096, "cuda")
    stages = [{"linear": 10.0, "elementwise": 2.0, "attention": 5.0, "logits": 0.5},
              {"linear": 12.0, "elementwise": 3.0, "attention": 4.0, "logits": 0.25},
              {"linear": 11.0, "elementwise": 1.0, "attention": 6.0, "logits": 1.0}]
    bp.fill_prefill_row(ok, m, [18.0, 20.0, 17.5], stages, ceiling=0.5, peak_bytes=3 * 2**30)
    assert (ok["ttft_ms"], ok["ttft_ms_min"], ok["ttft_ms_max"], ok["reps"]) == (18.0, 17.5, 20.0, 3)
    assert (ok["linear_ms"], ok["elementwise_ms"], ok["attention_ms"], ok["logits_ms"]) == (11.0, 2.0, 5.0, 0.5)
    assert ok["estimation_ms"] is None and ok["speedup_vs_full"] is None and ok["peak_mem_gib"] == 3.0
    tf = bp.prefill_linear_flops(m, 4096) / 11e-3 / 1e12
    assert ok["linear_tflops"] == pytest.approx(tf) and ok["linear_pct_of_ceiling"] == pytest.approx(200 * tf)
    skip = bp.prefill_row(m, "torch_sdpa_flash", 1 << 20, "cuda")
    skip["status"], skip["reason"] = "skipped", "would not fit memory: needs 2.0 GiB"
    ctx = {"sweep": "t", "device_name": "X", "torch": "9", "date": "d", "timing": "t"}
    md = bp.write_prefill(tmp_path, {"context": ctx, "rows": [ok, skip]})
    assert {f.name for f in tmp_path.iterdir()} == {"prefill_peers.json", "prefill_peers.csv", "prefill_peers.md"}
    rows = read_csv(tmp_path / "prefill_peers.csv")
    assert list(rows[0].keys()) == bp.PREFILL_COLUMNS
    assert rows[0]["method"] == "torch_sdpa_cudnn" and float(rows[0]["ttft_ms"]) == 18.0
    assert rows[0]["estimation_ms"] == "" and rows[0]["source"] == "bench_peers"
    assert rows[1]["status"] == "skipped" and rows[1]["ttft_ms"] == ""
    assert "| tiny | torch_sdpa_cudnn | 4K | 18.0 (17.5–20.0) | 11.0 | 2.0 | 5.0 | 0.50 |" in md
    assert "- tiny torch_sdpa_flash N=1M: skipped — would not fit memory" in md
    assert (tmp_path / "prefill_peers.md").read_text() == md
    assert json.loads((tmp_path / "prefill_peers.json").read_text())["rows"][0]["ttft_ms"] == 18.0


# ---------------------------------------------------------------- torch (CPU, math backend)

def reference_logits(w: dict, m: dict, tokens: np.ndarray) -> np.ndarray:
    """float32 numpy forward of the same weights with capture_qk.py's primitives."""
    from capture_qk import apply_rope, causal_attention, rms_norm, rope_cos_sin, silu_
    f = {k: (v.float().numpy() if v is not None else None) for k, v in w.items() if k != "layers"}
    n, hq, hkv, d, eps = len(tokens), m["num_q_heads"], m["num_kv_heads"], m["head_dim"], m["rms_norm_eps"]
    cos, sin = rope_cos_sin(n, d, m["rope_theta"])
    x = f["embed"][tokens]
    for lw in w["layers"]:
        lw = {k: (v.float().numpy() if v is not None else None) for k, v in lw.items()}
        qkv = rms_norm(x, lw["attn_norm"], eps) @ lw["qkv"].T + lw["qkv_bias"]
        q = apply_rope(qkv[:, :hq * d].reshape(n, hq, d).transpose(1, 0, 2), cos, sin)
        k = apply_rope(qkv[:, hq * d:(hq + hkv) * d].reshape(n, hkv, d).transpose(1, 0, 2), cos, sin)
        v = np.ascontiguousarray(qkv[:, (hq + hkv) * d:].reshape(n, hkv, d).transpose(1, 0, 2))
        x = x + causal_attention(q, k, v, chunk=16) @ lw["o"].T
        gu = rms_norm(x, lw["mlp_norm"], eps) @ lw["gate_up"].T
        g, u = np.split(gu, 2, axis=1)
        x = x + (silu_(np.ascontiguousarray(g)) * u) @ lw["down"].T
    return rms_norm(x[-1:], f["norm"], eps) @ f["lm_head"].T


def test_peer_prefill_forward_matches_numpy_reference():
    torch = pytest.importorskip("torch", reason="torch is not in the project venv (the GPU machine has it)")
    import torch.nn.functional as F
    m = bp.prefill_model(dict(TINY), "")
    w = bp.prefill_weights(torch, m, torch.device("cpu"), seed=3)
    assert float(w["layers"][0]["qkv"].float().std()) == pytest.approx(0.02, rel=0.1)
    tokens = torch.randint(0, m["vocab_size"], (45,), generator=torch.Generator().manual_seed(1))
    ref = reference_logits(w, m, tokens.numpy())
    notes = {}
    with torch.inference_mode():
        out = bp.prefill_forward(torch, F, w, m, tokens, bp.make_attend(torch, F, notes), mlp_chunk=8)
        whole = bp.prefill_forward(torch, F, w, m, tokens, bp.make_attend(torch, F, {}), mlp_chunk=1000)
    assert out.shape == (1, m["vocab_size"]) and notes["gqa"] == "enable_gqa"
    got = out.float().numpy()
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max(), (got, ref)  # bf16 activations
    np.testing.assert_allclose(whole.float().numpy(), got, atol=0.02 * np.abs(ref).max())  # chunking


def test_peer_prefill_cpu_run(tmp_path):
    pytest.importorskip("torch", reason="torch is not in the project venv (the GPU machine has it)")
    model, out = write_model(tmp_path), tmp_path / "o"
    p = run_script("--prefill", "--models", model, "--lengths", "48,70", "--device", "cpu", "--reps", 1,
                   "--warmup", 1, "--token-chunk", 32, "--out", out)
    assert p.returncode == 0, p.stderr
    rows = read_csv(out / "prefill_peers.csv")
    assert list(rows[0].keys()) == bp.PREFILL_COLUMNS
    assert [(r["method"], r["n"]) for r in rows] == [
        ("torch_sdpa_cudnn", "48"), ("torch_sdpa_flash", "48"), ("torch_sdpa_cudnn", "70"), ("torch_sdpa_flash", "70")]
    doc = json.loads((out / "prefill_peers.json").read_text())
    assert doc["context"]["sdpa_backends"] == {"torch_sdpa_cudnn": "MATH", "torch_sdpa_flash": "MATH"}
    for r, j in zip(rows, doc["rows"]):
        assert r["status"] == "ok" and r["source"] == "bench_peers" and r["device"] == "cpu" and r["layers"] == "2"
        stages = sum(float(r[f"{s}_ms"]) for s in ("linear", "elementwise", "attention", "logits"))
        assert stages == pytest.approx(float(r["ttft_ms"]), rel=1e-6)  # one repetition: the marks add up
        assert float(r["linear_tflops"]) > 0 and r["estimation_ms"] == "" and r["peak_mem_gib"] == ""
        assert len(j["extra"]["attention_ms_per_layer"]) == 2
        assert sum(j["extra"]["attention_ms_per_layer"]) == pytest.approx(float(r["attention_ms"]), rel=1e-6)
    assert "| tiny | torch_sdpa_flash | 70 |" in p.stdout


def test_peer_prefill_skips_before_allocating(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch", reason="torch is not in the project venv (the GPU machine has it)")

    def no_weights(*a, **k):
        raise AssertionError("weights allocated for a case that does not fit")
    monkeypatch.setattr(bp, "prefill_weights", no_weights)
    out = tmp_path / "o"
    rc = bp.main(["--prefill", "--model", str(write_model(tmp_path)), "--lengths", "64,1M", "--device", "cpu",
                  "--max-mem-gib", "0.001", "--out", str(out)])
    assert rc == 0
    rows = read_csv(out / "prefill_peers.csv")
    assert len(rows) == 4 and all(r["status"] == "skipped" and "would not fit memory" in r["reason"] for r in rows)
    assert "Not run:" in capsys.readouterr().out


def test_peer_prefill_gqa_fallback_expands_kv():
    """A backend that refuses enable_gqa: K/V expanded to the query heads, same output, noted."""
    torch = pytest.importorskip("torch", reason="torch is not in the project venv (the GPU machine has it)")
    import torch.nn.functional as F

    class NoGQA:
        calls = []

        @staticmethod
        def scaled_dot_product_attention(q, k, v, is_causal, enable_gqa=False):
            NoGQA.calls.append(enable_gqa)
            if enable_gqa:
                raise RuntimeError("No available kernel. Aborting execution.")
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, h, 20, 8, generator=g) for h in (6, 2, 2))
    notes = {}
    out = bp.make_attend(torch, NoGQA, notes)(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    assert notes["gqa"].startswith("expanded") and "No available kernel" in notes["gqa_refused"]
    bp.make_attend(torch, NoGQA, notes)(q, k, v)  # once refused, not tried again
    assert NoGQA.calls == [True, False, False]
