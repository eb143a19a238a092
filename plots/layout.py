"""Which shape parameter goes on the x axis and how the rest are grouped.

For the records of one variant: the x axis is the integer shape parameter
that varies most (ties broken by SIZE_PRIORITY: N before Nq before Nkv ...).
Parameters that move in lockstep with it (Nkv == Nq in every record, say) are
folded into the axis label ("$N_q = N_{kv}$"). Every other parameter that
varies, and the dtype when there are several, splits the records into panels
with readable titles ("f32 · H = 8 · causal"); within a panel each
implementation is one line. Parameters that are constant are listed in the
figure's caption line instead.
"""

import re
from dataclasses import dataclass

SIZE_PRIORITY = ["N", "Nq", "Nkv", "T", "L", "S", "M", "D", "B", "H"]

# Readable labels for common shape parameters (others: the name in italics).
AXIS_LABELS = {
    "N": "sequence length $N$",
    "Nq": "query length $N_q$",
    "Nkv": "key/value length $N_{kv}$",
    "T": "tokens $T$",
    "D": "head dimension $D$",
    "H": "heads $H$",
    "B": "batch $B$",
}


BOOL_LABELS = {"causal": ("causal", "non-causal")}
DTYPE_ORDER = ["f64", "f32", "f16", "bf16"]


def _math(name):
    """'Nkv' -> $N_{kv}$, 'c_z' -> $c_z$, 'H' -> $H$; longer words stay text."""
    m = re.fullmatch(r"([A-Za-z]{1,2})_([A-Za-z0-9]+)", name)
    if m:
        return f"${m.group(1)}_{{{m.group(2)}}}$"
    if len(name) > 1 and name[0].isupper() and name[1:].isalpha() and name[1:].islower():
        return f"${name[0]}_{{{name[1:]}}}$"
    if len(name) <= 2 and name.isalpha():
        return f"${name}$"
    return name.replace("_", " ")


def plain(text):
    """A label without mathtext markup, for Markdown and the terminal."""
    return re.sub(r"\$|[{}]", "", text)


def dtype_rank(dtype):
    return DTYPE_ORDER.index(dtype) if dtype in DTYPE_ORDER else len(DTYPE_ORDER)


def _is_size(v):
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class Layout:
    x_key: str | None        # None: no integer size parameter at all
    coupled: list            # keys identical to x in every record
    group_keys: list         # shape keys that split panels
    split_dtype: bool
    constant: dict           # key -> value for shape keys that never vary
    case_keys: list = None   # categorical layout: the varying keys that name a case
    cases: list = None       # categorical layout: distinct cases, in order of appearance
    members: set = None      # ids of the records this layout was chosen for (layout.parts)

    @property
    def categorical(self):
        return self.case_keys is not None

    def case_of(self, rec):
        return tuple(_hashable(rec.shape.get(k)) for k in self.case_keys)

    def _usual(self):
        """Per case key, the value at least half of the cases (and more than
        one) share; the labels leave it out. Keys without one: always shown."""
        usual = {}
        for i, k in enumerate(self.case_keys):
            vals = [c[i] for c in self.cases]
            best = max(vals, key=vals.count)
            if vals.count(best) > 1 and 2 * vals.count(best) >= len(vals):
                usual[k] = best
        return usual

    def case_label(self, index):
        """What sets a case apart from the usual values ('D=40, N=17'),
        for the ticks of a categorical axis."""
        usual = self._usual()
        parts = [plain(format_param(k, v)).replace(" = ", "=")
                 for k, v in zip(self.case_keys, self.cases[index])
                 if v is not None and (k not in usual or v != usual[k])]
        return ", ".join(parts) or "usual values"

    def usual_caption(self):
        usual = self._usual()
        return ", ".join(format_param(k, v) for k, v in sorted(usual.items())
                         if v not in (False, 0, "none", ""))

    def x_label(self):
        if self.categorical:
            return "case"
        if self.x_key is None:
            return "case"
        if self.coupled:
            names = " = ".join(_math(k).strip("$") for k in [self.x_key] + self.coupled)
            return f"${names}$"
        return AXIS_LABELS.get(self.x_key, _math(self.x_key))

    def x(self, rec):
        if self.categorical:
            return self.cases.index(self.case_of(rec))
        return rec.shape.get(self.x_key) if self.x_key else 0

    def panel_key(self, rec):
        key = tuple(_hashable(rec.shape.get(k)) for k in self.group_keys)
        return ((rec.dtype,) if self.split_dtype else ()) + key

    def panel_sort_key(self, pkey):
        if self.split_dtype:
            return (dtype_rank(pkey[0]),) + tuple(str(v) for v in pkey)
        return (0,) + tuple(str(v) for v in pkey)

    def panel_title(self, pkey):
        parts = []
        vals = list(pkey)
        if self.split_dtype:
            parts.append(vals.pop(0))
        for k, v in zip(self.group_keys, vals):
            if v is not None:
                parts.append(format_param(k, v))
        return " \u00b7 ".join(parts)

    def caption(self, skip=()):
        """The constant shape parameters, leaving out the ones that are off
        (false, 0, "none", ""): they are the variants' 'feature unused' values.
        Categorical layouts add the usual values the case labels leave out."""
        items = [format_param(k, v) for k, v in sorted(self.constant.items())
                 if k not in skip and v not in (False, 0, "none", "")]
        text = ", ".join(items)
        usual = self.usual_caption() if self.categorical else ""
        if usual:
            text = f"{text}; cases differ from {usual}" if text else f"cases differ from {usual}"
        return text


def _hashable(v):
    return v if not isinstance(v, (list, dict)) else str(v)


def format_param(key, value):
    if isinstance(value, bool):
        on, off = BOOL_LABELS.get(key, (key, f"no {key}"))
        return on if value else off
    if isinstance(value, float):
        return f"{_math(key)} = {value:g}"
    return f"{_math(key)} = {value}"


def _analyse(records):
    """x key, coupled keys, group keys and constants of a sweep over `records`."""
    keys = sorted({k for r in records for k in r.shape})
    values = {k: [r.shape.get(k) for r in records] for k in keys}
    distinct = {k: {_hashable(v) for v in vs} for k, vs in values.items()}
    varying = [k for k in keys if len(distinct[k]) > 1]
    constant = {k: values[k][0] for k in keys if len(distinct[k]) == 1}

    def rank(k):
        pri = SIZE_PRIORITY.index(k) if k in SIZE_PRIORITY else len(SIZE_PRIORITY)
        return (-len(distinct[k]), pri, k)

    sizes = [k for k in keys if all(_is_size(v) for v in values[k])]
    candidates = [k for k in sizes if k in varying] or [k for k in sizes if k in SIZE_PRIORITY[:6]]
    x_key = min(candidates, key=rank) if candidates else None
    coupled = []
    if x_key is not None:
        for k in varying:
            if k != x_key and all(r.shape.get(k) == r.shape.get(x_key) for r in records):
                coupled.append(k)
        constant.pop(x_key, None)
    group_keys = [k for k in varying if k != x_key and k not in coupled]
    return x_key, coupled, group_keys, constant, varying


def choose(records, split_dtype=None, categorical=False):
    """The Layout for `records` (all of one variant): a sweep over the size
    axis, or with `categorical` the cases side by side."""
    x_key, coupled, group_keys, constant, varying = _analyse(records)
    if split_dtype is None:
        split_dtype = len({r.dtype for r in records}) > 1
    if categorical:
        lay = Layout(None, [], [], split_dtype, constant, case_keys=varying, cases=[])
        for r in records:
            c = lay.case_of(r)
            if c not in lay.cases:
                lay.cases.append(c)
        return lay
    return Layout(x_key, coupled, group_keys, split_dtype, constant)


def parts(records, split_dtype=None):
    """[(suffix, layout, records)]: the sweeps of one variant's records on a
    size axis, and the explicit cases (records whose combination of the other
    parameters occurs at one size only, e.g. suites/ci.json) side by side in
    a second figure with suffix "cases"."""
    x_key, _coupled, group_keys, _constant, _varying = _analyse(records)
    if x_key is None or not group_keys:
        return [("", choose(records, split_dtype), records)]
    sizes = {}
    for r in records:
        g = tuple(_hashable(r.shape.get(k)) for k in group_keys)
        sizes.setdefault(g, set()).add(_hashable(r.shape.get(x_key)))

    def single(r):
        return len(sizes[tuple(_hashable(r.shape.get(k)) for k in group_keys)]) == 1

    sweep = [r for r in records if not single(r)]
    cases = [r for r in records if single(r)]
    out = []
    if sweep:
        out.append(("", choose(sweep, split_dtype), sweep))
    if cases and len(cases) == len(records):
        out.append(("", choose(cases, split_dtype, categorical=True), cases))
    elif cases:
        out.append(("cases", choose(cases, split_dtype, categorical=True), cases))
    return out
