"""Reading attnbench results (docs/results.md) and trainer logs (docs/plots.md).

Every problem with an input file raises InputError whose message is one
line naming the file and the JSON field ("results/a.json:
records[3].bench.median_s: expected a number, got \"x\""); plot.py prints it
and exits with 2.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = "attnbench.results/1"
STATUSES = ("ok", "failed", "skipped")
TRAIN_FIELDS = {"variant": str, "step": int, "wall_s": float, "loss": float, "top1": float,
                "split": str}


class InputError(Exception):
    pass


# --- validation helpers -----------------------------------------------------


def _type_name(v):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


def _fail(path, where, expected, got):
    if got is None:
        raise InputError(f"{path}: {where}: expected {expected}, got null")
    shown = json.dumps(got)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    raise InputError(f"{path}: {where}: expected {expected}, got {_type_name(got)} {shown}")


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Obj:
    """Typed access to one JSON object with the path used in error messages."""

    def __init__(self, path, where, value, sep="."):
        if not isinstance(value, dict):
            _fail(path, where or "top level", "an object", value)
        self.path, self.where, self.value, self.sep = path, where, value, sep

    def _key(self, key):
        return f"{self.where}{self.sep}{key}" if self.where else key

    def req(self, key, kind, nullable=False):
        if key not in self.value:
            raise InputError(f"{self.path}: {self._key(key)}: missing")
        return self.opt(key, kind, nullable)

    def opt(self, key, kind, nullable=True):
        v = self.value.get(key)
        if v is None:
            if key in self.value and not nullable:
                _fail(self.path, self._key(key), _KIND_TEXT[kind], v)
            return None
        ok = {
            "str": lambda x: isinstance(x, str),
            "bool": lambda x: isinstance(x, bool),
            "num": _is_number,
            "int": lambda x: _is_number(x) and float(x).is_integer(),
            "obj": lambda x: isinstance(x, dict),
            "list": lambda x: isinstance(x, list),
        }[kind](v)
        if not ok:
            _fail(self.path, self._key(key), _KIND_TEXT[kind], v)
        return v

    def sub(self, key, required=True):
        v = self.req(key, "obj") if required else self.opt(key, "obj")
        return None if v is None else _Obj(self.path, self._key(key), v)


_KIND_TEXT = {"str": "a string", "bool": "a boolean", "num": "a number", "int": "an integer",
              "obj": "an object", "list": "an array"}


# --- results ------------------------------------------------------------------


@dataclass
class ResultsFile:
    path: str
    suite: dict
    context: dict
    records: list = field(default_factory=list)


def validate_results(path, doc):
    top = _Obj(path, "", doc)
    schema = top.req("schema", "str")
    if schema != SCHEMA:
        raise InputError(f"{path}: schema: expected \"{SCHEMA}\", got \"{schema}\"")
    suite = top.sub("suite")
    suite.req("name", "str")
    ctx = top.sub("context")
    for key in ("host", "cpu_model", "git_sha"):
        ctx.req(key, "str")
    ctx.opt("peak_gflops", "num")
    ctx.opt("memory_bytes", "num")
    records = top.req("records", "list")
    for i, raw in enumerate(records):
        rec = _Obj(path, f"records[{i}]", raw)
        for key in ("variant", "impl", "dtype"):
            rec.req(key, "str")
        if "pass" in raw and raw["pass"] not in ("fwd", "bwd", "fwd_bwd"):
            _fail(path, f"records[{i}].pass", "fwd, bwd or fwd_bwd", raw["pass"])
        shape = rec.sub("shape")
        for k, v in shape.value.items():
            if not isinstance(v, (int, float, str, bool)):
                _fail(path, f"records[{i}].shape.{k}", "a number, string or boolean", v)
        status = rec.req("status", "str")
        if status not in STATUSES:
            raise InputError(f"{path}: records[{i}].status: expected one of ok, failed, skipped, "
                             f"got \"{status}\"")
        rec.opt("reason", "str")
        rec.opt("info", "obj")
        checks = rec.sub("checks", required=False)
        if checks is not None:
            for name in checks.value:
                c = checks.sub(name)
                c.req("passed", "bool")
                for key in ("max_abs", "max_rel", "rms_rel", "bound", "scale"):
                    c.opt(key, "num")
                c.opt("property", "str")
        bench = rec.sub("bench", required=False)
        if bench is not None:
            median = bench.req("median_s", "num")
            if median <= 0:
                raise InputError(f"{path}: records[{i}].bench.median_s: expected a positive "
                                 f"number, got {median}")
            for key in ("min_s", "mean_s", "cv", "flops", "gflops", "pct_peak", "peak_bytes",
                        "heap_peak_bytes", "rss_peak_bytes", "device_bytes", "setup_s"):
                bench.opt(key, "num")
            samples = bench.opt("samples_s", "list")
            for j, s in enumerate(samples or []):
                if not _is_number(s):
                    _fail(path, f"records[{i}].bench.samples_s[{j}]", "a number", s)
    return ResultsFile(path=path, suite=suite.value, context=ctx.value, records=records)


def _read_json(path):
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") \
            from None


def load_results(path):
    return validate_results(str(path), _read_json(path))


# --- attnbench train's output (docs/train.md) ----------------------------------


@dataclass
class TrainResults:
    """`attnbench train`'s train.json with each run's JSONL log from beside it."""
    path: str
    suite: str
    table: list  # per attention kind: attention, params, eval_loss/eval_top1/tokens_per_s {mean, ci95}
    runs: list   # per run: attention, seed, eval_loss, eval_top1, ...
    logs: dict   # (attention, seed) -> rows {step, loss, step_s[, eval_loss, eval_top1]}


def _is_train_results(doc):
    return isinstance(doc, dict) and doc.get("kind") == "train"


def validate_train_results(path, doc):
    """train.json and the logs `<attention>-seed<seed>.jsonl` beside it (a missing log: no curve)."""
    top = _Obj(path, "", doc)
    suite = top.req("suite", "str")
    table = top.req("table", "list")
    for i, raw in enumerate(table):
        row = _Obj(path, f"table[{i}]", raw)
        row.req("attention", "str")
        row.req("params", "int")
        for key in ("eval_loss", "eval_top1", "tokens_per_s"):
            stat = row.sub(key)
            stat.req("mean", "num")
            stat.req("ci95", "num")
    runs = top.req("runs", "list")
    logs = {}
    for i, raw in enumerate(runs):
        run = _Obj(path, f"runs[{i}]", raw)
        attention, seed = run.req("attention", "str"), run.req("seed", "int")
        run.req("eval_loss", "num")
        log = Path(path).parent / f"{attention}-seed{int(seed)}.jsonl"
        if log.exists():
            logs[(attention, int(seed))] = _load_train_log(log)
    return TrainResults(path, suite, table, runs, logs)


def _load_train_log(path):
    """One `attnbench train` run's JSONL: step, loss, step_s and, at evaluations, eval_loss and eval_top1."""
    rows = []
    for obj in _jsonl_objects(path):
        obj.req("step", "int")
        obj.req("loss", "num")
        obj.req("step_s", "num")
        obj.opt("eval_loss", "num")
        obj.opt("eval_top1", "num")
        rows.append(obj.value)
    return rows


def _is_train_log(path):
    """An `attnbench train` run log (step_s, no split): plotted through its train.json."""
    first = _first_line_object(path)
    return isinstance(first, dict) and "step_s" in first and "split" not in first


# --- trainer logs -------------------------------------------------------------


def _first_line_object(path):
    """The first non-empty line of a .jsonl file, parsed; "invalid" when it is not JSON, None when empty."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    return "invalid"
    return None


def _jsonl_objects(path):
    """Each non-empty line of a JSONL file as an _Obj ("<path>: line <n>: <field>" in errors)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
        yield _Obj(str(path), f"line {n}", row, sep=": ")


def _looks_like_training(path):
    """True when the first line of a .jsonl file is a trainer log line."""
    first = _first_line_object(path)
    if first == "invalid":
        return True  # let load_training report the error
    return isinstance(first, dict) and "step" in first and "loss" in first


def load_training(path):
    """Trainer JSONL: one object per line with TRAIN_FIELDS (docs/plots.md)."""
    rows = []
    for obj in _jsonl_objects(path):
        row = obj.value
        for key, kind in TRAIN_FIELDS.items():
            want = {str: "str", int: "int", float: "num"}[kind]
            if key == "top1":
                obj.opt(key, want)
            else:
                obj.req(key, want)
        if row["split"] not in ("train", "val"):
            raise InputError(f"{path}: {obj.where}: split: expected \"train\" or \"val\", got "
                             f"\"{row['split']}\"")
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: no trainer log lines")
    return rows


# --- inputs -------------------------------------------------------------------


@dataclass
class Inputs:
    results: list  # ResultsFile
    training: list  # (path, rows)
    notes: list     # one-line notes for the user
    trained: list = None  # TrainResults (attnbench train's train.json)


def collect(paths):
    """Expands files and directories into results files and trainer logs.

    Named files must be readable results (.json) or trainer logs (.jsonl).
    In directories, *.json are results and *.jsonl trainer logs; the results
    streams `attnbench run` writes beside its .json (same records) are skipped.
    """
    results, training, notes, trained = [], [], [], []

    def add_json(f):
        doc = _read_json(f)
        if _is_train_results(doc):
            trained.append(validate_train_results(str(f), doc))
        else:
            results.append(validate_results(str(f), doc))

    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            for f in sorted(p.glob("*.json")):
                if f.name == "figures.json" or f.name.endswith(".result.json"):
                    continue  # a run's record of attnbench train: its train.json has it
                add_json(f)
            for f in sorted(p.glob("*.jsonl")):
                if _is_train_log(f):
                    continue  # read through the train.json beside it
                if _looks_like_training(f):
                    training.append((str(f), load_training(f)))
                else:
                    notes.append(f"skipping {f}: a results stream (the .json beside it has "
                                 f"the same records)")
        elif p.suffix == ".jsonl":
            if not p.exists():
                raise InputError(f"{p}: no such file")
            if _is_train_log(p):
                raise InputError(f"{p}: an attnbench train run log: plot its folder or the train.json "
                                 f"beside it (the curves average over seeds)")
            if not _looks_like_training(p):
                raise InputError(f"{p}: not a trainer log (first line lacks \"step\"/\"loss\"); "
                                 f"plot the results .json instead")
            training.append((str(p), load_training(p)))
        else:
            if not p.exists():
                raise InputError(f"{p}: no such file or directory")
            add_json(p)
    return Inputs(results, training, notes, trained)


# --- records ------------------------------------------------------------------


@dataclass
class Record:
    """One results record with its file's context attached."""
    raw: dict
    context: dict
    path: str

    @property
    def variant(self):
        return self.raw["variant"]

    @property
    def impl(self):
        return self.raw["impl"]

    @property
    def dtype(self):
        return self.raw["dtype"]

    @property
    def pass_(self):
        """fwd, bwd or fwd_bwd; records written before the pass axis are fwd."""
        return self.raw.get("pass", "fwd")

    @property
    def shape(self):
        return self.raw["shape"]

    @property
    def status(self):
        return self.raw["status"]

    @property
    def bench(self):
        return self.raw.get("bench") or None

    @property
    def checks(self):
        return self.raw.get("checks") or {}

    @property
    def info(self):
        return self.raw.get("info") or {}

    def shape_key(self):
        return json.dumps(self.shape, sort_keys=True)

    def case_key(self):
        return (self.variant, self.impl, self.dtype, self.pass_, self.shape_key())


def flatten(inputs):
    """All records; a case present in several files keeps the last file's
    record (files are read in the order given) and adds a note."""
    by_case = {}
    notes = []
    for rf in inputs.results:
        for raw in rf.records:
            r = Record(raw, rf.context, rf.path)
            k = r.case_key()
            if k in by_case:
                notes.append(f"duplicate case {r.variant}/{r.impl}/{r.dtype}/{r.pass_} {r.shape_key()} in "
                             f"{by_case[k].path} and {r.path}; using {r.path}")
            by_case[k] = r
    return list(by_case.values()), notes
