"""scripts/bench_figures.py's prefill figure and table (issue 16) on synthetic prefill.csv /
prefill_peers.csv files: the files found, figures written, the table's values computed right, and
the kernel figures' inputs kept apart from the prefill ones."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(os.environ.get("PROXYATTN_SOURCE_DIR", Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(SRC / "scripts"))
import bench_figures as bf  # noqa: E402
import bench_peers as bp  # noqa: E402

K128, K256 = 131072, 262144
# (method, n) -> (ttft ms, linear % of ceiling); our full and ProxyAttn, then torch.
OURS = {("full", 8192): (1000.0, 92.0), ("full", K128): (40000.0, 88.0), ("full", K256): (150000.0, 91.0),
        ("proxyattn@density=0.1", 8192): (800.0, 92.0), ("proxyattn@density=0.1", K128): (16000.0, 90.0),
        ("proxyattn@density=0.1", K256): (50000.0, 90.0)}
TORCH = {("torch_sdpa_cudnn", 8192): 1100.0, ("torch_sdpa_cudnn", K128): 38000.0,
         ("torch_sdpa_flash", 8192): 1200.0, ("torch_sdpa_flash", K128): 45000.0}


def row(source, model, method, n, ttft, pct=None, **kw):
    r = {c: None for c in bp.PREFILL_COLUMNS}
    r.update(source=source, device="cuda", model=model, method=method, n=n, dtype="bf16", layers=32, density=1.0,
             status="ok", reason="")
    if ttft is not None:
        r.update(ttft_ms=ttft, ttft_ms_min=0.9 * ttft, ttft_ms_max=1.1 * ttft, reps=3, linear_ms=0.5 * ttft,
                 elementwise_ms=0.05 * ttft, attention_ms=0.4 * ttft, logits_ms=1.0, linear_pct_of_ceiling=pct)
    if ttft is not None and method.startswith("proxyattn"):
        r["estimation_ms"], r["attention_ms"] = 0.02 * ttft, 0.3 * ttft
    r.update(kw)
    return r


def write(d: Path, name: str, rows, ctx):
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(bp.rows_to_csv(rows, bp.PREFILL_COLUMNS))
    (d / name).with_suffix(".json").write_text(json.dumps({"context": ctx, "rows": rows}))


@pytest.fixture()
def results(tmp_path):
    run = tmp_path / "results" / "prefill"
    ours = [row("proxyattn-bench", "llama-3.1-8b", m, n, t, p) for (m, n), (t, p) in OURS.items()]
    ours.append(row("proxyattn-bench", "llama-3.1-8b", "xattn", K256, None, status="skipped",
                    reason="would not fit GPU memory"))
    ours.append(row("proxyattn-bench", "qwen2.5-7b", "full", 8192, 900.0, 93.0))
    write(run, "prefill.csv", ours, {"tool": "proxyattn-bench", "device_name": "H200", "date": "D1",
                                     "git_sha": "abc", "command": "proxyattn-bench --sweep prefill"})
    peers = [row("bench_peers", "llama-3.1-8b", m, n, t) for (m, n), t in TORCH.items()]
    peers.append(row("bench_peers", "llama-3.1-8b", "torch_sdpa_cudnn", K256, None, status="error",
                     reason="OutOfMemoryError: CUDA out of memory"))
    write(run, "prefill_peers.csv", peers, {"tool": "bench_peers", "device_name": "H200", "torch": "2.11",
                                            "date": "D2", "git_sha": "abc", "command": "bench_peers.py --prefill"})
    # A kernel sweep elsewhere: its rows stay out of the prefill figure and the other way round.
    k = tmp_path / "results" / "fig4"
    k.mkdir()
    (k / "bench.csv").write_text(",".join(bp.COLUMNS) + "\n")
    return tmp_path / "results"


def test_prefill_rows_found_and_kept_apart(results):
    rows, ctxs = bf.load_rows([results], "prefill")
    assert len(rows) == len(OURS) + 2 + len(TORCH) + 1
    assert {c["tool"] for c in ctxs} == {"proxyattn-bench", "bench_peers"}
    assert all(isinstance(r["n"], int) for r in rows) and rows[0]["ttft_ms"] == 1000.0
    assert bf.load_rows([results])[0] == []  # the kernel loader does not read prefill files
    # A CSV named directly is taken by its kind.
    assert len(bf.load_rows([results / "prefill" / "prefill_peers.csv"], "prefill")[0]) == len(TORCH) + 1
    assert bf.load_rows([results / "prefill" / "prefill_peers.csv"])[0] == []


def test_prefill_table_values(results):
    rows, ctxs = bf.load_rows([results], "prefill")
    t = bf.prefill_table(rows, ctxs)
    lines = t.splitlines()
    assert "### llama-3.1-8b: time to first token (ms, batch 1), in parentheses the speedup over our full attention" in lines
    assert "| method | 8K | 128K | 256K |" in lines
    assert "| full | 1000.0 | 40000.0 | 150000.0 |" in lines
    assert "| proxyattn@density=0.1 | 800.0 (1.25×) | 16000.0 (2.50×) | 50000.0 (3.00×) |" in lines
    assert "| xattn |  |  | skipped |" in lines
    assert "| torch_sdpa_cudnn (torch) | 1100.0 (0.91×) | 38000.0 (1.05×) | error |" in lines
    assert "| torch_sdpa_flash (torch) | 1200.0 (0.83×) | 45000.0 (0.89×) |  |" in lines
    assert "| linear % of GEMM ceiling (our full) | 92 % | 88 % | 91 % |" in lines
    # Order: ours (sweep order), then torch.
    meth = [ln.split(" | ")[0] for ln in lines if ln.startswith("| ") and "(ms" not in ln]
    assert meth.index("| full") < meth.index("| proxyattn@density=0.1") < meth.index("| torch_sdpa_cudnn (torch)")
    # Targets: lowest linear share 88 % (no); full/cuDNN worst 40000/38000 at 128K (no); 2.5x at 128K (yes).
    assert "| linear layers ≥ 90 % of the GEMM ceiling | lowest 88.0 % over 3 length(s) | no |" in lines
    assert ("| our full-attention TTFT ≤ torch + SDPA cuDNN at every N | worst ratio 1.05 at 128K over 2 length(s) "
            "| no |") in lines
    assert "| ProxyAttn at density 0.1: ≥ 2.4× over our full at 128K | 2.50× (256K: 3.00×) | yes |" in lines
    assert "xattn 256K: skipped (would not fit GPU memory)" in t and "OutOfMemoryError" in t
    # The second model: its own table, targets without data are n/a.
    assert "### qwen2.5-7b: time to first token (ms, batch 1), in parentheses the speedup over our full attention" in lines
    assert "| full | 900.0 |" in lines
    assert "| ProxyAttn at density 0.1: ≥ 2.4× over our full at 128K | n/a (256K: n/a) | n/a |" in lines
    # Provenance: both tools' commands.
    assert "`proxyattn-bench --sweep prefill`" in t and "`bench_peers.py --prefill`" in t and "torch 2.11" in t


def test_prefill_figures_written(results, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "fig"
    paths = bf.bench_figures([results], out)
    names = {Path(p).name for p in paths}
    assert {"prefill_llama-3.1-8b.png", "prefill_llama-3.1-8b.pdf", "prefill_qwen2.5-7b.png",
            "prefill_table.md"} <= names
    assert "fig4_speedup.png" not in names  # no kernel rows: no kernel figures, no P1-P4 table
    assert "p_targets.md" not in names
    for p in paths:
        assert Path(p).stat().st_size > 1000, p
    assert (out / "prefill_table.md").read_text().startswith("## Prefill: time to first token")
    assert not list(out.glob("*.tmp-*"))


def test_prefill_figures_command_line(results, tmp_path):
    out = tmp_path / "fig"
    p = subprocess.run([sys.executable, str(SRC / "scripts" / "bench_figures.py"), str(results), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert str(out / "prefill_table.md") in p.stdout.splitlines()
    p = subprocess.run([sys.executable, str(SRC / "scripts" / "bench_figures.py"), str(tmp_path / "none"),
                        "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "no such file" in p.stderr


def test_plot_figures_draws_the_prefill_figures(results, tmp_path):
    pytest.importorskip("matplotlib")
    import plot_figures
    paths = plot_figures.bench([results], tmp_path / "all")
    assert {"prefill_llama-3.1-8b.png", "prefill_table.md"} <= {Path(p).name for p in paths}
