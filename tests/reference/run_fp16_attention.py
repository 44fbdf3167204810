"""Run microsoft-aurora's `fp16_safe_scaled_dot_product_attention` on float16 inputs that overflow
plain float16 attention (reference virtualenv).

Usage: `run_fp16_attention.py SPEC.json OUT_DIR`; spec keys `seed`, `shape` (`(B, heads, N, d)`),
`scale` (std of the queries and keys), `aligned` (a query and a key row set to this value in every
channel, so that even the scaled logits overflow; 0 for none) and `mask` (add a -100/0 mask as the
shifted windows do). Runs under CPU float16 autocast, as the model does. Writes `attention.npz`
(`q`, `k`, `v`, `mask`, `out`).
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

from aurora.model.util import fp16_safe_scaled_dot_product_attention


def main(spec_path, out_dir):
    spec = json.loads(Path(spec_path).read_text())
    rng = np.random.default_rng(spec["seed"])
    shape = tuple(spec["shape"])
    q = (spec["scale"] * rng.standard_normal(shape)).astype(np.float16)
    k = (spec["scale"] * rng.standard_normal(shape)).astype(np.float16)
    v = rng.standard_normal(shape).astype(np.float16)
    if spec["aligned"]:
        q[..., 0, :] = spec["aligned"]
        k[..., 3, :] = spec["aligned"]
    n = shape[-2]
    mask = np.where(rng.random((n, n)) < 0.25, -100.0, 0.0).astype(np.float32)
    if not spec["mask"]:
        mask = np.zeros_like(mask)
    with torch.autocast("cpu", dtype=torch.float16):
        out = fp16_safe_scaled_dot_product_attention(
            torch.from_numpy(q),
            torch.from_numpy(k),
            torch.from_numpy(v),
            attn_mask=torch.from_numpy(mask) if spec["mask"] else None,
        )
    np.savez(Path(out_dir) / "attention.npz", q=q, k=k, v=v, mask=mask, out=out.float().numpy())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
