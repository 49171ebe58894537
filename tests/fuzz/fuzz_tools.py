"""Fuzz driver (issue #17): runs proxyattn-dump and proxyattn-analyze on the hostile stores of
hostile_stores.py and fails on any of

- a crash (killed by a signal), a hang (timeout), a sanitizer report (ASan/UBSan/LSan);
- an error that is not exactly one line `proxyattn-<tool>: error: ...` with a non-zero exit;
- a partial output: an output file or report folder, or a temporary (`*.tmp-*`), left by a
  failed run; an incomplete one after a successful run;
- silent acceptance: exit 0 on a store the generator marks as known-bad;
- a valid store rejected.

    python tests/fuzz/fuzz_tools.py --build build/cpu --seed 17 --count 12 --time-limit 50   # CI (ctest fuzz_short)
    python tests/fuzz/fuzz_tools.py --build build/cpu --seed 1 --count 400 --time-limit 3600  # the long run
    python tests/fuzz/fuzz_tools.py --build build/debug-asan --seed 1 --count 40              # under ASan/UBSan

Prints a table of classes x outcomes; exit 1 on any failure (each printed with its command).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostile_stores  # noqa: E402

ERROR_LINE = re.compile(r"^proxyattn-(dump|analyze): error: \S.*$")
SANITIZER = re.compile(r"(ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:|UndefinedBehaviorSanitizer|"
                       r"AddressSanitizer:DEADLYSIGNAL|terminate called)")


def is_asan(binary: Path) -> bool:
    try:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30).stdout
    except Exception:
        return False
    return "libasan" in out or "libubsan" in out


def leftovers(dirpath: Path) -> list[str]:
    return sorted(p.name for p in dirpath.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


class Driver:
    def __init__(self, build: Path, work: Path, timeout: float, asan: bool):
        self.dump = build / "apps" / "proxyattn-dump"
        self.analyze = build / "apps" / "proxyattn-analyze"
        self.work = work
        self.timeout = timeout
        self.asan = asan
        self.env = dict(os.environ, PROXYATTN_MEMORY_LIMIT="2G", OMP_NUM_THREADS="2",
                        ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:allocator_may_return_null=1",
                        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
                        LSAN_OPTIONS=f"suppressions={Path(__file__).resolve().parent / 'lsan.supp'}:print_suppressions=0")
        self.n = 0

    def _limits(self):
        if not self.asan:  # ASan reserves terabytes of virtual memory
            resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    def command(self, tool: str, store: Path) -> tuple[list[str], Path, str]:
        self.n += 1
        if tool == "info":
            return [str(self.dump), "info", str(store), "--json", "-q"], None, "none"
        if tool == "export":
            out = self.work / f"export-{self.n}.npy"
            return [str(self.dump), "export", str(store), "--layer", "0", "--head", "0", "-o", str(out)], out, "file"
        out = self.work / f"report-{self.n}"
        return [str(self.analyze), "similarity", str(store), "--out", str(out), "--quiet", "--block", "16",
                "--threads", "2"], out, "dir"

    def run(self, case: hostile_stores.Case, tool: str) -> tuple[str, str]:
        """Returns (outcome, detail): outcome in accepted / rejected / FAIL:<why>."""
        cmd, out, kind = self.command(tool, case.path)
        t0 = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout, env=self.env,
                               preexec_fn=self._limits, errors="replace")
        except subprocess.TimeoutExpired:
            return "FAIL:hang", " ".join(cmd)
        detail = f"{' '.join(cmd)} -> rc {p.returncode} in {time.time() - t0:.1f}s; stderr: {p.stderr.strip()[-600:]}"
        if p.returncode < 0:
            return f"FAIL:signal {signal.Signals(-p.returncode).name}", detail
        if SANITIZER.search(p.stderr):
            return "FAIL:sanitizer", detail
        left = leftovers(self.work)
        if left:
            for name in left:
                shutil.rmtree(self.work / name, ignore_errors=True) if (self.work / name).is_dir() else (self.work / name).unlink()
            return "FAIL:temporary left", detail + f"; left: {left}"
        if p.returncode != 0:
            lines = [l for l in p.stderr.splitlines() if l.strip()]
            if len(lines) != 1 or not ERROR_LINE.match(lines[0]):
                return "FAIL:error line", detail
            if p.returncode == 1 and re.search(r"bad_alloc|filesystem error|std::", lines[0]):
                return "FAIL:raw exception text", detail
            if out is not None and os.path.lexists(out):
                return "FAIL:partial output", detail
            if case.expect_for(tool) == "accept":
                return "FAIL:valid store rejected", detail
            return "rejected", detail
        # Success: complete output, and only where acceptance is allowed.
        if kind == "file":
            import numpy as np
            try:
                a = np.load(out)
                assert a.shape == (hostile_stores.N, hostile_stores.D)
            except Exception as e:  # noqa: BLE001
                return "FAIL:incomplete output", detail + f"; {e}"
            out.unlink()
        elif kind == "dir":
            try:
                json.loads((out / "report.json").read_text())
            except Exception as e:  # noqa: BLE001
                return "FAIL:incomplete output", detail + f"; {e}"
            shutil.rmtree(out)
        elif kind == "none":
            try:
                json.loads(p.stdout)
            except Exception as e:  # noqa: BLE001
                return "FAIL:incomplete output", detail + f"; {e}"
        if case.expect_for(tool) == "reject":
            return "FAIL:silent acceptance", detail
        # "any": damage this tool does not read, or that no checksum covers (unused bytes,
        # string values in the global heap, the pre-1.8 format).
        return "accepted" if case.expect_for(tool) == "accept" else "accepted (damage unread/undetectable)", detail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", type=Path, required=True, help="CMake build folder (has apps/)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--count", type=int, default=12, help="bit flips per format (truncations: count/4)")
    ap.add_argument("--time-limit", type=float, default=600, help="stop starting new runs after this many seconds")
    ap.add_argument("--timeout", type=float, default=60, help="per run")
    ap.add_argument("--work", type=Path, help="folder for stores and outputs (default: a temporary one)")
    ap.add_argument("--json", type=Path, help="write the outcome counts here")
    a = ap.parse_args()
    t_start = time.time()
    work = a.work or Path(tempfile.mkdtemp(prefix="proxyattn-fuzz-"))
    stores, outs = work / "stores", work / "out"
    cases = hostile_stores.generate(stores, a.seed, a.count)
    outs.mkdir(parents=True, exist_ok=True)
    drv = Driver(a.build, outs, a.timeout, is_asan(a.build / "apps" / "proxyattn-dump"))
    # Fixed classes first, then the random ones in a seeded order (a time cut keeps a mix).
    fixed = [c for c in cases if not c.name.startswith(("trunc-", "flip-"))]
    rand = [c for c in cases if c.name.startswith(("trunc-", "flip-"))]
    random.Random(a.seed).shuffle(rand)
    table: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    failures = []
    runs = 0
    for case in fixed + rand:
        for tool in case.tools:
            if time.time() - t_start > a.time_limit:
                break
            outcome, detail = drv.run(case, tool)
            runs += 1
            table[case.klass][outcome] += 1
            if outcome.startswith("FAIL"):
                failures.append((case.name, tool, outcome, detail))
    elapsed = time.time() - t_start
    outcomes = sorted({o for row in table.values() for o in row})
    print(f"fuzz: seed {a.seed}, {runs} runs on {len(cases)} stores in {elapsed:.0f} s"
          f"{' (ASan/UBSan build)' if drv.asan else ''}")
    print("| class | " + " | ".join(outcomes) + " |")
    print("|---|" + "---|" * len(outcomes))
    for klass, row in table.items():
        print(f"| {klass} | " + " | ".join(str(row.get(o, 0)) for o in outcomes) + " |")
    for name, tool, outcome, detail in failures:
        print(f"{outcome}: {name} [{tool}]: {detail}")
    if a.json:
        a.json.write_text(json.dumps(dict(seed=a.seed, runs=runs, stores=len(cases), seconds=elapsed,
                                          table=table, failures=failures), indent=1, default=dict))
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
