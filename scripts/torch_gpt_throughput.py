#!/usr/bin/env python3
"""Training throughput of `attnbench train` next to PyTorch 2 eager on the same
model (scripts/torch_gpt.py, float32, Adam), on the same machine, interleaved.

Each round runs `attnbench train` on a one-seed suite of the seed's config
(d 64, heads 2, layers 4, context 300, batch 16, RoPE, vocabulary 65 from the
MQAR task: pairs 16, keys 32, values 32; lr 1e-4) for `--steps` steps and
reads tokens/s from its train.json, then times PyTorch on the same shapes:
the same number of training steps (forward, cross-entropy, backward, Adam)
after one warm-up step, on random batches. Rounds alternate so machine noise
hits both alike; the medians and their ratio per attention kind are printed
and, with --out, written as JSON.

PyTorch's attention is F.scaled_dot_product_attention (causal) for
`standard`; for `selective` the seed's materialized algorithm (the (T, T, d)
per-query keys and values), which is what the seed trained with.

PyTorch is an optional dependency (pip install torch in a venv); attnbench
never needs it to build or test.

  python3 scripts/torch_gpt_throughput.py --attention standard,selective --threads 2 --rounds 3
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
SEED_CONFIG = {"vocab": 65, "d": 64, "heads": 2, "layers": 4, "context": 300, "rope": True, "lr": 1e-4}
BATCH = 16


def attnbench_tokens_per_s(binary, kind, steps, threads, work):
    suite = {"kind": "train", "name": "throughput",
             "data": {"kind": "mqar", "pairs": 16, "keys": 32, "values": 32},
             "model": {k: SEED_CONFIG[k] for k in ("d", "heads", "layers", "rope")},
             "attention": [kind], "seeds": [1], "steps": steps, "batch": BATCH,
             "context": SEED_CONFIG["context"], "lr": SEED_CONFIG["lr"],
             "eval_interval": steps, "eval_batches": 1}
    sp = os.path.join(work, "suite.json")
    with open(sp, "w") as f:
        json.dump(suite, f)
    out = os.path.join(work, f"out-{kind}-{time.monotonic_ns()}")
    subprocess.run([binary, "train", sp, "--out", out, "--quiet", "--threads", str(threads)], check=True,
                   stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "train.json")) as f:
        return json.load(f)["runs"][0]["tokens_per_s"]


def torch_tokens_per_s(torch_gpt, torch, kind, steps, seed):
    cfg = dict(SEED_CONFIG, attention=kind)
    g = torch.Generator().manual_seed(seed)
    P = torch_gpt.init_params(cfg, torch.float32, g)
    opt = torch.optim.Adam(list(P.values()), lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8)
    T = cfg["context"]

    def step():
        tokens = torch.randint(0, cfg["vocab"], (BATCH, T), generator=g)
        targets = torch.randint(0, cfg["vocab"], (BATCH, T), generator=g)
        opt.zero_grad(set_to_none=True)
        torch_gpt.loss_of(P, cfg, tokens, targets).backward()
        opt.step()

    step()  # warm-up (allocator, kernels)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH * T / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--attention", default="standard", help="comma-separated kinds: standard, selective")
    ap.add_argument("--steps", type=int, default=6, help="timed training steps per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both (torch.set_num_threads, --threads)")
    ap.add_argument("--attnbench", default=str(ROOT / "build" / "attnbench"), help="the attnbench binary")
    ap.add_argument("--out", help="write the measurements as JSON here")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("torch_gpt_throughput.py: PyTorch is not installed (optional: pip install torch in a venv); skipped")
        return 0
    sys.path.insert(0, str(ROOT / "scripts"))
    import torch_gpt

    torch.set_num_threads(args.threads)
    kinds = [k for k in args.attention.split(",") if k]
    for k in kinds:
        if k not in ("standard", "selective"):
            ap.error(f"--attention: unknown kind '{k}', expected standard or selective")
    results = {k: {"attnbench": [], "torch": []} for k in kinds}
    with tempfile.TemporaryDirectory(prefix="attnbench_gpt_tp_") as work:
        for r in range(args.rounds):
            for k in kinds:
                a = attnbench_tokens_per_s(args.attnbench, k, args.steps, args.threads, work)
                t = torch_tokens_per_s(torch_gpt, torch, k, args.steps, seed=r + 1)
                results[k]["attnbench"].append(a)
                results[k]["torch"].append(t)
                print(f"round {r + 1} {k:<10} attnbench {a:9.0f} tokens/s   torch {t:9.0f} tokens/s", flush=True)
    summary = {}
    for k in kinds:
        a, t = statistics.median(results[k]["attnbench"]), statistics.median(results[k]["torch"])
        summary[k] = {"attnbench_tokens_per_s": a, "torch_tokens_per_s": t, "ratio": a / t, **results[k]}
        print(f"{k:<10} medians: attnbench {a:.0f}, torch {t:.0f} tokens/s: attnbench / torch = {a / t:.2f}")
    if args.out:
        doc = {"config": dict(SEED_CONFIG, batch=BATCH), "threads": args.threads, "steps": args.steps,
               "torch": torch.__version__, "kinds": summary}
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
