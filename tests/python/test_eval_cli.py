"""proxyattn-eval (the C++ model runtime) on a tiny random Llama GGUF (model_fixtures.py):

(a) `ppl` equals the numpy spec's perplexity (capture_qk.perplexity), `generate` its greedy ids;
(b) `compare` finds the runtime's Q/K/V equal to a capture_qk.py store of the same model;
(c) bad input: exactly one stderr line "proxyattn-eval: error: ...", non-zero exit.

Binaries come from $PROXYATTN_BUILD_DIR/apps/.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SOURCE_DIR = Path(os.environ.get("PROXYATTN_SOURCE_DIR", Path(__file__).resolve().parents[2]))
BUILD_DIR = Path(os.environ.get("PROXYATTN_BUILD_DIR", SOURCE_DIR / "build" / "cpu"))
EVAL = BUILD_DIR / "apps" / "proxyattn-eval"
sys.path.insert(0, str(SOURCE_DIR / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

pytestmark = pytest.mark.skipif(not EVAL.exists(), reason="proxyattn-eval not built")


def run(*args):
    return subprocess.run([str(EVAL), *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import model_fixtures as mf
    d = tmp_path_factory.mktemp("model")
    mf.write_tiny(d, np.random.default_rng(7))
    ids = np.random.default_rng(8).integers(0, mf.TINY["vocab"], size=37)
    (d / "ids.txt").write_text(" ".join(str(int(i)) for i in ids) + "\n")
    return d, [int(i) for i in ids]


def test_ppl_and_generate_match_spec(tiny):
    import capture_qk as cq
    d, ids = tiny
    p = run("ppl", "--gguf", d / "tiny.gguf", "--tokens", d / "ids.txt", "-q")
    assert p.returncode == 0, p.stderr
    got = float(re.search(r"perplexity ([0-9.]+)", p.stdout).group(1))
    model = cq.GGUFModel(d / "tiny.gguf")
    want = cq.perplexity(model, ids)
    assert got == pytest.approx(want, rel=1e-3)

    p = run("generate", "--gguf", d / "tiny.gguf", "--tokens", d / "ids.txt", "--max-new", "5", "-q")
    assert p.returncode == 0, p.stderr
    assert [int(t) for t in p.stdout.split()] == cq.generate(model, ids, 5, set())


def test_compare_with_capture_store(tiny):
    d, ids = tiny
    (d / "prompt.txt").write_text("unused")
    import capture_qk as cq
    model = cq.GGUFModel(d / "tiny.gguf")
    prompt = cq.Prompt(ids=ids, text="tiny")
    meta = dict(model="tiny", source=str(d / "tiny.gguf"), num_layers=model.cfg.n_layers,
                num_q_heads=model.cfg.n_head, num_kv_heads=model.cfg.n_head_kv,
                head_dim=model.cfg.head_dim, rope_theta=model.cfg.rope_theta)
    args = cq.build_parser().parse_args(["--gguf", str(d / "tiny.gguf"), "--prompt-file", str(d / "prompt.txt"),
                                         "--out", str(d / "qk.h5"), "--dtype", "float32", "--quiet"])
    layers = list(range(model.cfg.n_layers))
    cq._write_store(args, prompt, meta, layers,
                    lambda on_layer: cq.forward(model, ids, layers, on_layer))
    p = run("compare", "--gguf", d / "tiny.gguf", "--store", d / "qk.h5", "-q")
    assert p.returncode == 0, p.stderr + p.stdout
    assert "worst relative error" in p.stdout


@pytest.mark.parametrize("case", ["vocab", "missing", "empty", "garbage", "notgguf", "last"])
def test_bad_input_is_one_line(tiny, tmp_path, case):
    d, _ = tiny
    gguf, toks = d / "tiny.gguf", tmp_path / "t.txt"
    toks.write_text("1 2 3\n")
    if case == "vocab":
        toks.write_text("1 2 99999\n")
    elif case == "missing":
        toks = tmp_path / "nope.txt"
    elif case == "empty":
        toks.write_text("  \n")
    elif case == "garbage":
        toks.write_text("1 2 x3\n")
    elif case == "notgguf":
        gguf = toks
    extra = ["--last", "-1"] if case == "last" else []
    p = run("ppl", "--gguf", gguf, "--tokens", toks, "-q", *extra)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("proxyattn-eval: error: "), p.stderr


def test_ppl_with_a_registered_method_in_every_layer(tiny):
    """--method runs the registry's estimator, budget and selection in every layer: the oracle
    budget at gamma 1 keeps every causal block (the dense perplexity); a tighter ProxyAttn budget
    changes it and reports a density below 1; bad method/budget values are one-line errors."""
    d, _ = tiny
    base = run("ppl", "--gguf", d / "tiny.gguf", "--tokens", d / "ids.txt", "-q")
    dense = float(re.search(r"perplexity ([0-9.]+)", base.stdout).group(1))
    full = run("ppl", "--gguf", d / "tiny.gguf", "--tokens", d / "ids.txt", "-q", "--method", "oracle",
               "--gamma", "1", "--block", "16")
    assert full.returncode == 0, full.stderr
    assert float(re.search(r"perplexity ([0-9.]+)", full.stdout).group(1)) == pytest.approx(dense, rel=1e-4)
    assert re.search(r"block density 1\.0000", full.stdout), full.stdout
    sp = run("ppl", "--gguf", d / "tiny.gguf", "--tokens", d / "ids.txt", "-q", "--method", "proxy", "--budget",
             "uniform", "--gamma", "0.5", "--block", "4", "--k-min", "1")
    assert sp.returncode != 0 and "--k-min" in sp.stderr  # not an option of ppl: CLI11's own line
    sp = run("ppl", "--gguf", d / "tiny.gguf", "--tokens", d / "ids.txt", "-q", "--method", "proxy", "--gamma", "0.3",
             "--block", "4", "--dense-layers", "1")
    assert sp.returncode == 0, sp.stderr
    m = re.search(r"(\d+) sparse layers: block density ([0-9.]+)", sp.stdout)
    assert m and int(m.group(1)) == 2 and float(m.group(2)) < 1.0, sp.stdout
    assert float(re.search(r"perplexity ([0-9.]+)", sp.stdout).group(1)) != pytest.approx(dense, rel=1e-6)
    for args, flag in ((["--method", "nope"], "--method"), (["--method", "proxy", "--budget", "native"], "--budget"),
                       (["--method", "proxy", "--groups", "4"], "groups"), (["--method", "xattn", "--xattn-stride", "3"], "stride")):
        p = run("ppl", "--gguf", d / "tiny.gguf", "--tokens", d / "ids.txt", "-q", *args)
        lines = p.stderr.strip().splitlines()
        assert p.returncode != 0 and len(lines) == 1 and lines[0].startswith("proxyattn-eval: error:") and flag in lines[0], (args, p.stderr)
