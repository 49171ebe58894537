"""proxyattn-bench in CPU mode (no GPU needed): output schema, masks and the check case it exports
(read back by scripts/bench_peers.py's torch-free half), skips, and one clear error on bad input."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SRC = Path(os.environ.get("PROXYATTN_SOURCE_DIR", Path(__file__).resolve().parents[2]))
BUILD = Path(os.environ.get("PROXYATTN_BUILD_DIR", SRC / "build" / "cpu"))
BENCH = BUILD / "apps" / "proxyattn-bench"
sys.path.insert(0, str(SRC / "scripts"))
import bench_peers  # noqa: E402

pytestmark = pytest.mark.skipif(not BENCH.exists(), reason=f"{BENCH} not built")

TINY = json.dumps({"name": "tiny", "num_layers": 1, "num_q_heads": 6, "num_kv_heads": 2, "head_dim": 64})
EXPECTED_COLUMNS = bench_peers.COLUMNS


def run(*args, check=False):
    p = subprocess.run([str(BENCH), *map(str, args)], capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"rc={p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def write_sweep(tmp_path, **fields) -> Path:
    base = {"name": "t", "model": json.loads(TINY), "device": "cpu", "lengths": [300], "methods": ["full"],
            "block": 64, "repetitions": 1, "warmup": 0, "seed": 5}
    base.update(fields)
    p = tmp_path / "sweep.json"
    p.write_text(json.dumps(base))
    return p


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One CPU run over every method family; shared by the schema tests."""
    d = tmp_path_factory.mktemp("smoke")
    sweep = d / "sweep.json"
    sweep.write_text(json.dumps({
        "name": "smoke", "model": json.loads(TINY), "device": "cpu", "lengths": [333, 1000],
        "methods": ["full", "sparse", "estimate", "proxyattn"], "densities": [0.5, 0.2],
        "estimators": ["proxy", "xattn", "pooled", "oracle"], "gammas": [0.9], "proxyattn_densities": [0.3],
        "block": 64, "repetitions": 2, "warmup": 1, "seed": 7}))
    out = d / "out"
    p = run("--sweep", sweep, "--out", out, "--export-masks", d / "masks", "--export-check", d / "check",
            "--check-len", 700, "--quiet", check=True)
    return {"dir": d, "out": out, "stdout": p.stdout, "stderr": p.stderr}


def test_outputs_and_schema(smoke):
    out = smoke["out"]
    for f in ("bench.json", "bench.csv", "bench.md"):
        assert (out / f).is_file(), f
    assert not list(out.glob("*.tmp-*")), "temporary files left behind"
    rows = read_csv(out / "bench.csv")
    assert list(rows[0].keys()) == EXPECTED_COLUMNS
    j = json.loads((out / "bench.json").read_text())
    assert j["schema_version"] == 1 and j["columns"] == EXPECTED_COLUMNS
    for key in ("git_sha", "date", "device", "device_name", "command", "timing", "model"):
        assert j["context"].get(key) not in (None, ""), key
    # 2 lengths x (full + 2 sparse + 4 estimators + 2 proxyattn)
    assert len(rows) == 2 * 9
    assert {r["method"] for r in rows} == {
        "full", "sparse@0.5", "sparse@0.2", "estimate:proxy[g=1,s=1]", "estimate:xattn", "estimate:pooled",
        "estimate:oracle", "proxyattn@gamma=0.9", "proxyattn@density=0.3"}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["source"] == "proxyattn-bench" and r["device"] == "cpu" and r["dtype"] == "bf16"
        assert int(r["reps"]) == 2
        tmin, tmed, tmax = float(r["total_ms_min"]), float(r["total_ms"]), float(r["total_ms_max"])
        assert 0 < tmin <= tmed <= tmax
        assert 0 < float(r["density"]) <= 1
        if r["family"] == "full":
            assert float(r["speedup_vs_full"]) == pytest.approx(1.0)
            # Same FLOPs (element density 1) over kernel time vs total time.
            assert float(r["tflops_done"]) * float(r["kernel_ms"]) == pytest.approx(
                float(r["tflops_effective"]) * float(r["total_ms"]), rel=1e-6)
        if r["family"] in ("estimate", "proxyattn"):
            assert float(r["estimation_ms"]) > 0
        if r["family"] == "estimate":
            assert r["kernel_ms"] == "" and r["tflops_effective"] == ""
        else:
            assert float(r["kernel_ms"]) > 0 and float(r["tflops_effective"]) > 0
        assert float(r["pct_of_full"]) == pytest.approx(100.0 / float(r["speedup_vs_full"]), rel=1e-6)
    # The Markdown table is printed and written.
    assert "| full | 333 | bf16 |" in (out / "bench.md").read_text()
    assert "| full | 1000 | bf16 |" in smoke["stdout"]


def test_random_masks_hit_their_density(smoke):
    rows = read_csv(smoke["out"] / "bench.csv")
    for r in rows:
        if r["family"] != "sparse":
            continue
        nb = -(-int(r["n"]) // 64)
        total = nb * (nb + 1) / 2
        target = float(r["density_target"])
        want = max(math.floor(target * total + 0.5), nb) / total  # round half up; at least the diagonal
        assert float(r["density"]) == pytest.approx(want, rel=1e-7), r


def test_exported_masks_read_back(smoke):
    mdir = smoke["dir"] / "masks"
    man = json.loads((mdir / "manifest.json").read_text())
    methods = {e["method"] for e in man["masks"]}
    assert {"sparse@0.5", "sparse@0.2", "proxyattn@gamma=0.9", "proxyattn@density=0.3"} <= methods
    rows = {(r["method"], int(r["n"])): r for r in read_csv(smoke["out"] / "bench.csv")}
    for e in man["masks"]:
        m = bench_peers.read_mask(str(mdir / e["file"]))
        assert m["heads"] == 6 and m["n"] == e["n"] and m["block"] == 64
        assert len(m["indices"]) == e["nnz"]
        bm = bench_peers.mask_bitmap(m)
        assert bm[:, np.arange(m["nb"]), np.arange(m["nb"])].all(), "diagonal missing"
        assert not np.triu(bm, 1).any(), "block above the diagonal"
        # The Python element density equals the C++ one (independent implementations).
        assert bench_peers.element_density(m) == pytest.approx(e["element_density"], rel=1e-12)
        assert float(rows[(e["method"], e["n"])]["density"]) == pytest.approx(e["density"], rel=1e-7)


def test_check_case_matches_reference_and_detects_corruption(smoke, tmp_path):
    chk = bench_peers.load_check(str(smoke["dir"] / "check"))
    assert chk["info"]["n"] == 700 and chk["o"].shape == (6, 700, 64)
    res = bench_peers.check_outputs(chk, {})
    assert res["passed"], res
    # A wrong output (one head's rows shifted) must fail the same check.
    bad = dict(chk)
    bad["o"] = chk["o"].copy()
    bad["o"][2] = np.roll(bad["o"][2], 1, axis=0)
    assert not bench_peers.check_outputs(bad, {})["passed"]
    # An "other" output equal to ours passes and is compared both ways.
    res2 = bench_peers.check_outputs(chk, {"copy": chk["o"].copy()})
    assert res2["passed"] and "copy_vs_ours" in res2["comparisons"]


def test_mask_file_roundtrip(smoke, tmp_path):
    src = smoke["dir"] / "masks" / "mask_sparse_0.2_N1000.pxm"
    out = tmp_path / "o"
    p = run("--device", "cpu", "--sweep", write_sweep(tmp_path, lengths=[1000], methods=["full"]),
            "--mask-file", src, "--out", out, "--quiet", check=True)
    rows = {r["method"]: r for r in read_csv(out / "bench.csv")}
    assert rows["sparse@file"]["status"] == "ok"
    man = json.loads((smoke["dir"] / "masks" / "manifest.json").read_text())
    e = next(e for e in man["masks"] if e["file"] == src.name)
    assert float(rows["sparse@file"]["density"]) == pytest.approx(e["density"], rel=1e-7)
    # A truncated file is one clear error naming it.
    bad = tmp_path / "bad.pxm"
    bad.write_bytes(src.read_bytes()[:-4])
    p = run("--device", "cpu", "--sweep", write_sweep(tmp_path, lengths=[1000]), "--mask-file", bad)
    assert p.returncode != 0 and "bad.pxm" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_lengths_past_cpu_limit_are_skipped_with_reason(tmp_path):
    out = tmp_path / "o"
    p = run("--sweep", write_sweep(tmp_path, lengths=[200, "1M"], methods=["full", "sparse@0.5"]),
            "--out", out, "--quiet", check=True)
    rows = read_csv(out / "bench.csv")
    big = [r for r in rows if r["n"] == str(1 << 20)]
    assert len(big) == 2 and all(r["status"] == "skipped" and "cpu_max_len" in r["reason"] for r in big)
    assert all(r["status"] == "ok" for r in rows if r["n"] == "200")
    assert "Not run:" in p.stdout


def test_cli_flags_override_the_sweep(tmp_path):
    out = tmp_path / "o"
    run("--sweep", write_sweep(tmp_path), "--lengths", "257", "--methods", "full,sparse@0.25", "--dtypes", "fp16",
        "--reps", 3, "--out", out, "--quiet", check=True)
    rows = read_csv(out / "bench.csv")
    assert [(r["method"], r["n"], r["dtype"], r["reps"]) for r in rows] == [
        ("full", "257", "fp16", "3"), ("sparse@0.25", "257", "fp16", "3")]


@pytest.mark.parametrize("fields,flags,message", [
    ({"methods": ["full", "dense"]}, [], "unknown method 'dense'"),
    ({"methods": ["estimate:magic"]}, [], "unknown estimator 'magic'"),
    ({"lengths": []}, [], "'lengths' is empty"),
    ({"methods": []}, [], "'methods' is empty"),
    ({"methods": ["sparse@0"]}, [], "outside (0, 1]"),
    ({"methods": ["sparse"], "densities": [0.5, 1.5]}, [], "outside (0, 1]"),
    ({"methods": ["proxyattn@gamma=-1"]}, [], "outside (0, 1]"),
    ({"lenghts": [1024]}, [], "unknown key 'lenghts'"),
    ({"lengths": ["4Q"]}, [], "length '4Q'"),
    ({"dtypes": ["f32"]}, [], "bf16 or fp16"),
    ({"block": 96}, [], "block 96"),
    ({"proxy": {"groups": 4}}, [], "does not divide"),
    ({}, ["--methods", "sparse@2"], "outside (0, 1]"),
    ({}, ["--lengths", "x"], "length 'x'"),
    ({}, ["--no-such-flag"], "no-such-flag"),
])
def test_bad_input_is_one_clear_error(tmp_path, fields, flags, message):
    out = tmp_path / "o"
    out.mkdir()
    p = run("--sweep", write_sweep(tmp_path, **fields), "--out", out, *flags)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("proxyattn-bench: error:"), p.stderr
    assert message in lines[0]
    assert not list(out.iterdir()), "no partial output on bad input"


def test_malformed_and_missing_sweep_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"lengths": [1024], "methods": ["full"],')
    for path, msg in ((bad, "invalid JSON"), (tmp_path / "none.json", "no such file")):
        p = run("--sweep", path)
        assert p.returncode != 0 and msg in p.stderr and str(path) in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    p = run("--sweep", arr)
    assert p.returncode != 0 and "JSON object" in p.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU may be present")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    p = run("--sweep", write_sweep(tmp_path), "--device", "cuda")
    assert p.returncode != 0 and "no CUDA device" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_shipped_sweeps_parse(tmp_path):
    """Every configs/sweeps file parses (run on CPU with all lengths past the limit: only skips)."""
    files = sorted((SRC / "configs" / "sweeps").glob("*.json"))
    assert files
    for f in files:
        sw = json.loads(f.read_text())
        # The peer script accepts the same file (a prefill sweep: its prefill plan).
        plan = bench_peers.plan(sw, str(f), type("A", (), {"lengths": None, "methods": None, "reps": None,
                                                           "warmup": None})())
        assert plan["lengths"] and plan["methods"]
        if sw.get("kind") == "prefill":
            continue  # proxyattn-bench prefill's (test_prefill_sweep_parses)
        out = tmp_path / f.stem
        p = run("--sweep", f, "--device", "cpu", "--cpu-max-len", 1, "--out", out, "--quiet")
        assert p.returncode == 0, (f, p.stderr)
        rows = read_csv(out / "bench.csv")
        assert rows and all(r["status"] == "skipped" for r in rows)


def test_prefill_sweep_parses_and_needs_a_gpu(tmp_path):
    """The shipped prefill sweep parses (its errors come before the device check); the plain
    bench points at the prefill mode; bad prefill input is one line, no report."""
    f = SRC / "configs" / "sweeps" / "prefill.json"
    p = run("--sweep", f, "--device", "cpu")
    assert p.returncode != 0 and "proxyattn-bench prefill" in p.stderr
    if shutil.which("nvidia-smi") is None:
        out = tmp_path / "prefill_out"
        p = run("prefill", "--sweep", f, "--out", out, "--quiet")
        assert p.returncode != 0 and "CUDA device" in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and not out.exists()
    for args, needle in [(["--methods", "full,proxyattn@density=2"], "(0, 1]"),
                         (["--methods", "flexprefill"], "no GPU kernel"),
                         (["--methods", "magic"], "unknown method"),
                         (["--models", str(SRC / "configs" / "models" / "nope.json")], "nope.json"),
                         (["--lengths", "1"], "too short"),
                         (["--reps", "0"], "--reps")]:
        p = run("prefill", "--sweep", f, *args, "--quiet")
        assert p.returncode != 0 and needle in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    bad = tmp_path / "bad_prefill.json"
    bad.write_text(json.dumps({"kind": "prefill", "models": ["x"], "lengths": ["8K"], "methods": ["full"], "colour": 1}))
    p = run("prefill", "--sweep", bad)
    assert p.returncode != 0 and "'colour'" in p.stderr


def test_peer_plan_rejects_unknown_methods():
    args = type("A", (), {"lengths": ["4K"], "methods": ["sdpa_magic"], "reps": None, "warmup": None})()
    with pytest.raises(bench_peers.PeerError, match="unknown peer method"):
        bench_peers.plan({}, "", args)
    with pytest.raises(bench_peers.PeerError):
        bench_peers.parse_length("12x")
    assert bench_peers.parse_length("128K") == 131072


def test_figures_and_p_table(smoke, tmp_path):
    import bench_figures
    pytest.importorskip("matplotlib")
    paths = bench_figures.bench_figures([smoke["out"]], tmp_path / "fig")
    names = {Path(p).name for p in paths}
    assert {"fig4_speedup.png", "fig5b_estimation.png", "p_targets.md"} <= names
    table = (tmp_path / "fig" / "p_targets.md").read_text()
    assert "| P1 |" in table and "| P4 |" in table and "proxyattn-bench" in table
