#!/usr/bin/env python3
"""Figures and the P1-P4 table of the kernel benchmarks (proxyattn-bench + scripts/bench_peers.py).

  Fig. 4 analogue  fig4_speedup.{png,pdf}: speedup over dense causal attention (SDPA flash, i.e.
                   FlashAttention-2, measured in the same run; our own full kernel when it is absent)
                   vs sequence length, one line per method, peers included.
  Fig. 5b analogue fig5b_estimation.{png,pdf}: estimation latency at 128K (or the longest length
                   measured) as a percentage of our full causal attention, per estimator.
  p_targets.md     the P1-P4 rows of PERFORMANCE.md with the measured values, device, date, command.
  prefill_MODEL.{png,pdf}  whole-model prefill (issue 16): time to first token vs N per method
                   (log-log, torch peers dashed), and the stages (linear, elementwise, estimation,
                   attention, logits) of our full attention and ProxyAttn at density 0.1 as stacked
                   bars, in % of our full-attention TTFT at each N.
  prefill_table.md per model: TTFT per method vs N with the speedup over our full attention, torch
                   SDPA's TTFT, the linear layers' % of the GEMM ceiling, and issue 16's targets.

Input: directories holding bench.csv / peers.csv and prefill.csv / prefill_peers.csv (searched
recursively) plus their .json twins (for the context: device, date, command). Hook for
scripts/plot_figures.py:

  from bench_figures import bench_figures
  bench_figures(["results/bench"], "figures")     # returns the paths written

  python3 scripts/bench_figures.py results/bench --out figures
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peers import PREFILL_COLUMNS, PREFILL_PEER_METHODS, PREFILL_STAGES  # noqa: E402

NUM = {"n", "q_heads", "kv_heads", "head_dim", "block", "density_target", "density", "element_density", "gamma",
       "estimation_ms", "kernel_ms", "total_ms", "total_ms_min", "total_ms_max", "reps", "tflops_done",
       "tflops_effective", "speedup_vs_full", "pct_of_full"}


def _num(v):
    if v is None or v == "":
        return None
    try:
        x = float(v)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


PREFILL_NUM = set(PREFILL_COLUMNS) - {"source", "device", "model", "method", "dtype", "status", "reason"}
PREFILL_FILES = ("prefill.csv", "prefill_peers.csv")
KERNEL_FILES = ("bench.csv", "peers.csv")


def load_rows(dirs, kind="kernel") -> tuple[list, list]:
    """All rows of bench.csv / peers.csv (kind "prefill": prefill.csv / prefill_peers.csv) under
    dirs, and the contexts of their .json twins. A CSV named directly is taken when it is of the
    kind (prefill files by their names, any other CSV as a kernel file)."""
    names, num = (PREFILL_FILES, PREFILL_NUM) if kind == "prefill" else (KERNEL_FILES, NUM)
    rows, ctxs = [], []
    for d in dirs:
        d = Path(d)
        if d.is_file():
            files = [d] if (d.name in PREFILL_FILES) == (kind == "prefill") else []
        else:
            files = sorted(f for name in names for f in d.rglob(name))
        for f in files:
            with open(f, newline="", encoding="utf-8") as fh:
                for r in csv.DictReader(fh):
                    for k in num:
                        if k in r:
                            r[k] = _num(r[k])
                    if r.get("n") is not None:
                        r["n"] = int(r["n"])
                    r["_file"] = str(f)
                    rows.append(r)
            js = f.with_suffix(".json")
            if js.exists():
                try:
                    c = json.loads(js.read_text(encoding="utf-8")).get("context", {})
                    c["_file"] = str(js)
                    c.setdefault("tool", rows[-1]["source"] if rows and rows[-1].get("_file") == str(f) else "?")
                    ctxs.append(c)
                except (OSError, json.JSONDecodeError):
                    pass
    return rows, ctxs


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok" and r.get("total_ms")]


def _time(rows, method, n, source=None):
    for r in _ok(rows):
        if r["method"] == method and r["n"] == n and (source is None or r["source"] == source):
            return r["total_ms"]
    return None


def _row(rows, method, n, near=None):
    """The row of (method, n); with `near`, one from the same sweep directory when there is one
    (ratios within one sweep's run)."""
    found = [r for r in _ok(rows) if r["method"] == method and r["n"] == n]
    if near is not None:
        same = [r for r in found if Path(r["_file"]).parent == Path(near["_file"]).parent]
        if same:
            return same[0]
    return found[0] if found else None


def _label_len(n):
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def save_figure(fig, out_dir: Path, stem: str) -> list:
    """Writes STEM.png and STEM.pdf, closes the figure, returns the two paths."""
    import matplotlib.pyplot as plt
    paths = []
    for ext in ("png", "pdf"):
        p = out_dir / f"{stem}.{ext}"
        fig.savefig(p, dpi=150)
        paths.append(str(p))
    plt.close(fig)
    return paths


def fig4(rows, out_dir: Path) -> list:
    import matplotlib
    matplotlib.use("Agg")
    matplotlib.rcParams["pdf.fonttype"] = 42
    import matplotlib.pyplot as plt

    ok = [r for r in _ok(rows) if r["family"] != "estimate" and not r["family"].endswith("estimate")]
    if not ok:
        return []
    lengths = sorted({r["n"] for r in ok})
    have_flash = any(r["method"] == "sdpa_flash" for r in ok)
    base_name = "sdpa_flash" if have_flash else "full"
    methods = []
    for r in ok:
        if r["method"] not in methods:
            methods.append(r["method"])
    # One colour per mask / kernel: our sparse@D and FlexAttention on the same mask share it
    # (solid: ours, dashed: peer), so the same-mask comparison reads off directly.
    keys = []
    for m in methods:
        k = m.split(":", 1)[1] if m.startswith("flex_sparse:") else m
        if k not in keys:
            keys.append(k)
    cmap = plt.get_cmap("tab20")
    color = {k: cmap(i % 20) for i, k in enumerate(keys)}
    fig, ax = plt.subplots(figsize=(11, 6))
    for m in methods:
        xs, ys = [], []
        for n in lengths:
            t, b = _time(ok, m, n), _time(ok, base_name, n)
            if t and b:
                xs.append(n)
                ys.append(b / t)
        if not xs:
            continue
        ours = any(r["method"] == m and r["source"] == "proxyattn-bench" for r in ok)
        style = "-" if ours else "--"
        marker = "o" if m.startswith("proxyattn") else ("s" if ours else "^")
        lw = 2.4 if m.startswith("proxyattn") else 1.4
        key = m.split(":", 1)[1] if m.startswith("flex_sparse:") else m
        ax.plot(xs, ys, style, marker=marker, lw=lw, ms=4, color=color[key], label=m + ("" if ours else " (peer)"))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([_label_len(n) for n in lengths])
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel(f"speedup over dense causal ({'SDPA flash / FA2' if have_flash else 'our full kernel'})")
    ax.set_title("Fig. 4 analogue: attention speedup vs length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return save_figure(fig, out_dir, "fig4_speedup")


def fig5b(rows, out_dir: Path, n_target=131072) -> list:
    import matplotlib
    matplotlib.use("Agg")
    matplotlib.rcParams["pdf.fonttype"] = 42
    import matplotlib.pyplot as plt

    est = [r for r in _ok(rows) if r["family"] == "estimate" or r["family"].endswith("estimate")]
    if not est:
        return []
    lengths = sorted({r["n"] for r in est})
    n = n_target if n_target in lengths else lengths[-1]
    full = _time(rows, "full", n, "proxyattn-bench") or _time(rows, "sdpa_flash", n)
    if not full:
        return []
    base = "our full kernel" if _time(rows, "full", n, "proxyattn-bench") else "SDPA flash"
    def pct(r):  # against our full kernel timed in the same sweep run where there is one
        f = _row(rows, "full", n, r)
        return 100.0 * r["total_ms"] / (f["total_ms"] if f else full)
    items = sorted(((r["method"], pct(r), r["source"]) for r in est if r["n"] == n), key=lambda x: x[1])
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(items) + 1.5))
    colors = ["tab:blue" if s == "proxyattn-bench" else "tab:orange" for _, _, s in items]
    ax.barh([m for m, _, _ in items], [p for _, p, _ in items], color=colors)
    for i, (_, p, _) in enumerate(items):
        ax.text(p, i, f" {p:.1f} %", va="center", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel(f"estimation time, % of {base} at {_label_len(n)} ({full:.1f} ms), same run")
    ax.set_title(f"Fig. 5b analogue: estimation latency at {_label_len(n)} (blue: ours, orange: peers)")
    fig.tight_layout()
    return save_figure(fig, out_dir, "fig5b_estimation")


def p_table(rows, ctxs, n=131072) -> str:
    """PERFORMANCE.md's P1-P4 with the measured values (None where a number is missing)."""
    def fmt(x, spec="{:.1f}"):
        return "n/a" if x is None else spec.format(x)

    pa = _row(rows, "proxyattn@density=0.1", n)
    full = _row(rows, "full", n, pa)
    flash, cudnn = _row(rows, "sdpa_flash", n, full), _row(rows, "sdpa_cudnn", n, full)
    sp = _row(rows, "sparse@0.1", n, full)
    flex_sp = _row(rows, "flex_sparse:sparse@0.1", n, sp)
    est = _row(rows, "estimate:proxy[g=1,s=1]", n)
    est_full = _row(rows, "full", n, est) if est else None
    t_full = full["total_ms"] if full else None
    lines = ["| # | what | measured | target | met |", "|---|---|---|---|---|"]

    p1 = full["tflops_effective"] if full else None
    lines.append(
        f"| P1 | our full causal attention at {_label_len(n)} | {fmt(t_full, '{:.1f}')} ms, {fmt(p1)} TFLOP/s "
        f"(SDPA flash {fmt(flash['tflops_effective'] if flash else None)}, cuDNN "
        f"{fmt(cudnn['tflops_effective'] if cudnn else None)} TFLOP/s, same run) | ≥ 600 TFLOP/s; first ≥ FA2 | "
        f"{'yes' if p1 and p1 >= 600 else ('≥ FA2' if p1 and flash and p1 >= flash['tflops_effective'] else 'no' if p1 else 'n/a')} |")
    t_sp = sp["total_ms"] if sp else None
    bound = 1.1 * 0.1 * t_full if t_full else None
    lines.append(
        f"| P2 | our block-sparse kernel, density 0.1, same mask as FlexAttention | {fmt(t_sp, '{:.2f}')} ms "
        f"(FlexAttention {fmt(flex_sp['total_ms'] if flex_sp else None, '{:.2f}')} ms; 1.1 × 0.1 × our full = "
        f"{fmt(bound, '{:.2f}')} ms) | ≤ 26 ms and ≤ 1.1 × density × full | "
        f"{'yes' if t_sp and t_sp <= 26 and bound and t_sp <= bound else ('no' if t_sp else 'n/a')} |")
    # Estimation against the full kernel timed in the same sweep run.
    t_est_full = est_full["total_ms"] if est_full else t_full
    p3 = 100 * est["total_ms"] / t_est_full if est and t_est_full else None
    p3b = 100 * pa["estimation_ms"] / t_full if pa and pa.get("estimation_ms") and t_full else None
    lines.append(
        f"| P3 | ProxyAttn estimation (proxy scores + budgets + selection) at {_label_len(n)} | "
        f"{fmt(est['total_ms'] if est else None, '{:.2f}')} ms = {fmt(p3, '{:.2f}')} % of our full "
        f"(inside proxyattn@density=0.1: {fmt(p3b, '{:.2f}')} %) | ≤ 3 % | "
        f"{'yes' if p3 is not None and p3 <= 3 else ('no' if p3 is not None else 'n/a')} |")
    s_flash = flash["total_ms"] / pa["total_ms"] if pa and flash else None
    s_full = t_full / pa["total_ms"] if pa and t_full else None
    lines.append(
        f"| P4 | ProxyAttn end to end at {_label_len(n)}, 90 % sparsity (density {fmt(pa['density'] if pa else None, '{:.3f}')}) | "
        f"{fmt(pa['total_ms'] if pa else None, '{:.2f}')} ms: {fmt(s_flash, '{:.2f}')}× over SDPA flash, "
        f"{fmt(s_full, '{:.2f}')}× over our full | ≥ 12× over flash, ≥ 8× over our full | "
        f"{'yes' if s_flash and s_full and s_flash >= 12 and s_full >= 8 else ('no' if s_flash or s_full else 'n/a')} |")
    return "\n".join(lines) + "\n" + provenance(ctxs)


def provenance(ctxs) -> str:
    """Where the numbers come from: one line per tool run (device, torch, date, git, command)."""
    if not ctxs:
        return ""
    uniq, seen = [], set()
    for c in ctxs:
        key = (c.get("tool"), c.get("command") or c.get("_file"))
        if key not in seen:
            seen.add(key)
            uniq.append(c)
    # One tool run per line; several lines are several runs (say so: their ratios mix sessions).
    out = "\nMeasured in one run:\n\n" if len(uniq) == 1 else f"\nMeasured in {len(uniq)} tool runs:\n\n"
    for c in uniq:
        dev = c.get("device_name", "?")
        extra = f", torch {c['torch']}" if c.get("torch") else ""
        smi = c.get("nvidia_smi_start") or ""
        cmd = f": `{c['command']}`" if c.get("command") else f" ({c['_file']})" if c.get("_file") else ""
        out += (f"- {c.get('tool', '?')} on {dev}{extra}, {c.get('date', '?')}, git {c.get('git_sha', '?')}"
                f"{(', nvidia-smi: ' + smi) if smi else ''}{cmd}\n")
    return out


# ---------------------------------------------------------------- prefill (issue 16)

OUR_PREFILL_ORDER = ["full", "proxyattn@density=0.1", "proxyattn@density=0.05", "proxyattn@gamma=0.95",
                     "pooled", "xattn", "vslash"]
STAGE_COLORS = {"linear": "tab:blue", "elementwise": "tab:gray", "estimation": "tab:orange",
                "attention": "tab:red", "logits": "tab:green"}


def _pok(rows):
    return [r for r in rows if r.get("status") == "ok" and r.get("ttft_ms")]


def _prow(rows, model, method, n, near=None):
    """The ok row of (model, method, n); with `near`, one from the same directory when there is one
    (our full attention and torch in one run: bench and bench_peers write to the same --out)."""
    found = [r for r in _pok(rows) if r["model"] == model and r["method"] == method and r["n"] == n]
    if near is not None:
        same = [r for r in found if Path(r["_file"]).parent == Path(near["_file"]).parent]
        if same:
            return same[0]
    return found[0] if found else None


def _prefill_methods(rows, model) -> list:
    """Ours in the sweep's order (others as they come), then the torch peers."""
    seen = []
    for r in rows:
        if r["model"] == model and r["method"] not in seen:
            seen.append(r["method"])
    ours = [m for m in OUR_PREFILL_ORDER if m in seen] + [
        m for m in seen if m not in OUR_PREFILL_ORDER and m not in PREFILL_PEER_METHODS]
    return ours + [m for m in PREFILL_PEER_METHODS if m in seen]


def _models(rows) -> list:
    out = []
    for r in rows:
        if r["model"] not in out:
            out.append(r["model"])
    return out


def prefill_speedup(rows, r):
    """Our full-attention TTFT / this row's TTFT at the same (model, N)."""
    full = _prow(rows, r["model"], "full", r["n"], r)
    return full["ttft_ms"] / r["ttft_ms"] if full and r.get("ttft_ms") else None


def fig_prefill(rows, out_dir: Path) -> list:
    import matplotlib
    matplotlib.use("Agg")
    matplotlib.rcParams["pdf.fonttype"] = 42
    import matplotlib.pyplot as plt

    ok = _pok(rows)
    paths = []
    for model in _models(ok):
        lengths = sorted({r["n"] for r in ok if r["model"] == model})
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(15, 5.5))
        cmap = plt.get_cmap("tab10")
        for i, m in enumerate(_prefill_methods(ok, model)):
            pts = [(n, _prow(ok, model, m, n)) for n in lengths]
            pts = [(n, r["ttft_ms"] / 1e3) for n, r in pts if r]
            if not pts:
                continue
            peer = m in PREFILL_PEER_METHODS
            ax.plot([n for n, _ in pts], [t for _, t in pts], "--" if peer else "-", marker="^" if peer else "o",
                    lw=2.4 if m.startswith("proxyattn@density=0.1") else 1.4, ms=4, color=cmap(i % 10),
                    label=m + (" (torch)" if peer else ""))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths)
        ax.set_xticklabels([_label_len(n) for n in lengths])
        ax.set_xlabel("prompt length N (tokens)")
        ax.set_ylabel("time to first token (s), batch 1")
        ax.set_title(f"{model}: prefill time vs N")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        # Stages of our full attention and ProxyAttn at density 0.1, in % of full's TTFT at each N.
        width, top = 0.38, 100.0
        for j, (m, hatch) in enumerate((("full", ""), ("proxyattn@density=0.1", "//"))):
            for x, n in enumerate(lengths):
                r, full = _prow(ok, model, m, n), _prow(ok, model, "full", n)
                if not r or not full:
                    continue
                bottom = 0.0
                for st in PREFILL_STAGES:
                    v = 100.0 * (r.get(f"{st}_ms") or 0.0) / full["ttft_ms"]
                    bx.bar(x + (j - 0.5) * width, v, width, bottom=bottom, color=STAGE_COLORS[st], hatch=hatch,
                           edgecolor="white", lw=0.5, label=st if (j, x) == (0, 0) else None)
                    bottom += v
                bx.text(x + (j - 0.5) * width, bottom, f"{r['ttft_ms'] / 1e3:.3g} s", ha="center", va="bottom",
                        fontsize=6)
                top = max(top, bottom)
        bx.bar(0, 0, 0, color="white", edgecolor="black", hatch="//", label="proxyattn@density=0.1 (hatched)")
        bx.set_xticks(range(len(lengths)))
        bx.set_xticklabels([_label_len(n) for n in lengths])
        bx.set_xlabel("prompt length N (left: full, right: proxyattn@density=0.1)")
        bx.set_ylabel("% of our full-attention TTFT at that N")
        bx.set_title(f"{model}: where the prefill time goes")
        bx.set_ylim(0, 1.3 * top)  # room for the legend above the bars
        bx.legend(fontsize=7, loc="upper center", ncol=3)
        bx.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        stem = "prefill_" + "".join(c if c.isalnum() or c in "-._" else "_" for c in model)
        paths += save_figure(fig, out_dir, stem)
    return paths


def prefill_table(rows, ctxs) -> str:
    """Per model: TTFT (ms) per method vs N with the speedup over our full attention, the linear
    layers' % of the GEMM ceiling, and issue 16's targets."""
    def fmt(x, spec="{:.1f}"):
        return "n/a" if x is None else spec.format(x)

    out = []
    for model in _models(rows):
        lengths = sorted({r["n"] for r in rows if r["model"] == model})
        out += [f"### {model}: time to first token (ms, batch 1), in parentheses the speedup over our full "
                "attention\n",
                "| method | " + " | ".join(_label_len(n) for n in lengths) + " |",
                "|---|" + "---|" * len(lengths)]
        for m in _prefill_methods(rows, model):
            cells = []
            for n in lengths:
                r = _prow(rows, model, m, n)
                if r is None:
                    st = next((x["status"] for x in rows if x["model"] == model and x["method"] == m
                               and x["n"] == n), "")
                    cells.append(st or "")
                    continue
                sp = prefill_speedup(rows, r)
                cells.append(f"{r['ttft_ms']:.1f}" + (f" ({sp:.2f}×)" if m != "full" and sp else ""))
            out.append(f"| {m}{' (torch)' if m in PREFILL_PEER_METHODS else ''} | " + " | ".join(cells) + " |")
        pct = [_prow(rows, model, "full", n) for n in lengths]
        out.append("| linear % of GEMM ceiling (our full) | " + " | ".join(
            fmt(r.get("linear_pct_of_ceiling") if r else None, "{:.0f} %") for r in pct) + " |")
        # Issue 16's targets.
        fulls = [r for r in pct if r]
        pcts = [r["linear_pct_of_ceiling"] for r in fulls if r.get("linear_pct_of_ceiling") is not None]
        vs = [(r["n"], r["ttft_ms"] / c["ttft_ms"]) for r in fulls
              for c in [_prow(rows, model, "torch_sdpa_cudnn", r["n"], r)] if c]
        worst = max(vs, key=lambda x: x[1]) if vs else None
        sp = {n: prefill_speedup(rows, r) for n in lengths
              for r in [_prow(rows, model, "proxyattn@density=0.1", n)] if r}
        n128 = 131072 if 131072 in sp else None
        out += ["", "| target | measured | met |", "|---|---|---|",
                f"| linear layers ≥ 90 % of the GEMM ceiling | lowest {fmt(min(pcts) if pcts else None, '{:.1f} %')} "
                f"over {len(pcts)} length(s) | {'n/a' if not pcts else ('yes' if min(pcts) >= 90 else 'no')} |",
                f"| our full-attention TTFT ≤ torch + SDPA cuDNN at every N | worst ratio "
                f"{fmt(worst[1] if worst else None, '{:.2f}')}"
                f"{(' at ' + _label_len(worst[0])) if worst else ''} over {len(vs)} length(s) | "
                f"{'n/a' if not vs else ('yes' if worst[1] <= 1 else 'no')} |",
                f"| ProxyAttn at density 0.1: ≥ 2.4× over our full at 128K | "
                f"{fmt(sp.get(131072), '{:.2f}×')} (256K: {fmt(sp.get(262144), '{:.2f}×')}) | "
                f"{'n/a' if n128 is None or sp[n128] is None else ('yes' if sp[n128] >= 2.4 else 'no')} |", ""]
        bad = [r for r in rows if r["model"] == model and r.get("status") not in ("ok", None)]
        if bad:
            out.append("Not run: " + "; ".join(f"{r['method']} {_label_len(r['n'])}: {r['status']} "
                                               f"({r.get('reason', '')})" for r in bad) + "\n")
    return "\n".join(out) + provenance(ctxs)


def _write_atomic(p: Path, text: str) -> None:
    tmp = p.with_name(p.name + f".tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)


def bench_figures(dirs, out_dir) -> list:
    rows, ctxs = load_rows(dirs)
    prows, pctxs = load_rows(dirs, "prefill")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        paths += fig4(rows, out)
        paths += fig5b(rows, out)
        paths += fig_prefill(prows, out)
    except ImportError as e:  # matplotlib missing: the tables still come
        print(f"bench_figures: no figures ({e})", file=sys.stderr)
    if rows or not prows:
        p = out / "p_targets.md"
        _write_atomic(p, "# P1–P4 (PERFORMANCE.md), measured\n\n" + p_table(rows, ctxs))
        paths.append(str(p))
    if prows:
        p = out / "prefill_table.md"
        _write_atomic(p, "## Prefill: time to first token of the whole model (issue 16)\n\n" + prefill_table(prows, pctxs))
        paths.append(str(p))
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Fig. 4 / Fig. 5b analogues, the P1-P4 table, the prefill figure "
                                             "and table")
    ap.add_argument("results", nargs="+", help="directories (or CSV files) with bench.csv / peers.csv / "
                                               "prefill.csv / prefill_peers.csv")
    ap.add_argument("--out", required=True, help="output directory")
    a = ap.parse_args(argv)
    for d in a.results:
        if not Path(d).exists():
            print(f"bench_figures: error: {d}: no such file or directory", file=sys.stderr)
            return 2
    for p in bench_figures(a.results, a.out):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
