"""The CLI contract of proxyattn-analyze.

(a) every subcommand writes report.json (schema-versioned), one CSV per table (same rows as the
    JSON tables) and report.md, into --out;
(b) several stores are aggregated with per-store rows kept;
(c) bad input: exactly one stderr line "proxyattn-analyze: error: ...", non-zero exit, and no
    report written.

Binaries come from $PROXYATTN_BUILD_DIR/apps/; stores are made with `proxyattn-dump synth`.
"""
import csv
import json
import os
import subprocess
from pathlib import Path

import pytest

SOURCE_DIR = Path(os.environ.get("PROXYATTN_SOURCE_DIR", Path(__file__).resolve().parents[2]))
BUILD_DIR = Path(os.environ.get("PROXYATTN_BUILD_DIR", SOURCE_DIR / "build" / "cpu"))
ANALYZE = BUILD_DIR / "apps" / "proxyattn-analyze"
DUMP = BUILD_DIR / "apps" / "proxyattn-dump"
SMOLLM = SOURCE_DIR / "configs" / "models" / "smollm2-135m.json"

pytestmark = pytest.mark.skipif(not (ANALYZE.exists() and DUMP.exists()), reason="proxyattn-analyze/-dump not built")

FAST = ["--block", "64", "--sparsity", "0.5,0.9", "--gamma", "0.9,0.95"]


def analyze(*args, check=True):
    p = subprocess.run([str(ANALYZE), *map(str, args)], capture_output=True, text=True, timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(f"proxyattn-analyze {' '.join(map(str, args))} failed ({p.returncode}): {p.stderr}")
    return p


def synth(path, *extra, length=300, layers=2, seed=1):
    subprocess.run([str(DUMP), "synth", str(path), "--model", str(SMOLLM), "--len", str(length), "--layers",
                    str(layers), "--seed", str(seed), "--quiet", *extra], check=True, capture_output=True, timeout=600)
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    return {
        "a": synth(d / "alpha.h5", seed=1),
        "b": synth(d / "beta.h5", seed=2),
        "nov": synth(d / "nov.h5", "--no-v", seed=3),
    }


@pytest.fixture(scope="module")
def full_report(stores, tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "all"
    analyze("all", stores["a"], "--out", out, "--quiet", *FAST)
    return out


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


# ----- (a) outputs ---------------------------------------------------------------------------


def test_all_writes_json_csv_and_markdown(full_report):
    rep = json.loads((full_report / "report.json").read_text())
    assert rep["schema_version"] == 1
    assert rep["tool"] == "proxyattn-analyze" and rep["command"] == "all"
    for key in ("git_sha", "version", "library_versions", "device", "config", "stores", "timing", "created_utc"):
        assert key in rep, key
    st = rep["stores"][0]
    assert (st["model"], st["seq_len"], st["num_q_heads"], st["num_kv_heads"], st["head_dim"]) == ("smollm2-135m", 300, 9, 3, 64)
    assert st["layers_analyzed"] == [0, 1] and st["proxy_groups"] == [1, 3, 9] and st["has_v"] is True
    assert rep["config"]["block"] == 64 and rep["config"]["sparsity"] == [0.5, 0.9]
    expected = {"similarity_pairs", "similarity_layers", "head_budget", "head_budget_layers", "proxy_fidelity",
                "selections", "selection_summary", "budget_accuracy", "recall_vs_sparsity", "budget_summary",
                "budget_heads", "fidelity_summary"}
    assert expected <= set(rep["tables"])
    # Each table is a CSV with the same header and the same number of rows.
    for name, table in rep["tables"].items():
        rows = read_csv(full_report / f"{name}.csv")
        assert rows[0] == table["columns"], name
        assert len(rows) - 1 == len(table["rows"]), name
    md = (full_report / "report.md").read_text()
    for section in ("## Stores", "## Head similarity per layer", "## Recall vs sparsity", "## Budgets",
                    "### Budget error per head"):
        assert section in md, section
    # No temporaries left.
    assert not [p for p in full_report.iterdir() if ".tmp" in p.name]


def test_numbers_hold_their_invariants(full_report):
    rep = json.loads((full_report / "report.json").read_text())
    t = rep["tables"]["selections"]
    c = {n: i for i, n in enumerate(t["columns"])}
    seen_error = False
    for r in t["rows"]:
        assert 0.0 < r[c["density"]] <= 1.0
        assert -1e-6 <= r[c["mass_recall"]] <= 1.0 + 1e-6
        if r[c["method"]] == "oracle" and r[c["budget"]] == "native":
            assert r[c["block_recall"]] == pytest.approx(1.0)
            assert r[c["mass_recall"]] >= r[c["gamma"]] - 1e-6
        if r[c["output_error"]] is not None:
            seen_error = True
            assert r[c["output_error"]] >= 0.0
    assert seen_error
    p = rep["tables"]["similarity_pairs"]
    pc = {n: i for i, n in enumerate(p["columns"])}
    for r in p["rows"]:
        if r[pc["head_a"]] == r[pc["head_b"]]:
            assert r[pc["topk_overlap_5pct"]] == 1.0 and r[pc["spearman"]] == pytest.approx(1.0)


@pytest.mark.parametrize("cmd,present,absent", [
    ("similarity", {"similarity_pairs", "head_budget", "proxy_fidelity"}, {"selections", "budget_accuracy"}),
    ("recall", {"selections", "recall_vs_sparsity"}, {"similarity_pairs", "budget_accuracy"}),
    ("budget", {"budget_accuracy", "budget_summary", "selections"}, {"similarity_pairs"}),
])
def test_subcommands_write_their_tables(stores, tmp_path, cmd, present, absent):
    out = tmp_path / cmd
    analyze(cmd, stores["a"], "--out", out, "--quiet", "--layers", "1", *FAST)
    rep = json.loads((out / "report.json").read_text())
    assert rep["command"] == cmd
    assert present <= set(rep["tables"]), set(rep["tables"])
    assert not (absent & set(rep["tables"]))
    if cmd != "similarity":
        errs = [r for r in rep["tables"]["selections"]["rows"] if r[-1] is not None]
        assert not errs, "output error is only computed by error/all"


def test_error_subcommand_fills_output_error(stores, tmp_path):
    out = tmp_path / "err"
    analyze("error", stores["a"], "--out", out, "--quiet", "--layers", "0", "--methods", "oracle,pooled", *FAST)
    rows = read_csv(out / "selection_summary.csv")
    col = rows[0].index("output_error_mean")
    vals = [float(r[col]) for r in rows[1:]]
    assert vals and all(v >= 0 for v in vals)


def test_progress_on_stderr_unless_quiet(stores, tmp_path):
    p = analyze("similarity", stores["a"], "--out", tmp_path / "p", "--layers", "0", *FAST)
    assert "layer 0" in p.stderr
    assert "files in" in p.stdout
    q = analyze("similarity", stores["a"], "--out", tmp_path / "q", "--layers", "0", "--quiet", *FAST)
    assert q.stderr == "" and q.stdout == ""


# ----- (b) several stores ----------------------------------------------------------------------


def test_several_stores_keep_per_store_rows(stores, tmp_path):
    out = tmp_path / "two"
    analyze("recall", stores["a"], stores["b"], "--out", out, "--quiet", "--methods", "proxy,oracle", *FAST)
    rep = json.loads((out / "report.json").read_text())
    assert [s["label"] for s in rep["stores"]] == ["alpha", "beta"]
    rows = read_csv(out / "selections.csv")
    assert {r[0] for r in rows[1:]} == {"alpha", "beta"}
    agg = rep["tables"]["recall_vs_sparsity"]
    c = agg["columns"]
    assert all(r[c.index("stores")] == 2 and r[c.index("layers")] == 4 for r in agg["rows"])


def test_same_file_name_twice_gets_distinct_labels(stores, tmp_path):
    out = tmp_path / "dup"
    analyze("similarity", stores["a"], stores["a"], "--out", out, "--quiet", "--layers", "0", *FAST)
    rep = json.loads((out / "report.json").read_text())
    assert [s["label"] for s in rep["stores"]] == ["alpha", "alpha#2"]


# ----- (c) bad input -----------------------------------------------------------------------------


def expect_error(tmp_path, args, needle, code=None):
    out = tmp_path / "bad"
    p = analyze(*args, "--out", out, check=False)
    assert p.returncode != 0, p
    if code is not None:
        assert p.returncode == code
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("proxyattn-analyze: error: "), lines[0]
    assert needle in lines[0], lines[0]
    assert not (out / "report.json").exists()


@pytest.mark.parametrize("extra,needle", [
    (["--methods", "proxy,magic"], "--methods: unknown method 'magic'"),
    (["--gamma", "1.5"], "--gamma: 1.5 outside (0, 1]"),
    (["--gamma", "0"], "--gamma: 0 outside (0, 1]"),
    (["--sparsity", "1"], "--sparsity: 1 outside [0, 1)"),
    (["--sparsity", "0.5,-0.2"], "--sparsity: -0.2 outside [0, 1)"),
    (["--groups", "4"], "--groups: 4 does not divide the 9 query heads"),
    (["--layers", "0,5"], "--layers: layer 5 is not in"),
    (["--layers", "1-x"], "--layers"),
    (["--block", "100"], "--block: 100"),
    (["--device", "tpu"], "--device: unknown device 'tpu'"),
    (["--density-rule", "best"], "--density-rule: unknown rule 'best'"),
    (["--lanes", "3"], "--lanes: 3 outside [0, 2]"),
])
def test_bad_flags(stores, tmp_path, extra, needle):
    expect_error(tmp_path, ["recall", stores["a"], *extra], needle)


def test_two_lanes_give_the_same_report(tmp_path):
    # Two units in flight (each lane with half the threads) must not change a number: every table
    # of report.json and every CSV equal to one lane's. 3 layers on 4 threads run one after
    # another (not one unit per thread), so --lanes applies.
    store = synth(tmp_path / "three.h5", length=333, layers=3, seed=5)
    reps = {}
    for lanes in (1, 2):
        out = tmp_path / f"lanes{lanes}"
        analyze("all", store, "--lanes", lanes, "--threads", 4, "--out", out, "--quiet", *FAST)
        rep = json.loads((out / "report.json").read_text())
        assert rep["timing"]["lanes"] == lanes
        reps[lanes] = (rep, {f.name: f.read_text() for f in sorted(out.glob("*.csv"))})
    (r1, c1), (r2, c2) = reps[1], reps[2]
    for r in (r1, r2):
        for k in ("timing", "created_utc", "argv"):
            r.pop(k, None)
        r.get("config", {}).pop("argv", None)
    assert json.dumps(r1, sort_keys=True) == json.dumps(r2, sort_keys=True)
    assert c1 == c2 and len(c1) > 5


def test_huge_pages_for_the_host_arrays(stores, tmp_path):
    # Where the kernel backs only madvised memory with huge pages (THP "madvise") and glibc has
    # the hugetlb tunable (2.35+), the tool re-executes itself once with it (host_memory.hpp);
    # the report says what the run had. PROXYATTN_HUGEPAGES=0 and a user's own setting win.
    import platform
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        mode = text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        mode = ""
    lib, ver = platform.libc_ver()
    glibc_ok = lib == "glibc" and tuple(int(x) for x in ver.split(".")[:2]) >= (2, 35)
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "PROXYATTN_HUGEPAGES",
                                                             "PROXYATTN_HUGEPAGES_REEXEC")}

    def mode_of(env, name):
        out = tmp_path / name
        subprocess.run([str(ANALYZE), "recall", str(stores["a"]), "--out", str(out), "--quiet", *FAST], env=env,
                       check=True, capture_output=True, timeout=600)
        return json.loads((out / "report.json").read_text())["timing"]["host_huge_pages"]

    by_default = mode_of(base, "default")
    if mode == "madvise":
        assert by_default == ("glibc.malloc.hugetlb=1 (THP madvise)" if glibc_ok else
                              "off: THP madvise without glibc.malloc.hugetlb")
        assert mode_of({**base, "PROXYATTN_HUGEPAGES": "0"}, "optout") == "off: THP madvise without glibc.malloc.hugetlb"
        assert mode_of({**base, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "user") == \
            "off: THP madvise without glibc.malloc.hugetlb"
    elif mode == "always":
        assert by_default == "THP always"
    else:
        assert by_default.startswith("off: ")


def test_cuda_kernels_loaded_eagerly(stores, tmp_path):
    # The tools set CUDA_MODULE_LOADING=EAGER before any CUDA call (lazy loading hung the driver
    # with kernels launched from several threads: cuda_dispatch.hpp); a user's own value stands.
    base = {k: v for k, v in os.environ.items() if k != "CUDA_MODULE_LOADING"}

    def loading(env, name):
        out = tmp_path / name
        subprocess.run([str(ANALYZE), "recall", str(stores["a"]), "--out", str(out), "--quiet", *FAST], env=env,
                       check=True, capture_output=True, timeout=600)
        return json.loads((out / "report.json").read_text())["timing"]["cuda_module_loading"]

    assert loading(base, "default") == "EAGER"
    assert loading({**base, "CUDA_MODULE_LOADING": "LAZY"}, "user") == "LAZY"


def test_device_cuda(stores, tmp_path):
    # Without a CUDA build or a visible device: one clear error line and no report; with one,
    # the report records the GPU it ran on.
    has_gpu = Path("/dev/nvidia0").exists()
    if not has_gpu:
        expect_error(tmp_path, ["recall", stores["a"], "--device", "cuda", *FAST], "--device cuda: no CUDA device")
        return
    out = tmp_path / "cuda"
    p = analyze("recall", stores["a"], "--device", "cuda", "--out", out, "--quiet", *FAST, check=False)
    if p.returncode != 0:  # a CPU-only build on a GPU host still fails cleanly
        assert p.stderr.strip().startswith("proxyattn-analyze: error: --device cuda: "), p.stderr
        return
    rep = json.loads((out / "report.json").read_text())
    assert rep["device"]["kind"] == "cuda"
    assert rep["device"]["name"] and "no CUDA device" not in rep["device"]["name"]


def test_bad_stores(stores, tmp_path):
    expect_error(tmp_path, ["recall", tmp_path / "missing.h5"], "missing.h5: no such store file")
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    expect_error(tmp_path, ["recall", junk], "junk.h5")
    expect_error(tmp_path, ["error", stores["nov"]], "needs V")


def test_unwritable_out(stores, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    p = analyze("similarity", stores["a"], "--out", blocker / "sub", "--quiet", check=False)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("proxyattn-analyze: error: --out"), p.stderr


def test_usage_errors_exit_2(stores, tmp_path):
    p = analyze("recall", stores["a"], check=False)  # --out missing
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--out" in p.stderr
    p = analyze(check=False)  # no subcommand
    assert p.returncode == 2 and p.stderr.startswith("proxyattn-analyze: error: ")
    assert analyze("--help").returncode == 0
    assert "proxyattn-analyze" in analyze("--version").stdout


def test_sliding_window_layers_are_never_analysed_as_global(tmp_path):
    """Layers marked attention = "sliding" (Gemma-3's local layers) are skipped by default with a
    note; asking for one with --layers is one error line; a store of sliding layers only too."""
    import h5py
    s = synth(tmp_path / "mixed.h5", length=300, layers=3, seed=5)
    with h5py.File(s, "r+") as f:
        f["layers/01"].attrs["attention"] = "sliding"
        f["layers/01"].attrs["window"] = 64
    out = tmp_path / "rep"
    analyze("recall", s, "--out", out, "--quiet", *FAST)
    rep = json.loads((out / "report.json").read_text())
    assert rep["stores"][0]["layers_analyzed"] == [0, 2]
    assert any("sliding-window layers 1 (window 64) not analysed" in n for n in rep["notes"]), rep["notes"]
    p = analyze("recall", s, "--layers", "1", "--out", tmp_path / "bad", "--quiet", *FAST, check=False)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("proxyattn-analyze: error:") and "sliding-window" in lines[0], lines
    assert not (tmp_path / "bad").exists()
    only = synth(tmp_path / "local.h5", length=200, layers=1, seed=6)
    with h5py.File(only, "r+") as f:
        f["layers/00"].attrs["attention"] = "sliding"
        f["layers/00"].attrs["window"] = 64
    p = analyze("recall", only, "--out", tmp_path / "bad2", "--quiet", *FAST, check=False)
    assert p.returncode != 0 and "every layer is sliding-window" in p.stderr, p.stderr
