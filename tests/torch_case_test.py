"""The PyTorch case-dump helper end to end (scripts/attnbench_case.py).

Builds small Invariant Point Attention (AlphaFold2 Algorithm 22) and triangle
attention (Algorithms 13 and 14: starting and ending node) modules in PyTorch,
written here from the paper and the math in docs/ipa.md and docs/triangle.md
(the tensor layout attnbench documents; OpenFold's state_dict names), runs
them in float64 on random inputs with masked residues, dumps each with
attnbench_case.dump_case and runs `attnbench verify` on the file with no
--shape: the dims and the node come from the file's __metadata__. Then the
negatives: a file whose metadata names the wrong node, and one whose stored
output is off by 1e-9 relative, must fail verify.

Usage: python tests/torch_case_test.py ATTNBENCH_BINARY
Exit 77 (CTest's SKIP_RETURN_CODE) when torch is not installed.
"""

import math
import os
import shutil
import subprocess
import sys
import tempfile

try:
    import torch
except ImportError:
    print("SKIP: torch is not installed (an optional dependency)")
    sys.exit(77)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
import attnbench_case  # noqa: E402

torch.set_default_dtype(torch.float64)
torch.manual_seed(0)

INF_IPA, INF_TRI = 1e5, 1e9


class PointProjection(torch.nn.Module):
    """c_s -> n points per residue in the global frame: [N, n, 3] (x, y, z blocks of the linear's output)."""

    def __init__(self, c_s, n):
        super().__init__()
        self.linear = torch.nn.Linear(c_s, 3 * n)
        self.n = n

    def forward(self, s, rot, trans):
        x, y, z = torch.split(self.linear(s), self.n, dim=-1)
        local = torch.stack([x, y, z], dim=-1)  # [N, n, 3]
        return torch.einsum("iab,inb->ina", rot, local) + trans[:, None, :]


class InvariantPointAttention(torch.nn.Module):
    """AF2 Algorithm 22 (monomer), with frames (rot, trans) applied in their float32 values."""

    def __init__(self, c_s, c_z, c, H, P, P_v):
        super().__init__()
        self.c, self.H, self.P, self.P_v = c, H, P, P_v
        self.linear_q = torch.nn.Linear(c_s, H * c)
        self.linear_kv = torch.nn.Linear(c_s, 2 * H * c)
        self.linear_q_points = PointProjection(c_s, H * P)
        self.linear_kv_points = PointProjection(c_s, H * (P + P_v))
        self.linear_b = torch.nn.Linear(c_z, H)
        self.head_weights = torch.nn.Parameter(torch.full((H,), 0.541324854612918))
        self.linear_out = torch.nn.Linear(H * (c + 4 * P_v + c_z), c_s)

    def forward(self, s, z, rot, trans, mask):
        N, (c, H, P, P_v) = s.shape[0], (self.c, self.H, self.P, self.P_v)
        rot, trans = rot.to(torch.float64), trans.to(torch.float64)
        q = self.linear_q(s).view(N, H, c)
        k, v = torch.split(self.linear_kv(s).view(N, H, 2 * c), c, dim=-1)
        q_pts = self.linear_q_points(s, rot, trans).view(N, H, P, 3)
        kv_pts = self.linear_kv_points(s, rot, trans).view(N, H, P + P_v, 3)
        k_pts, v_pts = kv_pts[:, :, :P], kv_pts[:, :, P:]
        b = self.linear_b(z)  # [N, N, H]

        logits = math.sqrt(1.0 / (3 * c)) * torch.einsum("ihc,jhc->hij", q, k)
        logits = logits + math.sqrt(1.0 / 3) * b.permute(2, 0, 1)
        gamma = torch.nn.functional.softplus(self.head_weights) * math.sqrt(1.0 / (3 * (P * 9.0 / 2)))
        d2 = ((q_pts[:, None] - k_pts[None, :]) ** 2).sum(dim=(-1, -2))  # [N, N, H]
        logits = logits - 0.5 * gamma[:, None, None] * d2.permute(2, 0, 1)
        logits = logits + INF_IPA * (mask[:, None] * mask[None, :] - 1)[None]
        a = torch.softmax(logits, dim=-1)  # [H, N, N]

        o = torch.einsum("hij,jhc->ihc", a, v).reshape(N, H * c)
        o_pt = torch.einsum("hij,jhpx->ihpx", a, v_pts)  # global frame
        o_pt = torch.einsum("iba,ihpb->ihpa", rot, o_pt - trans[:, None, None, :])  # R_i^T (x - t_i)
        o_pt = o_pt.reshape(N, H * P_v, 3)
        norm = torch.sqrt((o_pt ** 2).sum(-1) + 1e-8)
        o_pair = torch.einsum("hij,ijc->ihc", a, z).reshape(N, -1)
        return self.linear_out(torch.cat([o, o_pt[..., 0], o_pt[..., 1], o_pt[..., 2], norm, o_pair], dim=-1))


class GatedAttention(torch.nn.Module):
    def __init__(self, c_z, c, H):
        super().__init__()
        self.linear_q = torch.nn.Linear(c_z, H * c, bias=False)
        self.linear_k = torch.nn.Linear(c_z, H * c, bias=False)
        self.linear_v = torch.nn.Linear(c_z, H * c, bias=False)
        self.linear_g = torch.nn.Linear(c_z, H * c)
        self.linear_o = torch.nn.Linear(H * c, c_z)


class TriangleAttention(torch.nn.Module):
    """AF2 Algorithm 13 (starting node) and 14 (ending node: the same on the transposed pair)."""

    def __init__(self, c_z, c, H, starting):
        super().__init__()
        self.c, self.H, self.starting = c, H, starting
        self.layer_norm = torch.nn.LayerNorm(c_z, eps=1e-5)
        self.linear = torch.nn.Linear(c_z, H, bias=False)
        self.mha = GatedAttention(c_z, c, H)

    def forward(self, z, mask):
        if not self.starting:
            z, mask = z.transpose(0, 1), mask.transpose(0, 1)
        N, c, H = z.shape[0], self.c, self.H
        x = self.layer_norm(z)
        q = self.mha.linear_q(x).view(N, N, H, c) / math.sqrt(c)
        k = self.mha.linear_k(x).view(N, N, H, c)
        v = self.mha.linear_v(x).view(N, N, H, c)
        bias = self.linear(x).permute(2, 0, 1)  # [H, j, k]
        logits = torch.einsum("ijhc,ikhc->ihjk", q, k)
        logits = logits + (INF_TRI * (mask - 1))[:, None, None, :]  # row i, key k
        logits = logits + bias[None]
        a = torch.softmax(logits, dim=-1)
        o = torch.einsum("ihjk,ikhc->ijhc", a, v)
        o = torch.sigmoid(self.mha.linear_g(x)).view(N, N, H, c) * o
        out = self.mha.linear_o(o.reshape(N, N, H * c))
        return out if self.starting else out.transpose(0, 1)


def randomize(module, std=0.1):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def random_rotations(N):
    q, r = torch.linalg.qr(torch.randn(N, 3, 3))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    q[torch.det(q) < 0, :, 0] *= -1
    return q.to(torch.float32)  # frames are float32 (docs/ipa.md)


def verify(binary, variant, path, *extra):
    r = subprocess.run([binary, "verify", variant, path, *extra], capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr


failures = []


def expect(cond, what, text=""):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)
        print(text)


def main(binary):
    tmp = tempfile.mkdtemp(prefix="attnbench_torch_case_")

    # IPA: N 11, residues 3 and 7 masked (their query rows carry OpenFold's uniform -1e5 shift).
    N = 11
    ipa = randomize(InvariantPointAttention(c_s=16, c_z=8, c=4, H=3, P=2, P_v=3))
    s, z = torch.randn(N, 16), torch.randn(N, N, 8)
    rot, trans = random_rotations(N), (3 * torch.randn(N, 3)).to(torch.float32).to(torch.float64)
    mask = torch.ones(N)
    mask[[3, 7]] = 0
    with torch.no_grad():
        out = ipa(s, z, rot, trans, mask)
    path = os.path.join(tmp, "ipa.safetensors")
    p = attnbench_case.dump_case(path, ipa, "ipa", {"s": s, "z": z, "rotations": rot, "translations": trans,
                                                    "mask": mask}, {"output": out})
    expect(p == {"N": 11, "c_s": 16, "c_z": 8, "c": 4, "H": 3, "P": 2, "P_v": 3}, f"ipa dims inferred: {p}")
    code, text = verify(binary, "ipa", path)
    expect(code == 0 and "all checks passed" in text, "verify ipa (no --shape)", text)
    print(text)

    # Triangle attention, both nodes: N 9, a random pair mask with a fully masked row.
    for starting in (True, False):
        N = 9
        tri = randomize(TriangleAttention(c_z=12, c=5, H=3, starting=starting))
        with torch.no_grad():
            tri.layer_norm.weight.add_(1.0)
        z = torch.randn(N, N, 12)
        mask = (torch.rand(N, N) > 0.3).to(torch.float64)
        mask[2, :] = 0  # starting: row 2 has no valid key; ending: column 2
        with torch.no_grad():
            out = tri(z, mask)
        node = "starting" if starting else "ending"
        path = os.path.join(tmp, f"triangle_{node}.safetensors")
        p = attnbench_case.dump_case(path, tri, "triangle_attention", {"z": z, "mask": mask}, {"output": out})
        expect(p == {"N": 9, "c_z": 12, "c": 5, "H": 3, "starting": starting}, f"triangle {node} dims: {p}")
        code, text = verify(binary, "triangle_attention", path)
        expect(code == 0 and "all checks passed" in text, f"verify triangle_attention {node} node (no --shape)", text)
        print(text)
        # The metadata decides the node: the other one's claim must fail.
        wrong = os.path.join(tmp, f"triangle_{node}_wrong_node.safetensors")
        attnbench_case.dump_case(wrong, tri, "triangle_attention", {"z": z, "mask": mask}, {"output": out},
                                 params={"starting": not starting})
        code, text = verify(binary, "triangle_attention", wrong)
        expect(code == 1, f"triangle {node} output claimed as the other node fails verify (exit {code})", text)

    # A stored output 1e-9 off (relative) is far outside the file bound (1024 f64 ulps).
    off = os.path.join(tmp, "ipa_off.safetensors")
    N = 11
    with torch.no_grad():
        s, z = torch.randn(N, 16), torch.randn(N, N, 8)
        mask = torch.ones(N)
        out = ipa(s, z, rot, trans, mask)
    attnbench_case.dump_case(off, ipa, "ipa", {"s": s, "z": z, "rotations": rot, "translations": trans, "mask": mask},
                             {"output": out * (1 + 1e-9)})
    code, text = verify(binary, "ipa", off, "--impl", "reference")
    expect(code == 1, f"ipa output off by 1e-9 relative fails verify (exit {code})", text)

    if failures:
        print(f"{len(failures)} failed: {failures} (files kept in {tmp})")
        return 1
    shutil.rmtree(tmp)
    print("all torch case checks passed")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
