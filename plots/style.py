"""Shared figure style for attnbench plots: one look for every figure.

- Sizes for a two-column paper: one column is 3.4 in wide, the full text
  width 7.0 in; fonts 8 pt (7 pt ticks), serif (STIX, Times-like, shipped
  with matplotlib) with STIX math so labels and equations match.
- Colour-blind-safe palette (Okabe & Ito, 2008) plus a marker per series, so
  figures also read in greyscale.
- One colour and marker per implementation across all figures of a run
  (`Palette`): well-known implementations have fixed entries, others take
  the remaining entries in sorted-name order.
- Every figure is saved as vector PDF (TrueType fonts embedded, no Type 3)
  and as a 300-dpi PNG.
"""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

COLUMN_WIDTH_IN = 3.4
TEXT_WIDTH_IN = 7.0
PANEL_HEIGHT_IN = 2.15

# Okabe-Ito, without yellow (too light on white for thin lines).
OKABE_ITO = {
    "black": "#000000",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "green": "#009E73",
    "orange": "#E69F00",
    "purple": "#CC79A7",
    "sky": "#56B4E9",
}
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]

# Fixed identities for the implementations every variant has.
FIXED_IMPLS = {
    "reference": (OKABE_ITO["black"], "o"),
    "cpu": (OKABE_ITO["blue"], "s"),
    "cuda": (OKABE_ITO["vermillion"], "^"),
}

RC = {
    "font.family": "serif",
    "font.serif": ["STIXGeneral", "DejaVu Serif"],
    "mathtext.fontset": "stix",
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "legend.handlelength": 1.8,
    "legend.columnspacing": 1.2,
    "axes.linewidth": 0.6,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.linewidth": 0.4,
    "grid.color": "#d9d9d9",
    "grid.alpha": 1.0,
    "lines.linewidth": 1.1,
    "lines.markersize": 3.6,
    "errorbar.capsize": 1.6,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.minor.width": 0.4,
    "ytick.minor.width": 0.4,
    "xtick.direction": "out",
    "ytick.direction": "out",
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "savefig.dpi": 300,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
    "figure.dpi": 100,
}


def apply():
    plt.rcParams.update(RC)


class Palette:
    """Stable colour + marker per name (implementation, variant, operation)."""

    def __init__(self, names, fixed=None, avoid_black=False):
        fixed = dict(fixed or {})
        used_colours = {c for c, _ in fixed.values()}
        if avoid_black:
            used_colours.add(OKABE_ITO["black"])
        used_markers = {m for _, m in fixed.values()}
        colours = [c for c in OKABE_ITO.values() if c not in used_colours]
        markers = [m for m in MARKERS if m not in used_markers]
        self._style = dict(fixed)
        for i, name in enumerate(sorted(n for n in set(names) if n not in fixed)):
            # Past the palette, colours repeat with a different marker.
            self._style[name] = (colours[i % len(colours)], markers[i % len(markers)])

    def colour(self, name):
        return self._style[name][0]

    def marker(self, name):
        return self._style[name][1]


def figure(npanels, ncols=None, height=PANEL_HEIGHT_IN, sharey=True, sharex=False):
    """A figure of `npanels` axes: one column wide for a single panel, the
    full text width otherwise. Returns (fig, flat list of used axes)."""
    if npanels == 1:
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH_IN, height * 1.1), constrained_layout=True)
        return fig, [ax]
    ncols = ncols or (2 if npanels in (2, 4) else 3)
    nrows = -(-npanels // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(TEXT_WIDTH_IN, height * nrows), sharey=sharey, sharex=sharex,
        constrained_layout=True, squeeze=False)
    flat = [a for row in axes for a in row]
    for ax in flat[npanels:]:
        ax.set_visible(False)
    return fig, flat[:npanels]


def legend_above(fig, handles, labels, ncol=None):
    """Legend above the panels, outside every axes (never over data), in as
    many columns as fit the figure's width."""
    if not handles:
        return
    if ncol is None:
        budget = fig.get_figwidth() * 15.0  # characters of 7-pt text per line, with handles
        ncol = len(labels)
        while ncol > 1:
            rows = [labels[i:i + ncol] for i in range(0, len(labels), ncol)]
            widths = [max(len(r[c]) for r in rows if c < len(r)) + 5 for c in range(ncol)]
            if sum(widths) <= budget:
                break
            ncol -= 1
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=ncol,
               borderaxespad=0.1)


def si_formatter(unit):
    """Tick labels like '10 ms', '1 GB' on a log axis of base-unit values."""
    prefixes = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""),
                (1e-3, "m"), (1e-6, "\u00b5"), (1e-9, "n")]

    def fmt(v, _pos):
        if v <= 0:
            return ""
        for scale, p in prefixes:
            if v >= scale * 0.9999:
                x = v / scale
                s = f"{x:.0f}" if abs(x - round(x)) < 1e-6 else f"{x:.3g}"
                return f"{s} {p}{unit}"
        return f"{v:.1e} {unit}"

    return ticker.FuncFormatter(fmt)


def integer_log_axis(ax, values, axis="x"):
    """Log axis (base 2) with the data's sizes as tick labels when they span
    more than one octave; linear integer ticks otherwise."""
    vals = sorted({v for v in values if v and v > 0})
    set_scale = ax.set_xscale if axis == "x" else ax.set_yscale
    target = ax.xaxis if axis == "x" else ax.yaxis
    if len(vals) >= 2 and vals[-1] / vals[0] >= 4:
        set_scale("log", base=2)
        if len(vals) <= 10:
            target.set_major_locator(ticker.FixedLocator(vals))
        target.set_major_formatter(ticker.FuncFormatter(lambda v, _p: f"{v:g}"))
        target.set_minor_locator(ticker.NullLocator())
    else:
        target.set_major_locator(ticker.MaxNLocator(integer=True, nbins=6))


def dense_log_ticks(ax, axis="y"):
    """On a log axis spanning under two decades, label 1-2-5 steps too, so
    the reader is not left with one or two labelled ticks."""
    target = ax.yaxis if axis == "y" else ax.xaxis
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    if lo > 0 and hi / lo < 100:
        target.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        target.set_minor_locator(ticker.LogLocator(base=10, subs=tuple(range(1, 10))))
        target.set_minor_formatter(ticker.NullFormatter())


def save(fig, out_dir, stem):
    """Writes OUT/stem.pdf and OUT/stem.png; returns the two paths."""
    pdf = out_dir / f"{stem}.pdf"
    png = out_dir / f"{stem}.png"
    fig.savefig(pdf)
    fig.savefig(png)
    plt.close(fig)
    return pdf, png
