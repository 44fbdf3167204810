"""The torch-free `torch.save` reader against checkpoints written by PyTorch itself, and against
forged ones.

The fixtures come from `tests/reference/make_torch_checkpoint_fixture.py` (real `torch.save`, in
the reference virtualenv); everything else is built here from them or by hand, so no test needs
PyTorch.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from aurora.torch_checkpoint import TorchCheckpointError, load_torch_checkpoint

DATA = Path(__file__).parent / "data"
LIGHTNING = DATA / "torch_checkpoint_fixture.pt"
SEQUENTIAL = DATA / "torch_checkpoint_fixture_sequential.pt"
EXPECTED = DATA / "torch_checkpoint_fixture.npz"

# Bytes per scalar component of each storage element: what a byte-order swap reverses.
COMPONENT_BYTES = {
    "DoubleStorage": 8,
    "FloatStorage": 4,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "ComplexDoubleStorage": 8,
    "ComplexFloatStorage": 4,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
    "uint16": 2,
    "float8_e4m3fn": 1,
}


# ---------------------------------------------------------------------------------------------
# helpers


def dtype_named(name: str) -> np.dtype:
    """numpy's dtypes and ml_dtypes' (bfloat16, float8_e4m3fn) by name."""
    return np.dtype(getattr(ml_dtypes, name, None) or name)


def expected(prefix: str) -> dict[str, tuple[np.ndarray, np.dtype]]:
    """name -> (values, dtype the reader must return); bfloat16/float8 values are their float32
    form."""
    with np.load(EXPECTED) as npz:
        names = [k.split("/", 1)[1] for k in npz.files if k.startswith(prefix + "/")]
        return {
            n: (npz[f"{prefix}/{n}"], dtype_named(str(npz[f"dtype/{prefix}/{n}"]))) for n in names
        }


def assert_identical(a: np.ndarray, b: np.ndarray) -> None:
    """Same dtype, shape and bits (exact, and meaningful for bfloat16/float8 too)."""
    assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
    assert (a.dtype, a.shape) == (b.dtype, b.shape)
    assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def assert_same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert_identical(a[k], b[k])


def rewrite_zip(
    src: Path,
    dst: Path,
    edit: Callable[[str, bytes], tuple[str, bytes]] = lambda n, d: (n, d),
    compression: int = zipfile.ZIP_STORED,
) -> Path:
    """Copy a zip record by record through `edit(name, data) -> (name, data)`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            zout.writestr(*edit(info.filename, zin.read(info.filename)))
    return dst


def make_archive(
    path: Path, pkl: bytes, records: dict[str, bytes] | None = None, prefix: str = "archive"
) -> Path:
    """A torch-style zip from a hand-written `data.pkl` and storage records."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{prefix}/data.pkl", pkl)
        z.writestr(f"{prefix}/byteorder", "little")
        for key, data in (records or {}).items():
            z.writestr(f"{prefix}/data/{key}", data)
        z.writestr(f"{prefix}/version", "3\n")
    return path


def g(module: str, name: str) -> bytes:
    """Pickle opcode GLOBAL: pushes `module.name` (as the unpickler's find_class resolves it)."""
    return b"c" + f"{module}\n{name}\n".encode()


def p(obj: object) -> bytes:
    """The opcodes that push one plain object (protocol 2, without header and STOP)."""
    return pickle.dumps(obj, protocol=2)[2:-1]


def tensor_pickle(
    offset: object,
    size: object,
    stride: object,
    numel: int = 4,
    storage: str = "FloatStorage",
    size_global: bool = False,
) -> bytes:
    """`{"w": _rebuild_tensor_v2(storage '0', offset, size, stride, False, OrderedDict())}`, as
    torch.save writes it."""
    pid = b"(" + p("storage") + g("torch", storage) + p("0") + p("cpu") + p(numel) + b"tQ"
    size_ops = g("torch", "Size") + b"(" + p(list(size)) + b"tR" if size_global else p(size)  # type: ignore[arg-type]
    args = (
        b"("
        + pid
        + p(offset)
        + size_ops
        + p(stride)
        + p(False)
        + g("collections", "OrderedDict")
        + b")Rt"
    )
    return b"\x80\x02}" + p("w") + g("torch._utils", "_rebuild_tensor_v2") + args + b"Rs."


class StorageComponents(pickle.Unpickler):
    """Reads a trusted fixture's pickle only to learn each storage key's component size."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.sizes: dict[str, int] = {}

    def find_class(self, module: str, name: str) -> Any:
        if name == "_rebuild_tensor_v3":
            return lambda storage, *args: self.sizes.__setitem__(
                storage[0], COMPONENT_BYTES[args[5]]
            )
        if module == "torch":
            return name
        return lambda *args: OrderedDict() if name == "OrderedDict" else None

    def persistent_load(self, pid: Any) -> tuple[str, str]:
        _, storage_type, key, _, _ = pid
        if storage_type in COMPONENT_BYTES:
            self.sizes[key] = COMPONENT_BYTES[storage_type]
        return key, storage_type


def big_endian_copy(src: Path, dst: Path) -> Path:
    """What `torch.save` writes on a big-endian machine: same pickle, swapped storages, byteorder
    "big"."""
    with zipfile.ZipFile(src) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    reader = StorageComponents(pkl)
    reader.load()

    def swap(name: str, data: bytes) -> tuple[str, bytes]:
        if name.endswith("/byteorder"):
            return name, b"big"
        folder, _, key = name.rpartition("/")
        if folder.endswith("/data") and reader.sizes.get(key, 1) > 1:
            return name, np.frombuffer(data, f"<u{reader.sizes[key]}").byteswap().tobytes()
        return name, data

    return rewrite_zip(src, dst, swap)


# ---------------------------------------------------------------------------------------------
# real torch.save checkpoints


def test_lightning_checkpoint_matches_torch() -> None:
    ckpt = load_torch_checkpoint(LIGHTNING)
    assert type(ckpt) is dict and set(ckpt) == {"state_dict", "epoch"} and ckpt["epoch"] == 3
    state = ckpt["state_dict"]
    assert type(state) is OrderedDict
    want = expected("lightning")
    assert list(state) == list(want)
    for name, (values, dtype) in want.items():
        got = state[name]
        assert isinstance(got, np.ndarray), name
        assert (got.dtype, got.shape) == (dtype, values.shape), name
        assert_identical(got.astype(values.dtype), values)


def test_sequential_state_dict_matches_torch() -> None:
    """A model's plain `state_dict()`, including the `_metadata` torch sets on its OrderedDict."""
    state = load_torch_checkpoint(SEQUENTIAL)
    assert type(state) is OrderedDict
    want = expected("sequential")
    assert list(state) == ["0.weight", "0.bias", "1.weight", "1.bias"] == list(want)
    for name, (values, dtype) in want.items():
        assert dtype == np.float32
        assert_identical(state[name], values)
    assert state._metadata == OrderedDict(
        [("", {"version": 1}), ("0", {"version": 1}), ("1", {"version": 1})]
    )


def test_float32_flag_casts_every_floating_array() -> None:
    state = load_torch_checkpoint(LIGHTNING, float32=True)["state_dict"]
    for name, (values, dtype) in expected("lightning").items():
        floating = np.issubdtype(dtype, np.floating) or dtype.type in (
            ml_dtypes.bfloat16,
            ml_dtypes.float8_e4m3fn,
        )
        assert state[name].dtype == (np.float32 if floating else dtype), name
        assert_identical(state[name], values.astype(state[name].dtype))


def test_tensors_are_independent_writable_copies() -> None:
    """Views that shared a storage in torch must not share memory here (nor with the file)."""
    state = load_torch_checkpoint(LIGHTNING)["state_dict"]
    for name, a in state.items():
        assert a.flags.writeable and a.flags.c_contiguous, name
    assert not np.shares_memory(state["shared_a"], state["shared_b"])
    state["shared_a"][...] = -1
    assert_identical(state["shared_b"], np.arange(10, 15, dtype=np.float32))


def test_no_torch_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` now raises ImportError
    assert load_torch_checkpoint(LIGHTNING)["epoch"] == 3


def test_archive_folder_name_may_vary(tmp_path: Path) -> None:
    renamed = rewrite_zip(
        LIGHTNING, tmp_path / "x.pt", lambda n, d: ("some-other_name/" + n.partition("/")[2], d)
    )
    assert_same_state(
        load_torch_checkpoint(renamed)["state_dict"], load_torch_checkpoint(LIGHTNING)["state_dict"]
    )


def test_compressed_records_are_read_too(tmp_path: Path) -> None:
    """torch stores records uncompressed (and they are memory-mapped); a re-zipped file still
    loads."""
    deflated = rewrite_zip(LIGHTNING, tmp_path / "deflated.pt", compression=zipfile.ZIP_DEFLATED)
    assert_same_state(
        load_torch_checkpoint(deflated)["state_dict"],
        load_torch_checkpoint(LIGHTNING)["state_dict"],
    )


def test_big_endian_checkpoint(tmp_path: Path) -> None:
    big = big_endian_copy(LIGHTNING, tmp_path / "big.pt")
    record = "torch_checkpoint_fixture/data/0"  # the float32 tensor
    with zipfile.ZipFile(big) as z_big, zipfile.ZipFile(LIGHTNING) as z_little:
        assert (
            z_big.read(record)
            == np.frombuffer(z_little.read(record), "<f4").astype(">f4").tobytes()
        )
    assert_same_state(
        load_torch_checkpoint(big)["state_dict"], load_torch_checkpoint(LIGHTNING)["state_dict"]
    )


def test_missing_byteorder_record_means_little_endian(tmp_path: Path) -> None:
    old = rewrite_zip(
        LIGHTNING, tmp_path / "old.pt", lambda n, d: (n.replace("/byteorder", "/ignored"), d)
    )
    assert_same_state(
        load_torch_checkpoint(old)["state_dict"], load_torch_checkpoint(LIGHTNING)["state_dict"]
    )


def test_plain_builtin_values_round_trip(tmp_path: Path) -> None:
    """Non-tensor entries of a checkpoint (bytes via `_codecs.encode`, sets, complex, nesting)."""
    value = {
        "bytes": b"\x00\xffab",
        "set": {1, 2},
        "complex": 1 + 2j,
        "list": [1, (2.5, None)],
        "nested": {"a": "b"},
    }
    assert (
        load_torch_checkpoint(make_archive(tmp_path / "plain.pt", pickle.dumps(value, protocol=2)))
        == value
    )


# ---------------------------------------------------------------------------------------------
# hand-written tensor pickles: views and their bounds


def test_hand_written_tensor_pickle(tmp_path: Path) -> None:
    """The forging helper itself writes what torch writes (so the refusals below are meaningful)."""
    storage = np.arange(6, dtype="<f4").tobytes()
    for size_global in (False, True):
        pkl = tensor_pickle(1, (2, 2), (1, 2), numel=6, size_global=size_global)
        path = make_archive(tmp_path / "ok.pt", pkl, {"0": storage})
        assert_identical(load_torch_checkpoint(path)["w"], np.array([[1, 3], [2, 4]], np.float32))


@pytest.mark.parametrize(
    "offset, size, stride",
    [
        (3, (2,), (1,)),  # runs one past the end
        (0, (2, 2), (1, 3)),  # stride too large
        (5, (0,), (1,)),  # offset past the end even for an empty tensor
        (0, (2,), (-1,)),  # negative stride
        (-1, (1,), (1,)),  # negative offset
        (0, (2, 2), (1,)),  # size/stride of different ranks
        (0, (2.0,), (1,)),  # not an integer
        (0, [2], [1]),  # not a tuple
    ],
)
def test_views_outside_their_storage_are_refused(
    tmp_path: Path, offset: object, size: object, stride: object
) -> None:
    path = make_archive(tmp_path / "bad.pt", tensor_pickle(offset, size, stride), {"0": bytes(16)})
    with pytest.raises(TorchCheckpointError, match="bad.pt: .*(overruns|beyond|bad tensor)"):
        load_torch_checkpoint(path)


def test_missing_or_short_storage_record(tmp_path: Path) -> None:
    with pytest.raises(TorchCheckpointError, match="missing storage record 'archive/data/0'"):
        load_torch_checkpoint(make_archive(tmp_path / "a.pt", tensor_pickle(0, (4,), (1,))))
    with pytest.raises(TorchCheckpointError, match="has 8 bytes, the checkpoint expects 16"):
        load_torch_checkpoint(
            make_archive(tmp_path / "b.pt", tensor_pickle(0, (4,), (1,)), {"0": bytes(8)})
        )


@pytest.mark.parametrize(
    "pid",
    [
        b"(" + p("storage") + g("torch", "FloatStorage") + p("0") + p("cpu") + b"tQ",
        p("0") + b"Q",
        b"(" + p("storage") + p("FloatStorage") + p("0") + p("cpu") + p(4) + b"tQ",
    ],
    ids=["no-numel", "a-string", "type-as-string"],
)
def test_malformed_persistent_ids_are_refused(tmp_path: Path, pid: bytes) -> None:
    path = make_archive(tmp_path / "pid.pt", b"\x80\x02" + pid + b".", {"0": bytes(16)})
    with pytest.raises(TorchCheckpointError, match="persistent id|bad storage reference"):
        load_torch_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# security: a pickle must not be able to run code


class RunsCommand:
    """What a malicious checkpoint pickles: unpickling it calls `os.system(command)`."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (self.command,)


def test_os_system_global_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    pkl = (
        g("os", "system") + b"(V" + f"touch {marker}".encode() + b"\ntR."
    )  # protocol 0, `os.system(...)`
    path = make_archive(tmp_path / "evil.pt", pkl)
    with pytest.raises(pickle.UnpicklingError, match=r"evil.pt: forbidden global os\.system"):
        load_torch_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_reduce_to_os_system_is_refused_in_every_protocol(tmp_path: Path, protocol: int) -> None:
    """pickle.dumps writes `posix.system` (GLOBAL or STACK_GLOBAL), nested inside a state dict."""
    marker = tmp_path / "pwned"
    state = OrderedDict(w=[RunsCommand(f"touch {marker}")])
    path = make_archive(
        tmp_path / "evil.pt", pickle.dumps({"state_dict": state}, protocol=protocol)
    )
    with pytest.raises(TorchCheckpointError, match=r"forbidden global \w+\.system"):
        load_torch_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "module, name",
    [
        ("builtins", "eval"),
        ("__builtin__", "exec"),
        ("builtins", "getattr"),
        ("subprocess", "Popen"),
        ("torch", "load"),
        ("torch._utils", "_rebuild_qtensor"),
        ("numpy", "load"),
        ("collections", "namedtuple"),
    ],
)
def test_other_globals_are_refused(tmp_path: Path, module: str, name: str) -> None:
    path = make_archive(tmp_path / "evil.pt", b"\x80\x02" + g(module, name) + b".")
    shown = "builtins" if module == "__builtin__" else module
    with pytest.raises(TorchCheckpointError, match=rf"forbidden global {shown}\.{name}"):
        load_torch_checkpoint(path)


@pytest.mark.parametrize(
    "target",
    [
        g("torch._utils", "_rebuild_tensor_v2"),
        g("torch", "FloatStorage"),
        g("collections", "OrderedDict"),
    ],
    ids=["rebuild", "storage-type", "OrderedDict"],
)
@pytest.mark.parametrize(
    "state", [p({"_fn": 1}), p((None, {"_fn": 1}))], ids=["dict-state", "slot-state"]
)
def test_allowed_globals_cannot_be_tampered_with(
    tmp_path: Path, target: bytes, state: bytes
) -> None:
    """The pickle BUILD opcode on an allowed global (to replace what it calls) is refused."""
    path = make_archive(tmp_path / "evil.pt", b"\x80\x02" + target + state + b"b.")
    with pytest.raises(TorchCheckpointError, match="set the state of"):
        load_torch_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# broken and unsupported files


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, -10])
def test_truncated_file(tmp_path: Path, keep: float) -> None:
    data = LIGHTNING.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: int(len(data) * keep) if keep > 0 else keep])
    with pytest.raises(
        TorchCheckpointError, match=rf"^{re.escape(str(path))}: .*(truncated|corrupt)"
    ):
        load_torch_checkpoint(path)


def test_corrupt_pickle_record(tmp_path: Path) -> None:
    data = bytearray(LIGHTNING.read_bytes())
    at = data.index(
        b"_rebuild_tensor_v2"
    )  # inside data.pkl, stored uncompressed: the CRC no longer matches
    data[at] ^= 0xFF
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(
        TorchCheckpointError, match=rf"^{re.escape(str(path))}: corrupt .*\(BadZipFile: Bad CRC-32"
    ):
        load_torch_checkpoint(path)
    half_pickle = lambda n, d: (n, d[: len(d) // 2] if n.endswith("data.pkl") else d)
    cut = rewrite_zip(LIGHTNING, tmp_path / "cut.pt", half_pickle)
    with pytest.raises(
        TorchCheckpointError, match=rf"^{re.escape(str(cut))}: corrupt or truncated checkpoint"
    ):
        load_torch_checkpoint(cut)


def test_legacy_format_is_refused_with_advice(tmp_path: Path) -> None:
    """`torch.save(..., _use_new_zipfile_serialization=False)` writes the magic number, then more
    pickles."""
    path = tmp_path / "legacy.pt"
    path.write_bytes(
        pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2) + b"..."
    )
    with pytest.raises(
        TorchCheckpointError, match=r"legacy\.pt: legacy torch\.save format .* re-save it"
    ):
        load_torch_checkpoint(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"not a checkpoint", pickle.dumps({"w": 1}), b"\x89HDF\r\n\x1a\n"],
    ids=["empty", "text", "pickle", "hdf5"],
)
def test_other_files_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "other.bin"
    path.write_bytes(content)
    with pytest.raises(TorchCheckpointError, match=r"not a torch\.save zip checkpoint") as error:
        load_torch_checkpoint(path)
    assert str(error.value).startswith(f"{path}: ")


def test_torchscript_archive_is_refused(tmp_path: Path) -> None:
    path = make_archive(tmp_path / "scripted.pt", pickle.dumps({}, protocol=2), {})
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(TorchCheckpointError, match="TorchScript"):
        load_torch_checkpoint(path)


def test_top_level_must_be_a_dict(tmp_path: Path) -> None:
    with pytest.raises(TorchCheckpointError, match="holds a list, expected a dict"):
        load_torch_checkpoint(make_archive(tmp_path / "list.pt", pickle.dumps([1], protocol=2)))


def test_missing_file_is_a_file_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_torch_checkpoint(tmp_path / "nope.pt")
