"""Generate the fixtures of tests/test_torch_checkpoint.py with PyTorch's own `torch.save`.

Writes

* ``tests/data/torch_checkpoint_fixture.pt``: a Lightning-style checkpoint
  ``{"state_dict": OrderedDict(...), "epoch": 3}`` whose tensors cover every case the torch-free
  reader (``aurora/torch_checkpoint.py``) must get right: each common dtype (float32, float16,
  bfloat16, float64, complex64, int64/32/16/8, uint8, bool), the dtypes that torch pickles through
  ``_rebuild_tensor_v3`` and an ``UntypedStorage`` (uint16, float8_e4m3fn), a transposed view, a
  strided slice, an expanded (stride 0) view, two tensors sharing one storage at different offsets,
  a 0-d and an empty tensor, an ``nn.Parameter`` and a conjugate view (saved with ``conj``
  metadata);
* ``tests/data/torch_checkpoint_fixture_sequential.pt``: the plain ``state_dict()`` of a tiny
  ``nn.Sequential(Linear, LayerNorm)``, as a user would save a model (it carries the
  ``_metadata`` attribute that ``state_dict()`` sets on its OrderedDict);
* ``tests/data/torch_checkpoint_fixture.npz``: the expected values, ``lightning/NAME`` and
  ``sequential/NAME``, with ``dtype/lightning/NAME`` (the numpy/ml_dtypes dtype name). Dtypes that
  ``.npz`` cannot hold (bfloat16, float8) are stored as their exact float32 values.

Regenerate (needs the reference virtualenv, see ``tests/reference/venv.py``) from the repository
root with::

    $(python -m tests.reference.venv) tests/reference/make_torch_checkpoint_fixture.py

Run it as a script, not with ``-m``: the reference virtualenv's ``aurora`` is another package.
"""

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parents[1] / "data"
NPZ_UNSUPPORTED = {torch.bfloat16: "bfloat16", torch.float8_e4m3fn: "float8_e4m3fn"}


def lightning_state_dict() -> "OrderedDict[str, torch.Tensor]":
    """Tensors chosen for their storage layout, not their values."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g)
    shared = torch.arange(20, dtype=torch.float32)  # one storage behind two tensors
    grid = torch.arange(24, dtype=torch.int32).reshape(4, 6)
    return OrderedDict(
        float32=torch.randn(3, 4, generator=g),
        float16=torch.randn(5, generator=g).half(),
        bfloat16=torch.randn(2, 3, generator=g).bfloat16(),
        float64=torch.randn(2, 2, generator=g, dtype=torch.float64),
        complex64=torch.randn(3, generator=g, dtype=torch.complex64),
        int64=torch.arange(-3, 3).reshape(2, 3),
        int32=grid,
        int16=torch.tensor([-32768, 0, 32767], dtype=torch.int16),
        int8=torch.tensor([-128, -1, 127], dtype=torch.int8),
        uint8=torch.tensor([0, 1, 255], dtype=torch.uint8),
        bool=torch.tensor([True, False, True]),
        uint16=torch.tensor([0, 1, 65535], dtype=torch.uint16),
        float8_e4m3fn=torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn),
        transposed=base.t(),
        strided=grid[1::2, ::3],
        expanded=torch.tensor([1.0, 2.0, 3.0]).expand(2, 3),
        shared_a=shared[2:8].view(2, 3),
        shared_b=shared[10:15],
        scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 4),
        param=torch.nn.Parameter(torch.randn(4, generator=g)),
        conj=torch.tensor([1 + 2j, -3 - 4j], dtype=torch.complex64).conj(),
    )


def sequential_state_dict() -> "OrderedDict[str, torch.Tensor]":
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).state_dict()


def expected(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """Exact values as `.npz` can store them, and the dtype name the reader must return."""
    t = t.detach().resolve_conj()
    if t.dtype in NPZ_UNSUPPORTED:
        return t.float().numpy(), NPZ_UNSUPPORTED[t.dtype]
    value = t.numpy().copy()
    return value, value.dtype.name


def main() -> None:
    lightning = {"state_dict": lightning_state_dict(), "epoch": 3}
    sd = lightning["state_dict"]
    assert (
        sd["shared_a"].untyped_storage().data_ptr() == sd["shared_b"].untyped_storage().data_ptr()
    )
    assert not sd["transposed"].is_contiguous() and not sd["strided"].is_contiguous()
    assert sd["conj"].is_conj() and isinstance(sd["param"], torch.nn.Parameter)
    torch.save(lightning, DATA / "torch_checkpoint_fixture.pt")
    sequential = sequential_state_dict()
    torch.save(sequential, DATA / "torch_checkpoint_fixture_sequential.pt")

    arrays: dict[str, np.ndarray] = {}
    for prefix, state in (("lightning", sd), ("sequential", sequential)):
        for name, t in state.items():
            arrays[f"{prefix}/{name}"], dtype = expected(t)
            arrays[f"dtype/{prefix}/{name}"] = np.array(dtype)
    np.savez(DATA / "torch_checkpoint_fixture.npz", **arrays)
    for path in sorted(DATA.glob("torch_checkpoint_fixture*")):
        print(f"{path}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
