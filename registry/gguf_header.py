"""Read the header of a GGUF file fast, checking every declared length against the file size.

A GGUF file (version 2 or 3, little-endian) starts with the magic "GGUF", a u32
version, a u64 tensor count and a u64 key/value count. The key/value pairs follow,
then one info record per tensor (name, shape, type, offset), padding up to
`general.alignment`, and the tensor data.

gguf's own GGUFReader trusts declared counts and builds a Python object per array
element, which takes seconds on a 151k-token vocabulary and can be made to allocate
or loop without bound. This reader takes only the constants and type tables from
gguf, and:

* checks each count and length against the bytes left in the file before reading,
  so a truncated or crafted file raises GGUFError instead of allocating;
* reads through a fixed-size window, so memory does not grow with the file;
* skips arrays instead of materializing them: a string array is walked by its
  length prefixes only, and only arrays of at most MAX_KEPT_ITEMS items keep values;
* caps tensors, keys, names and kept strings (MAX_TENSORS, MAX_KEYS, MAX_NAME_BYTES,
  MAX_STRING_BYTES).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import stat
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO

from registry.errors import GGUFError, NotFoundError, QregError, UsageError

log = logging.getLogger(__name__)


def _load_gguf_constants() -> ModuleType:
    """Return gguf's constants module, without importing the gguf package if possible.

    `import gguf` also imports numpy, gguf's reader and its writer, which costs about
    0.1 s per run of `qreg inspect` and is not needed here. gguf/constants.py (checked
    in gguf 0.19) imports only the standard library, so it is loaded on its own.
    """
    loaded = sys.modules.get("gguf.constants")
    if loaded is not None:
        return loaded

    module = _load_constants_file()
    if module is not None:
        return module

    import gguf

    return gguf.constants


def _load_constants_file() -> ModuleType | None:
    spec = importlib.util.find_spec("gguf")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "constants.py"
    file_spec = importlib.util.spec_from_file_location("registry._gguf_constants", path)
    if not path.is_file() or file_spec is None or file_spec.loader is None:
        return None

    module = importlib.util.module_from_spec(file_spec)
    sys.modules[file_spec.name] = module
    try:
        file_spec.loader.exec_module(module)
    except ImportError:
        del sys.modules[file_spec.name]
        log.debug("%s does not load on its own; importing the gguf package", path)
        return None
    return module


gguf_constants = _load_gguf_constants()

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)

# Bytes read per refill of the window; a longer string is skipped with a seek.
WINDOW_BYTES = 1 << 20

# Caps that keep memory bounded whatever the file declares. Real models stay far
# below them: Qwen3-Embedding-0.6B has 310 tensors.
MAX_TENSORS = 1 << 16
MAX_KEYS = 1 << 16
MAX_DIMS = 4  # GGML_MAX_DIMS in ggml.h; llama.cpp rejects tensors with more
MAX_NAME_BYTES = 16 << 20  # key and tensor names together; more is rejected
MAX_STRING_BYTES = 16 << 20  # kept string values together; later ones become OmittedString
MAX_KEPT_STRING_BYTES = 1 << 20  # a longer string value is kept as OmittedString
MAX_KEPT_ITEMS = 64  # a longer array is kept as its type and length only

# Long string arrays remember this many offsets, so one item (the text of a special
# token) can be read later by skipping at most length / CHECKPOINTS strings.
CHECKPOINTS = 64

# Smallest possible encoding of each record, used to reject counts the file cannot hold.
MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, a one-byte value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, zero dimensions, type, offset

_HEAD = struct.Struct("<4sIQQ")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_ARRAY_HEAD = struct.Struct("<IQ")
_TENSOR_TAIL = struct.Struct("<IQ")

_VT = gguf_constants.GGUFValueType
_SCALAR_FORMATS: dict[int, str] = {
    _VT.UINT8: "B",
    _VT.INT8: "b",
    _VT.UINT16: "H",
    _VT.INT16: "h",
    _VT.UINT32: "I",
    _VT.INT32: "i",
    _VT.FLOAT32: "f",
    _VT.BOOL: "?",
    _VT.UINT64: "Q",
    _VT.INT64: "q",
    _VT.FLOAT64: "d",
}
_SCALAR_STRUCTS = {vtype: struct.Struct("<" + code) for vtype, code in _SCALAR_FORMATS.items()}

TRUNCATED_HINT = "the file is incomplete or damaged; download it again"
INVALID_HINT = "the file is damaged or not a GGUF model; download it again"
NOT_GGUF_HINT = "pass a .gguf model file"


@dataclass(frozen=True)
class ArrayValue:
    """A metadata array: element type (gguf_constants.GGUFValueType name), length, and values if short."""

    element_type: str
    length: int
    values: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class OmittedString:
    """A string value longer than MAX_KEPT_STRING_BYTES, or past MAX_STRING_BYTES in total, not kept."""

    length: int


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's record in the header; `offset` is relative to the start of tensor data."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int
    n_elements: int
    n_bytes: int

    @property
    def type_name(self) -> str:
        """Return the gguf_constants.GGMLQuantizationType name, e.g. Q4_K or BF16."""
        return gguf_constants.GGMLQuantizationType(self.type_id).name


@dataclass(frozen=True)
class GGUFHeader:
    """Everything in a GGUF file before its tensor data, with arrays summarized."""

    path: Path
    file_size: int
    version: int
    alignment: int
    data_offset: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    # Text of the token ids named by tokenizer.ggml.*_token_id keys, when in range.
    token_texts: dict[int, str] = field(default_factory=dict)

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get(gguf_constants.Keys.General.ARCHITECTURE)
        return value if isinstance(value, str) else None

    def arch_value(self, key_template: str) -> Any:
        """Return the value of an architecture key such as gguf_constants.Keys.LLM.CONTEXT_LENGTH, or None."""
        if self.architecture is None:
            return None
        return self.metadata.get(key_template.format(arch=self.architecture))

    @property
    def parameter_count(self) -> int:
        return sum(tensor.n_elements for tensor in self.tensors)

    @property
    def tensor_data_bytes(self) -> int:
        return sum(tensor.n_bytes for tensor in self.tensors)


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Read and validate the header of a GGUF file, without reading its tensor data.

    Raises NotFoundError for a missing path, UsageError for a directory or other
    non-regular file, QregError when the file cannot be read, and GGUFError when
    the bytes are not a valid GGUF header or the tensors run past the end of the file.
    """
    path = Path(path)
    handle, size = _open_regular_file(path)
    with handle:
        return _HeaderParser(_Window(handle, size, path)).parse()


def _open_regular_file(path: Path) -> tuple[BinaryIO, int]:
    # stat first: opening a FIFO or a terminal for reading could block forever.
    try:
        info = path.stat()
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such file", hint="check the path, or pass a variant name") from None
    except PermissionError:
        raise _permission_error(path) from None
    except OSError as error:
        raise QregError(f"{path}: cannot read: {error.strerror}") from None

    if stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{path} is a directory, not a GGUF file", hint="pass the path of a .gguf file")
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{path} is not a regular file", hint="pass the path of a .gguf file")

    try:
        handle = open(path, "rb")
    except PermissionError:
        raise _permission_error(path) from None
    except OSError as error:
        raise QregError(f"{path}: cannot read: {error.strerror}") from None
    return handle, info.st_size


def _permission_error(path: Path) -> QregError:
    return QregError(f"{path}: cannot read: permission denied", hint="check the file's permissions")


class _Window:
    """A bounded read window over the file; every read is checked against the file size."""

    def __init__(self, handle: BinaryIO, size: int, path: Path):
        self.handle = handle
        self.size = size
        self.path = path
        self.buffer = b""
        self.start = 0  # file offset of buffer[0]
        self.pos = 0

    def fail(self, problem: str, hint: str = INVALID_HINT) -> GGUFError:
        return GGUFError(f"{self.path}: {problem}", hint=hint)

    def require(self, count: int, what: str) -> None:
        """Raise GGUFError unless `count` bytes remain after the current position."""
        needed = self.pos + count
        if needed > self.size:
            raise self.fail(
                f"truncated at {what}: needs {needed:,} bytes, the file has {self.size:,}",
                hint=TRUNCATED_HINT,
            )

    def remaining(self) -> int:
        return self.size - self.pos

    def fill(self, count: int, what: str) -> int:
        """Make the buffer cover the next `count` bytes; return their index in the buffer."""
        self.require(count, what)
        local = self.pos - self.start
        if 0 <= local and local + count <= len(self.buffer):
            return local

        self.handle.seek(self.pos)
        self.buffer = self.handle.read(max(count, WINDOW_BYTES))
        self.start = self.pos
        if len(self.buffer) < count:
            # The file shrank after it was measured.
            raise self.fail(f"truncated at {what}: the file ended while being read", hint=TRUNCATED_HINT)
        return 0

    def take(self, count: int, what: str) -> bytes:
        local = self.fill(count, what)
        self.pos += count
        return self.buffer[local : local + count]

    def unpack(self, layout: struct.Struct, what: str) -> tuple[Any, ...]:
        local = self.fill(layout.size, what)
        self.pos += layout.size
        return layout.unpack_from(self.buffer, local)

    def skip(self, count: int, what: str) -> None:
        self.require(count, what)
        self.pos += count

    def skip_strings(self, count: int, what: str) -> None:
        """Skip `count` length-prefixed strings, walking their prefixes in the buffer."""
        while count:
            local = self.fill(8, what)
            local, skipped = _skip_strings_in(self.buffer, local, count)
            self.pos = self.start + local
            count -= skipped

            if count and local + 8 <= len(self.buffer):
                # This string runs past the buffer: skip its body by position.
                (length,) = self.unpack(_U64, what)
                self.skip(length, what)
                count -= 1


def _skip_strings_in(buffer: bytes, local: int, count: int) -> tuple[int, int]:
    """Skip up to `count` strings that lie wholly in the buffer; return the new index and the number skipped.

    This is the hot loop of reading a vocabulary. No check against the file size is
    needed here, because the buffer lies inside the file.
    """
    end = len(buffer)
    last_prefix = end - 8
    unpack_u64 = _U64.unpack_from
    for skipped in range(count):
        if local > last_prefix:
            return local, skipped
        string_end = local + 8 + unpack_u64(buffer, local)[0]
        if string_end > end:
            return local, skipped
        local = string_end
    return local, count


class _HeaderParser:
    """One pass over a GGUF header: head, key/value pairs, tensor infos, special tokens."""

    def __init__(self, window: _Window):
        self.window = window
        self.name_budget = MAX_NAME_BYTES
        self.string_budget = MAX_STRING_BYTES
        self.checkpoints: dict[str, list[tuple[int, int]]] = {}

    def parse(self) -> GGUFHeader:
        version, tensor_count, kv_count = self._read_head()
        metadata = self._read_metadata(kv_count)
        infos = self._read_tensor_infos(tensor_count)

        alignment = self._alignment(metadata)
        data_offset = _align(self.window.pos, alignment)
        tensors = tuple(self._check_tensor(info, alignment) for info in infos)
        self._check_tensor_data(tensors, data_offset)

        return GGUFHeader(
            path=self.window.path,
            file_size=self.window.size,
            version=version,
            alignment=alignment,
            data_offset=data_offset,
            metadata=metadata,
            tensors=tensors,
            token_texts=self._special_token_texts(metadata),
        )

    def _read_head(self) -> tuple[int, int, int]:
        window = self.window
        if window.size == 0:
            raise window.fail("file is empty (0 bytes), not a GGUF file", hint=NOT_GGUF_HINT)
        if window.size < 4:
            raise window.fail(f"not a GGUF file: only {window.size} bytes", hint=NOT_GGUF_HINT)

        magic = window.take(4, "the magic")
        if magic != GGUF_MAGIC:
            raise window.fail(
                f"not a GGUF file: starts with {magic!r}, expected {GGUF_MAGIC!r}", hint=NOT_GGUF_HINT
            )

        window.pos = 0
        _magic, version, tensor_count, kv_count = window.unpack(_HEAD, "the file header")
        if version not in SUPPORTED_VERSIONS:
            if version & 0xFFFF == 0:
                raise window.fail("big-endian GGUF files are not supported", hint="use a little-endian file")
            raise window.fail(f"GGUF version {version} is not supported (qreg reads versions 2 and 3)")

        self._check_count(kv_count, MIN_KV_BYTES, MAX_KEYS, "key/value pairs")
        self._check_count(tensor_count, MIN_TENSOR_INFO_BYTES, MAX_TENSORS, "tensors")
        return version, tensor_count, kv_count

    def _check_count(self, count: int, min_item_bytes: int, cap: int | None, what: str) -> None:
        """Reject a declared count that cannot fit in the bytes left, or exceeds qreg's cap."""
        remaining = self.window.remaining()
        if count * min_item_bytes > remaining:
            raise self.window.fail(
                f"declares {count:,} {what} of at least {min_item_bytes} bytes each, "
                f"but only {remaining:,} bytes remain after offset {self.window.pos:,}"
            )
        if cap is not None and count > cap:
            raise self.window.fail(f"declares {count:,} {what}; qreg reads at most {cap:,}")

    def _read_metadata(self, kv_count: int) -> dict[str, Any]:
        metadata: dict[str, Any] = {}
        for index in range(kv_count):
            key = self._read_name(f"key #{index + 1}")
            what = f"key '{key}'"
            if key in metadata:
                raise self.window.fail(f"duplicate {what}")

            (raw_type,) = self.window.unpack(_U32, f"the value type of {what}")
            metadata[key] = self._read_value(self._value_type(raw_type, what), key, what)
        return metadata

    def _value_type(self, raw_type: int, what: str) -> gguf_constants.GGUFValueType:
        try:
            return gguf_constants.GGUFValueType(raw_type)
        except ValueError:
            raise self.window.fail(f"{what} has unknown value type {raw_type}") from None

    def _read_name(self, what: str) -> str:
        (length,) = self.window.unpack(_U64, f"the name length of {what}")
        self.window.require(length, f"the name of {what}")
        if length > self.name_budget:
            raise self.window.fail(
                f"the name of {what} is {length:,} bytes, past the {MAX_NAME_BYTES:,} bytes of names qreg reads"
            )
        self.name_budget -= length
        return self.window.take(length, f"the name of {what}").decode("utf-8", errors="replace")

    def _read_value(self, vtype: gguf_constants.GGUFValueType, key: str, what: str) -> Any:
        if vtype == _VT.STRING:
            return self._read_string(what)
        if vtype == _VT.ARRAY:
            return self._read_array(key, what)
        return self.window.unpack(_SCALAR_STRUCTS[vtype], f"the value of {what}")[0]

    def _read_string(self, what: str) -> str | OmittedString:
        (length,) = self.window.unpack(_U64, f"the string length of {what}")
        self.window.require(length, f"the string of {what}")
        if length > MAX_KEPT_STRING_BYTES or length > self.string_budget:
            self.window.skip(length, f"the string of {what}")
            return OmittedString(length)

        self.string_budget -= length
        return self.window.take(length, f"the string of {what}").decode("utf-8", errors="replace")

    def _read_array(self, key: str, what: str) -> ArrayValue:
        raw_type, length = self.window.unpack(_ARRAY_HEAD, f"the array header of {what}")
        element_type = self._value_type(raw_type, f"the array {what}")
        if element_type == _VT.ARRAY:
            raise self.window.fail(f"{what} is an array of arrays, which GGUF readers do not support")

        if element_type == _VT.STRING:
            self._check_count(length, 8, None, f"string items in {what}")
            values = self._read_string_items(key, length, what)
        else:
            layout = _SCALAR_STRUCTS[element_type]
            self._check_count(length, layout.size, None, f"{element_type.name} items in {what}")
            values = self._read_scalar_items(layout, length, what)
        return ArrayValue(element_type.name, length, values)

    def _read_string_items(self, key: str, length: int, what: str) -> tuple[Any, ...] | None:
        if length <= MAX_KEPT_ITEMS:
            return tuple(self._read_string(what) for _ in range(length))

        # Skip in CHECKPOINTS steps and remember where each step starts.
        step = -(-length // CHECKPOINTS)
        marks = []
        for first in range(0, length, step):
            marks.append((first, self.window.pos))
            self.window.skip_strings(min(step, length - first), f"the strings of {what}")
        self.checkpoints[key] = marks
        return None

    def _read_scalar_items(self, layout: struct.Struct, length: int, what: str) -> tuple[Any, ...] | None:
        if length > MAX_KEPT_ITEMS:
            self.window.skip(length * layout.size, f"the items of {what}")
            return None
        items = struct.Struct("<" + layout.format[1:] * length)
        return self.window.unpack(items, f"the items of {what}")

    def _read_tensor_infos(self, tensor_count: int) -> list[tuple[str, tuple[int, ...], int, int]]:
        infos = []
        names: set[str] = set()
        for index in range(tensor_count):
            name = self._read_name(f"tensor #{index + 1}")
            what = f"tensor '{name}'"
            if name in names:
                raise self.window.fail(f"duplicate {what}")
            names.add(name)

            (n_dims,) = self.window.unpack(_U32, f"the dimension count of {what}")
            if n_dims > MAX_DIMS:
                raise self.window.fail(f"{what} has {n_dims} dimensions; GGUF allows at most {MAX_DIMS}")
            shape = struct.unpack_from(f"<{n_dims}Q", self.window.take(8 * n_dims, f"the shape of {what}"))
            type_id, offset = self.window.unpack(_TENSOR_TAIL, f"the type and offset of {what}")
            infos.append((name, shape, type_id, offset))
        return infos

    def _alignment(self, metadata: dict[str, Any]) -> int:
        alignment = metadata.get(gguf_constants.Keys.General.ALIGNMENT, gguf_constants.GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise self.window.fail(f"general.alignment is {alignment!r}, not a positive power of two")
        return alignment

    def _check_tensor(self, info: tuple[str, tuple[int, ...], int, int], alignment: int) -> TensorInfo:
        name, shape, type_id, offset = info
        what = f"tensor '{name}'"
        try:
            qtype = gguf_constants.GGMLQuantizationType(type_id)
            block_size, type_size = gguf_constants.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise self.window.fail(f"{what} has unknown tensor type {type_id}") from None

        n_elements = 1
        for dim in shape:
            n_elements *= dim
        if n_elements >= 1 << 63:
            raise self.window.fail(f"{what} has shape {list(shape)}, more than 2^63 elements")
        if shape and shape[0] % block_size:
            raise self.window.fail(
                f"{what} has a first dimension of {shape[0]}, not a multiple of {qtype.name}'s block size {block_size}"
            )
        if offset % alignment:
            raise self.window.fail(f"{what} has offset {offset}, not a multiple of the alignment {alignment}")

        n_bytes = n_elements // block_size * type_size
        return TensorInfo(name, tuple(shape), type_id, offset, n_elements, n_bytes)

    def _check_tensor_data(self, tensors: tuple[TensorInfo, ...], data_offset: int) -> None:
        """Raise GGUFError when two tensors overlap or the tensor data does not fit in the file."""
        ordered = sorted(tensors, key=lambda tensor: tensor.offset)
        for previous, tensor in zip(ordered, ordered[1:]):
            if tensor.offset < previous.offset + previous.n_bytes:
                raise self.window.fail(
                    f"tensor '{tensor.name}' at offset {tensor.offset:,} overlaps tensor "
                    f"'{previous.name}' ({previous.n_bytes:,} bytes at offset {previous.offset:,})"
                )

        if not ordered:
            return
        last = max(ordered, key=lambda tensor: tensor.offset + tensor.n_bytes)
        needed = data_offset + last.offset + last.n_bytes
        if needed > self.window.size:
            raise self.window.fail(
                f"truncated in tensor data: needs {needed:,} bytes (tensor '{last.name}' ends there), "
                f"the file has {self.window.size:,}",
                hint=TRUNCATED_HINT,
            )

    def _special_token_texts(self, metadata: dict[str, Any]) -> dict[int, str]:
        """Read the text of each token id named by a tokenizer.ggml.*_token_id key."""
        marks = self.checkpoints.get(gguf_constants.Keys.Tokenizer.LIST)
        tokens = metadata.get(gguf_constants.Keys.Tokenizer.LIST)
        if not isinstance(tokens, ArrayValue) or tokens.element_type != "STRING":
            return {}

        ids = {
            value
            for key, value in metadata.items()
            if key.startswith("tokenizer.ggml.") and key.endswith("_token_id") and isinstance(value, int)
        }
        texts = {}
        for token_id in sorted(ids):
            if 0 <= token_id < tokens.length:
                texts[token_id] = self._string_item(tokens, marks, token_id)
        return texts

    def _string_item(self, array: ArrayValue, marks: list[tuple[int, int]] | None, index: int) -> str:
        if array.values is not None:
            item = array.values[index]
            return item if isinstance(item, str) else f"<{item.length} bytes>"

        first, offset = max((mark for mark in marks if mark[0] <= index), key=lambda mark: mark[0])
        self.window.pos = offset
        self.window.skip_strings(index - first, "a token")
        text = self._read_string(f"token {index}")
        return text if isinstance(text, str) else f"<{text.length} bytes>"


def _align(offset: int, alignment: int) -> int:
    return offset + (-offset % alignment)
