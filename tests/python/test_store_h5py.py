"""Store round trips between proxyattn and h5py, and the CLI contract of proxyattn-dump.

(a) proxyattn writes (`proxyattn-dump synth`) -> h5py reads the same values `export` gives and
    sees every attribute with the right Python type;
(b) h5py writes (float16 and float32, numpy bool and str attributes) -> `info --json` and
    `export` read exactly the values written (bit-exact float16 -> float32);
(c) bad input: one stderr line naming the file/flag, non-zero exit, no partial output file.

Binaries come from $PROXYATTN_BUILD_DIR/apps/.
"""
import json
import os
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

SOURCE_DIR = Path(os.environ.get("PROXYATTN_SOURCE_DIR", Path(__file__).resolve().parents[2]))
BUILD_DIR = Path(os.environ.get("PROXYATTN_BUILD_DIR", SOURCE_DIR / "build" / "cpu"))
DUMP = BUILD_DIR / "apps" / "proxyattn-dump"
SMOLLM = SOURCE_DIR / "configs" / "models" / "smollm2-135m.json"

pytestmark = pytest.mark.skipif(not DUMP.exists(), reason=f"{DUMP} not built")


def run(*args, check=True):
    p = subprocess.run([str(DUMP), *map(str, args)], capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"proxyattn-dump {' '.join(map(str, args))} failed ({p.returncode}): {p.stderr}")
    return p


def f32_bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# ----- (a) ours writes, h5py reads ---------------------------------------------------------------


@pytest.fixture(scope="module", params=["f16", "f32-gzip"])
def synth_store(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / f"synth-{request.param}.h5"
    args = ["synth", path, "--model", SMOLLM, "--len", 1000, "--layers", 2, "--seed", 5, "--quiet"]
    if request.param == "f32-gzip":
        args += ["--dtype", "f32", "--gzip"]
    run(*args)
    return path, request.param


def test_h5py_sees_attributes_with_the_right_types(synth_store):
    path, kind = synth_store
    with h5py.File(path, "r") as f:
        a = f.attrs
        for name in ("model", "source", "dtype", "prompt_sha256", "creator"):
            assert isinstance(a[name], str), (name, type(a[name]))
        for name in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim", "seq_len"):
            assert isinstance(a[name], np.integer), (name, type(a[name]))
        assert isinstance(a["rope_theta"], np.floating)
        assert isinstance(a["rope_applied"], np.bool_) and bool(a["rope_applied"]) is True
        assert a["model"] == "smollm2-135m"
        assert (a["num_layers"], a["num_q_heads"], a["num_kv_heads"], a["head_dim"], a["seq_len"]) == (30, 9, 3, 64, 1000)
        assert a["rope_theta"] == 100000.0
        assert a["dtype"] == ("float16" if kind == "f16" else "float32")
        assert sorted(f["layers"].keys()) == ["00", "01"]
        q = f["layers/01/q"]
        assert q.shape == (9, 1000, 64) and f["layers/01/k"].shape == (3, 1000, 64) and f["layers/01/v"].shape == (3, 1000, 64)
        assert q.dtype == (np.float16 if kind == "f16" else np.float32)
        assert q.chunks[0] == 1 and q.chunks[2] == 64
        if kind == "f32-gzip":
            assert q.compression == "gzip" and q.shuffle
        else:
            assert q.compression is None
        assert f["tokens"].dtype == np.int32 and f["tokens"].shape == (1000,)
        assert isinstance(f["needle"].attrs["text"], str)
        assert 0 <= f["needle"].attrs["position"] < 1000
        assert np.all(np.isfinite(q[...]))


@pytest.mark.parametrize("tensor,head,tokens", [("q", 4, "100:357"), ("k", 2, ":"), ("v", 0, "999:")])
def test_export_equals_h5py_values(synth_store, tmp_path, tensor, head, tokens):
    path, _ = synth_store
    with h5py.File(path, "r") as f:
        ds = f[f"layers/01/{tensor}"]
        a, b = tokens.split(":")
        lo, hi = int(a or 0), int(b or ds.shape[1])
        want = ds[head, lo:hi, :].astype(np.float32)
    common = ["export", path, "--layer", 1, "--head", head, "--qk", tensor, "--tokens", tokens]
    run(*common, "-o", tmp_path / "x.npy")
    got = np.load(tmp_path / "x.npy")
    assert got.dtype == np.dtype("<f4") and got.shape == want.shape
    assert np.array_equal(f32_bits(got), f32_bits(want))
    run(*common, "--format", "bin", "-o", tmp_path / "x.raw")
    raw = np.fromfile(tmp_path / "x.raw", dtype="<f4").reshape(want.shape)
    assert np.array_equal(f32_bits(raw), f32_bits(want))
    run(*common, "-o", tmp_path / "x.csv")
    lines = (tmp_path / "x.csv").read_text().splitlines()
    assert lines[0] == "token," + ",".join(f"d{i}" for i in range(64))
    rows = np.array([[float(x) for x in line.split(",")] for line in lines[1:]])
    assert rows.shape == (want.shape[0], 65)
    assert np.array_equal(rows[:, 0], np.arange(lo, hi))
    assert np.array_equal(f32_bits(rows[:, 1:].astype(np.float32)), f32_bits(want))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.csv", "x.npy", "x.raw"]


def test_synth_is_deterministic(tmp_path):
    for name in ("a.h5", "b.h5"):
        run("synth", tmp_path / name, "--model", SMOLLM, "--len", 257, "--layers", 1, "--seed", 9, "--quiet")
    with h5py.File(tmp_path / "a.h5", "r") as a, h5py.File(tmp_path / "b.h5", "r") as b:
        for t in ("q", "k", "v"):
            assert np.array_equal(a[f"layers/00/{t}"][...].view(np.uint16), b[f"layers/00/{t}"][...].view(np.uint16))


# ----- (b) h5py writes, ours reads ---------------------------------------------------------------

ATTRS = dict(model="h5py-model", source="hf:some/model", num_layers=4, num_q_heads=6, num_kv_heads=2,
             head_dim=64, seq_len=37, rope_theta=10000.0, rope_applied=np.bool_(True), dtype="float16",
             prompt_sha256="ab" * 32, creator="test_store_h5py.py")


def write_h5py_store(path, dtype=np.float16, layers=(0, 3), attrs=None, drop=(), shapes=None, seed=0,
                     with_v=True, tokens=True):
    """A store written the way a Python capture script would; returns {(layer, tensor): array}."""
    rng = np.random.default_rng(seed)
    a = dict(ATTRS, dtype=np.dtype(dtype).name)
    a.update(attrs or {})
    n, d = int(ATTRS["seq_len"]), int(ATTRS["head_dim"])
    shapes = shapes or {}
    data = {}
    with h5py.File(path, "w") as f:
        for k, v in a.items():
            if k not in drop:
                f.attrs[k] = v
        for layer in layers:
            for t, h in (("q", 6), ("k", 2)) + ((("v", 2),) if with_v else ()):
                shape = shapes.get((layer, t), (h, n, d))
                x = (rng.standard_normal(shape) * (4.0 if t == "q" else 1.0)).astype(dtype)
                f.create_dataset(f"layers/{layer:02d}/{t}", data=x, chunks=(1,) + tuple(shape[1:]) if len(shape) == 3 else None)
                data[(layer, t)] = x
        if tokens:
            f["tokens"] = np.arange(n, dtype=np.int32) * 3
    return data


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_info_json_reads_h5py_store(tmp_path, dtype):
    path = tmp_path / "py.h5"
    data = write_h5py_store(path, dtype=dtype)
    p = run("info", path, "--json", "--quiet")
    info = json.loads(p.stdout)
    a = info["attributes"]
    for k in ("model", "source", "num_layers", "num_q_heads", "num_kv_heads", "head_dim", "seq_len", "prompt_sha256", "creator"):
        assert a[k] == ATTRS[k], k
    assert a["rope_theta"] == 10000.0 and a["rope_applied"] is True
    assert a["dtype"] == np.dtype(dtype).name
    assert info["layers_stored"] == [0, 3]
    assert info["tokens"] == 37
    by_layer = {l["layer"]: l["tensors"] for l in info["layers"]}
    for (layer, t), x in data.items():
        s = by_layer[layer][t]
        x64 = x.astype(np.float64)
        assert s["shape"] == list(x.shape) and s["dtype"] == np.dtype(dtype).name
        assert s["min"] == x64.min() and s["max"] == x64.max()
        assert s["mean"] == pytest.approx(x64.mean(), rel=1e-12, abs=1e-12)
        assert s["std"] == pytest.approx(x64.std(), rel=1e-9)
        assert s["nan"] == 0 and s["inf"] == 0 and s["count"] == x.size
        assert len(s["heads"]) == x.shape[0]
        for h, hs in enumerate(s["heads"]):
            assert hs["min"] == x64[h].min() and hs["max"] == x64[h].max()
            assert hs["mean"] == pytest.approx(x64[h].mean(), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_export_reads_h5py_values_bit_exact(tmp_path, dtype):
    path = tmp_path / "py.h5"
    data = write_h5py_store(path, dtype=dtype, seed=1)
    for (layer, t), x in data.items():
        head = x.shape[0] - 1
        out = tmp_path / f"{layer}{t}.npy"
        run("export", path, "--layer", layer, "--head", head, "--qk", t, "-o", out)
        got = np.load(out)
        assert np.array_equal(f32_bits(got), f32_bits(x[head].astype(np.float32))), (layer, t)


def test_every_finite_half_pattern_survives(tmp_path):
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    halves = bits.view(np.float16)
    halves = halves[np.isfinite(halves)]  # 63,488 values incl. subnormals, -0.0, +-65504
    n = len(halves) // 64
    q = halves[: n * 64].reshape(1, n, 64)
    path = tmp_path / "halves.h5"
    with h5py.File(path, "w") as f:
        for k, v in dict(ATTRS, num_q_heads=1, num_kv_heads=1, seq_len=n, rope_applied=False).items():
            f.attrs[k] = v
        f["layers/00/q"] = q
        f["layers/00/k"] = q[:, ::-1, :].copy()
    run("export", path, "--layer", 0, "--head", 0, "-o", tmp_path / "q.npy")
    got = np.load(tmp_path / "q.npy")
    assert np.array_equal(f32_bits(got), f32_bits(q[0].astype(np.float32)))
    info = json.loads(run("info", path, "--json", "--quiet").stdout)
    assert info["attributes"]["rope_applied"] is False
    assert info["layers"][0]["tensors"]["q"]["max"] == 65504.0


def test_fixed_length_and_integer_attributes_are_accepted(tmp_path):
    path = tmp_path / "py.h5"
    write_h5py_store(path, attrs=dict(source=np.bytes_(b"fixed-bytes"), rope_applied=1, rope_theta=500000))
    info = json.loads(run("info", path, "--json", "--quiet").stdout)
    assert info["attributes"]["source"] == "fixed-bytes"
    assert info["attributes"]["rope_applied"] is True
    assert info["attributes"]["rope_theta"] == 500000.0


def test_info_counts_nonfinite_and_export_refuses_them(tmp_path):
    path = tmp_path / "nan.h5"
    data = write_h5py_store(path, dtype=np.float32, layers=(0,))
    with h5py.File(path, "r+") as f:
        q = f["layers/00/q"]
        x = q[...]
        x[2, 5, 7] = np.nan
        x[2, 6, 0] = np.inf
        x[4, 0, 0] = -np.inf
        q[...] = x
    info = json.loads(run("info", path, "--json", "--quiet").stdout)
    s = info["layers"][0]["tensors"]["q"]
    assert (s["nan"], s["inf"]) == (1, 2)
    assert s["count"] == data[(0, "q")].size - 3
    assert [h["nan"] for h in s["heads"]] == [0, 0, 1, 0, 0, 0]
    text = run("info", path).stdout
    assert "nan" in text
    out = tmp_path / "x.npy"
    p = run("export", path, "--layer", 0, "--head", 2, "-o", out, check=False)
    expect_one_line_error(p, "nan.h5", "/layers/00/q", "1 NaN", "1 Inf")
    assert not out.exists()
    run("export", path, "--layer", 0, "--head", 2, "--allow-nonfinite", "-o", out)
    assert np.isnan(np.load(out)[5, 7])


# ----- (c) bad input on the command line ---------------------------------------------------------


def bad_store(tmp_path, kind):
    """Stores broken in one way each; returns (path, text the error must mention)."""
    p = tmp_path / f"{kind}.h5"
    if kind == "not_hdf5":
        p.write_text("definitely not HDF5\n")
        return p, "not an HDF5 file"
    if kind == "truncated":
        write_h5py_store(p)
        b = p.read_bytes()
        p.write_bytes(b[: len(b) // 2])
        return p, p.name
    if kind == "missing_dataset":
        write_h5py_store(p)
        with h5py.File(p, "r+") as f:
            del f["layers/03/k"]
        return p, "/layers/03/k"
    if kind == "missing_attribute":
        write_h5py_store(p, drop=("num_kv_heads",))
        return p, "num_kv_heads"
    if kind == "wrong_rank":
        write_h5py_store(p, shapes={(0, "q"): (6, 37 * 64)})
        return p, "/layers/00/q"
    if kind == "head_count":
        write_h5py_store(p, attrs=dict(num_q_heads=8))
        return p, "num_q_heads"
    if kind == "gqa":
        write_h5py_store(p, attrs=dict(num_kv_heads=4))
        return p, "num_kv_heads"
    if kind == "head_dim":
        write_h5py_store(p, shapes={(3, "k"): (2, 37, 32)})
        return p, "/layers/03/k"
    if kind == "zero_length":
        write_h5py_store(p, attrs=dict(seq_len=0))
        return p, "seq_len"
    raise ValueError(kind)


BAD = ["not_hdf5", "truncated", "missing_dataset", "missing_attribute", "wrong_rank", "head_count", "gqa", "head_dim",
       "zero_length"]


def expect_one_line_error(p, *needles):
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0, p
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("proxyattn-dump: error: "), lines[0]
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])


@pytest.mark.parametrize("kind", BAD)
def test_bad_store_gives_one_line_and_no_output(tmp_path, kind):
    path, needle = bad_store(tmp_path, kind)
    expect_one_line_error(run("info", path, check=False), path.name, needle)
    out = tmp_path / "out" / "x.npy"
    out.parent.mkdir()
    p = run("export", path, "--layer", 0, "--head", 0, "-o", out, check=False)
    expect_one_line_error(p, path.name)
    assert list(out.parent.iterdir()) == []  # no partial file, no temporary


def test_missing_file(tmp_path):
    expect_one_line_error(run("info", tmp_path / "absent.h5", check=False), "absent.h5", "no such file")


def test_usage_errors(tmp_path):
    store = tmp_path / "ok.h5"
    write_h5py_store(store)
    out = tmp_path / "o.npy"
    cases = [
        (["info", store, "--frobnicate"], "--frobnicate", 2),
        (["export", store, "--layer", 0, "--head", 0], "--out", 2),  # required option missing
        (["export", store, "--layer", 0, "--head", 0, "--qk", "x", "-o", out], "--qk", 2),
        (["export", store, "--layer", 0, "--head", 0, "--format", "xml", "-o", out], "--format", 2),
        (["export", store, "--layer", 1, "--head", 0, "-o", out], "--layer 1", 1),
        (["export", store, "--layer", 0, "--head", 6, "-o", out], "--head 6", 1),
        (["export", store, "--layer", 0, "--head", 2, "--qk", "k", "-o", out], "--head 2", 1),
        (["export", store, "--layer", 0, "--head", 0, "--tokens", "5:99", "-o", out], "--tokens", 1),
        (["export", store, "--layer", 0, "--head", 0, "--tokens", "abc", "-o", out], "--tokens", 1),
        (["export", store, "--layer", 0, "--head", 0, "-o", tmp_path / "o.txt"], "--format", 2),
        (["export", store, "--layer", 0, "--head", 0, "-o", tmp_path / "nodir" / "o.npy"], "nodir", 1),
        (["synth", tmp_path / "s.h5", "--model", tmp_path / "nope.json", "--len", 10], "nope.json", 1),
        (["synth", tmp_path / "s.h5", "--model", SMOLLM, "--len", 0], "--len", 2),
        (["synth", tmp_path / "s.h5", "--model", SMOLLM, "--len", 10, "--layers", 31], "--layers", 2),
        (["synth", tmp_path / "s.h5", "--model", SMOLLM, "--len", 10, "--dtype", "f64"], "--dtype", 2),
        (["synth", tmp_path / "nodir" / "s.h5", "--model", SMOLLM, "--len", 10], "nodir", 1),
        (["bogus"], "bogus", 2),
        ([], "subcommand", 2),
    ]
    for args, needle, code in cases:
        p = run(*args, check=False)
        expect_one_line_error(p, needle)
        assert p.returncode == code, (args, p.returncode, p.stderr)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ok.h5"]


def test_bad_model_config_names_the_field(tmp_path):
    cfg = json.loads(SMOLLM.read_text())
    cfg["num_kv_heads"] = 4
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(cfg))
    p = run("synth", tmp_path / "s.h5", "--model", bad, "--len", 10, check=False)
    expect_one_line_error(p, "bad.json", "num_kv_heads")
    assert not (tmp_path / "s.h5").exists()


def test_help_and_version_exit_zero():
    for args in (["--help"], ["export", "--help"], ["synth", "--help"], ["info", "--help"]):
        p = run(*args, check=False)
        assert p.returncode == 0 and "Usage" in p.stdout and p.stderr == "", args
    p = run("--version", check=False)
    assert p.returncode == 0 and p.stdout.startswith("proxyattn-dump ")


def test_synth_progress_and_summary(tmp_path):
    p = run("synth", tmp_path / "s.h5", "--model", SMOLLM, "--len", 100, "--layers", 3)
    assert "wrote" in p.stdout and "3 layers" in p.stdout
    assert "3/3" in p.stderr  # progress lines (stderr is not a terminal here)
    q = run("synth", tmp_path / "t.h5", "--model", SMOLLM, "--len", 100, "--layers", 1, "--quiet")
    assert q.stdout == "" and q.stderr == ""
