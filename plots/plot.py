#!/usr/bin/env python3
"""Paper figures from attnbench results.

    python3 plots/plot.py results/*.json [more files or directories] --out plots/out/

Reads results files (docs/results.md; directories: every *.json inside) and
trainer logs (*.jsonl, docs/plots.md) and `attnbench train` outputs (its
train.json with the run logs beside it), and writes for each variant every
figure its records have data for (time, throughput, memory, speedup, error,
SE(3) invariance, block-sparse speedup, per-operation breakdown) plus the
training curves (with bands over seeds) and final quality per attention kind,
each as PDF and PNG, and OUT/figures.json listing them.

Exit codes: 0 done, 2 bad input (one line naming the file and field),
3 matplotlib missing.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import data  # noqa: E402

SYSTEM_PYTHON = "/usr/bin/python3"


def _import_matplotlib():
    """Imports matplotlib; if this interpreter lacks it (a pyenv or venv
    python3 ahead of Debian's on PATH), re-runs under the system python
    that scripts/setup.sh installs matplotlib for."""
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        pass
    if (os.path.realpath(sys.executable) != os.path.realpath(SYSTEM_PYTHON)
            and os.path.exists(SYSTEM_PYTHON)
            and not os.environ.get("ATTNBENCH_PLOT_REEXEC")):
        os.environ["ATTNBENCH_PLOT_REEXEC"] = "1"
        os.execv(SYSTEM_PYTHON, [SYSTEM_PYTHON] + sys.argv)
    return False


def main(argv):
    ap = argparse.ArgumentParser(
        prog="plot.py", description="Paper figures from attnbench results (docs/plots.md).")
    ap.add_argument("inputs", nargs="+", metavar="RESULTS",
                    help="results .json files, trainer .jsonl logs or directories of them")
    ap.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    ap.add_argument("--no-title", action="store_true",
                    help="omit the title line (for figures whose caption is in the paper)")
    ap.add_argument("--check", action="store_true",
                    help="only validate the inputs, draw nothing")
    args = ap.parse_args(argv)
    have_matplotlib = args.check or _import_matplotlib()  # may re-run under the system python

    try:
        inputs = data.collect(args.inputs)
    except data.InputError as e:
        print(f"plot.py: {e}", file=sys.stderr)
        return 2
    for note in inputs.notes:
        print(f"plot.py: note: {note}", file=sys.stderr)
    if args.check:
        return 0
    if not inputs.results and not inputs.training and not inputs.trained:
        print("plot.py: no results files or trainer logs in " + " ".join(args.inputs),
              file=sys.stderr)
        return 2
    if not have_matplotlib:
        print(f"plot.py: matplotlib is not installed for {sys.executable} "
              f"(install python3-matplotlib: scripts/setup.sh)", file=sys.stderr)
        return 3

    import figures
    import style

    style.apply()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records, notes = data.flatten(inputs)
    for note in notes:
        print(f"plot.py: note: {note}", file=sys.stderr)
    impls = style.Palette({r.impl for r in records}, style.FIXED_IMPLS)
    ctx = figures.Context(out, impls, titles=not args.no_title)
    # One set of figures per variant and pass: a fwd_bwd time never shares axes with a fwd time.
    by_variant = {}
    for r in records:
        label = r.variant if r.pass_ == "fwd" else f"{r.variant} {r.pass_}"
        by_variant.setdefault(label, []).append(r)
    for variant in sorted(by_variant):
        for draw in figures.ALL_RECORD_FIGURES:
            draw(ctx, variant, by_variant[variant])
    if inputs.training:
        figures.training_curves(ctx, inputs.training)
    for tr in inputs.trained:
        figures.train_curves(ctx, tr)
        figures.train_final(ctx, tr)

    manifest = [{"kind": f.kind, "variant": f.variant, "title": f.title, "pdf": f.pdf,
                 "png": f.png} for f in ctx.figures]
    tmp = out / "figures.json.tmp"
    tmp.write_text(json.dumps({"figures": manifest}, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out / "figures.json")
    for f in ctx.figures:
        print(f"{out / f.pdf}  {f.title}")
    print(f"plot.py: {len(ctx.figures)} figures in {out}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
