"""Generator of hostile Q/K stores (issue #17): every class of bad input we know of, built with
h5py from a seed. Each case is (name, klass, path, expect, tools):

- expect "reject": known-bad input; a tool must exit non-zero with one clean error line;
- expect "accept": a valid store; a tool must succeed;
- expect "any": damaged input that may or may not still be a valid store (bit flips outside
  the checksummed parts); a tool may succeed or fail cleanly, but never crash, hang or leave a
  partial output.

Used by fuzz_tools.py (the driver); `python hostile_stores.py OUT_DIR --seed S --count N`
only writes the stores and prints the manifest (JSON lines).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

HQ, HKV, D, N, LAYERS = 4, 2, 16, 40, 2

ATTRS = dict(
    model="fuzz", source="fuzz.gguf", num_layers=np.int64(LAYERS), num_q_heads=np.int64(HQ),
    num_kv_heads=np.int64(HKV), head_dim=np.int64(D), seq_len=np.int64(N), rope_theta=np.float64(10000.0),
    rope_applied=np.bool_(True), dtype="float16", prompt_sha256="0" * 64, creator="hostile_stores.py")


@dataclass
class Case:
    name: str
    klass: str
    path: Path
    expect: str  # reject | accept | any
    tools: list[str] = field(default_factory=lambda: ["info", "export", "analyze"])
    per_tool: dict[str, str] = field(default_factory=dict)  # expectation overrides, e.g. {"export": "any"}

    def expect_for(self, tool: str) -> str:
        return self.per_tool.get(tool, self.expect)

    def manifest(self) -> dict:
        return dict(name=self.name, klass=self.klass, path=str(self.path), expect=self.expect, tools=self.tools,
                    per_tool=self.per_tool)


def write_store(path: Path, *, attrs: dict | None = None, drop=(), dtype=np.float16, latest=True, fletcher=True,
                rng: np.random.Generator | None = None, ds_kw: dict | None = None, tokens=True,
                skip_data: set | None = None) -> None:
    """A small valid store (unless the arguments make it otherwise)."""
    rng = rng or np.random.default_rng(0)
    a = dict(ATTRS)
    a.update(attrs or {})
    kw = dict(ds_kw or {})
    if fletcher:
        kw["fletcher32"] = True
    with h5py.File(path, "w", libver=("v110", "v110") if latest else "earliest") as f:
        for k, v in a.items():
            if k not in drop:
                f.attrs[k] = v
        for layer in range(LAYERS):
            for t, h in (("q", HQ), ("k", HKV), ("v", HKV)):
                x = (rng.standard_normal((h, N, D)) * (3.0 if t == "q" else 1.0)).astype(dtype)
                name = f"layers/{layer:02d}/{t}"
                if skip_data and name in skip_data:
                    continue
                f.create_dataset(name, data=x, chunks=(1, N, D), **kw)
        if tokens:
            f.create_dataset("tokens", data=np.arange(N, dtype=np.int32), fletcher32=fletcher)
        f.create_group("needle")
        f["needle"].attrs["position"] = np.int64(5)
        f["needle"].attrs["text"] = "the needle"


def _replace(path: Path, dataset: str, make) -> None:
    with h5py.File(path, "r+") as f:
        del f[dataset]
        make(f, dataset)


# ----- classes --------------------------------------------------------------------------------

def valid(out: Path, rng: random.Random) -> list[Case]:
    cases = []
    for latest in (True, False):
        for fletcher in (True, False):
            p = out / f"valid-{'latest' if latest else 'earliest'}-{'f32' if fletcher else 'nof32'}.h5"
            write_store(p, latest=latest, fletcher=fletcher)
            cases.append(Case(p.stem, "valid store (h5py)", p, "accept"))
    p = out / "valid-gzip.h5"
    write_store(p, ds_kw=dict(compression="gzip", shuffle=True))
    cases.append(Case(p.stem, "valid store (h5py)", p, "accept"))
    return cases


def shapes(out: Path, rng: random.Random) -> list[Case]:
    """Declared shapes far beyond the bytes in the file, and overflowing products."""
    cases = []
    # [4, 2^23, 32]: a few KB on disk (no chunk written), 4 GiB in memory.
    for name, (hq, hkv, n, d) in {
        "huge-tokens": (4, 2, 1 << 23, 32),
        "huge-heads": (1 << 20, 1 << 20, 64, 16),
        "overflow": (1 << 30, 1 << 30, (1 << 40), 1 << 30),
        "overflow-seq": (4, 2, (1 << 62), 16),
    }.items():
        p = out / f"shape-{name}.h5"
        try:
            with h5py.File(p, "w", libver=("v110", "v110")) as f:
                a = dict(ATTRS, num_q_heads=np.int64(hq), num_kv_heads=np.int64(hkv), seq_len=np.int64(n),
                         head_dim=np.int64(d))
                for k, v in a.items():
                    f.attrs[k] = v
                for t, h in (("q", hq), ("k", hkv)):
                    shape = (h, n, d)
                    chunk = (1, min(n, 1024), min(d, 1024))
                    f.create_dataset(f"layers/00/{t}", shape=shape, dtype=np.float16, chunks=chunk)
        except (ValueError, OSError, OverflowError):
            # HDF5 refuses the extent itself: keep only the attributes declaring it.
            write_store(p, attrs=dict(num_q_heads=np.int64(hq), num_kv_heads=np.int64(hkv), seq_len=np.int64(n),
                                      head_dim=np.int64(d)))
        cases.append(Case(p.stem, "crafted shapes (overflow, unallocated extent)", p, "reject"))
    # Declared shape with only some chunks written.
    p = out / "shape-partial-chunks.h5"
    write_store(p, skip_data={"layers/01/k"})
    with h5py.File(p, "r+") as f:
        ds = f.create_dataset("layers/01/k", shape=(HKV, N, D), dtype=np.float16, chunks=(1, 8, D))
        ds[0, :8, :] = 1.0
    cases.append(Case(p.stem, "crafted shapes (overflow, unallocated extent)", p, "reject"))
    # Shape disagreeing with attributes, wrong rank.
    p = out / "shape-rank2.h5"
    write_store(p)
    _replace(p, "layers/00/q", lambda f, n: f.create_dataset(n, data=np.zeros((HQ, N * D), np.float16)))
    cases.append(Case(p.stem, "crafted shapes (overflow, unallocated extent)", p, "reject"))
    p = out / "shape-contiguous-empty.h5"
    write_store(p)
    _replace(p, "layers/00/k", lambda f, n: f.create_dataset(n, shape=(HKV, N, D), dtype=np.float16))
    cases.append(Case(p.stem, "crafted shapes (overflow, unallocated extent)", p, "reject"))
    return cases


def dtypes(out: Path, rng: random.Random) -> list[Case]:
    cases = []
    kinds = {
        "float64": lambda f, n, x: f.create_dataset(n, data=x.astype(np.float64)),
        "int16": lambda f, n, x: f.create_dataset(n, data=x.astype(np.int16)),
        "bigendian-f16-mislabel": lambda f, n, x: f.create_dataset(n, data=x.astype(">f4")),
        "compound": lambda f, n, x: f.create_dataset(n, data=np.zeros(x.shape, dtype=[("a", "<f2"), ("b", "<f2")])),
        "string": lambda f, n, x: f.create_dataset(n, data=np.full(x.shape, b"ab", dtype="S2")),
        "uint8": lambda f, n, x: f.create_dataset(n, data=x.astype(np.uint8)),
    }
    for kind, make in kinds.items():
        p = out / f"dtype-{kind}.h5"
        write_store(p)
        x = np.zeros((HQ, N, D), np.float32)
        _replace(p, "layers/00/q", lambda f, n, make=make: make(f, n, x))
        cases.append(Case(p.stem, "dtypes", p, "reject"))
    # Tokens of a bad type / shape.
    p = out / "dtype-tokens-float.h5"
    write_store(p, tokens=False)
    with h5py.File(p, "r+") as f:
        f["tokens"] = np.zeros(N, np.float32)
    cases.append(Case(p.stem, "dtypes", p, "reject", tools=["info"]))
    # lzf: a filter h5py has and libhdf5 does not.
    p = out / "dtype-lzf-filter.h5"
    write_store(p, ds_kw=dict(compression="lzf"), fletcher=False)
    cases.append(Case(p.stem, "dtypes", p, "reject"))
    return cases


def attributes(out: Path, rng: random.Random) -> list[Case]:
    cases = []
    bad = {
        "seq_len-string": dict(seq_len="forty"),
        "seq_len-negative": dict(seq_len=np.int64(-40)),
        "seq_len-zero": dict(seq_len=np.int64(0)),
        "heads-array": dict(num_q_heads=np.array([4, 4], np.int64)),
        "heads-float": dict(num_q_heads=np.float64(4.5)),
        "gqa-mismatch": dict(num_kv_heads=np.int64(3)),
        "rope-nan": dict(rope_theta=np.float64("nan")),
        "rope-applied-2": dict(rope_applied=np.int64(2)),
        "dtype-unknown": dict(dtype="float8"),
        "dtype-int": dict(dtype=np.int64(16)),
        "model-huge-fixed": dict(model=np.bytes_(b"x" * (2 << 20))),
        "model-array": dict(model=np.array(["a", "b"], dtype=h5py.string_dtype())),
        "num_layers-huge": dict(num_layers=np.int64(1 << 40)),
        "head_dim-mismatch": dict(head_dim=np.int64(32)),
        "creator-vlen-int": dict(creator=np.array([1, 2, 3], dtype=h5py.vlen_dtype(np.int32))),
    }
    for name, attrs in bad.items():
        p = out / f"attr-{name}.h5"
        try:
            write_store(p, attrs={k: v for k, v in attrs.items() if k != "creator"})
            if "creator" in attrs:
                with h5py.File(p, "r+") as f:
                    del f.attrs["creator"]
                    f.attrs.create("creator", data=attrs["creator"][0:1], dtype=attrs["creator"].dtype)
        except Exception:
            continue
        cases.append(Case(p.stem, "attributes (types, values, sizes)", p, "reject"))
    for missing in ("seq_len", "dtype", "rope_applied"):
        p = out / f"attr-missing-{missing}.h5"
        write_store(p, drop=(missing,))
        cases.append(Case(p.stem, "attributes (types, values, sizes)", p, "reject"))
    p = out / "attr-needle-outside.h5"
    write_store(p)
    with h5py.File(p, "r+") as f:
        f["needle"].attrs["position"] = np.int64(N + 5)
    cases.append(Case(p.stem, "attributes (types, values, sizes)", p, "reject"))
    p = out / "attr-many.h5"
    write_store(p)
    with h5py.File(p, "r+") as f:
        for i in range(5000):
            f.attrs[f"extra{i}"] = np.int64(i)
    cases.append(Case(p.stem, "attributes (types, values, sizes)", p, "reject", tools=["info"]))
    return cases


def outside(out: Path, rng: random.Random) -> list[Case]:
    """Anything that makes a reader look outside the file."""
    cases = []
    secret = out / "secret.bin"
    secret.write_bytes(np.arange(HQ * N * D, dtype=np.float16).tobytes() * 2)
    other = out / "other.h5"
    write_store(other)
    # External raw storage pointing at another file.
    p = out / "outside-external-storage.h5"
    write_store(p)
    _replace(p, "layers/00/q", lambda f, n: f.create_dataset(
        n, shape=(HQ, N, D), dtype=np.float16, external=[(str(secret), 0, HQ * N * D * 2)]))
    cases.append(Case(p.stem, "external storage / links / virtual datasets", p, "reject"))
    # External link to a dataset / group of another file.
    p = out / "outside-external-link-ds.h5"
    write_store(p)
    _replace(p, "layers/00/q", lambda f, n: f.__setitem__(n, h5py.ExternalLink(str(other), "/layers/00/q")))
    cases.append(Case(p.stem, "external storage / links / virtual datasets", p, "reject"))
    p = out / "outside-external-link-group.h5"
    write_store(p)
    with h5py.File(p, "r+") as f:
        del f["layers"]
        f["layers"] = h5py.ExternalLink(str(other), "/layers")
    cases.append(Case(p.stem, "external storage / links / virtual datasets", p, "reject"))
    p = out / "outside-soft-link.h5"
    write_store(p)
    with h5py.File(p, "r+") as f:
        del f["layers/01/k"]
        f["layers/01/k"] = h5py.SoftLink("/layers/00/k")
    cases.append(Case(p.stem, "external storage / links / virtual datasets", p, "reject"))
    # Virtual dataset mapping another file.
    p = out / "outside-virtual.h5"
    write_store(p)
    layout = h5py.VirtualLayout(shape=(HQ, N, D), dtype=np.float16)
    layout[:] = h5py.VirtualSource(str(other), "layers/00/q", shape=(HQ, N, D))
    with h5py.File(p, "r+") as f:
        del f["layers/00/q"]
        f.create_virtual_dataset("layers/00/q", layout)
    cases.append(Case(p.stem, "external storage / links / virtual datasets", p, "reject"))
    # The store itself is a symlink / a directory / a device.
    p = out / "outside-symlink-store.h5"
    p.symlink_to(other)
    cases.append(Case(p.stem, "not a file", p, "accept", tools=["info"]))
    p = out / "outside-directory.h5"
    p.mkdir()
    cases.append(Case(p.stem, "not a file", p, "reject", tools=["info"]))
    cases.append(Case("dev-zero", "not a file", Path("/dev/zero"), "reject", tools=["info"]))
    return cases


def truncations(out: Path, rng: random.Random, n: int) -> list[Case]:
    base = out / "trunc-base.h5"
    write_store(base)
    size = base.stat().st_size
    cases = []
    for i in range(n):
        cut = rng.randrange(0, size)
        p = out / f"trunc-{i:03d}-{cut}.h5"
        p.write_bytes(base.read_bytes()[:cut])
        cases.append(Case(p.stem, "truncations", p, "reject"))
    return cases


def _data_ranges(path: Path) -> list[tuple[int, int, str, tuple]]:
    """Byte ranges of raw chunk data (file offsets) of every dataset, with its name and the
    chunk's offset in the dataset."""
    ranges = []
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.chunks:
                for i in range(obj.id.get_num_chunks()):
                    info = obj.id.get_chunk_info(i)
                    ranges.append((info.byte_offset, info.byte_offset + info.size, name, tuple(info.chunk_offset)))
        f.visititems(visit)
    return ranges


def bitflips(out: Path, rng: random.Random, n: int) -> list[Case]:
    """Seeded bit flips: in the raw data (checksummed: must be rejected) and in the metadata
    (latest format: checksummed, mostly rejected; may land in unused bytes: any)."""
    cases = []
    for latest in (True, False):
        base = out / f"flip-base-{'latest' if latest else 'earliest'}.h5"
        write_store(base, latest=latest, fletcher=True)
        data = base.read_bytes()
        ranges = _data_ranges(base)
        in_data = lambda off: any(a <= off < b for a, b, _, _ in ranges)
        for i in range(n):
            buf = bytearray(data)
            where = "data" if (i % 2 == 0) else "meta"
            per_tool = {}
            if where == "data":
                a, b, ds, origin = ranges[rng.randrange(len(ranges))]
                off = rng.randrange(a, b)
                # What each tool reads: info every q/k/v, analyze similarity every q and k,
                # export layer 0 q head 0. A flip elsewhere may pass unnoticed by that tool.
                if ds == "tokens":
                    per_tool = dict(info="any", export="any", analyze="any")
                else:
                    if ds.endswith("/v"):
                        per_tool["analyze"] = "any"
                    if not (ds == "layers/00/q" and origin[0] == 0):
                        per_tool["export"] = "any"
            else:
                off = rng.randrange(len(buf))
                while in_data(off):
                    off = rng.randrange(len(buf))
            buf[off] ^= 1 << rng.randrange(8)
            p = out / f"flip-{'latest' if latest else 'earliest'}-{where}-{i:03d}-{off}.h5"
            p.write_bytes(bytes(buf))
            # A data flip under Fletcher-32 must never pass; metadata flips may hit unused bytes.
            cases.append(Case(p.stem, f"bit flips ({where}, {'latest format' if latest else 'h5py default format'})",
                              p, "reject" if where == "data" else "any", per_tool=per_tool))
    return cases


def generate(out: Path, seed: int, count: int) -> list[Case]:
    """All the fixed classes once, plus `count` truncations and `count` flips per format."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rng = random.Random(seed)
    cases: list[Case] = []
    for gen in (valid, shapes, dtypes, attributes, outside):
        cases += gen(out, rng)
    cases += truncations(out, rng, max(1, count // 4))
    cases += bitflips(out, rng, count)
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--count", type=int, default=20)
    a = ap.parse_args()
    for c in generate(a.out, a.seed, a.count):
        print(json.dumps(c.manifest()))


if __name__ == "__main__":
    main()
