"""proxyattn-analyze under MPI: `mpirun -np 2` splits the (store, layer) units across ranks and
rank 0 writes a report equal, number for number, to the single-process one; a failing rank fails
the whole run with its message and no report.

Skipped (with the reason) where mpirun is missing, cannot start two ranks here, or the tool was
built without MPI.
"""
import json
import os
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

SOURCE_DIR = Path(os.environ.get("PROXYATTN_SOURCE_DIR", Path(__file__).resolve().parents[2]))
BUILD_DIR = Path(os.environ.get("PROXYATTN_BUILD_DIR", SOURCE_DIR / "build" / "cpu"))
ANALYZE = BUILD_DIR / "apps" / "proxyattn-analyze"
DUMP = BUILD_DIR / "apps" / "proxyattn-dump"
SMOLLM = SOURCE_DIR / "configs" / "models" / "smollm2-135m.json"
FAST = ["--block", "64", "--sparsity", "0.5,0.9", "--gamma", "0.9,0.95", "-q"]

# Open MPI refuses root unless told; CI runs as root in a container with no network.
MPI_ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_btl="self,vader", OMPI_MCA_btl_vader_single_copy_mechanism="none")


def mpirun(n, *args):
    return subprocess.run(["mpirun", "-np", str(n), "--oversubscribe", *map(str, args)], capture_output=True,
                          text=True, env=MPI_ENV, timeout=600)


@pytest.fixture(scope="module")
def mpi_ok():
    if not (ANALYZE.exists() and DUMP.exists()):
        pytest.skip("proxyattn-analyze/-dump not built")
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed")
    p = mpirun(2, "true")
    if p.returncode != 0:
        pytest.skip(f"mpirun cannot start 2 ranks here: {p.stderr.strip()[:200]}")


def synth(path, layers):
    subprocess.run([str(DUMP), "synth", str(path), "--model", str(SMOLLM), "--len", "389", "--layers", str(layers),
                    "--seed", "3", "--quiet"], check=True, capture_output=True, timeout=600)
    return path


def test_two_ranks_equal_single_process(tmp_path, mpi_ok):
    store = synth(tmp_path / "s.h5", 5)
    one = subprocess.run([str(ANALYZE), "all", store, "--out", tmp_path / "one", *FAST], capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    two = mpirun(2, ANALYZE, "all", store, "--out", tmp_path / "two", *FAST)
    if "no MPI support" in two.stderr:
        pytest.skip("proxyattn-analyze built without MPI")
    assert two.returncode == 0, two.stderr
    a = json.loads((tmp_path / "one" / "report.json").read_text())
    b = json.loads((tmp_path / "two" / "report.json").read_text())
    assert b["distributed"]["ranks"] == 2 and b["distributed"]["mpi"] is True
    assert [r["rank"] for r in b["distributed"]["per_rank"]] == [0, 1]
    assert sum(r["units"] for r in b["distributed"]["per_rank"]) == 5
    assert a["distributed"]["ranks"] == 1
    assert a["tables"] == b["tables"]  # number for number
    assert a["notes"] == b["notes"]
    for name in a["tables"]:  # the CSVs too
        assert (tmp_path / "one" / f"{name}.csv").read_text() == (tmp_path / "two" / f"{name}.csv").read_text()


def test_failing_rank_fails_the_run(tmp_path, mpi_ok):
    store = synth(tmp_path / "bad.h5", 5)
    with h5py.File(store, "r+") as f:  # layer 3 goes to rank 1 (equal costs: 0,2,4 -> rank 0; 1,3 -> rank 1)
        q = f["layers/03/q"]
        q[0, 7, 3] = np.float16("nan")
    p = mpirun(2, ANALYZE, "all", store, "--out", tmp_path / "out", *FAST)
    if "no MPI support" in p.stderr:
        pytest.skip("proxyattn-analyze built without MPI")
    assert p.returncode != 0
    lines = [l for l in p.stderr.splitlines() if "proxyattn-analyze: error:" in l]
    assert len(lines) == 1, p.stderr
    assert "rank 1" in lines[0] and "NaN" in lines[0], lines[0]
    assert not (tmp_path / "out" / "report.json").exists()
