"""proxyattn-bench under MPI: `mpirun -np 2` splits the cases (length x dtype x method) across
ranks by cost and rank 0 writes one report whose rows equal the single-process ones in every
non-timing field and order, with the exported masks and check case written once and identical;
a failing rank fails the whole run with its message and no report.

Skipped (with the reason) where mpirun is missing, cannot start two ranks here, or the tool was
built without MPI.
"""
import csv
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

SOURCE_DIR = Path(os.environ.get("PROXYATTN_SOURCE_DIR", Path(__file__).resolve().parents[2]))
BUILD_DIR = Path(os.environ.get("PROXYATTN_BUILD_DIR", SOURCE_DIR / "build" / "cpu"))
BENCH = BUILD_DIR / "apps" / "proxyattn-bench"
SMOKE = SOURCE_DIR / "configs" / "sweeps" / "cpu_smoke.json"

# Open MPI refuses root unless told; CI runs as root in a container with no network. One OpenMP
# thread per process: two ranks share the 2-core CI machine.
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
           OMPI_MCA_btl="self,vader", OMPI_MCA_btl_vader_single_copy_mechanism="none", OMP_NUM_THREADS="1")

TIMING = {"estimation_ms", "kernel_ms", "total_ms", "total_ms_min", "total_ms_max", "tflops_done",
          "tflops_effective", "speedup_vs_full", "pct_of_full"}


def single(*args):
    return subprocess.run([str(BENCH), *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300)


def mpirun(n, *args):
    return subprocess.run(["mpirun", "-np", str(n), "--oversubscribe", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=300)


@pytest.fixture(scope="module")
def mpi_ok():
    if not BENCH.exists():
        pytest.skip(f"{BENCH} not built")
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed")
    p = mpirun(2, "true")
    if p.returncode != 0:
        pytest.skip(f"mpirun cannot start 2 ranks here: {p.stderr.strip()[:200]}")


def bench_mpi(n, *args):
    p = mpirun(n, BENCH, *args)
    if "no MPI support" in p.stderr:
        pytest.skip("proxyattn-bench built without MPI")
    return p


def untimed(row):
    r = {k: v for k, v in row.items() if k not in TIMING}
    extra = dict(r.get("extra", {}))
    extra.pop("stages_median", None)
    r["extra"] = extra
    return r


def csv_untimed(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def files_of(d: Path):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def write_pxm(path, heads, block, n):
    """A valid mask file: the diagonal block of every query block, per head."""
    nb = (n + block - 1) // block
    indptr = list(range(heads * nb + 1))
    idx = [i for _ in range(heads) for i in range(nb)]
    path.write_bytes(b"PXMASK01" + struct.pack("<iiqiiq", heads, block, n, nb, 0, len(idx)) +
                     struct.pack(f"<{len(indptr)}i", *indptr) + struct.pack(f"<{len(idx)}i", *idx))
    return path


def test_two_ranks_equal_single_process(tmp_path, mpi_ok):
    common = ["--sweep", SMOKE, "--lengths", "300,517", "--cpu-threads", "1", "--export-check", None,
              "--check-len", "200", "--export-masks", None, "--out", None]

    def args(tag):
        a = list(common)
        a[a.index("--export-check") + 1] = tmp_path / tag / "check"
        a[a.index("--export-masks") + 1] = tmp_path / tag / "masks"
        a[a.index("--out") + 1] = tmp_path / tag / "out"
        return a

    one = single(*args("one"))
    assert one.returncode == 0, one.stderr
    two = bench_mpi(2, *args("two"))
    assert two.returncode == 0, two.stderr
    a = json.loads((tmp_path / "one" / "out" / "bench.json").read_text())
    b = json.loads((tmp_path / "two" / "out" / "bench.json").read_text())
    # Same rows, same order, every non-timing field identical (densities, skips, reasons, extra).
    assert len(a["rows"]) == len(b["rows"]) == 22
    assert [untimed(r) for r in a["rows"]] == [untimed(r) for r in b["rows"]]
    assert all(r["status"] == "ok" for r in b["rows"])
    assert a["config"] == b["config"]
    assert csv_untimed(tmp_path / "one" / "out" / "bench.csv") == csv_untimed(tmp_path / "two" / "out" / "bench.csv")
    # Who ran what.
    d = b["context"]["distributed"]
    assert d["ranks"] == 2 and d["mpi"] is True
    assert [r["rank"] for r in d["per_rank"]] == [0, 1]
    assert all(r["cases"] > 0 and r["device"] == "cpu" for r in d["per_rank"])
    assert sum(r["cases"] for r in d["per_rank"]) == 22
    assert sorted(set(d["case_rank"])) == [0, 1] and len(d["case_rank"]) == 22
    assert "longest-processing-time" in d["assignment"]
    assert a["context"]["distributed"]["ranks"] == 1
    assert "MPI: 2 ranks" in (tmp_path / "two" / "out" / "bench.md").read_text()
    # Masks and the check case: written once, byte for byte the single process's.
    ma, mb = files_of(tmp_path / "one" / "masks"), files_of(tmp_path / "two" / "masks")
    assert "manifest.json" in ma and len(ma) > 1
    assert ma == mb
    ca, cb = files_of(tmp_path / "one" / "check"), files_of(tmp_path / "two" / "check")
    assert ca and ca == cb
    # Rank 0 alone prints the table; progress lines carry their rank.
    assert two.stdout.count("# proxyattn-bench") == 1
    progress = [l for l in two.stderr.splitlines() if "manual_time" in l]
    assert {l.split("]")[0] + "]" for l in progress} == {"[rank 0]", "[rank 1]"}


def test_split_by_cost_not_count(tmp_path, mpi_ok):
    # Costs ~ N^2: the 800-token case outweighs the other three together, so rank 0 runs it alone
    # (longest first) and rank 1 the three short ones.
    p = bench_mpi(2, "--sweep", SMOKE, "--lengths", "100,200,400,800", "--methods", "full", "--reps", "1",
                  "--cpu-threads", "1", "--quiet", "--out", tmp_path / "out")
    assert p.returncode == 0, p.stderr
    d = json.loads((tmp_path / "out" / "bench.json").read_text())["context"]["distributed"]
    assert d["case_rank"] == [1, 1, 1, 0]
    assert [r["cases"] for r in d["per_rank"]] == [1, 3]
    assert d["per_rank"][0]["cost_share"] > 0.7


def test_one_rank_is_the_single_process(tmp_path, mpi_ok):
    args = ["--sweep", SMOKE, "--lengths", "300", "--methods", "full,sparse@0.2,proxyattn@gamma=0.9", "--quiet"]
    one = single(*args, "--out", tmp_path / "one")
    mp1 = bench_mpi(1, *args, "--out", tmp_path / "mp1")
    assert one.returncode == 0 and mp1.returncode == 0, mp1.stderr
    a = json.loads((tmp_path / "one" / "bench.json").read_text())
    b = json.loads((tmp_path / "mp1" / "bench.json").read_text())
    assert [untimed(r) for r in a["rows"]] == [untimed(r) for r in b["rows"]]
    assert b["context"]["distributed"]["ranks"] == 1
    assert "MPI:" not in (tmp_path / "mp1" / "bench.md").read_text()


def test_failing_rank_fails_the_run(tmp_path, mpi_ok):
    # A valid mask file for 1 head where the model has 6: only the rank running that case fails.
    # Costs: full N=517 -> rank 0; full N=300 -> rank 1; the mask case (density 1/3) -> rank 1.
    bad = write_pxm(tmp_path / "one_head.pxm", heads=1, block=64, n=300)
    out, masks = tmp_path / "out", tmp_path / "masks"
    p = bench_mpi(2, "--sweep", SMOKE, "--lengths", "300,517", "--methods", "full", "--mask-file", bad,
                  "--cpu-threads", "1", "--out", out, "--export-masks", masks)
    assert p.returncode != 0
    lines = [l for l in p.stderr.splitlines() if "proxyattn-bench: error:" in l]
    assert len(lines) == 1, p.stderr
    assert "rank 1: sparse@file N=300" in lines[0] and "one_head.pxm" in lines[0] and "1 heads" in lines[0], lines[0]
    assert not any((out / f).exists() for f in ("bench.json", "bench.csv", "bench.md"))
    assert not masks.exists() or not any(masks.iterdir())
    assert "# proxyattn-bench" not in p.stdout
    # One process keeps its behaviour: the report holds the failed case as an error row, exit 1.
    q = single("--sweep", SMOKE, "--lengths", "300,517", "--methods", "full", "--mask-file", bad, "--quiet",
               "--out", tmp_path / "one")
    assert q.returncode == 1
    rows = json.loads((tmp_path / "one" / "bench.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
