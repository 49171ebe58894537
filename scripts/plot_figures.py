#!/usr/bin/env python3
"""Every figure of the suite from report folders: one command, PNG + PDF (fonts embedded).

  scripts/plot_figures.py REPORT_DIR... --out FIGDIR [--layers 0,14,29]

Reads only what the tools wrote: report.json of `proxyattn-analyze` (its tables are the same
data as the CSV files beside it) and, for the kernel and prefill figures, the bench.csv / peers.csv
and prefill.csv / prefill_peers.csv files of `proxyattn-bench` / scripts/bench_peers.py (drawn by
scripts/bench_figures.py). A figure whose
data is absent is skipped with a note on stderr; the paths written are printed on stdout.

  fig1_recall_vs_sparsity   Fig. 1 analogue: mass recall vs sparsity, every method on one plot
                            (each method's selection brought to the fixed sparsities; its native
                            operating points as open markers), oracle = upper bound.
  fig2_similarity_<store>   Fig. 2 analogue, per store: for a few layers, the head x head top-k
                            token overlap (top row) and each head's oracle budget at gamma
                            (bottom row): "same tokens, different sparsity".
  fig2b_layers              head agreement (top-k overlap, Spearman) and the spread of the
                            per-head oracle budget vs layer depth.
  fig5a_groups              Fig. 5a analogue: mass recall at 90 % / 95 % sparsity vs the number
                            of proxy groups g.
  fig5c_budgets             Fig. 5c analogue: mass recall and output error vs sparsity for the
                            dynamic, uniform and token budgets (ProxyAttn's scores).
  fig4_* / fig5b_* / prefill_*  kernel and prefill figures (scripts/bench_figures.py), when bench
                            data is given.
  fig_eval_accuracy         from a `proxyattn-eval sweep` folder: NIAH accuracy and Δ perplexity
                            vs sparsity per method (sparse attention in every layer; lines: fixed
                            sparsities, open markers: native points, gray: full attention).
  fig_eval_vs_recall        with an analysis report of the same selections beside it: each sweep
                            point's end-to-end Δ perplexity and NIAH accuracy against the
                            per-layer mass recall (and output error, where the analysis has it)
                            measured for the same selection id.

One function per figure (fig1, fig2, fig2b, fig5a, fig5c, bench, fig_eval, fig_eval_recall); each
returns the paths it wrote, or [] after a note when its data is missing.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

plt.rcParams.update({
    "pdf.fonttype": 42,  # TrueType, embedded (no Type 3 fonts)
    "ps.fonttype": 42,
    "font.size": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "savefig.dpi": 150,
})

METHOD_ORDER = ["proxy", "pooled", "xattn", "flexprefill", "vslash", "oracle"]
METHOD_STYLE = {
    "proxy": dict(color="#d62728", marker="o"),
    "pooled": dict(color="#1f77b4", marker="s"),
    "xattn": dict(color="#2ca02c", marker="^"),
    "flexprefill": dict(color="#9467bd", marker="v"),
    "vslash": dict(color="#8c564b", marker="D"),
    "oracle": dict(color="black", marker="*", linestyle="--"),
}
BUDGET_STYLE = {
    "dynamic": dict(color="#d62728", marker="o"),
    "uniform": dict(color="#1f77b4", marker="s"),
    "token": dict(color="#ff7f0e", marker="^"),
}


def note(msg: str) -> None:
    print(f"plot_figures: {msg}", file=sys.stderr)


# ---- reading ---------------------------------------------------------------------------------


class Report:
    """One proxyattn-analyze report folder: its tables as lists of dicts (None for NaN)."""

    def __init__(self, folder: Path):
        self.folder = folder
        with open(folder / "report.json", encoding="utf-8") as f:
            self.doc = json.load(f)
        self.label = folder.name
        self.tables = {}
        for name, t in self.doc.get("tables", {}).items():
            cols = t["columns"]
            self.tables[name] = [dict(zip(cols, r)) for r in t["rows"]]
        cfg = self.doc.get("config", {})
        gammas = cfg.get("gamma") or [0.95]
        self.gamma_ref = cfg.get("gamma_ref", max(gammas))

    def table(self, name: str) -> list:
        return self.tables.get(name, [])


def load_reports(dirs, tool: str = "proxyattn-analyze") -> list:
    reports = []
    for d in dirs:
        d = Path(d)
        found = [d] if (d / "report.json").is_file() else sorted(p.parent for p in d.rglob("report.json"))
        for f in found:
            try:
                r = Report(f)
            except (OSError, ValueError, KeyError) as e:
                note(f"{f}: unreadable report.json ({e}); skipped")
                continue
            if r.doc.get("tool") != tool:
                continue
            reports.append(r)
    # Distinct labels when several folders share a name.
    seen = {}
    for r in reports:
        n = seen.get(r.label, 0)
        seen[r.label] = n + 1
        if n:
            r.label = f"{r.label}#{n + 1}"
    return reports


def finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def close(a, b, tol=1e-9) -> bool:
    return finite(a) and finite(b) and abs(a - b) <= tol


def save(fig, out_dir: Path, stem: str) -> list:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        p = out_dir / f"{stem}.{ext}"
        fig.savefig(p, bbox_inches="tight")
        paths.append(str(p))
    plt.close(fig)
    return paths


def method_label(row: dict) -> str:
    m = row["method"]
    return f"proxy (g={row['groups']})" if m == "proxy" else m


def suffix(report: Report, many: bool) -> str:
    return f" [{report.label}]" if many else ""


LINESTYLES = ["-", "--", ":", "-."]


def report_style(style: dict, index: int) -> dict:
    """Same colour per method, a different line style per report folder."""
    s = dict(style)
    if index:
        s["linestyle"] = LINESTYLES[index % len(LINESTYLES)]
    return s


# ---- Fig. 1 ----------------------------------------------------------------------------------


def fig1(reports: list, out_dir: Path) -> list:
    """Mass recall vs sparsity, every method; proxy with its smallest group count."""
    many = len(reports) > 1
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    drawn = 0
    for ri, rep in enumerate(reports):
        rows = rep.table("recall_vs_sparsity")
        fixed = [r for r in rows if r["budget"] == "fixed" and finite(r["sparsity"]) and finite(r["mass_recall_mean"])]
        if not fixed:
            continue
        g_min = min((r["groups"] for r in fixed if r["method"] == "proxy"), default=None)
        methods = sorted({r["method"] for r in fixed}, key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else 99)
        for m in methods:
            pts = sorted((r["sparsity"], r["mass_recall_mean"]) for r in fixed
                         if r["method"] == m and (m != "proxy" or r["groups"] == g_min))
            style = report_style(METHOD_STYLE.get(m, {}), ri)
            label = (f"ProxyAttn (g={g_min})" if m == "proxy" else m) + suffix(rep, many)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, markersize=4, linewidth=1.2, **style)
            # Native operating points: the method's own rule (proxy: dynamic budget at gamma).
            nat = [r for r in rows if r["method"] == m and not finite(r["target_sparsity"])
                   and (r["budget"] == "native" or (m == "proxy" and r["budget"] == "dynamic" and r["groups"] == g_min))
                   and finite(r["sparsity"])]
            if nat:
                ax.scatter([r["sparsity"] for r in nat], [r["mass_recall_mean"] for r in nat], s=28,
                           facecolors="none", edgecolors=style.get("color", "gray"), marker=style.get("marker", "o"),
                           linewidths=1.0, zorder=3)
            drawn += 1
    if not drawn:
        plt.close(fig)
        note("fig1: no fixed-sparsity rows (run proxyattn-analyze recall/error/all); skipped")
        return []
    ax.set_xlabel("sparsity (1 − block density)")
    ax.set_ylabel("attention mass recall (mean over heads)")
    ax.set_title("Recall vs sparsity (open markers: native budgets)")
    ax.legend(fontsize=7, loc="lower left")
    return save(fig, out_dir, "fig1_recall_vs_sparsity")


# ---- Fig. 2 ----------------------------------------------------------------------------------


def pick_layers(layers: list, wanted, limit=6) -> list:
    if wanted:
        return [l for l in wanted if l in layers]
    if len(layers) <= limit:
        return layers
    idx = sorted({round(i * (len(layers) - 1) / (limit - 1)) for i in range(limit)})
    return [layers[i] for i in idx]


def fig2(reports: list, out_dir: Path, wanted_layers=None) -> list:
    """Per store: head x head top-k overlap heatmaps and per-head oracle budgets, a few layers."""
    paths = []
    many = len(reports) > 1
    for rep in reports:
        pairs = rep.table("similarity_pairs")
        budgets = rep.table("head_budget")
        if not pairs:
            continue
        topk_cols = [c for c in pairs[0] if c.startswith("topk_overlap_")]
        col = topk_cols[-1] if topk_cols else "cosine"
        for store in sorted({p["store"] for p in pairs}):
            sp = [p for p in pairs if p["store"] == store]
            layers = pick_layers(sorted({p["layer"] for p in sp}), wanted_layers)
            if not layers:
                note(f"fig2: {store}: none of the requested layers is in the report; skipped")
                continue
            H = max(p["head_a"] for p in sp) + 1
            n = len(layers)
            fig, axes = plt.subplots(2, n, figsize=(2.1 * n + 0.6, 4.4), squeeze=False,
                                     gridspec_kw=dict(height_ratios=[1.25, 1]))
            im = None
            for c, layer in enumerate(layers):
                mat = [[float("nan")] * H for _ in range(H)]
                for p in sp:
                    if p["layer"] == layer and finite(p[col]):
                        mat[p["head_a"]][p["head_b"]] = p[col]
                ax = axes[0][c]
                im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
                ax.set_title(f"layer {layer}")
                ax.set_xticks(range(H))
                ax.set_yticks(range(H))
                ax.tick_params(labelsize=6)
                ax.grid(False)
                if c == 0:
                    ax.set_ylabel("head")
                bx = axes[1][c]
                hb = [b for b in budgets if b["store"] == store and b["layer"] == layer and close(b["gamma"], rep.gamma_ref)]
                hb.sort(key=lambda b: b["head"])
                if hb:
                    bx.bar([b["head"] for b in hb], [b["budget_mean"] for b in hb], color="#4c72b0")
                    bx.set_xticks(range(H))
                    bx.tick_params(labelsize=6)
                bx.set_xlabel("head")
                if c == 0:
                    bx.set_ylabel(f"oracle budget\n(blocks/row, γ={rep.gamma_ref:g})")
            fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=col.replace("topk_overlap_", "top-").replace("pct", " % overlap"))
            fig.suptitle(f"{store}{suffix(rep, many)}: same tokens, different sparsity", fontsize=10)
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in store)
            paths += save(fig, out_dir, f"fig2_similarity_{safe}" + (f"_{rep.label}" if many else ""))
    if not paths:
        note("fig2: no similarity tables (run proxyattn-analyze similarity/all); skipped")
    return paths


def fig2b(reports: list, out_dir: Path) -> list:
    """Head agreement and budget spread vs layer."""
    many = len(reports) > 1
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8.4, 3.2))
    drawn = 0
    for rep in reports:
        layers = rep.table("similarity_layers")
        spread = rep.table("head_budget_layers")
        if not layers:
            continue
        topk = [c for c in layers[0] if c.startswith("topk_overlap_") and c.endswith("_mean")]
        for store in sorted({r["store"] for r in layers}):
            rows = sorted((r for r in layers if r["store"] == store), key=lambda r: r["layer"])
            x = [r["layer"] for r in rows]
            tag = store + suffix(rep, many)
            for c in topk:
                a1.plot(x, [r[c] for r in rows], marker=".", label=f"{tag}: top-{c[13:-8]} % overlap")
            a1.plot(x, [r["spearman_mean"] for r in rows], marker=".", linestyle="--", label=f"{tag}: Spearman")
            sb = sorted((r for r in spread if r["store"] == store and close(r["gamma"], rep.gamma_ref)),
                        key=lambda r: r["layer"])
            if sb:
                a2.plot([r["layer"] for r in sb], [r["budget_cv"] for r in sb], marker=".", label=tag)
            drawn += 1
    if not drawn:
        plt.close(fig)
        note("fig2b: no similarity tables; skipped")
        return []
    a1.set_xlabel("layer")
    a1.set_ylabel("mean over head pairs")
    a1.set_title("Do heads attend to the same tokens?")
    a1.legend(fontsize=6)
    a2.set_xlabel("layer")
    a2.set_ylabel("CV of per-head oracle budget")
    a2.set_title("Do heads need the same budget?")
    a2.legend(fontsize=6)
    return save(fig, out_dir, "fig2b_layers")


# ---- Fig. 5a / 5c ----------------------------------------------------------------------------


def fig5a(reports: list, out_dir: Path, targets=(0.9, 0.95)) -> list:
    """Mass recall at high fixed sparsity vs the number of proxy groups."""
    many = len(reports) > 1
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    drawn = 0
    ticks = set()
    for rep in reports:
        rows = [r for r in rep.table("recall_vs_sparsity")
                if r["method"] == "proxy" and r["budget"] == "fixed" and finite(r["mass_recall_mean"])]
        for t, ls in zip(targets, ("-", "--")):
            pts = sorted((r["groups"], r["mass_recall_mean"], r["sparsity"]) for r in rows
                         if close(r["target_sparsity"], t))
            if len(pts) < 1:
                continue
            reached = sum(p[2] for p in pts) / len(pts)
            ticks.update(p[0] for p in pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle=ls,
                    label=f"target {t:g} (reached {reached:.3f}){suffix(rep, many)}")
            drawn += 1
    if not drawn:
        plt.close(fig)
        note("fig5a: no proxy rows at sparsity 0.9/0.95 (add them to --sparsity); skipped")
        return []
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks))
    ax.set_xticklabels([str(t) for t in sorted(ticks)])
    ax.minorticks_off()
    ax.set_xlabel("proxy groups g (log scale)")
    ax.set_ylabel("mass recall (mean over heads)")
    ax.set_title("ProxyAttn: recall vs number of proxy heads")
    ax.legend(fontsize=7)
    return save(fig, out_dir, "fig5a_groups")


def fig5c(reports: list, out_dir: Path) -> list:
    """Dynamic vs uniform vs token budgets at fixed sparsities: recall and output error."""
    many = len(reports) > 1
    have_err = any(finite(r.get("output_error_mean")) for rep in reports for r in rep.table("recall_vs_sparsity"))
    ncol = 2 if have_err else 1
    fig, axes = plt.subplots(1, ncol, figsize=(4.4 * ncol, 3.4), squeeze=False)
    drawn = 0
    for ri, rep in enumerate(reports):
        rows = [r for r in rep.table("recall_vs_sparsity")
                if r["method"] == "proxy" and r["budget"] in BUDGET_STYLE and r["rule"] in ("scaled", "row_uniform")
                and finite(r["target_sparsity"]) and finite(r["sparsity"])]
        for b in ("dynamic", "uniform", "token"):
            sel = [r for r in rows if r["budget"] == b and (b == "uniform" or close(r["gamma"], rep.gamma_ref))]
            if not sel:
                continue
            sel.sort(key=lambda r: r["sparsity"])
            lab = (b if b == "uniform" else f"{b} (γ={rep.gamma_ref:g})") + suffix(rep, many)
            style = report_style(BUDGET_STYLE[b], ri)
            axes[0][0].plot([r["sparsity"] for r in sel], [r["mass_recall_mean"] for r in sel], label=lab,
                            markersize=4, **style)
            if have_err:
                e = [r for r in sel if finite(r["output_error_mean"])]
                axes[0][1].plot([r["sparsity"] for r in e], [r["output_error_mean"] for r in e], label=lab,
                                markersize=4, **style)
            drawn += 1
    if not drawn:
        plt.close(fig)
        note("fig5c: no budget rows at fixed sparsity (run proxyattn-analyze budget/error/all); skipped")
        return []
    if not have_err:
        note("fig5c: no output error in the reports (needs V and the error/all subcommand); recall panel only")
    axes[0][0].set_xlabel("sparsity")
    axes[0][0].set_ylabel("mass recall (mean over heads)")
    axes[0][0].set_title("Budget: recall")
    axes[0][0].legend(fontsize=7)
    if have_err:
        axes[0][1].set_xlabel("sparsity")
        axes[0][1].set_ylabel("‖O_sparse − O_full‖ / ‖O_full‖")
        axes[0][1].set_title("Budget: output error")
        axes[0][1].legend(fontsize=7)
    return save(fig, out_dir, "fig5c_budgets")


# ---- the whole model: proxyattn-eval sweep ---------------------------------------------------


def eval_series(rep: Report) -> dict:
    """{(method, groups): (fixed rows by target sparsity, native rows)} of a sweep's points table."""
    out: dict = {}
    for r in rep.table("points"):
        if r["method"] == "full":
            continue
        fixed, nat = out.setdefault((r["method"], r["groups"]), ([], []))
        (fixed if r["budget"] == "fixed" else nat).append(r)
    for fixed, _ in out.values():
        fixed.sort(key=lambda r: r["target_sparsity"])
    return dict(sorted(out.items(), key=lambda kv: (METHOD_ORDER.index(kv[0][0]) if kv[0][0] in METHOD_ORDER else 99,
                                                     kv[0][1])))


def eval_label(method: str, groups: int) -> str:
    return f"ProxyAttn (g={groups})" if groups else method


def eval_style(method: str, groups: int, groups_seen: list) -> dict:
    """The method's colour and marker; a grouped method's second, third... group count dotted."""
    s = dict(METHOD_STYLE.get(method, {}))
    if groups and groups_seen.index(groups):
        s["linestyle"] = LINESTYLES[groups_seen.index(groups) % len(LINESTYLES)]
        s["marker"] = "P"
    return s


def fig_eval(reports: list, out_dir: Path) -> list:
    """NIAH accuracy and Δ perplexity vs sparsity, per method, from each sweep folder."""
    written = []
    for rep in reports:
        full = next((r for r in rep.table("points") if r["method"] == "full"), None)
        series = eval_series(rep)
        if full is None or not series:
            note(f"fig_eval: {rep.folder}: no sweep points; skipped")
            continue
        groups_seen = sorted({g for (_, g) in series if g})
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        panels = (("niah_accuracy", "NIAH accuracy (greedy answer holds the needle)"),
                  ("delta_ppl", "Δ perplexity vs full attention"))
        for ax, (col, ylabel) in zip(axes, panels):
            if finite(full[col]):
                ax.axhline(full[col], color="gray", linewidth=1.0, linestyle="--", label="full attention")
            for (m, g), (fixed, nat) in series.items():
                style = eval_style(m, g, groups_seen)
                pts = [(r["sparsity"], r[col]) for r in fixed if finite(r["sparsity"]) and finite(r[col])]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=eval_label(m, g), markersize=4,
                            linewidth=1.2, **style)
                npts = [(r["sparsity"], r[col]) for r in nat if finite(r["sparsity"]) and finite(r[col])]
                if npts:
                    ax.scatter([p[0] for p in npts], [p[1] for p in npts], s=30, facecolors="none",
                               edgecolors=style.get("color", "gray"), marker=style.get("marker", "o"),
                               linewidths=1.0, zorder=3)
            ax.set_xlabel("sparsity (1 − block density, mean over sparse layers)")
            ax.set_ylabel(ylabel)
        if any(finite(r["delta_ppl"]) and r["delta_ppl"] > 0 for f, n in series.values() for r in f + n):
            axes[1].set_yscale("symlog", linthresh=0.1)
        axes[0].set_ylim(-0.05, 1.05)
        model = rep.doc.get("model", {})
        ident = model.get("identity", {})
        cfg = rep.doc.get("config", {})
        # A model with sliding-window layers (Gemma-3) has the methods in its global layers only.
        n_layers, n_global = model.get("layers"), model.get("global_layers", model.get("layers"))
        where = ("every layer" if n_global == n_layers else
                 f"the {n_global} global layers (the other {n_layers - n_global} keep their sliding window)")
        fig.suptitle(f"{ident.get('file', rep.label)}: sparse attention in {where} "
                     f"(block {cfg.get('block')}, first {cfg.get('dense_layers', 0)} dense; open markers: native)",
                     fontsize=9)
        axes[0].legend(fontsize=7, loc="lower left")
        written += save(fig, out_dir, "fig_eval_accuracy" + (f"_{rep.label}" if len(reports) > 1 else ""))
    return written


def fig_eval_recall(sweeps: list, analyses: list, out_dir: Path) -> list:
    """End-to-end NIAH accuracy and Δ perplexity vs the analysis' per-layer mass recall and output
    error of the same selection (rows: the two per-layer metrics; columns: the two end-to-end ones)."""
    per_layer = {}
    for a in analyses:
        for r in a.table("recall_vs_sparsity"):
            per_layer.setdefault(r["selection"], r)
    rows = [r for s in sweeps for r in s.table("points") if r["point"] in per_layer]
    if not rows:
        note("fig_eval_vs_recall: no sweep point has an analysis row of the same selection id; skipped")
        return []
    metrics = [(k, label) for k, label in (("mass_recall_mean", "per-layer mass recall (analysis)"),
                                           ("output_error_mean", "per-layer output error (analysis)"))
               if any(finite(per_layer[r["point"]].get(k)) for r in rows)]
    fig, axes = plt.subplots(len(metrics), 2, figsize=(10, 3.6 * len(metrics)), squeeze=False)
    methods = sorted({r["method"] for r in rows}, key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else 99)
    for (key, xlabel), axrow in zip(metrics, axes):
        for ax, col, ylabel in ((axrow[0], "niah_accuracy", "NIAH accuracy"), (axrow[1], "delta_ppl", "Δ perplexity")):
            for m in methods:
                pts = [(per_layer[r["point"]][key], r[col]) for r in rows
                       if r["method"] == m and finite(r[col]) and finite(per_layer[r["point"]].get(key))]
                st = METHOD_STYLE.get(m, {})
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=m, color=st.get("color"),
                           marker=st.get("marker", "o"), s=22)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if col == "delta_ppl" and any(finite(r["delta_ppl"]) and r["delta_ppl"] > 0 for r in rows):
                ax.set_yscale("symlog", linthresh=0.1)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Does the per-layer metric predict end-to-end accuracy? (one marker per selection id)", fontsize=9)
    return save(fig, out_dir, "fig_eval_vs_recall")


# ---- kernel figures (other issue) ------------------------------------------------------------


def bench(dirs: list, out_dir: Path) -> list:
    """Fig. 4 / 5b and the prefill figures from proxyattn-bench CSVs, through scripts/bench_figures.py."""
    names = ("bench.csv", "peers.csv", "prefill.csv", "prefill_peers.csv")
    has = any(Path(d).is_dir() and any(any(Path(d).rglob(n)) for n in names) for d in dirs)
    if not has:
        note("fig4/fig5b/prefill: no bench.csv / peers.csv / prefill.csv / prefill_peers.csv in the given folders; "
             "skipped")
        return []
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from bench_figures import bench_figures  # noqa: WPS433 (optional sibling module)
    except ImportError as e:
        note(f"fig4/fig5b: scripts/bench_figures.py not importable ({e}); skipped")
        return []
    return list(bench_figures([str(d) for d in dirs], str(out_dir)) or [])


# ---- main ------------------------------------------------------------------------------------


def parse_layers(s: str | None):
    if not s:
        return None
    out = []
    for part in s.split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            out += list(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return sorted(set(out))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", metavar="REPORT_DIR", help="report folders (searched recursively)")
    ap.add_argument("--out", required=True, help="figure folder (created)")
    ap.add_argument("--layers", help="layers shown in fig2, e.g. 0,14,29 (default: up to 6 evenly spaced)")
    args = ap.parse_args(argv)
    for d in args.dirs:
        if not Path(d).exists():
            print(f"plot_figures: error: {d}: no such folder", file=sys.stderr)
            return 1
    out = Path(args.out)
    try:
        layers = parse_layers(args.layers)
    except ValueError:
        print(f"plot_figures: error: --layers: cannot parse '{args.layers}'", file=sys.stderr)
        return 2
    reports = load_reports(args.dirs)
    sweeps = load_reports(args.dirs, "proxyattn-eval")
    if not reports and not sweeps:
        note("no proxyattn-analyze or proxyattn-eval report.json in the given folders: analysis figures skipped")
    written = []
    if sweeps:
        written += fig_eval(sweeps, out)
        if reports:
            written += fig_eval_recall(sweeps, reports, out)
    if reports:
        written += fig1(reports, out)
        written += fig2(reports, out, layers)
        written += fig2b(reports, out)
        written += fig5a(reports, out)
        written += fig5c(reports, out)
    written += bench(args.dirs, out)
    for p in written:
        print(p)
    if not written:
        print("plot_figures: error: nothing to plot in the given folders", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
