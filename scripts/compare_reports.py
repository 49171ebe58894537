#!/usr/bin/env python3
"""Compares the numeric cells of two proxyattn-analyze report.json files (e.g. --device cpu vs
--device cuda on the same store): per table and column the max |a - b| and the number of cells
over the tolerance. Rows are matched by position (both runs list them in the same order); a
table or row count that differs is a mismatch. Exit 0 when every cell is within --tol.

    scripts/compare_reports.py cpu/report.json cuda/report.json --tol 1e-3
"""
import argparse
import json
import math
import sys


def tables_of(rep):
    t = rep.get("tables", {})
    if isinstance(t, dict):
        return t
    raise SystemExit("report has no 'tables' object")


def rows_of(table):
    if isinstance(table, dict) and "rows" in table:
        rows, cols = table["rows"], table.get("columns")
        if rows and isinstance(rows[0], list) and cols:
            return [dict(zip(cols, r)) for r in rows]
        return rows
    return table if isinstance(table, list) else []


def is_num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--tol", type=float, default=1e-3)
    args = ap.parse_args()
    ra, rb = (json.load(open(p)) for p in (args.a, args.b))
    ta, tb = tables_of(ra), tables_of(rb)
    bad = 0
    lines = []
    for name in sorted(set(ta) | set(tb)):
        if name not in ta or name not in tb:
            lines.append(f"{name}: only in {'a' if name in ta else 'b'}")
            bad += 1
            continue
        xa, xb = rows_of(ta[name]), rows_of(tb[name])
        if len(xa) != len(xb):
            lines.append(f"{name}: {len(xa)} rows vs {len(xb)}")
            bad += 1
            continue
        stats = {}  # column -> [max diff, cells over tol, cells]
        for r, (a, b) in enumerate(zip(xa, xb)):
            for col in sorted(set(a) | set(b)):
                va, vb = a.get(col), b.get(col)
                st = stats.setdefault(col, [0.0, 0, 0])
                if is_num(va) and is_num(vb):
                    st[2] += 1
                    if math.isnan(va) and math.isnan(vb):
                        continue
                    d = abs(va - vb) if math.isfinite(va) and math.isfinite(vb) else (0.0 if va == vb else math.inf)
                    st[0] = max(st[0], d)
                    st[1] += d > args.tol
                elif va != vb and not (va is None and vb is None):
                    st[2] += 1
                    st[1] += 1
                    st[0] = math.inf
        for col, (mx, over, n) in stats.items():
            if n == 0:
                continue
            bad += over
            flag = "  MISMATCH" if over else ""
            lines.append(f"{name}.{col}: max|diff| {mx:.3g}, {over}/{n} cells over {args.tol:g}{flag}")
    print("\n".join(lines))
    da, db = ra.get("device", {}), rb.get("device", {})
    print(f"SUMMARY: a={da.get('kind')} b={db.get('kind')} ({db.get('name', da.get('name', ''))}): "
          f"{len(ta)} tables, {bad} cells/tables over tol {args.tol:g} -> {'MISMATCH' if bad else 'OK'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
