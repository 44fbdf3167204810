"""Read `torch.save` checkpoints as numpy arrays, safely and without PyTorch.

Converting microsoft-aurora weights should not require a 5 GB PyTorch install just to read a file.
Since PyTorch 1.6, `torch.save` writes a zip archive::

    <prefix>/data.pkl      the pickled object; each tensor's data is a persistent id of a storage
    <prefix>/data/<key>    the raw bytes of storage <key>, stored uncompressed (and 64-byte aligned)
    <prefix>/byteorder     "little" or "big" (absent in old files: little)
    <prefix>/version       the format version (not needed to read the data)

where `<prefix>` is the file's name at save time, so it varies.

Unpickling calls whatever functions a pickle names, so a checkpoint from the internet could run
any code. Like `torch.load(weights_only=True)`, this reader resolves only the few globals a
weights-only checkpoint needs (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
storage types, dtypes, ...), each to a small numpy implementation in this module; nothing is
imported by name, and any other global raises `TorchCheckpointError` (a `pickle.UnpicklingError`)
naming it. The objects handed to the pickle refuse `BUILD` (attribute setting), so a pickle cannot
tamper with them either; only the containers it builds accept it (a state dict's OrderedDict
carries `_metadata` that way).

Storages are memory-mapped and each tensor copies just its own elements out (honouring offset
and strides), so reading needs about the memory of the result. Like PyTorch, storage records are
not CRC-checked; `data.pkl` is.

Refused: the legacy format (`_use_new_zipfile_serialization=False`, PyTorch < 1.6) and
TorchScript archives, with an error that says what to do instead; quantized, sparse, nested and
subclassed tensors, whose rebuild functions are not on the list, as forbidden globals.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import pickle
import struct
import sys
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, NoReturn

import ml_dtypes
import numpy as np

__all__ = ["TorchCheckpointError", "load_torch_checkpoint"]

_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a legacy (pre-zip) torch.save file
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length

# Legacy typed storages: the dtype of a `_rebuild_tensor_v2` tensor comes from its storage type.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
# Floating types that numpy does not know; torch.bfloat16/float8_* become these.
_ML_FLOATS: dict[str, np.dtype] = {
    name: np.dtype(getattr(ml_dtypes, name))
    for name in (
        "bfloat16",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
    )
    if hasattr(ml_dtypes, name)
}
_NUMPY_NAMES = ("float64", "float32", "float16", "complex128", "complex64", "bool")
_INT_NAMES = ("int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64")
# `torch.<name>` dtype objects; `_rebuild_tensor_v3` (uint16/32/64, float8) pairs one with bytes.
_TORCH_DTYPES: dict[str, np.dtype] = {
    **{name: np.dtype(name) for name in _NUMPY_NAMES + _INT_NAMES},
    **_ML_FLOATS,
}


class TorchCheckpointError(pickle.UnpicklingError):
    """A checkpoint cannot be read: forbidden content, an unsupported format, or a corrupt file."""


def _refuse(message: str) -> NoReturn:
    raise TorchCheckpointError(message)


class _Sealed:
    """Base of every object a pickle can obtain from us: refuses the pickle `BUILD` opcode.

    `BUILD` looks up `__setstate__` first, so defining it here stops a pickle from setting
    attributes on (and so tampering with) the allowed globals, storages and dtypes.
    """

    __slots__ = ()

    def __setstate__(self, state: object) -> NoReturn:
        _refuse(f"the pickle tries to set the state of {self!r}")


class _Global(_Sealed):
    """An allowed callable global, e.g. `torch._utils._rebuild_tensor_v2` -> our numpy version."""

    __slots__ = ("_fn", "_name")

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        self._name, self._fn = name, fn

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __repr__(self) -> str:
        return self._name


class _StorageType(_Sealed):
    """`torch.FloatStorage` & co. (and `torch.UntypedStorage`, as bytes): a storage's dtype."""

    __slots__ = ("dtype", "name")

    def __init__(self, name: str, dtype: np.dtype) -> None:
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _TorchDtype(_Sealed):
    """`torch.uint16` & co., as `_rebuild_tensor_v3` receives them."""

    __slots__ = ("dtype", "name")

    def __init__(self, name: str, dtype: np.dtype) -> None:
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _Storage(_Sealed):
    """One storage record: read-only bytes (a view of the memory-mapped file) and their dtype."""

    __slots__ = ("dtype", "key", "raw", "swap")

    def __init__(self, key: str, raw: np.ndarray, dtype: np.dtype, swap: bool) -> None:
        self.key, self.raw, self.dtype, self.swap = key, raw, dtype, swap

    def __repr__(self) -> str:
        return f"<storage {self.key!r} of {self.raw.size} bytes>"


def _is_float(dtype: np.dtype) -> bool:
    """numpy's floating types and ml_dtypes' (bfloat16, float8), which numpy does not count as
    floating."""
    return np.issubdtype(dtype, np.floating) or dtype in _ML_FLOATS.values()


def _check_layout(
    numel: int, offset: object, size: object, stride: object
) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """Validate a tensor's view of its storage before numpy reads memory through it.

    A forged offset or stride would otherwise read past the storage: every index the view can
    reach must lie inside the storage's `numel` elements.
    """
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)):
        _refuse(f"bad tensor size/stride {size!r}/{stride!r}")
    ints = (offset, *size, *stride)
    if not all(type(v) is int and v >= 0 for v in ints):
        _refuse(f"bad tensor offset/size/stride {offset!r}/{size!r}/{stride!r}")
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= numel:
            _refuse(
                f"tensor (offset {offset}, size {size}, stride {stride}) overruns its storage of "
                f"{numel} elements"
            )
    elif offset > numel:
        _refuse(f"tensor offset {offset} beyond its storage of {numel} elements")
    return offset, size, stride


def _strided_copy(
    storage: _Storage, dtype: np.dtype, offset: object, size: object, stride: object
) -> np.ndarray:
    """The elements of a (possibly non-contiguous) view of `storage`, as a new C-contiguous
    array."""
    if storage.raw.size % dtype.itemsize:
        _refuse(
            f"storage {storage.key!r} of {storage.raw.size} bytes does not hold whole {dtype} "
            "elements"
        )
    offset, size, stride = _check_layout(storage.raw.size // dtype.itemsize, offset, size, stride)
    if 0 in size:
        return np.empty(size, dtype)
    strides = tuple(s * dtype.itemsize for s in stride)
    view = np.ndarray(
        size, dtype, buffer=storage.raw, offset=offset * dtype.itemsize, strides=strides
    )
    out = view.copy()
    if storage.swap and dtype.itemsize > 1:
        out.byteswap(inplace=True)
    return out


def _apply_metadata(array: np.ndarray, metadata: object) -> np.ndarray:
    """Resolve PyTorch's lazy conjugate/negative views, which `torch.save` keeps as tensor
    metadata."""
    if not metadata:
        return array
    if not isinstance(metadata, dict) or not set(metadata) <= {"conj", "neg"}:
        _refuse(f"unsupported tensor metadata {metadata!r}")
    if metadata.get("neg"):
        array = np.negative(array)
    if metadata.get("conj"):
        array = np.conj(array)
    return array


class _Rebuilder:
    """numpy versions of the `torch._utils` functions that rebuild tensors and parameters."""

    def __init__(self, float32: bool) -> None:
        self.float32 = float32

    def _finish(self, array: np.ndarray) -> np.ndarray:
        return array.astype(np.float32) if self.float32 and _is_float(array.dtype) else array

    def tensor(
        self, storage: object, offset: object, size: object, stride: object, *_: object
    ) -> np.ndarray:
        """`_rebuild_tensor(storage, offset, size, stride)`: dtype from the storage type."""
        return self.tensor_v2(storage, offset, size, stride)

    def tensor_v2(
        self,
        storage: object,
        offset: object,
        size: object,
        stride: object,
        requires_grad: object = False,
        backward_hooks: object = None,
        metadata: object = None,
    ) -> np.ndarray:
        """`_rebuild_tensor_v2`: what `torch.save` writes for tensors of the classic dtypes."""
        if not isinstance(storage, _Storage):
            _refuse(f"_rebuild_tensor_v2 expects a storage, got {type(storage).__name__}")
        return self._finish(
            _apply_metadata(_strided_copy(storage, storage.dtype, offset, size, stride), metadata)
        )

    def tensor_v3(
        self,
        storage: object,
        offset: object,
        size: object,
        stride: object,
        requires_grad: object,
        backward_hooks: object,
        dtype: object,
        metadata: object = None,
    ) -> np.ndarray:
        """`_rebuild_tensor_v3`: untyped bytes plus a dtype (uint16/32/64, float8, ...)."""
        if not isinstance(storage, _Storage) or not isinstance(dtype, _TorchDtype):
            _refuse("_rebuild_tensor_v3 expects a storage and a dtype")
        return self._finish(
            _apply_metadata(_strided_copy(storage, dtype.dtype, offset, size, stride), metadata)
        )

    @staticmethod
    def parameter(
        data: object, requires_grad: object, backward_hooks: object, state: object = None
    ) -> np.ndarray:
        """`_rebuild_parameter[_with_state]`: an `nn.Parameter` is just its data here.

        The state of `_with_state` holds Python attributes of Parameter subclasses, not weights.
        """
        if not isinstance(data, np.ndarray):
            _refuse(f"_rebuild_parameter expects a tensor, got {type(data).__name__}")
        return data


def _encode(text: object, encoding: object = "latin1") -> bytes:
    """`_codecs.encode`, which protocol-2 pickles use for `bytes`; only the latin-1 form they
    write."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        _refuse("_codecs.encode is only allowed as pickle uses it for bytes")
    return text.encode("latin1")


def _allowed_globals(rebuild: _Rebuilder) -> dict[tuple[str, str], object]:
    """Everything a weights-only checkpoint may name, keyed by (module, name) as pickled."""
    callables: dict[tuple[str, str], Callable[..., Any]] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("collections", "Counter"): Counter,
        ("builtins", "set"): set,
        ("builtins", "complex"): complex,
        ("builtins", "bytearray"): bytearray,
        ("_codecs", "encode"): _encode,
        ("torch", "Size"): tuple,
        ("torch._utils", "_rebuild_tensor"): rebuild.tensor,
        ("torch._utils", "_rebuild_tensor_v2"): rebuild.tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): rebuild.tensor_v3,
        ("torch._utils", "_rebuild_parameter"): rebuild.parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): rebuild.parameter,
    }
    allowed: dict[tuple[str, str], object] = {
        key: _Global(".".join(key), fn) for key, fn in callables.items()
    }
    for name, dtype in _STORAGE_DTYPES.items():
        allowed["torch", name] = allowed["torch.cuda", name] = _StorageType(name, dtype)
    allowed["torch", "UntypedStorage"] = allowed["torch.storage", "UntypedStorage"] = _StorageType(
        "UntypedStorage", np.dtype(np.uint8)
    )
    for name, dtype in _TORCH_DTYPES.items():
        allowed["torch", name] = _TorchDtype(name, dtype)
    return allowed


class _Archive:
    """The records of a torch zip checkpoint; storages are zero-copy views of a memory map."""

    def __init__(self, zf: zipfile.ZipFile, mm: mmap.mmap) -> None:
        self._zip, self._mm = zf, mm
        self.prefix = self._find_prefix(zf.namelist())
        self.swap = self._byteorder() != sys.byteorder
        self._storages: dict[str, _Storage] = {}

    @staticmethod
    def _find_prefix(names: list[str]) -> str:
        """The archive's top folder, which is the file name at save time: the one with a
        `data.pkl`."""
        prefixes = [
            n[: -len("data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1
        ]
        if len(prefixes) != 1:
            _refuse(
                f"expected one <folder>/data.pkl in the zip, found {len(prefixes)}: "
                "not a torch.save checkpoint"
            )
        if any(
            n.startswith(prefixes[0] + "code/") or n == prefixes[0] + "constants.pkl" for n in names
        ):
            _refuse(
                "this is a TorchScript archive (torch.jit.save); "
                "save the model's state_dict() with torch.save"
            )
        return prefixes[0]

    def _byteorder(self) -> str:
        name = self.prefix + "byteorder"
        if name not in self._zip.NameToInfo:
            return "little"
        order = self._zip.read(name).decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            _refuse(f"unknown byte order {order!r}")
        return order

    def release(self) -> None:
        """Drop the storage views so that the memory map can be closed."""
        self._storages.clear()

    def pickle_bytes(self) -> bytes:
        return self._zip.read(self.prefix + "data.pkl")

    def storage(self, key: str, storage_type: _StorageType, numel: int) -> _Storage:
        """The bytes of storage `key`, shared by every tensor that views it."""
        if key not in self._storages:
            nbytes = numel * storage_type.dtype.itemsize
            raw = self._record(f"{self.prefix}data/{key}", nbytes)
            self._storages[key] = _Storage(key, raw, storage_type.dtype, self.swap)
        storage = self._storages[key]
        if storage.dtype != storage_type.dtype:
            _refuse(f"storage {key!r} is used both as {storage.dtype} and as {storage_type.dtype}")
        return storage

    def _record(self, name: str, nbytes: int) -> np.ndarray:
        """The first `nbytes` bytes of a record: mapped if stored (as torch writes), else
        decompressed."""
        info = self._zip.NameToInfo.get(name)
        if info is None:
            _refuse(f"missing storage record {name!r}")
        if info.file_size < nbytes:
            _refuse(
                f"storage record {name!r} has {info.file_size} bytes, "
                f"the checkpoint expects {nbytes}"
            )
        if info.compress_type != zipfile.ZIP_STORED:
            return np.frombuffer(self._zip.read(name), np.uint8, count=nbytes)
        header = self._mm[info.header_offset : info.header_offset + _LOCAL_HEADER.size]
        if len(header) < _LOCAL_HEADER.size:
            _refuse(f"record {name!r} lies beyond the end of the file")
        signature, name_len, extra_len = _LOCAL_HEADER.unpack(header)
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        if signature != _ZIP_MAGIC or start + nbytes > len(self._mm):
            _refuse(f"record {name!r} is corrupt or lies beyond the end of the file")
        return np.frombuffer(self._mm, np.uint8, count=nbytes, offset=start)


class _Unpickler(pickle.Unpickler):
    """A pickle machine that knows only `allowed` globals and reads storages from `archive`."""

    def __init__(
        self, file: IO[bytes], archive: _Archive, allowed: dict[tuple[str, str], object]
    ) -> None:
        super().__init__(file, encoding="utf-8")
        self._archive, self._allowed = archive, allowed

    def find_class(self, module: str, name: str) -> object:
        module = (
            "builtins" if module == "__builtin__" else module
        )  # protocol-2 pickles from Python 2
        try:
            return self._allowed[module, name]
        except KeyError:
            _refuse(
                f"forbidden global {module}.{name}: a weights-only checkpoint does not need it, "
                "and unpickling it could run arbitrary code"
            )

    def persistent_load(self, pid: object) -> _Storage:
        """`('storage', storage_type, key, location, numel)` -> that storage; `location` is
        ignored (all CPU)."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            _refuse(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not (
            isinstance(storage_type, _StorageType)
            and isinstance(key, str)
            and type(numel) is int
            and numel >= 0
        ):
            _refuse(f"bad storage reference {pid!r}")
        return self._archive.storage(key, storage_type, numel)


@contextmanager
def _open_archive(path: Path) -> Iterator[_Archive]:
    """Open the zip and memory-map the file; no returned array refers to the map (they are
    copies)."""
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        archive = None
        try:
            archive = _Archive(zf, mm)
            yield archive
        finally:
            if archive is not None:
                archive.release()
            # A view may still be referenced (e.g. by a traceback); it is unmapped with it then.
            with contextlib.suppress(BufferError):
                mm.close()


def _check_format(path: Path) -> None:
    """Refuse, with advice, what is not a zip: legacy torch.save files and anything else.

    A legacy file starts with a pickle of one magic int; it is recognised by its bytes, without
    unpickling anything.
    """
    with open(path, "rb") as f:
        head = f.read(32)
    if head.startswith(_ZIP_MAGIC):
        return
    if any(
        head.startswith(pickle.dumps(_LEGACY_MAGIC, protocol=p))
        for p in range(2, pickle.HIGHEST_PROTOCOL + 1)
    ):
        _refuse(
            "legacy torch.save format (_use_new_zipfile_serialization=False, PyTorch < 1.6) "
            "is not supported; "
            "re-save it with a current PyTorch: torch.save(torch.load(p, weights_only=True), new_p)"
        )
    _refuse(
        "not a torch.save zip checkpoint (no zip header): truncated or corrupt, or another format"
    )


def load_torch_checkpoint(path: str | Path, *, float32: bool = False) -> dict[str, Any]:
    """Load a `torch.save` file with every tensor as a numpy array (a copy), without PyTorch.

    Containers are kept (`OrderedDict`s, nested dicts such as a Lightning checkpoint's
    `state_dict`, lists); `nn.Parameter`s become arrays; bfloat16/float8 come back as ml_dtypes
    arrays, or, with `float32=True`, every floating array as float32. Only what a weights-only
    checkpoint needs may be unpickled: any other global raises `TorchCheckpointError` naming it,
    as does a corrupt, truncated or unsupported file (the message starts with the path).
    """
    path = Path(path)
    try:
        _check_format(path)
        with _open_archive(path) as archive:
            allowed = _allowed_globals(_Rebuilder(float32))
            data = archive.pickle_bytes()
            result = _Unpickler(io.BytesIO(data), archive, allowed).load()
    except TorchCheckpointError as e:
        raise TorchCheckpointError(f"{path}: {e}") from None
    except MemoryError:
        raise
    except OSError as e:
        if e.filename is not None:  # could not open the file: the error already names it
            raise
        raise TorchCheckpointError(
            f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {e})"
        ) from e
    except Exception as e:  # any other failure while parsing means a corrupt file
        raise TorchCheckpointError(
            f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(result, dict):
        raise TorchCheckpointError(
            f"{path}: holds a {type(result).__name__}, expected a dict (a state dict)"
        )
    return result
