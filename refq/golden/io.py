"""Golden suite I/O: the one safetensors writer/reader, JSON, sha256, manifest reading.

Nothing here knows about quantization; refq/golden/spec.py says what is stored.
"""
import hashlib
import json
import os
import struct

import numpy as np

from refq.errors import RefqError

_ST = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
       "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
       "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAME = {np.dtype(v): k for k, v in _ST.items()}


def safetensors_bytes(tensors):
    """A safetensors file: tensors in sorted name order, no metadata, header
    padded with spaces to a multiple of 8.  Deterministic for equal inputs."""
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        if a.dtype not in _ST_NAME:
            raise RefqError(f"golden: field {name}: dtype {a.dtype} cannot be stored")
        raw = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _ST_NAME[a.dtype], "shape": list(a.shape),
                        "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def parse_safetensors(data, what):
    from safetensors.numpy import load
    try:
        return load(data)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise RefqError(f"{what}: not a valid safetensors file "
                        f"({str(e).splitlines()[0]})") from None


def load_safetensors(path):
    """-> dict name -> ndarray (RefqError naming the file if it is missing or corrupt)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise RefqError(f"{path}: cannot read ({e.strerror})") from None
    return parse_safetensors(data, path)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def jsonable(v):
    """Options to strict JSON: non-finite floats as {"$float": "inf"}."""
    if isinstance(v, float) and not np.isfinite(v):
        return {"$float": repr(v)}
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def from_json(v):
    if isinstance(v, dict):
        if set(v) == {"$float"}:
            return float(v["$float"])
        return {k: from_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [from_json(x) for x in v]
    return v


def dump_json(obj):
    return (json.dumps(obj, sort_keys=True, indent=1, allow_nan=False, ensure_ascii=True)
            + "\n").encode("utf-8")


def read_checked(root, entry, what):
    """Load a file named by a manifest entry ({"file", "sha256"}) after checking its sha256."""
    rel = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(rel, str) or os.path.isabs(rel) or ".." in rel.split("/"):
        raise RefqError(f"{what}: bad file entry {rel!r} in manifest.json")
    path = os.path.join(root, rel)
    if not os.path.isfile(path):
        raise RefqError(f"{what}: {rel}: missing")
    with open(path, "rb") as f:
        data = f.read()
    if sha256(data) != entry.get("sha256"):
        raise RefqError(f"{what}: {rel}: sha256 mismatch ({len(data)} bytes, manifest says "
                        f"{entry.get('bytes')}): the file was changed or truncated")
    return parse_safetensors(data, f"{what}: {rel}")


def read_manifest(root):
    path = os.path.join(root, "manifest.json")
    if not os.path.isdir(root):
        raise RefqError(f"{root}: no such folder")
    if not os.path.isfile(path):
        raise RefqError(f"{path}: missing (not a golden suite)")
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise RefqError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or not isinstance(m.get("cases"), list) \
            or not isinstance(m.get("inputs"), dict):
        raise RefqError(f"{path}: not a golden manifest (no 'cases' list / 'inputs' object)")
    return m
