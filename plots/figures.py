"""The figure types. Each takes the records of one variant (or the trainer
logs), draws what the data supports and returns a list of Figure entries
(empty when the records lack what the figure needs), so every figure works
for every variant that produces its fields (docs/plots.md lists them).
"""

import json
import re
import textwrap
from collections import defaultdict
from dataclasses import dataclass

from matplotlib import ticker
from matplotlib.lines import Line2D

import layout as layout_mod
import style

MAX_PANELS = 9


@dataclass
class Figure:
    kind: str
    variant: str
    stem: str
    title: str
    pdf: str = ""
    png: str = ""


class Context:
    """What every figure function needs: palette, output dir, options."""

    def __init__(self, out_dir, impl_palette, titles=True):
        self.out_dir = out_dir
        self.impls = impl_palette
        self.titles = titles
        self.figures = []

    def finish(self, fig, kind, variant, title, part=None):
        stem = f"{kind}_{_slug(variant)}" + (f"_{part}" if part else "")
        if self.titles:
            width = fig.get_figwidth()
            fig.suptitle(_wrap(title, int(width * 19)), fontsize=7)
        pdf, png = style.save(fig, self.out_dir, stem)
        self.figures.append(Figure(kind, variant, stem, layout_mod.plain(title), pdf.name,
                                   png.name))


def _wrap(text, width):
    """textwrap that never breaks inside a $...$ math segment."""
    guarded = re.sub(r"\$[^$]*\$", lambda m: m.group(0).replace(" ", "\0"), text)
    guarded = guarded.replace(" = ", "\0=\0")
    return "\n".join(line.replace("\0", " ") for line in textwrap.wrap(guarded, width))


def _slug(s):
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s)


def _title(variant, lay, what, skip=()):
    cap = lay.caption(skip)
    return f"{variant}: {what}" + (f" ({cap})" if cap else "")


def _panels(records, lay):
    """{panel key: {impl: [records sorted by x]}} in a stable order."""
    panels = defaultdict(lambda: defaultdict(list))
    for r in records:
        panels[lay.panel_key(r)][r.impl].append(r)
    out = {}
    for pk in sorted(panels, key=lay.panel_sort_key):
        out[pk] = {impl: sorted(rs, key=lay.x) for impl, rs in sorted(panels[pk].items())}
    return out


def _chunks(items, n):
    return [items[i:i + n] for i in range(0, len(items), n)] or [[]]


def _impl_handle(ctx, impl, dashed=False):
    return Line2D([], [], color=ctx.impls.colour(impl), marker=ctx.impls.marker(impl),
                  linestyle="--" if dashed else "-", label=impl)


def _draw_vs_n(ctx, records, kind, variant, what, ylabel, y_of, *, yerr_of=None,
               layout_records=None, split_dtype=None, ylog=True, decorate=None,
               extra_handles=(), yformatter=None, sharey=True):
    """Generic 'quantity vs the size axis, one line per impl, panels by the
    other varying parameters'. `y_of(rec)` returns the value or None.
    The layout comes from `layout_records` (default: the records with a
    value); explicit cases go to a second figure (layout.parts)."""
    recs = [r for r in records if y_of(r) is not None]
    if not recs:
        return
    for suffix, lay, members in layout_mod.parts(layout_records or recs, split_dtype):
        ids = {id(r) for r in members}
        lay.members = ids
        part_recs = [r for r in recs if id(r) in ids]
        if part_recs and (lay.x_key is not None or lay.categorical):
            _draw_part(ctx, part_recs, lay, kind, variant, what, ylabel, y_of, yerr_of, ylog,
                       decorate, extra_handles, yformatter, sharey, suffix)


def _draw_part(ctx, recs, lay, kind, variant, what, ylabel, y_of, yerr_of, ylog, decorate,
               extra_handles, yformatter, sharey, suffix):
    panels = _panels(recs, lay)
    keys = list(panels)
    pages = _chunks(keys, MAX_PANELS)
    for page, chunk in enumerate(pages, start=1):
        if lay.categorical:  # panels stacked, one set of case labels at the bottom
            fig, axes = style.figure(len(chunk), ncols=1, height=1.45, sharey=sharey,
                                     sharex=True)
            fig.set_figwidth(style.TEXT_WIDTH_IN)
        else:
            fig, axes = style.figure(len(chunk), sharey=sharey)
        impls_seen = []
        for ax, pk in zip(axes, chunk):
            xs_all = []
            impls_here = list(panels[pk])
            for impl, rs in panels[pk].items():
                xs = [lay.x(r) + _dodge(lay, impl, impls_here) for r in rs]
                ys = [y_of(r) for r in rs]
                xs_all += [lay.x(r) for r in rs]
                colour, marker = ctx.impls.colour(impl), ctx.impls.marker(impl)
                line = "none" if lay.categorical else "-"
                if yerr_of:
                    lo, hi = zip(*(yerr_of(r) for r in rs))
                    err = [[max(y - l, 0) for y, l in zip(ys, lo)],
                           [max(h - y, 0) for y, h in zip(ys, hi)]]
                    ax.errorbar(xs, ys, yerr=err, color=colour, marker=marker, elinewidth=0.7,
                                linestyle=line)
                else:
                    ax.plot(xs, ys, color=colour, marker=marker, linestyle=line)
                if impl not in impls_seen:
                    impls_seen.append(impl)
            if ylog:
                ax.set_yscale("log")
            if yformatter:
                ax.yaxis.set_major_formatter(yformatter)
            if decorate:
                right_edge = ax.get_subplotspec().is_last_col() or pk == chunk[-1]
                xs_all += decorate(ax, pk, panels[pk], lay, right_edge) or []
            if lay.categorical:
                _case_ticks(ax, lay)
                ax.set_xlim(-0.6, len(lay.cases) - 0.4)
                ax.grid(axis="x", visible=False)
            else:
                style.integer_log_axis(ax, xs_all)
            if ylog:
                style.dense_log_ticks(ax)
            if lay.group_keys or lay.split_dtype:
                ax.set_title(lay.panel_title(pk))
            if not lay.categorical or ax.get_subplotspec().is_last_row():
                ax.set_xlabel(lay.x_label())
        for ax in axes:
            if ax.get_subplotspec().is_first_col():
                ax.set_ylabel(ylabel)
        extra = extra_handles(lay) if callable(extra_handles) else list(extra_handles)
        handles = [_impl_handle(ctx, i) for i in sorted(impls_seen)] + extra
        style.legend_above(fig, handles, [h.get_label() for h in handles])
        tag = "_".join(t for t in (suffix, str(page) if len(pages) > 1 else "") if t)
        if suffix == "cases":
            what = f"{what}, explicit cases"
        ctx.finish(fig, kind, variant, _title(variant, lay, what), tag or None)


def _case_ticks(ax, lay):
    """Case labels under a categorical axis: wrapped and level when they fit,
    slanted when there are many."""
    idx = list(range(len(lay.cases)))
    labels = [lay.case_label(i) for i in idx]
    width = max(int(style.TEXT_WIDTH_IN * 15 / max(len(idx), 1)), 12)
    wrapped = [_wrap_items(t.split(", "), width) for t in labels]
    if max(w.count("\n") for w in wrapped) < 4:
        ax.set_xticks(idx, wrapped)
    else:
        ax.set_xticks(idx, labels, rotation=30, ha="right", rotation_mode="anchor")


def _wrap_items(items, width):
    """Joins 'k=v' items with ', ' into lines of about `width` characters,
    never splitting an item."""
    lines = [""]
    for item in items:
        if lines[-1] and len(lines[-1]) + 2 + len(item) > width:
            lines[-1] += ","
            lines.append(item)
        else:
            lines[-1] = f"{lines[-1]}, {item}" if lines[-1] else item
    return "\n".join(lines)


def _dodge(lay, impl, impls):
    """Side-by-side offsets of the implementations on a categorical axis."""
    if not lay.categorical or len(impls) < 2:
        return 0.0
    return (impls.index(impl) - (len(impls) - 1) / 2) * 0.16


# --- 1. time vs N ---------------------------------------------------------------


def time_vs_n(ctx, variant, records):
    def y(r):
        return r.bench["median_s"] if r.bench else None

    def spread(r):
        s = r.bench.get("samples_s") or []
        if s:
            return min(s), max(s)
        return r.bench.get("min_s", r.bench["median_s"]), r.bench["median_s"]

    _draw_vs_n(ctx, records, "time", variant, "time per call (median, bars: min-max over "
               "repetitions)", "time per call", y, yerr_of=spread,
               yformatter=style.si_formatter("s"))


# --- 2. GFLOP/s and % of peak ----------------------------------------------------------


def throughput_vs_n(ctx, variant, records):
    def y(r):
        return r.bench.get("gflops") if r.bench else None

    recs = [r for r in records if y(r)]
    peaks = sorted({r.context.get("peak_gflops") for r in recs if r.context.get("peak_gflops")})

    def decorate(ax, _pk, _series, _lay, right_edge):
        for p in peaks:
            ax.axhline(p, color="#555555", linestyle=":", linewidth=0.9)
        if len(peaks) == 1 and right_edge:
            p = peaks[0]
            sec = ax.secondary_yaxis("right", functions=(lambda g: 100.0 * g / p,
                                                         lambda q: q * p / 100.0))
            sec.set_ylabel("% of CPU FMA peak")
            sec.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _p: f"{v:g}%"))

    extra = []
    if peaks:
        label = ("measured CPU FMA peak" if len(peaks) == 1 else
                 "measured CPU FMA peaks (" + ", ".join(f"{p:.0f}" for p in peaks) + ")")
        extra.append(Line2D([], [], color="#555555", linestyle=":", label=label))
    _draw_vs_n(ctx, recs, "throughput", variant,
               "achieved throughput" + (f"; peak {peaks[0]:.0f} GFLOP/s" if len(peaks) == 1
                                        else ""),
               "GFLOP/s (dense-equivalent)", y, decorate=decorate, extra_handles=extra,
               yformatter=ticker.FuncFormatter(lambda v, _p: f"{v:g}"))


# --- 3. peak memory ---------------------------------------------------------------------


def _too_large(r):
    return r.status == "skipped" and re.search(r"memory|too large|exceed", r.raw.get("reason", ""),
                                               re.IGNORECASE)


def _memory_of(r):
    if not r.bench:
        return None
    b = r.bench
    vals = [b.get(k) for k in ("peak_bytes", "heap_peak_bytes", "rss_peak_bytes", "device_bytes")]
    vals = [v for v in vals if v is not None]
    return max(vals) if vals else None


def memory_vs_n(ctx, variant, records):
    ok = [r for r in records if _memory_of(r) is not None]
    skipped = [r for r in records if _too_large(r)]
    if not ok:
        return
    machine = sorted({r.context.get("memory_bytes") for r in ok + skipped
                      if r.context.get("memory_bytes")})
    positive = [_memory_of(r) for r in ok if _memory_of(r) > 0]
    floor = min(positive) / 4 if positive else 1024.0

    def y(r):
        m = _memory_of(r)
        return m if m > 0 else floor

    def decorate(ax, pk, series, lay, _right_edge):
        for m in machine:
            ax.axhline(m, color="#555555", linestyle=":", linewidth=0.9)
        xs = []
        for r in skipped:
            if id(r) in lay.members and lay.panel_key(r) == pk:
                model = (r.info or {}).get("memory_model_bytes")
                yv = model if model else (machine[-1] * 2 if machine else None)
                if yv:
                    ax.plot([lay.x(r)], [yv], linestyle="none", marker="x", markersize=5,
                            color=ctx.impls.colour(r.impl), markeredgewidth=1.1)
                    xs.append(lay.x(r))
        zeros = [r for rs in series.values() for r in rs if _memory_of(r) == 0]
        if zeros:
            ax.axhline(floor, color="#bbbbbb", linewidth=0.6)
        return xs

    extra = []
    if machine:
        extra.append(Line2D([], [], color="#555555", linestyle=":", label="machine memory"))
    if skipped:
        extra.append(Line2D([], [], color="#555555", linestyle="none", marker="x",
                            markersize=5, label="skipped (too large)"))
    if any(_memory_of(r) == 0 for r in ok):
        extra.append(Line2D([], [], color="#bbbbbb", linewidth=0.6,
                            label="no scratch (0 B)"))
    _draw_vs_n(ctx, ok, "memory", variant, "peak memory beyond inputs and outputs", "peak memory",
               y, layout_records=ok + skipped, decorate=decorate, extra_handles=extra,
               yformatter=style.si_formatter("B"))


# --- 4. speedup over the reference ----------------------------------------------------


def speedup_vs_n(ctx, variant, records):
    ref = {(r.dtype, r.pass_, r.shape_key()): r for r in records if r.impl == "reference" and r.bench}
    speed = {}
    for r in records:
        if r.impl != "reference" and r.bench:
            base = ref.get((r.dtype, r.pass_, r.shape_key()))
            if base:
                speed[id(r)] = base.bench["median_s"] / r.bench["median_s"]
    if not speed:
        return

    def decorate(ax, *_args):
        ax.axhline(1.0, color="#555555", linestyle=":", linewidth=0.9)

    extra = [Line2D([], [], color="#555555", linestyle=":", label="reference (1\u00d7)")]
    _draw_vs_n(ctx, records, "speedup", variant, "speedup over the reference in the same dtype",
               "speedup over reference", lambda r: speed.get(id(r)), decorate=decorate,
               extra_handles=extra,
               yformatter=ticker.FuncFormatter(lambda v, _p: f"{v:g}\u00d7"))


# --- 5. error vs N ---------------------------------------------------------------------


def _worst_equivalence(r):
    best = None
    for name, c in r.checks.items():
        if name == "equivalence" or name.startswith("equivalence/"):
            if c.get("max_rel") is None:
                continue
            if best is None or c["max_rel"] > best["max_rel"]:
                best = c
    return best


def _bound_rel(c):
    """The pass bound (an absolute error) on the max_rel scale."""
    if c.get("bound") and c.get("max_abs") and c.get("max_rel"):
        return c["bound"] * c["max_rel"] / c["max_abs"]
    return None


def error_vs_n(ctx, variant, records):
    recs = [r for r in records if _worst_equivalence(r)]
    if not recs:
        return
    def y(r):
        e = _worst_equivalence(r)["max_rel"]
        return e if e > 0 else None

    exact = [r for r in recs if _worst_equivalence(r)["max_rel"] == 0]

    def decorate(ax, pk, series, lay_, _right_edge):
        impls = list(series)
        xs = []
        for r in exact:
            if id(r) in lay_.members and lay_.panel_key(r) == pk:
                x = lay_.x(r) + _dodge(lay_, r.impl, impls if r.impl in impls else [r.impl])
                ax.plot([x], [0.03], transform=ax.get_xaxis_transform(), linestyle="none",
                        marker="v", markerfacecolor="none", clip_on=False,
                        markeredgecolor=ctx.impls.colour(r.impl))
                xs.append(lay_.x(r))
        for impl, rs in series.items():
            off = _dodge(lay_, impl, impls)
            pts = [(lay_.x(r) + off, _bound_rel(_worst_equivalence(r))) for r in rs]
            pts = [p for p in pts if p[1]]
            if pts and lay_.categorical:
                ax.plot(*zip(*pts), color=ctx.impls.colour(impl), linestyle="none", marker="_",
                        markersize=7, markeredgewidth=1.0)
            elif pts:
                ax.plot(*zip(*pts), color=ctx.impls.colour(impl), linestyle="--",
                        linewidth=0.8)
            bad = [(lay_.x(r) + off, y(r)) for r in rs
                   if not _worst_equivalence(r)["passed"] and y(r)]
            if bad:
                ax.plot(*zip(*bad), linestyle="none", marker="o", markersize=7,
                        markerfacecolor="none", markeredgecolor="#D55E00", markeredgewidth=1.0)
        return xs

    def extra(lay):
        bound_style = ({"linestyle": "none", "marker": "_", "markersize": 7} if lay.categorical
                       else {"linestyle": "--", "linewidth": 0.8})
        handles = [Line2D([], [], color="#555555", label="pass bound (same colour)",
                          **bound_style)]
        mine = [r for r in recs if id(r) in lay.members]
        if any(_worst_equivalence(r)["max_rel"] == 0 for r in mine):
            handles.append(Line2D([], [], color="#555555", linestyle="none", marker="v",
                                  markerfacecolor="none", label="exact (0 error)"))
        if any(not _worst_equivalence(r)["passed"] for r in mine):
            handles.append(Line2D([], [], linestyle="none", marker="o", markersize=7,
                                  markerfacecolor="none", markeredgecolor="#D55E00",
                                  label="check failed"))
        return handles

    _draw_vs_n(ctx, recs, "error", variant,
               "max relative error vs the f64 oracle (worst output)",
               "max relative error", y, layout_records=recs, split_dtype=True,
               decorate=decorate, extra_handles=extra, sharey=False)


# --- 6. SE(3) invariance ---------------------------------------------------------------


def _se3_checks(r):
    out = []
    for name, c in r.checks.items():
        if c.get("property") == "se3_invariance" or re.fullmatch(r"se3_t[0-9.e+-]+", name):
            scale = c.get("scale")
            if scale is None:
                m = re.fullmatch(r"se3_t([0-9.e+-]+)", name)
                scale = float(m.group(1)) if m else None
            if scale is not None and c.get("max_rel") is not None:
                out.append((float(scale), c))
    return out


def se3_vs_scale(ctx, variant, records):
    recs = [r for r in records if _se3_checks(r)]
    if not recs:
        return
    dtypes = sorted({r.dtype for r in recs}, key=layout_mod.dtype_rank)
    lay = layout_mod.choose(recs, split_dtype=True)
    sizes = sorted({lay.x(r) for r in recs})
    fig, axes = style.figure(len(dtypes))
    impls_seen = set()
    any_fail = False
    for ax, dt in zip(axes, dtypes):
        by_impl = defaultdict(lambda: defaultdict(list))
        for r in recs:
            if r.dtype == dt:
                for scale, c in _se3_checks(r):
                    by_impl[r.impl][scale].append(c)
        for impl, per_scale in sorted(by_impl.items()):
            impls_seen.add(impl)
            scales = sorted(per_scale)
            worst = [max(per_scale[s], key=lambda c: c["max_rel"]) for s in scales]
            colour = ctx.impls.colour(impl)
            ax.plot(scales, [max(c["max_rel"], 1e-18) for c in worst], color=colour,
                    marker=ctx.impls.marker(impl))
            bounds = [(s, _bound_rel(c)) for s, c in zip(scales, worst)]
            bounds = [b for b in bounds if b[1]]
            if bounds:
                ax.plot(*zip(*bounds), color=colour, linestyle="--", linewidth=0.8)
            bad = [(s, c["max_rel"]) for s, c in zip(scales, worst) if not c["passed"]]
            if bad:
                any_fail = True
                ax.plot(*zip(*bad), linestyle="none", marker="o", markersize=7,
                        markerfacecolor="none", markeredgecolor="#D55E00")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("translation scale (\u00c5)")
        if len(dtypes) > 1:
            ax.set_title(dt)
    axes[0].set_ylabel("max relative change of the output")
    handles = [_impl_handle(ctx, i) for i in sorted(impls_seen)]
    handles.append(Line2D([], [], color="#555555", linestyle="--", linewidth=0.8,
                          label="pass bound (same colour)"))
    if any_fail:
        handles.append(Line2D([], [], linestyle="none", marker="o", markersize=7,
                              markerfacecolor="none", markeredgecolor="#D55E00",
                              label="check failed"))
    style.legend_above(fig, handles, [h.get_label() for h in handles])
    what = "SE(3) invariance error vs translation"
    if lay.categorical:
        what += f" (worst over {len(lay.cases)} cases)"
    elif len(sizes) > 1:
        what += f" (worst over {lay.x_label()} = {', '.join(str(s) for s in sizes)})"
    ctx.finish(fig, "se3", variant, _title(variant, lay, what, skip=(lay.x_key,)))


# --- 7. block-sparse speedup ------------------------------------------------------------


def _dense_median(r, by_case):
    """Time of the dense execution of r's case: info.dense_median_s, or the median
    of the same case run by r's implementation with every tile computed
    (implementation "<impl>_dense", e.g. cpu_dense for cpu)."""
    if r.info.get("dense_median_s"):
        return r.info["dense_median_s"]
    dense = by_case.get((r.variant, r.impl + "_dense", r.dtype, r.pass_, r.shape_key()))
    return dense.bench["median_s"] if dense is not None and dense.bench else None


def sparsity_speedup(ctx, variant, records):
    by_case = {r.case_key(): r for r in records}
    recs = [r for r in records if r.bench and r.info.get("tiles_fraction")
            and not r.impl.endswith("_dense") and _dense_median(r, by_case)]
    if not recs:
        return
    dtypes = sorted({r.dtype for r in recs}, key=layout_mod.dtype_rank)
    fig, axes = style.figure(len(dtypes))
    impls_seen = set()
    fmin = min(r.info["tiles_fraction"] for r in recs)
    for ax, dt in zip(axes, dtypes):
        by_impl = defaultdict(list)
        for r in recs:
            if r.dtype == dt:
                by_impl[r.impl].append((r.info["tiles_fraction"],
                                        _dense_median(r, by_case) / r.bench["median_s"]))
        for impl, pts in sorted(by_impl.items()):
            impls_seen.add(impl)
            pts.sort()
            ax.plot(*zip(*pts), color=ctx.impls.colour(impl), marker=ctx.impls.marker(impl),
                    linestyle="none")
        f = [fmin * 0.8 * (1.0 / (fmin * 0.8)) ** (i / 50) for i in range(51)]
        ax.plot(f, [1 / v for v in f], color="#555555", linestyle=":", linewidth=0.9)
        ax.axhline(1.0, color="#bbbbbb", linewidth=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _p: f"{v:g}"))
        style.dense_log_ticks(ax)
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _p: f"{v:g}\u00d7"))
        ax.set_xlabel("fraction of (q, kv) tiles computed")
        if len(dtypes) > 1:
            ax.set_title(dt)
    axes[0].set_ylabel("speedup over all tiles computed")
    handles = [_impl_handle(ctx, i) for i in sorted(impls_seen)]
    for h in handles:
        h.set_linestyle("none")
    handles.append(Line2D([], [], color="#555555", linestyle=":", label="ideal (1 / fraction)"))
    style.legend_above(fig, handles, [h.get_label() for h in handles])
    lay = layout_mod.choose(recs)
    ctx.finish(fig, "sparsity", variant,
               _title(variant, lay, "block-sparse speedup vs tiles computed"))


# --- 8. per-operation breakdown ------------------------------------------------------------


def _breakdown(r):
    """{operation: median seconds per call} in execution order, from bench.breakdown."""
    rows = (r.bench or {}).get("breakdown")
    if not isinstance(rows, list):
        return {}
    return {row["op"]: float(row["s"]) for row in rows if isinstance(row, dict) and "op" in row and "s" in row}


def breakdown(ctx, variant, records):
    recs = [r for r in records if _breakdown(r)]
    if not recs:
        return
    lay = layout_mod.choose(recs)
    ops = []
    for r in recs:
        for op in _breakdown(r):
            if op not in ops:
                ops.append(op)
    colours = list(style.OKABE_ITO.values())[1:] + ["#999999", "#000000"]
    hatches = ["", "//", "..", "xx", "\\\\", "--"]
    groups = defaultdict(list)
    for r in recs:
        groups[(r.impl,) + lay.panel_key(r)].append(r)
    keys = sorted(groups, key=lambda k: tuple(str(v) for v in k))
    fig, axes = style.figure(len(keys), sharey=True)
    for ax, key in zip(axes, keys):
        rs = sorted(groups[key], key=lay.x)
        xs = list(range(len(rs)))
        bottom = [0.0] * len(rs)
        for i, op in enumerate(ops):
            totals = [sum(_breakdown(r).values()) for r in rs]
            frac = [100.0 * _breakdown(r).get(op, 0.0) / t if t > 0 else 0.0
                    for r, t in zip(rs, totals)]
            ax.bar(xs, frac, bottom=bottom, width=0.7, color=colours[i % len(colours)],
                   hatch=hatches[(i // len(colours)) % len(hatches)], edgecolor="white",
                   linewidth=0.4)
            bottom = [b + f for b, f in zip(bottom, frac)]
        for x, r in zip(xs, rs):
            total = sum(_breakdown(r).values())
            ax.text(x, 101.5, style.si_formatter("s")(float(f"{total:.3g}"), None),
                    ha="center", va="bottom", fontsize=6)
        ax.set_xticks(xs, [str(lay.x(r)) for r in rs])
        ax.set_ylim(0, 112)
        ax.set_yticks([0, 25, 50, 75, 100])
        ax.grid(axis="x", visible=False)
        ax.set_xlabel(lay.x_label())
        title = key[0] + (" \u00b7 " + lay.panel_title(key[1:]) if key[1:] else "")
        ax.set_title(title)
    axes[0].set_ylabel("share of block time (%)")
    handles = [Line2D([], [], color=colours[i % len(colours)], linewidth=6, label=op)
               for i, op in enumerate(ops)]
    style.legend_above(fig, handles, ops, ncol=min(len(ops), 4))
    ctx.finish(fig, "breakdown", variant,
               _title(variant, lay, "time per operation (bar labels: total time per call)"))


# --- 9. training curves ----------------------------------------------------------------------


def training_curves(ctx, logs):
    rows = [row for _path, rs in logs for row in rs]
    if not rows:
        return
    variants = sorted({r["variant"] for r in rows})
    pal = style.Palette(variants, avoid_black=True)
    wall_max = max(r["wall_s"] for r in rows)
    unit, per = (("s", 1.0) if wall_max < 300 else ("min", 60.0) if wall_max < 3 * 3600
                 else ("h", 3600.0))
    has_top1 = any(r.get("top1") is not None for r in rows)
    panels = [("loss", "step"), ("loss", "wall_s")]
    if has_top1:
        panels += [("top1", "step"), ("top1", "wall_s")]
    fig, axes = style.figure(len(panels), ncols=2, sharey=False)
    ylabels = {"loss": "cross-entropy loss (nats/char)", "top1": "top-1 accuracy"}
    xlabels = {"step": "training step", "wall_s": f"wall-clock time ({unit})"}
    for ax, (metric, xkey) in zip(axes, panels):
        for v in variants:
            for split, ls, lw in (("train", "-", 0.7), ("val", "-", 1.3)):
                div = per if xkey == "wall_s" else 1.0
                pts = sorted((r[xkey] / div, r[metric]) for r in rows
                             if r["variant"] == v and r["split"] == split
                             and r.get(metric) is not None)
                if pts:
                    ax.plot(*zip(*pts), color=pal.colour(v), linestyle=ls, linewidth=lw,
                            alpha=0.45 if split == "train" else 1.0)
        ax.set_xlabel(xlabels[xkey])
        ax.set_ylabel(ylabels[metric])
        if metric == "top1":
            ax.yaxis.set_major_formatter(ticker.PercentFormatter(1.0, decimals=0))
    handles = [Line2D([], [], color=pal.colour(v), linewidth=1.3, label=v) for v in variants]
    handles += [Line2D([], [], color="#555555", linewidth=1.3, label="validation"),
                Line2D([], [], color="#555555", linewidth=0.7, alpha=0.45, label="training")]
    style.legend_above(fig, handles, [h.get_label() for h in handles])
    if ctx.titles:
        fig.suptitle("training curves (" + ", ".join(variants) + ")", fontsize=7)
    pdf, png = style.save(fig, ctx.out_dir, "training")
    ctx.figures.append(Figure("training", ",".join(variants), "training",
                              "training curves", pdf.name, png.name))


# --- 10. attnbench train: curves over seeds, final quality --------------------------------------

# Student t 0.975 quantiles by degrees of freedom (harness/train/trainer.cpp's mean_ci95, the table's).
_T975 = [0, 12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042]


def mean_ci95(xs):
    """Mean and half-width of the 95 % Student t interval (0 for one value)."""
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, 0.0
    sd = (sum((x - mean) ** 2 for x in xs) / (n - 1)) ** 0.5
    return mean, (_T975[n - 1] if n - 1 <= 30 else 1.96) * sd / n ** 0.5


def _band(ax, per_step, colour, lw, alpha, clip=None):
    """Mean over seeds at each step every seed has, with its 95 % interval shaded (clipped to `clip`)."""
    steps = sorted(per_step)
    if not steps:
        return
    stats = [mean_ci95(per_step[k]) for k in steps]
    lo = [m - h for m, h in stats]
    hi = [m + h for m, h in stats]
    if clip:
        lo, hi = [max(clip[0], v) for v in lo], [min(clip[1], v) for v in hi]
    ax.plot(steps, [m for m, _ in stats], color=colour, linewidth=lw)
    ax.fill_between(steps, lo, hi, color=colour, alpha=alpha, linewidth=0)


def _smoothed(rows, key, window):
    """(step, mean of `key` over the last `window` logged steps) of one run."""
    out, recent = [], []
    for r in rows:
        recent = (recent + [r[key]])[-window:]
        out.append((r["step"], sum(recent) / len(recent)))
    return out


def train_curves(ctx, tr):
    """Held-out loss and top-1, and the training loss (each run's running mean over 1/50 of its
    steps), vs step per attention kind: mean over seeds with a 95 % band, clipped to the metric's range (steps every seed logged)."""
    kinds = [row["attention"] for row in tr.table]
    if not any(a in kinds for a, _ in tr.logs):
        return
    pal = style.Palette(kinds, avoid_black=True)
    panels = [("eval_loss", "held-out loss (nats/token)"), ("loss", "training loss (nats/token)"),
              ("eval_top1", "held-out top-1 accuracy")]
    fig, axes = style.figure(len(panels), ncols=3, sharey=False)
    for ax, (key, ylabel) in zip(axes, panels):
        for kind in kinds:
            logs = [rows for (a, _s), rows in sorted(tr.logs.items()) if a == kind]
            if not logs:
                continue
            per_step = defaultdict(list)
            for rows in logs:
                if key == "loss":
                    for step, v in _smoothed(rows, key, max(1, len(rows) // 50)):
                        per_step[step].append(v)
                else:
                    for r in rows:
                        if r.get(key) is not None:
                            per_step[r["step"]].append(r[key])
            every = {k: v for k, v in per_step.items() if len(v) == len(logs)}
            _band(ax, every, pal.colour(kind), 0.9 if key == "loss" else 1.3, 0.2,
                  (0.0, 1.0) if key == "eval_top1" else (0.0, float("inf")))
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        if key == "eval_top1":
            ax.yaxis.set_major_formatter(ticker.PercentFormatter(1.0, decimals=0))
    seeds = {kind: sum(1 for a, _ in tr.logs if a == kind) for kind in kinds}
    handles = [Line2D([], [], color=pal.colour(k), linewidth=1.3, label=f"{k} ({seeds[k]} seeds)")
               for k in kinds if seeds[k]]
    style.legend_above(fig, handles, [h.get_label() for h in handles])
    ctx.finish(fig, "train_curves", tr.suite,
               f"{tr.suite}: training curves, mean over seeds with 95 % intervals")


def train_final(ctx, tr):
    """Final held-out loss and top-1 per attention kind, mean ± 95 % interval over seeds (the table)."""
    if not tr.table:
        return
    kinds = [row["attention"] for row in tr.table]
    pal = style.Palette(kinds, avoid_black=True)
    fig, axes = style.figure(2, ncols=2, sharey=False)
    for ax, (key, ylabel) in zip(axes, [("eval_loss", "final held-out loss (nats/token)"),
                                        ("eval_top1", "final held-out top-1 accuracy")]):
        for i, row in enumerate(tr.table):
            ax.errorbar([i], [row[key]["mean"]], yerr=[row[key]["ci95"]], fmt="o", capsize=3,
                        color=pal.colour(row["attention"]), markersize=4)
        ax.set_xticks(range(len(kinds)))
        ax.set_xticklabels([f"{row['attention']}\n{row['params'] / 1e3:.0f}k params\n"
                            f"{row['tokens_per_s']['mean']:.0f} tok/s" for row in tr.table], fontsize=6)
        ax.set_xlim(-0.6, len(kinds) - 0.4)
        ax.set_ylabel(ylabel)
        if key == "eval_top1":
            ax.yaxis.set_major_formatter(ticker.PercentFormatter(1.0, decimals=0))
    n = max((row.get("seeds", 1) for row in tr.table), default=1)
    ctx.finish(fig, "train_final", tr.suite,
               f"{tr.suite}: final quality per attention kind, mean ± 95 % interval over {n} seeds")


ALL_RECORD_FIGURES = [time_vs_n, throughput_vs_n, memory_vs_n, speedup_vs_n, error_vs_n,
                      se3_vs_scale, sparsity_speedup, breakdown]
