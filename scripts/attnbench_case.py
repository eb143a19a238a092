"""Write a PyTorch module's case into an attnbench case file (docs/case-files.md).

One function, :func:`dump_case`, writes a module's ``state_dict()``, the inputs
it was called with and the outputs it returned into a safetensors file in the
layout ``attnbench verify`` reads: every tensor under its name (the
state_dict's names for weights), and ``__metadata__`` holding the variant
(the module kind), its shape parameters (the dims) as a JSON string and the
producer, so that ``attnbench verify VARIANT FILE`` needs no hand-written
``--shape``.

Pure Python: the safetensors format is written here (8-byte little-endian
header length, JSON header, raw little-endian data), so neither the
``safetensors`` package nor torch is required. Tensors may be torch tensors
(torch is imported only if the caller has it) or numpy arrays.

    import attnbench_case
    out = module(s, z, rotations, translations, mask)
    attnbench_case.dump_case("ipa.safetensors", module, "ipa",
                             inputs={"s": s, "z": z, "rotations": r, "translations": t, "mask": mask},
                             outputs={"output": out})

Dims are inferred from the state_dict and inputs for the variants attnbench
knows how to read (``ipa``, ``triangle_attention``; ``starting`` from the
module's attribute of that name); ``params`` overrides or adds any of them.
"""

from __future__ import annotations

import json
import struct

__all__ = ["dump_case", "infer_params"]

# safetensors dtype names, by numpy dtype name / torch dtype name.
_NUMPY_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
                 "uint8": "U8", "bool": "BOOL"}
_TORCH_DTYPES = {"torch.float64": "F64", "torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16",
                 "torch.int64": "I64", "torch.int32": "I32", "torch.uint8": "U8", "torch.bool": "BOOL"}


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _encode(name: str, x):
    """(safetensors dtype, shape, little-endian bytes) of a torch tensor or numpy array."""
    if _is_torch(x):
        t = x.detach().cpu().contiguous()
        dtype = _TORCH_DTYPES.get(str(t.dtype))
        if dtype is None:
            raise TypeError(f"{name}: unsupported dtype {t.dtype} (supported: {', '.join(_TORCH_DTYPES)})")
        shape = list(t.shape)
        if dtype == "BF16":  # numpy has no bfloat16: the same 16 bits as int16
            import torch  # the caller has torch: x is a torch tensor

            t = t.view(torch.int16)
        data = t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
        return dtype, shape, data
    import numpy as np  # numpy arrays (or anything numpy can read)

    a = np.ascontiguousarray(np.asarray(x))
    dtype = _NUMPY_DTYPES.get(a.dtype.name)
    if dtype is None:
        raise TypeError(f"{name}: unsupported dtype {a.dtype} (supported: {', '.join(_NUMPY_DTYPES)})")
    return dtype, list(a.shape), a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()


def _shape(x):
    return [int(d) for d in x.shape]


def infer_params(variant: str, tensors: dict, module=None) -> dict:
    """attnbench's shape parameters of `variant` from the tensors (weights and
    inputs, by their names) and, where the tensors cannot tell, the module's
    attributes. Unknown variants give {} (pass params to dump_case)."""
    if variant == "ipa":
        H = _shape(tensors["head_weights"])[0]
        N, c_s = _shape(tensors["s"])
        c_z = _shape(tensors["linear_b.weight"])[1]
        c = _shape(tensors["linear_q.weight"])[0] // H
        P = _shape(tensors["linear_q_points.linear.weight"])[0] // (3 * H)
        P_v = _shape(tensors["linear_kv_points.linear.weight"])[0] // (3 * H) - P
        return {"N": N, "c_s": c_s, "c_z": c_z, "c": c, "H": H, "P": P, "P_v": P_v}
    if variant == "triangle_attention":
        H, c_z = _shape(tensors["linear.weight"])
        N = _shape(tensors["z"])[0]
        c = _shape(tensors["mha.linear_q.weight"])[0] // H
        p = {"N": N, "c_z": c_z, "c": c, "H": H}
        if module is not None and hasattr(module, "starting"):
            p["starting"] = bool(module.starting)
        return p
    return {}


def dump_case(path, module, variant: str, inputs: dict, outputs: dict, params: dict | None = None,
              producer: str | None = None) -> dict:
    """Writes `module`'s state_dict, `inputs` and `outputs` (name -> tensor)
    into the case file `path` for `attnbench verify VARIANT path`.

    `variant` is the module kind as attnbench names it ("ipa",
    "triangle_attention", "sdpa", ...). The dims go to __metadata__.params:
    inferred (infer_params) and updated with `params`. `module` may be None
    (no weights: sdpa). Returns the params written. The file is written to
    `path` + ".tmp" and renamed, so a failed dump leaves no partial file.
    """
    tensors = {}
    if module is not None:
        for name, t in module.state_dict().items():
            tensors[name] = t
    for group in (inputs, outputs):
        for name, t in group.items():
            if name in tensors:
                raise ValueError(f"{name}: given twice (a weight, an input or an output)")
            tensors[name] = t
    p = infer_params(variant, tensors, module)
    p.update(params or {})
    if producer is None:
        # Not "attnbench...": verify checks files that attnbench did not write against the
        # reference in their producer's (OpenFold's) additive-mask arithmetic (docs/case-files.md).
        kind = type(module).__module__ + "." + type(module).__name__ if module is not None else "no module"
        producer = f"pytorch {kind} (dumped by scripts/attnbench_case.py)"
    if producer.startswith("attnbench"):
        raise ValueError("producer: names starting with 'attnbench' are reserved for attnbench export's files")
    header = {"__metadata__": {"variant": variant, "params": json.dumps(p, sort_keys=True), "producer": producer}}
    if module is not None:
        header["__metadata__"]["module"] = type(module).__name__
    blobs, offset = [], 0
    for name in sorted(tensors):
        dtype, shape, data = _encode(name, tensors[name])
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    tmp = str(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)
    import os

    os.replace(tmp, path)
    return p
