#!/usr/bin/env python3
"""PyTorch 2's CPU scaled_dot_product_attention next to attnbench's fused CPU
kernels, measured in one run on the same machine, interleaved.

For every shape, each round times torch (forward, or forward + backward) and
then `attnbench run` on a one-case suite of the same shape and pass; the
rounds alternate so that machine noise hits both alike. Writes an attnbench
results file (schema attnbench.results/1) with one record per implementation
and shape (`impl: torch` next to `impl: cpu`, the rounds' medians in
`bench.samples_s`), so `attnbench report` and plots/ show them side by side,
and prints the ratio per shape.

PyTorch is an optional dependency (pip install torch in a venv); attnbench
never needs it to build or test.

  python3 scripts/torch_sdpa_compare.py --pass fwd_bwd --shape 1,8,4096,64 --out results/torch_sdpa.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_shape(text):
    parts = text.split(",")
    if len(parts) not in (4, 5):
        raise argparse.ArgumentTypeError(f"--shape: expected B,H,N,D[,causal], got '{text}'")
    try:
        b, h, n, d = (int(x) for x in parts[:4])
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape: expected integers B,H,N,D, got '{text}'")
    causal = len(parts) == 5 and parts[4] in ("1", "true", "causal")
    return {"B": b, "H": h, "N": n, "D": d, "causal": causal}


def flops(shape, pass_):
    """attnbench's count: 4·B·H·D·pairs (causal: N(N+1)/2 pairs), bwd 2.5x, fwd_bwd 3.5x."""
    n = shape["N"]
    pairs = n * (n + 1) / 2 if shape["causal"] else n * n
    fwd = 4.0 * shape["B"] * shape["H"] * shape["D"] * pairs
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[pass_]


def time_torch(torch, shape, dtype, pass_, min_time):
    """Median seconds per call over calls filling `min_time` (after a warm-up)."""
    F = torch.nn.functional
    dt = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    dims = (shape["B"], shape["H"], shape["N"], shape["D"])
    need_grad = pass_ != "fwd"
    q, k, v = (torch.randn(*dims, generator=g).to(dt).requires_grad_(need_grad) for _ in range(3))
    do = torch.randn(*dims, generator=g).to(dt)

    if pass_ == "bwd":
        raise SystemExit("torch_sdpa_compare.py: --pass bwd is not measurable in eager torch "
                         "(the backward cannot run without its forward); use fwd or fwd_bwd")

    def call():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=shape["causal"])
        if need_grad:
            o.backward(do)
            q.grad = k.grad = v.grad = None

    call()
    times = []
    start = time.perf_counter()
    while not times or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_attnbench(binary, shape, dtype, pass_, min_time, threads, workdir):
    """One `attnbench run` of a one-case suite: (median seconds, the record, the run context)."""
    suite = {
        "name": "torch_compare",
        "checks": {"enabled": False},
        "bench": {"min_time_s": min_time, "repetitions": 1},
        "groups": [{"variant": "sdpa", "impls": ["cpu"], "dtypes": [dtype], "passes": [pass_], "cases": [shape]}],
    }
    suite_path = Path(workdir) / "suite.json"
    out_path = Path(workdir) / "out.json"
    suite_path.write_text(json.dumps(suite))
    cmd = [str(binary), "run", str(suite_path), "--out", str(out_path), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"torch_sdpa_compare.py: {' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
    doc = json.loads(out_path.read_text())
    rec = doc["records"][0]
    if rec["status"] != "ok":
        raise SystemExit(f"torch_sdpa_compare.py: attnbench {rec['status']}: {rec['reason']}")
    return rec["bench"]["median_s"], rec, doc["context"]


def record(impl, shape, dtype, pass_, samples, peak, extra_shape=None):
    med = statistics.median(samples)
    gflops = flops(shape, pass_) / med / 1e9
    return {
        "variant": "sdpa", "impl": impl, "dtype": dtype, "pass": pass_,
        "shape": extra_shape or shape, "status": "ok", "reason": "",
        "bench": {"median_s": med, "min_s": min(samples), "mean_s": statistics.fmean(samples),
                  "cv": statistics.pstdev(samples) / statistics.fmean(samples), "repetitions": len(samples),
                  "samples_s": samples, "flops": flops(shape, pass_), "gflops": gflops,
                  "pct_peak": 100.0 * gflops / peak if peak else None},
    }


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=parse_shape, action="append",
                    help="B,H,N,D[,causal] (repeatable; default 1,8,4096,64)")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--pass", dest="pass_", choices=["fwd", "fwd_bwd"], default="fwd_bwd")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per shape (default 5)")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of calls per measurement (default 1)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--attnbench", default=str(ROOT / "build" / "attnbench"))
    ap.add_argument("--out", default=str(ROOT / "results" / "torch_sdpa.json"))
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("torch_sdpa_compare.py: PyTorch is not installed (optional: pip install torch in a venv); skipped")
        return 0
    if not Path(args.attnbench).exists():
        raise SystemExit(f"torch_sdpa_compare.py: {args.attnbench}: no such binary (scripts/build.sh builds it)")
    torch.set_num_threads(args.threads)
    shapes = args.shape or [parse_shape("1,8,4096,64")]

    records, context = [], None
    with tempfile.TemporaryDirectory() as work:
        for shape in shapes:
            ours, theirs, our_rec = [], [], None
            for r in range(args.rounds):
                theirs.append(time_torch(torch, shape, args.dtype, args.pass_, args.min_time))
                t, our_rec, context = time_attnbench(args.attnbench, shape, args.dtype, args.pass_,
                                                     args.min_time, args.threads, work)
                ours.append(t)
                print(f"  round {r + 1}/{args.rounds}: torch {theirs[-1] * 1e3:.1f} ms, "
                      f"attnbench {ours[-1] * 1e3:.1f} ms", flush=True)
            peak = context.get("peak_gflops", 0)
            ratio = statistics.median(theirs) / statistics.median(ours)
            print(f"sdpa {args.pass_} {args.dtype} {shape}: torch {statistics.median(theirs) * 1e3:.1f} ms, "
                  f"attnbench cpu {statistics.median(ours) * 1e3:.1f} ms ({our_rec['bench'].get('kernel_path', 'cpu')}): "
                  f"attnbench {ratio:.2f}x faster")
            records.append(record("torch", shape, args.dtype, args.pass_, theirs, peak, our_rec["shape"]))
            records.append(record("cpu", shape, args.dtype, args.pass_, ours, peak, our_rec["shape"]))
    context = dict(context, torch_version=torch.__version__, torch_threads=torch.get_num_threads())
    doc = {"schema": "attnbench.results/1",
           "suite": {"name": "torch_sdpa", "file": "scripts/torch_sdpa_compare.py", "quick": False,
                     "shard": "1/1", "complete": True},
           "context": context, "records": records,
           "summary": {"ok": len(records), "failed": 0, "skipped": 0, "checks_failed": 0}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out)
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
