"""Issue #17, hostile input, through the tools: stores that point outside the file or declare
sizes they do not hold, checksums on the stores we write, invalid flag values, output targets
that are never replaced, report folders committed whole, temporaries removed on signals, and
the short fuzz run's generator classes (tests/fuzz/)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

SOURCE_DIR = Path(os.environ.get("PROXYATTN_SOURCE_DIR", Path(__file__).resolve().parents[2]))
BUILD_DIR = Path(os.environ.get("PROXYATTN_BUILD_DIR", SOURCE_DIR / "build" / "cpu"))
APPS = BUILD_DIR / "apps"
DUMP, ANALYZE, BENCH = APPS / "proxyattn-dump", APPS / "proxyattn-analyze", APPS / "proxyattn-bench"
SMOLLM = SOURCE_DIR / "configs" / "models" / "smollm2-135m.json"
sys.path.insert(0, str(SOURCE_DIR / "tests" / "fuzz"))

import hostile_stores as HS  # noqa: E402

pytestmark = pytest.mark.skipif(not DUMP.exists(), reason=f"{DUMP} not built")


def run(tool, *args, env=None):
    return subprocess.run([str(tool), *map(str, args)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, **(env or {})))


def error_line(p, tool):
    """The one stderr line of a failed run (asserted to be in the documented form)."""
    assert p.returncode != 0, p.stdout
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"proxyattn-{tool}: error: "), lines[0]
    assert "bad_alloc" not in lines[0] and "filesystem error" not in lines[0], lines[0]
    return lines[0]


def no_temporaries(d: Path):
    left = [p.name for p in d.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert not left, left


# ----- stores: nothing outside the file, no size beyond what it holds -----------------------------

@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    rng = __import__("random").Random(3)
    cases = {}
    for gen in (HS.valid, HS.shapes, HS.dtypes, HS.outside):
        for c in gen(d, rng):
            cases[c.name] = c
    return cases


@pytest.mark.parametrize("name,needles", [
    ("outside-external-storage", ["/layers/00/q", "external storage"]),
    ("outside-external-link-ds", ["/layers/00/q", "external link"]),
    ("outside-external-link-group", ["/layers", "external link"]),
    ("outside-soft-link", ["/layers/01/k", "soft"]),
    ("outside-virtual", ["/layers/00/q", "virtual dataset"]),
    ("shape-huge-tokens", ["/layers/00/q", "chunks stored"]),
    ("shape-partial-chunks", ["/layers/01/k", "1 of 10 chunks stored"]),
    ("shape-contiguous-empty", ["/layers/00/k", "data bytes stored"]),
    ("dtype-lzf-filter", ["filter 32000", "not supported"]),
    ("dtype-float64", ["/layers/00/q", "unsupported float type"]),
])
def test_store_refused_with_a_clear_line(hostile, tmp_path, name, needles):
    c = hostile[name]
    for args in (["info", c.path, "--json", "-q"], ["export", c.path, "--layer", 0, "--head", 0, "-o", tmp_path / "o.npy"]):
        line = error_line(run(DUMP, *args), "dump")
        for n in needles:
            assert n in line, (n, line)
    assert not (tmp_path / "o.npy").exists()
    no_temporaries(tmp_path)


def test_external_storage_never_prints_the_other_file(hostile, tmp_path):
    p = run(DUMP, "export", hostile["outside-external-storage"].path, "--layer", 0, "--head", 0, "-o", tmp_path / "o.csv")
    error_line(p, "dump")
    assert p.stdout == ""


def test_declared_sizes_are_checked_before_allocating(tmp_path):
    # Attributes and datasets agree on [4, 2^18, 64], every chunk stored (gzip'd zeros, a few
    # hundred KB on disk), 256 MiB as float32 in memory: the memory check refuses it up front.
    p = tmp_path / "big.h5"
    n = 1 << 18
    with h5py.File(p, "w") as f:
        for k, v in dict(HS.ATTRS, seq_len=np.int64(n), head_dim=np.int64(64), num_layers=np.int64(1)).items():
            f.attrs[k] = v
        zeros = np.zeros((1, 1 << 16, 64), np.float16)
        for t, h in (("q", HS.HQ), ("k", HS.HKV)):
            ds = f.create_dataset(f"layers/00/{t}", shape=(h, n, 64), dtype=np.float16, chunks=(1, 1 << 16, 64),
                                  compression="gzip")
            for i in range(h):
                for j in range(0, n, 1 << 16):
                    ds[i:i + 1, j:j + (1 << 16), :] = zeros
    env = {"PROXYATTN_MEMORY_LIMIT": "64M"}
    line = error_line(run(DUMP, "info", p, "-q", env=env), "dump")
    assert "needs" in line and "available" in line, line
    line = error_line(run(ANALYZE, "similarity", p, "--out", tmp_path / "r", "--quiet", env=env), "analyze")
    assert "needs" in line, line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", ["valid-latest-f32", "valid-earliest-nof32", "valid-gzip", "outside-symlink-store"])
def test_h5py_stores_with_or_without_checksums_still_load(hostile, tmp_path, name):
    c = hostile[name]
    assert run(DUMP, "info", c.path, "--json", "-q").returncode == 0
    p = run(DUMP, "export", c.path, "--layer", 1, "--head", 3, "-o", tmp_path / "q.npy")
    assert p.returncode == 0, p.stderr
    with h5py.File(c.path, "r") as f:
        assert np.array_equal(np.load(tmp_path / "q.npy"), f["layers/01/q"][3].astype(np.float32))


# ----- stores we write: newest format, Fletcher-32 on every dataset, verified on read ------------

def superblock_version(path: Path) -> int:
    b = path.read_bytes()[:9]
    assert b[:8] == b"\x89HDF\r\n\x1a\n"
    return b[8]


def test_synth_writes_checksummed_stores(tmp_path):
    out = tmp_path / "s.h5"
    assert run(DUMP, "synth", out, "--model", SMOLLM, "--len", 300, "--layers", 2, "--quiet").returncode == 0
    assert superblock_version(out) >= 2  # v2+ superblock: the format with metadata checksums
    with h5py.File(out, "r") as f:
        seen = []
        f.visititems(lambda n, o: seen.append((n, o.fletcher32)) if isinstance(o, h5py.Dataset) else None)
        assert seen and all(fl for _, fl in seen), seen
        info = f["layers/01/k"].id.get_chunk_info(0)
    # One flipped bit in the raw data of /layers/01/k: reading it fails, naming the dataset.
    b = bytearray(out.read_bytes())
    b[info.byte_offset + 17] ^= 0x10
    bad = tmp_path / "flipped.h5"
    bad.write_bytes(bytes(b))
    line = error_line(run(DUMP, "export", bad, "--layer", 1, "--head", 0, "--qk", "k", "-o", tmp_path / "k.npy"), "dump")
    assert "/layers/01/k" in line and "read failed" in line, line
    assert not (tmp_path / "k.npy").exists()
    # The other datasets still read.
    assert run(DUMP, "export", bad, "--layer", 0, "--head", 0, "-o", tmp_path / "q.npy").returncode == 0


def test_metadata_flip_in_a_checksummed_store_is_an_error(tmp_path):
    out = tmp_path / "s.h5"
    assert run(DUMP, "synth", out, "--model", SMOLLM, "--len", 100, "--layers", 1, "--quiet").returncode == 0
    b = bytearray(out.read_bytes())
    b[20] ^= 0x01  # inside the superblock (checksummed in v2+)
    out.write_bytes(bytes(b))
    error_line(run(DUMP, "info", out, "-q"), "dump")


# ----- invalid flag values --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "s.h5"
    assert run(DUMP, "synth", out, "--model", SMOLLM, "--len", 300, "--layers", 2, "--quiet").returncode == 0
    return out


@pytest.mark.parametrize("extra,needle", [
    (["--sparsity", ""], "--sparsity: empty value"),
    (["--methods", ""], "--methods: empty value"),
    (["--gamma", " "], "--gamma: empty value"),
    (["--layers", ""], "--layers: empty value"),
    (["--block", "1073741824"], "--block: 1073741824 too large"),
    (["--threads", "100000"], "--threads"),
    (["--xattn-stride", "0"], "--xattn-stride"),
])
def test_analyze_invalid_values(store, tmp_path, extra, needle):
    line = error_line(run(ANALYZE, "similarity", store, "--out", tmp_path / "r", "--quiet", *extra), "analyze")
    assert needle in line, line
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(not BENCH.exists(), reason="no proxyattn-bench")
@pytest.mark.parametrize("extra,needle", [
    (["--block", "0"], "--block: 0 outside"),
    (["--reps", "0"], "--reps: 0 outside"),
    (["--warmup", "-1"], "--warmup: -1 outside"),
    (["--seed", "-1"], "--seed: -1 outside"),
    (["--cpu-max-len", "0"], "--cpu-max-len"),
    (["--out", ""], "--out: empty value"),
])
def test_bench_invalid_values(tmp_path, extra, needle):
    p = run(BENCH, "--device", "cpu", "--lengths", "256", "--methods", "full", "--quiet", *extra)
    line = error_line(p, "bench")
    assert needle in line, line


@pytest.mark.parametrize("seed", ["-1", "x", "18446744073709551616", ""])
def test_synth_invalid_seed(tmp_path, seed):
    out = tmp_path / "s.h5"
    line = error_line(run(DUMP, "synth", out, "--model", SMOLLM, "--len", 100, "--seed", seed, "--quiet"), "dump")
    assert "--seed" in line, line
    assert not out.exists()
    no_temporaries(tmp_path)


def test_synth_model_config_with_absurd_heads(tmp_path):
    cfg = tmp_path / "m.json"
    cfg.write_text('{"name": "x", "num_layers": 1, "num_q_heads": 1073741824, "num_kv_heads": 1, "head_dim": 64,'
                   ' "rope_theta": 10000, "max_context": 4096}')
    line = error_line(run(DUMP, "synth", tmp_path / "s.h5", "--model", cfg, "--len", 100, "--quiet"), "dump")
    assert "num_q_heads" in line and "too large" in line, line


# ----- outputs: never replace what is not ours; whole or nothing ------------------------------------

def test_outputs_never_replace_links_or_devices(store, tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep")
    link = tmp_path / "link.npy"
    link.symlink_to(target)
    line = error_line(run(DUMP, "export", store, "--layer", 0, "--head", 0, "-o", link), "dump")
    assert "symbolic link" in line, line
    line = error_line(run(DUMP, "export", store, "--layer", 0, "--head", 0, "--format", "bin", "-o", "/dev/null"), "dump")
    assert "character device" in line, line
    line = error_line(run(DUMP, "synth", link, "--model", SMOLLM, "--len", 50, "--quiet"), "dump")
    assert "symbolic link" in line, line
    assert link.is_symlink() and target.read_text() == "keep"
    line = error_line(run(ANALYZE, "similarity", store, "--out", link, "--quiet"), "analyze")
    assert "symbolic link" in line, line
    line = error_line(run(ANALYZE, "similarity", store, "--out", target, "--quiet"), "analyze")
    assert "not a directory" in line, line
    assert target.read_text() == "keep"
    no_temporaries(tmp_path)


def test_failed_analyze_creates_nothing(store, tmp_path):
    out = tmp_path / "deep" / "r"
    error_line(run(ANALYZE, "error", store, "--out", out, "--quiet", "--layers", "7"), "analyze")
    assert not (tmp_path / "deep").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_analyze_replaces_a_report_as_a_whole(store, tmp_path):
    out = tmp_path / "r"
    assert run(ANALYZE, "recall", store, "--out", out, "--quiet", "--methods", "proxy,oracle").returncode == 0
    first = sorted(p.name for p in out.iterdir())
    assert "report.json" in first
    assert run(ANALYZE, "similarity", store, "--out", out, "--quiet").returncode == 0
    second = sorted(p.name for p in out.iterdir())
    # Only the second run's files: nothing of the first one mixed in.
    assert "similarity_pairs.csv" in second and not (set(first) - {"report.json", "report.md"}) & set(second)
    no_temporaries(tmp_path)
    # figures/ (plot_figures.py's) goes with the report it was drawn from; anything else is refused.
    (out / "figures").mkdir()
    (out / "figures" / "fig.png").write_bytes(b"png")
    assert run(ANALYZE, "similarity", store, "--out", out, "--quiet").returncode == 0
    assert not (out / "figures").exists()
    (out / "notes").mkdir()
    line = error_line(run(ANALYZE, "similarity", store, "--out", out, "--quiet"), "analyze")
    assert "notes" in line and "not part of a report" in line, line
    assert (out / "notes").is_dir()


def test_concurrent_analyze_runs_never_mix(store, tmp_path):
    out = tmp_path / "r"
    procs = [subprocess.Popen([str(ANALYZE), cmd, str(store), "--out", str(out), "--quiet", "--threads", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for cmd in ("similarity", "budget", "similarity", "budget")]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()
    import json
    report = json.loads((out / "report.json").read_text())
    csvs = {p.stem for p in out.glob("*.csv")}
    assert csvs == set(report["tables"]), (csvs, set(report["tables"]))
    no_temporaries(tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_killed_synth_leaves_no_temporary(tmp_path, sig):
    out = tmp_path / "big.h5"
    p = subprocess.Popen([str(DUMP), "synth", str(out), "--model", str(SMOLLM), "--len", "65536", "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob("big.h5.tmp-*")):
        time.sleep(0.05)
    assert list(tmp_path.glob("big.h5.tmp-*")), "the writer never started"
    time.sleep(0.5)
    p.send_signal(sig)
    assert p.wait(timeout=60) == -sig
    assert sorted(x.name for x in tmp_path.iterdir()) == []


# ----- capture_qk.py --------------------------------------------------------------------------------

def test_capture_layers_empty_and_directories(tmp_path):
    import test_capture as TC
    model = tmp_path / "tiny.gguf"
    TC.write_tiny_gguf(model)
    prompt = tmp_path / "p.txt"
    prompt.write_text("Hello there, this is a short prompt.")
    out = tmp_path / "o.h5"
    p = TC.run_capture("--gguf", model, "--prompt-file", prompt, "--layers", "", "--out", out, check=False)
    TC.assert_clean_failure(p, out, "--layers", "no layers selected")
    p = TC.run_capture("--gguf", model, "--prompt-file", tmp_path, "--out", out, check=False)
    TC.assert_clean_failure(p, out, "--prompt-file", "is a directory")
    p = TC.run_capture("--gguf", tmp_path, "--prompt-file", prompt, "--out", out, check=False)
    TC.assert_clean_failure(p, out, "--gguf", "is a directory")
    link = tmp_path / "link.h5"
    link.symlink_to(prompt)
    p = TC.run_capture("--gguf", model, "--prompt-file", prompt, "--out", link, check=False)
    assert p.returncode != 0 and "not a regular file" in p.stderr and link.is_symlink()
    # The store it writes: HDF5 1.10's newest format and Fletcher-32 everywhere; our reader loads it.
    TC.run_capture("--gguf", model, "--prompt-file", prompt, "--out", out, "--quiet")
    assert superblock_version(out) >= 2
    with h5py.File(out, "r") as f:
        flags = []
        f.visititems(lambda n, o: flags.append(o.fletcher32) if isinstance(o, h5py.Dataset) else None)
        assert flags and all(flags)
    assert run(DUMP, "info", out, "-q").returncode == 0


@pytest.mark.skipif(not BENCH.exists(), reason="no proxyattn-bench")
def test_bench_outputs_refuse_links_and_create_nothing_on_failure(tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    target = tmp_path / "precious.json"
    target.write_text("keep")
    (out / "bench.json").symlink_to(target)
    line = error_line(run(BENCH, "--device", "cpu", "--lengths", "256", "--methods", "full", "--reps", "1",
                          "--warmup", "0", "--quiet", "--out", out), "bench")
    assert "bench.json" in line and "symbolic link" in line, line
    assert target.read_text() == "keep" and (out / "bench.json").is_symlink()
    # A run that fails before timing creates no --out.
    error_line(run(BENCH, "--device", "cpu", "--lengths", "256", "--methods", "nope", "--quiet", "--out", tmp_path / "c"), "bench")
    assert not (tmp_path / "c").exists()


def test_libhdf5_crash_on_corrupt_global_heap_is_one_line(tmp_path):
    # The global heap (variable-length strings) has no checksum in any 1.10 file format, and
    # libhdf5 1.10 trusts an object's size there: a huge size is a memcpy far past the buffer.
    # The open probe turns that crash into one line.
    p = tmp_path / "heap.h5"
    HS.write_store(p)
    b = bytearray(p.read_bytes())
    at = b.find(b"hostile_stores.py\x00")
    assert at > 0 and b.rfind(b"GCOL", 0, at) >= 0
    assert int.from_bytes(b[at - 8:at], "little") == len("hostile_stores.py")
    b[at - 8:at] = (1 << 28).to_bytes(8, "little")
    p.write_bytes(bytes(b))
    for args in (["info", p, "-q"], ["export", p, "--layer", 0, "--head", 0, "-o", tmp_path / "o.npy"]):
        line = error_line(run(DUMP, *args), "dump")
        assert "corrupt HDF5 metadata" in line and "crashed" in line, line
    line = error_line(run(ANALYZE, "similarity", p, "--out", tmp_path / "r", "--quiet"), "analyze")
    assert "corrupt HDF5 metadata" in line, line
    assert sorted(x.name for x in tmp_path.iterdir()) == ["heap.h5"]


def test_synth_layers_zero_is_an_error(tmp_path):
    line = error_line(run(DUMP, "synth", tmp_path / "s.h5", "--model", SMOLLM, "--len", 100, "--layers", 0, "--quiet"), "dump")
    assert "--layers" in line and ">= 1" in line, line
    assert sorted(x.name for x in tmp_path.iterdir()) == []


def test_analyze_checks_a_layers_memory_before_the_work(store, tmp_path):
    line = error_line(run(ANALYZE, "similarity", store, "--out", tmp_path / "r", "--quiet",
                          env={"PROXYATTN_MEMORY_LIMIT": "1M"}), "analyze")
    assert "seq_len 300 with --block 128" in line and "block matrices" in line and "needs" in line, line
    assert not (tmp_path / "r").exists()
