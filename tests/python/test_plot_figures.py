"""scripts/plot_figures.py: every analysis figure from report folders, PNG + PDF with embedded
TrueType fonts; figures whose data is absent are skipped with a note, not an error."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SOURCE_DIR = Path(os.environ.get("PROXYATTN_SOURCE_DIR", Path(__file__).resolve().parents[2]))
BUILD_DIR = Path(os.environ.get("PROXYATTN_BUILD_DIR", SOURCE_DIR / "build" / "cpu"))
ANALYZE = BUILD_DIR / "apps" / "proxyattn-analyze"
DUMP = BUILD_DIR / "apps" / "proxyattn-dump"
PLOT = SOURCE_DIR / "scripts" / "plot_figures.py"
SMOLLM = SOURCE_DIR / "configs" / "models" / "smollm2-135m.json"

pytestmark = pytest.mark.skipif(not (ANALYZE.exists() and DUMP.exists()), reason="proxyattn-analyze/-dump not built")


def run(cmd, check=True):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}): {p.stderr}")
    return p


def plot(*args, check=True):
    return run([sys.executable, PLOT, *args], check=check)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    d = tmp_path_factory.mktemp("plots")
    store = d / "tiny.h5"
    run([DUMP, "synth", store, "--model", SMOLLM, "--len", 400, "--layers", 3, "--seed", 4, "--quiet"])
    full, sim = d / "full", d / "sim"
    common = ["--block", 64, "--sparsity", "0.5,0.7,0.9,0.95", "--quiet"]
    run([ANALYZE, "all", store, "--out", full, *common])
    run([ANALYZE, "similarity", store, "--out", sim, *common])
    return full, sim


def test_every_analysis_figure_png_and_pdf(reports, tmp_path):
    full, _ = reports
    out = tmp_path / "figs"
    p = plot(full, "--out", out)
    for stem in ("fig1_recall_vs_sparsity", "fig2_similarity_tiny", "fig2b_layers", "fig5a_groups", "fig5c_budgets"):
        for ext in ("png", "pdf"):
            f = out / f"{stem}.{ext}"
            assert f.exists() and f.stat().st_size > 1000, f
            assert str(f) in p.stdout
    pdf = (out / "fig1_recall_vs_sparsity.pdf").read_bytes()
    assert b"/Type3" not in pdf and b"/FontFile2" in pdf, "fonts must be embedded TrueType (pdf.fonttype 42)"
    assert (out / "fig1_recall_vs_sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # No bench data given: the kernel figures are skipped with a note.
    assert "fig4" in p.stderr


def test_missing_data_is_skipped_with_a_note(reports, tmp_path):
    _, sim = reports
    out = tmp_path / "figs"
    p = plot(sim, "--out", out, "--layers", "0,2")
    assert (out / "fig2_similarity_tiny.pdf").exists()
    assert not (out / "fig1_recall_vs_sparsity.png").exists()
    assert "fig1" in p.stderr and "fig5a" in p.stderr and "fig5c" in p.stderr


def test_several_report_folders_on_one_plot(reports, tmp_path):
    full, sim = reports
    out = tmp_path / "figs"
    p = plot(full, sim, "--out", out)
    assert (out / "fig1_recall_vs_sparsity.png").exists()
    assert "fig2_similarity_tiny_full.png" in p.stdout and "fig2_similarity_tiny_sim.png" in p.stdout


def test_nothing_to_plot_is_an_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    p = plot(empty, "--out", tmp_path / "figs", check=False)
    assert p.returncode == 1 and "nothing to plot" in p.stderr
    p = plot(tmp_path / "missing", "--out", tmp_path / "figs", check=False)
    assert p.returncode == 1 and "no such folder" in p.stderr
