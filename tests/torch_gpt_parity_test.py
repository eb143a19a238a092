"""PyTorch parity of `attnbench train`'s GPT (llm.c's test_gpt2 pattern).

The model is scripts/torch_gpt.py, written in PyTorch from docs/train.md and
docs/selective.md (post-LN blocks, half-split RoPE, causal / sliding-window /
selective attention, the block options), run here in float64, autograd doing
the backward. For
each configuration below: `attnbench train` runs one step of a tiny MQAR suite
and saves a checkpoint (parameters, Adam moments, step 1); this script loads
it, draws one batch and runs `attnbench gpt-steps` on it (10 steps on that
batch). It then compares the logits, the loss and every parameter gradient of
the first step, and the losses of all 10 Adam steps (continuing the
checkpoint's moments), with PyTorch's. attnbench computes in f32, PyTorch here
in f64: the differences are attnbench's rounding, and the bounds are a few
times what it measured (docs/train.md "PyTorch parity"), far below what one
wrong term (>= 1e-2 relative) gives.

Usage: python tests/torch_gpt_parity_test.py ATTNBENCH_BINARY [--keep DIR]
Exit 77 (CTest's SKIP_RETURN_CODE) when torch is not installed.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

try:
    import torch
except ImportError:
    print("SKIP: torch is not installed (an optional dependency: pip install torch in a venv)")
    sys.exit(77)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from torch_gpt import forward, loss_of, read_safetensors  # noqa: E402

torch.set_default_dtype(torch.float64)

# Bounds (max |attnbench - torch| over the tensor's largest |torch| entry, or
# relative for the losses).
LOGITS_TOL, GRAD_TOL, LOSS_TOL = 2e-6, 1e-5, 5e-6

CONFIGS = [
    ("standard", {}),
    ("standard", {"rope": False}),
    ("standard", {"gate": True, "value_residual": "learned", "layer_scale": 0.5, "glu": True}),
    ("window", {"window": 7, "gate": True, "value_residual": "token", "layer_scale": 0.1, "glu": True}),
    ("selective", {}),
    ("selective", {"gate": True, "glu": True}),
]


def rel_err(a, b):
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def run(binary, work, kind, model):
    suite = {
        "kind": "train",
        "name": "parity",
        "data": {"kind": "mqar", "pairs": 3, "keys": 8, "values": 8},
        "model": dict({"d": 16, "heads": 2, "layers": 3, "rope": True}, **model),
        "attention": [kind],
        "seeds": [3],
        "steps": 1,
        "batch": 4,
        "context": 24,
        "lr": 3e-3,
        "eval_interval": 1000,
        "eval_batches": 1,
        "threads": 1,
    }
    sp = os.path.join(work, "suite.json")
    with open(sp, "w") as f:
        json.dump(suite, f)
    out = os.path.join(work, "train")
    subprocess.run([binary, "train", sp, "--out", out, "--quiet"], check=True, stdout=subprocess.DEVNULL)
    ck = os.path.join(out, f"{kind}-seed3.safetensors")
    T, ckp = read_safetensors(ck)
    cfg = json.loads(ckp["config"])
    cfg["context"] = suite["context"]

    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, cfg["vocab"], (3, cfg["context"]), generator=g)
    targets = torch.randint(0, cfg["vocab"], (3, cfg["context"]), generator=g)
    targets[0, :5] = -1  # not counted
    bp = os.path.join(work, "batch.json")
    with open(bp, "w") as f:
        json.dump({"tokens": tokens.tolist(), "targets": targets.tolist()}, f)
    op = os.path.join(work, "steps.safetensors")
    steps = 10
    subprocess.run([binary, "gpt-steps", ck, "--batch", bp, "--steps", str(steps), "--out", op, "--threads", "1"],
                   check=True)
    ours, _ = read_safetensors(op)

    names = [n for n in T if not n.startswith("adam_")]
    P = {n: T[n].clone().requires_grad_(True) for n in names}
    loss = loss_of(P, cfg, tokens, targets)
    loss.backward()
    worst = {"logits": rel_err(ours["logits"], forward(P, cfg, tokens).detach())}
    worst["grad"] = max(rel_err(ours["grad." + n], P[n].grad) for n in names)
    worst_grad_name = max(names, key=lambda n: rel_err(ours["grad." + n], P[n].grad))

    # 10 Adam steps on the same batch, continuing the checkpoint's moments.
    opt = torch.optim.Adam([P[n] for n in names], lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8)
    step0 = int(ckp["step"])
    for n in names:
        opt.state[P[n]] = {"step": torch.tensor(float(step0)), "exp_avg": T["adam_m." + n].clone(),
                           "exp_avg_sq": T["adam_v." + n].clone()}
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        lo = loss_of(P, cfg, tokens, targets)
        lo.backward()
        losses.append(lo.item())
        opt.step()
    worst["loss"] = max(abs(a - b) / abs(b) for a, b in zip(ours["losses"].tolist(), losses))
    ok = worst["logits"] <= LOGITS_TOL and worst["grad"] <= GRAD_TOL and worst["loss"] <= LOSS_TOL
    label = kind + " " + (json.dumps(model, separators=(",", ":")) if model else "plain")
    print(f"{'ok ' if ok else 'FAIL'} {label:<100} logits {worst['logits']:.2e}  grads {worst['grad']:.2e} "
          f"({worst_grad_name})  10-step losses {worst['loss']:.2e}  (loss {losses[0]:.4f} -> {losses[-1]:.4f})")
    return ok


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    binary = sys.argv[1]
    keep = sys.argv[sys.argv.index("--keep") + 1] if "--keep" in sys.argv else None
    print(f"torch {torch.__version__}; bounds: logits {LOGITS_TOL}, gradients {GRAD_TOL} "
          f"(of each tensor's largest entry), losses {LOSS_TOL} relative")
    ok = True
    for idx, (kind, model) in enumerate(CONFIGS):
        work = tempfile.mkdtemp(prefix="attnbench_parity_")
        try:
            ok &= run(binary, work, kind, model)
        finally:
            if keep:
                shutil.copytree(work, os.path.join(keep, str(idx)), dirs_exist_ok=True)
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
