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


# ---- the accuracy sweep ---------------------------------------------------------------------

def read_table(folder, name):
    import csv
    with open(folder / f"{name}.csv", newline="") as f:
        return list(csv.DictReader(f))


def fnum(x):
    return float("nan") if x in ("nan", "") else float(x)


@pytest.fixture(scope="module")
def evalset(tmp_path_factory):
    """The tiny model with a tokenizer (model_fixtures.write_tiny, tokenizer=True) and an evaluation
    set built for it by scripts/prepare_eval.py (NIAH at 384 and 512 tokens, two documents)."""
    import model_fixtures as mf
    import prepare_eval
    d = tmp_path_factory.mktemp("evalset")
    mf.write_tiny(d, np.random.default_rng(7), "tiny_tok.gguf", tokenizer=True, n_ctx=1024)
    rc = prepare_eval.main(["--gguf", str(d / "tiny_tok.gguf"), "--out", str(d / "set.json"), "--niah-lengths",
                            "384,512", "--depths", "0.2,0.8", "--ppl-length", "448", "--ppl-count", "2", "--last", "64",
                            "-q"])
    assert rc == 0
    return d


SWEEP = ["--methods", "proxy,xattn,vslash,oracle", "--sparsity", "0,0.5", "--gamma", "0.9", "--groups", "1,3",
         "--block", "16", "-q"]


@pytest.fixture(scope="module")
def sweep(evalset):
    out = evalset / "sweep"
    p = run("sweep", "--gguf", evalset / "tiny_tok.gguf", "--eval-set", evalset / "set.json", "--out", out, *SWEEP)
    assert p.returncode == 0, p.stderr
    return out


def test_prepare_eval_set_is_the_documented_schema(evalset):
    import json
    import capture_qk as cq
    s = json.loads((evalset / "set.json").read_text())
    assert s["schema"] == "proxyattn-eval-set" and s["schema_version"] == 1
    assert s["model"]["file"] == "tiny_tok.gguf" and s["model"]["vocab_size"] == 301
    assert s["model"]["tokenizer"] == "gpt2/smollm"
    model = cq.GGUFModel(evalset / "tiny_tok.gguf")
    tok = cq.GGUFTokenizer(model)
    assert len(s["niah"]["cases"]) == 4 and len(s["ppl"]["documents"]) == 2
    for c in s["niah"]["cases"]:
        assert len(c["tokens"]) == c["length"]
        # the prompt is capture_qk's NIAH prompt, the answer ids spell the needle's number
        assert c["tokens"] == cq.build_niah(tok, c["length"], c["depth"], c["seed"]).ids
        assert tok.decode(c["answer_ids"]).strip() == c["answer"]
    for doc in s["ppl"]["documents"]:
        assert len(doc["tokens"]) == 448 and doc["score_last"] == 64
    assert s["ppl"]["documents"][0]["tokens"] != s["ppl"]["documents"][1]["tokens"]


def test_sweep_report_and_baseline(evalset, sweep):
    for name in ("report.json", "report.md", "points.csv", "niah.csv", "ppl.csv", "layers.csv"):
        assert (sweep / name).is_file(), name
    pts = {r["point"]: r for r in read_table(sweep, "points")}
    full = pts["full"]
    # full attention: density 1 everywhere, delta 0 against itself
    assert fnum(full["block_density"]) == 1.0 and fnum(full["element_density"]) == 1.0
    assert fnum(full["delta_ppl"]) == 0.0
    assert all(fnum(r["block_density_mean"]) == 1.0 for r in read_table(sweep, "layers") if r["point"] == "full")
    # the ids of the points are the analysis' selection ids, from the registry's traits
    for want in ("proxy/g1/fixed/s0.5", "proxy/g3/fixed/s0.5", "proxy/g1/dynamic/gamma0.9", "xattn/native/gamma0.9",
                 "vslash/native", "oracle/fixed/s0.5", "oracle/native/gamma0.9"):
        assert want in pts, want
    # the baseline's perplexity is the `ppl` subcommand's on the same tokens (last K scored)
    import json
    s = json.loads((evalset / "set.json").read_text())
    nll = []
    for doc in s["ppl"]["documents"]:
        (evalset / "doc.txt").write_text(" ".join(map(str, doc["tokens"])))
        p = run("ppl", "--gguf", evalset / "tiny_tok.gguf", "--tokens", evalset / "doc.txt", "--last", 64, "-q")
        assert p.returncode == 0, p.stderr
        nll.append(np.log(float(re.search(r"perplexity ([0-9.]+)", p.stdout).group(1))))
    assert fnum(full["ppl"]) == pytest.approx(float(np.exp(np.mean(nll))), rel=1e-4)


def test_sweep_fixed_sparsity_is_reached(sweep):
    pts = {r["point"]: r for r in read_table(sweep, "points")}
    for pid, r in pts.items():
        if r["budget"] != "fixed":
            continue
        s = fnum(r["target_sparsity"])
        # block 16 at 384..512 tokens: 24..32 blocks, so 0.5 is reachable for every rule
        assert fnum(r["block_density"]) == pytest.approx(1 - s, abs=0.03), pid
        if s == 0:  # every causal block: the dense model, to float rounding
            assert abs(fnum(r["delta_ppl_pct"])) < 1e-3, pid
            assert r["niah_correct"] == pts["full"]["niah_correct"]
    # a sparse point changes the model's output
    assert abs(fnum(pts["oracle/fixed/s0.5"]["delta_ppl"])) > 0
    # densities per layer: every layer ran sparse
    lay = [r for r in read_table(sweep, "layers") if r["point"] == "xattn/fixed/s0.5"]
    assert len(lay) == 3 and all(r["dense"] == "0" and fnum(r["block_density_mean"]) < 0.6 for r in lay)
    # at sparsity 0 the answers are the dense model's, token for token
    niah = read_table(sweep, "niah")
    gen = {(r["point"], r["case"]): r["generated"] for r in niah}
    for (pt, case), g in gen.items():
        if pt == "oracle/fixed/s0":
            assert g == gen[("full", case)]


def test_sweep_niah_criterion(evalset, sweep, tmp_path):
    """A case whose answer ids are what the dense model generates counts as correct, for the
    baseline and for every point that generates the same; one whose ids never occur, as wrong."""
    import json
    s = json.loads((evalset / "set.json").read_text())
    niah = read_table(sweep, "niah")
    full_gen = {r["case"]: [int(t) for t in r["generated"].split()] for r in niah if r["point"] == "full"}
    c0, c1 = s["niah"]["cases"][0], s["niah"]["cases"][1]
    c0["answer_ids"] = full_gen[c0["id"]][2:5]
    c1["answer_ids"] = [300, 300, 300]  # the EOS piece three times: never generated (decoding stops at it)
    s["niah"]["cases"] = [c0, c1]
    s["ppl"]["documents"] = []
    (tmp_path / "set.json").write_text(json.dumps(s))
    out = tmp_path / "out"
    p = run("sweep", "--gguf", evalset / "tiny_tok.gguf", "--eval-set", tmp_path / "set.json", "--out", out,
            "--methods", "oracle", "--sparsity", "0", "--no-native", "--block", "16", "-q")
    assert p.returncode == 0, p.stderr
    pts = {r["point"]: r for r in read_table(out, "points")}
    assert pts["full"]["niah_correct"] == "1" and pts["oracle/fixed/s0"]["niah_correct"] == "1"
    assert fnum(pts["oracle/fixed/s0"]["niah_kept"]) == 1.0
    assert "fails NIAH case " + c1["id"] in (out / "report.md").read_text()


def test_sweep_layer0_masks_are_the_analysis_selections(evalset, tmp_path):
    """Layer 0 sees the same Q/K in the model and in a capture store of the same prompt, so each
    point's layer-0 density equals proxyattn-analyze's for the selection of the same id."""
    import json
    import capture_qk as cq
    s = json.loads((evalset / "set.json").read_text())
    case = s["niah"]["cases"][1]
    s["niah"]["cases"], s["ppl"]["documents"] = [case], []
    (tmp_path / "set.json").write_text(json.dumps(s))
    out = tmp_path / "sweep"
    args = ["--methods", "proxy,pooled,xattn,flexprefill,oracle", "--sparsity", "0.5,0.8", "--gamma", "0.9,0.95",
            "--groups", "1,3", "--block", "16", "-q"]
    p = run("sweep", "--gguf", evalset / "tiny_tok.gguf", "--eval-set", tmp_path / "set.json", "--out", out, *args)
    assert p.returncode == 0, p.stderr
    model = cq.GGUFModel(evalset / "tiny_tok.gguf")
    meta = dict(model="tiny", source=str(evalset / "tiny_tok.gguf"), num_layers=model.cfg.n_layers,
                num_q_heads=model.cfg.n_head, num_kv_heads=model.cfg.n_head_kv,
                head_dim=model.cfg.head_dim, rope_theta=model.cfg.rope_theta)
    (tmp_path / "p.txt").write_text("unused")
    cargs = cq.build_parser().parse_args(["--gguf", str(evalset / "tiny_tok.gguf"), "--prompt-file",
                                          str(tmp_path / "p.txt"), "--out", str(tmp_path / "qk.h5"),
                                          "--dtype", "float32", "--layers", "0", "--quiet"])
    ids = case["tokens"]
    cq._write_store(cargs, cq.Prompt(ids=ids, text="niah"), meta, [0],
                    lambda on_layer: cq.forward(model, ids, [0], on_layer))
    analyze = BUILD_DIR / "apps" / "proxyattn-analyze"
    a = subprocess.run([str(analyze), "recall", str(tmp_path / "qk.h5"), "--out", str(tmp_path / "an"), *args],
                       capture_output=True, text=True, timeout=600)
    assert a.returncode == 0, a.stderr
    an = {r["selection"]: fnum(r["density"]) for r in read_table(tmp_path / "an", "selection_summary")
          if r["layer"] == "0"}
    ev = {r["point"]: fnum(r["block_density_mean"]) for r in read_table(out, "layers") if r["layer"] == "0"}
    shared = [k for k in ev if k in an]
    assert len(shared) >= 15, (sorted(ev), sorted(an))
    for k in shared:
        # float32 Q/K of the runtime vs the numpy spec: a near-tie may flip one block
        assert ev[k] == pytest.approx(an[k], abs=2e-3), k


def sweep_fails(evalset, tmp_path, *args, gguf=None, eval_set=None):
    out = tmp_path / "out"
    p = run("sweep", "--gguf", gguf or evalset / "tiny_tok.gguf", "--eval-set", eval_set or evalset / "set.json",
            "--out", out, "-q", *args)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0, p.stdout
    assert len(lines) == 1 and lines[0].startswith("proxyattn-eval: error: "), p.stderr
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*")), "partial output left behind"
    return lines[0]


@pytest.mark.parametrize("case", ["other_model", "renamed", "vocab", "token_range", "overlength", "not_json",
                                  "schema", "missing_field"])
def test_sweep_bad_eval_set(evalset, tmp_path, case):
    import json
    import shutil
    s = json.loads((evalset / "set.json").read_text())
    gguf = None
    want = "made for another model"
    if case == "other_model":
        gguf = evalset / "tiny.gguf"  # the same weights without a tokenizer
        import model_fixtures as mf
        mf.write_tiny(evalset, np.random.default_rng(7))
        want = "file 'tiny_tok.gguf'"
    elif case == "renamed":
        gguf = tmp_path / "other.gguf"
        shutil.copy(evalset / "tiny_tok.gguf", gguf)
    elif case == "vocab":
        s["model"]["vocab_size"] = 49152
    elif case == "token_range":
        s["ppl"]["documents"][1]["tokens"][7] = 301
        want = "doc1-L448.tokens[7]: token id 301 outside the vocabulary"
    elif case == "overlength":
        c = s["niah"]["cases"][0]
        c["tokens"] = (c["tokens"] * 3)[:1020]
        c["length"] = 1020
        want = "exceed the context length 1024"
    elif case == "schema":
        s["schema"] = "something-else"
        want = "schema"
    elif case == "missing_field":
        del s["niah"]["cases"][2]["answer_ids"]
        want = "niah.cases[2].answer_ids: missing"
    path = tmp_path / "set.json"
    path.write_text("{not json" if case == "not_json" else json.dumps(s))
    line = sweep_fails(evalset, tmp_path, "--methods", "xattn", "--sparsity", "0.5", "--block", "16", gguf=gguf,
                       eval_set=path)
    assert (want if case != "not_json" else "not a JSON document") in line, line


@pytest.mark.parametrize("args,flag", [
    (["--methods", "nope"], "--methods"),
    (["--methods", "proxy", "--groups", "4"], "--groups 4"),
    (["--methods", "xattn", "--sparsity", "1"], "--sparsity"),
    (["--methods", "xattn", "--gamma", "0"], "--gamma"),
    (["--methods", "xattn", "--xattn-stride", "3"], "stride"),
    (["--methods", "xattn", "--block", "24"], "block"),
    (["--methods", "xattn", "--dense-layers", "3"], "--dense-layers"),
    (["--methods", ""], "--methods"),
    (["--methods", "xattn", "--backend", "tpu"], "--backend"),
])
def test_sweep_refused_flags(evalset, tmp_path, args, flag):
    line = sweep_fails(evalset, tmp_path, *args)
    assert flag in line, line


def test_sweep_backend_cuda_without_cuda(evalset, tmp_path):
    v = run("--version")
    if "CPU only" not in v.stdout:
        pytest.skip("a CUDA build: the cuda back end may run here")
    line = sweep_fails(evalset, tmp_path, "--methods", "xattn", "--backend", "cuda")
    assert "cuda" in line, line


def test_sweep_out_is_a_file(evalset, tmp_path):
    (tmp_path / "out").write_text("mine")
    p = run("sweep", "--gguf", evalset / "tiny_tok.gguf", "--eval-set", evalset / "set.json", "--out",
            tmp_path / "out", "--methods", "xattn", "-q")
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and "out" in lines[0], p.stderr
    assert (tmp_path / "out").read_text() == "mine"


def test_plot_eval_figure(sweep, tmp_path):
    plot = SOURCE_DIR / "scripts" / "plot_figures.py"
    p = subprocess.run([sys.executable, str(plot), str(sweep), "--out", str(tmp_path / "fig")], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "fig" / "fig_eval_accuracy.png").stat().st_size > 10000
    assert (tmp_path / "fig" / "fig_eval_accuracy.pdf").is_file()
