"""Reading safetensors checkpoints, memory-mapped, one tensor at a time.

The safetensors format is simple enough to read by hand, which is what this
file does (so that bf16 works without torch, and nothing is read until asked):

    [8 bytes]  N, little-endian uint64: the length of the JSON header
    [N bytes]  JSON: {"tensor name": {"dtype": "F32", "shape": [..],
                                      "data_offsets": [begin, end]}, ...,
                      "__metadata__": {...optional strings...}}
    [rest]     the tensors' bytes, each at data_offsets relative to 8 + N

A checkpoint is one `model.safetensors`, or several shards listed in
`model.safetensors.index.json` ({"weight_map": {name: file}}). Every tensor is
returned as a numpy view on the mapped file (or, for fp16/bf16, converted to
float32 on the way out), so a 7B checkpoint is paged in one decoder layer at a
time, when the forward pass first touches it.
"""
import glob
import json
import os
import struct

import numpy as np

from refq.errors import RefqError

# safetensors dtype string -> numpy dtype as stored on disk.
# BF16 has no numpy dtype: it is read as uint16 and widened by _bf16_to_f32.
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
    "BOOL": np.bool_,
}


def _bf16_to_f32(a):
    """bfloat16 is the top 16 bits of a float32: shift them back into place."""
    return (a.astype(np.uint32) << 16).view(np.float32)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _check_entry(path, name, info):
    """One header entry {"dtype": str, "shape": [int >= 0, ...], "data_offsets":
    [begin, end] ints, 0 <= begin <= end}: anything else is a one-line error."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise RefqError(f"{where}: header entry is not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise RefqError(f"{where}: header entry has no {key!r}")
    dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dt, str) or dt not in _DTYPES:
        raise RefqError(f"{where} has unsupported dtype {dt!r}")
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise RefqError(f"{where}: shape {shape!r} is not a list of integers >= 0")
    if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)
            and 0 <= offs[0] <= offs[1]):
        raise RefqError(f"{where}: data_offsets {offs!r} is not [begin, end] with "
                        "0 <= begin <= end")


class SafetensorsFile:
    """One .safetensors file: its header parsed, its data memory-mapped."""

    def __init__(self, path):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise RefqError(f"{path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100_000_000:
                    raise RefqError(f"{path}: corrupt safetensors header length {n} "
                                    f"(file has {size} bytes)")
                header = json.loads(f.read(n))
        except OSError as e:
            raise RefqError(f"{path}: cannot read ({e.strerror})") from None
        except (ValueError, UnicodeDecodeError):
            raise RefqError(f"{path}: corrupt safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise RefqError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict):
            raise RefqError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
        self.data_start = 8 + n
        self.data_size = size - self.data_start
        self.header = header
        for name, info in header.items():
            _check_entry(path, name, info)
            dt, shape, (b, e) = info["dtype"], info["shape"], info["data_offsets"]
            want = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dt]).itemsize
            if e - b != want or e > self.data_size or b < 0:
                raise RefqError(f"{path}: tensor {name!r} (shape {shape}, {dt}) has "
                                f"{e - b} bytes at [{b}, {e}) but needs {want} within "
                                f"{self.data_size} (truncated or corrupt file)")
        self._mm = None

    def _map(self):
        if self._mm is None:
            if self.data_size == 0:
                self._mm = np.zeros(0, np.uint8)
            else:
                self._mm = np.memmap(self.path, dtype=np.uint8, mode="r",
                                     offset=self.data_start, shape=(self.data_size,))
        return self._mm

    def raw(self, name):
        """The tensor as stored (a read-only view on the mapped file)."""
        info = self.header[name]
        b, e = info["data_offsets"]
        dt = np.dtype(_DTYPES[info["dtype"]])
        return self._map()[b:e].view(dt).reshape(info["shape"])

    def dtype(self, name):
        return self.header[name]["dtype"]


class Checkpoint:
    """All tensors of a Hugging Face model folder, by name, loaded on demand."""

    def __init__(self, folder):
        self.folder = folder
        index = os.path.join(folder, "model.safetensors.index.json")
        self._where = {}
        self._files = {}
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError):
                raise RefqError(f"{index}: not a valid safetensors index "
                                "(expected JSON with a 'weight_map' object)") from None
            if not isinstance(weight_map, dict):
                raise RefqError(f"{index}: 'weight_map' is not an object")
            for name, fname in weight_map.items():
                if (not isinstance(fname, str) or os.path.basename(fname) != fname
                        or fname in ("", ".", "..")):
                    raise RefqError(f"{index}: weight_map[{name!r}] is {fname!r}, "
                                    "not the name of a file in the folder")
                self._where[name] = os.path.join(folder, fname)
            for path in set(self._where.values()):
                if not os.path.isfile(path):
                    raise RefqError(f"{path}: listed in {index} but missing")
        else:
            paths = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
            if not paths:
                raise RefqError(f"{folder}: no *.safetensors file (only safetensors "
                                "checkpoints are supported)")
            for path in paths:
                for name in self._file(path).header:
                    self._where[name] = path

    def _file(self, path):
        if path not in self._files:
            self._files[path] = SafetensorsFile(path)
        return self._files[path]

    def names(self):
        return list(self._where)

    def __contains__(self, name):
        return name in self._where

    def raw(self, name):
        """The tensor in its stored dtype (uint16 for bf16)."""
        if name not in self._where:
            raise RefqError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        f = self._file(self._where[name])
        if name not in f.header:
            raise RefqError(f"{f.path}: tensor {name!r} is listed in the index but "
                            "not in the file")
        return f.raw(name)

    def get(self, name, shape=None):
        """The tensor as float32. fp32 tensors come back as zero-copy mmap views."""
        f = self._file(self._where[name]) if name in self._where else None
        a = self.raw(name)
        dt = f.dtype(name)
        if dt == "BF16":
            a = _bf16_to_f32(a)
        elif dt in ("F16", "F64"):
            a = a.astype(np.float32)
        elif dt != "F32":
            raise RefqError(f"{f.path}: tensor {name!r} has dtype {dt}, expected a float type")
        if shape is not None and tuple(a.shape) != tuple(shape):
            raise RefqError(f"{f.path}: tensor {name!r} has shape {tuple(a.shape)}, "
                            f"expected {tuple(shape)}")
        return a
