"""The "uniform" format: RTN / GPTQ integer codes with per-(row, group) scale and zero.

    W_hat[r, c] = scale[r, g(c)] * (code[r, c] - zero[r, g(c)])

Stored tensors (all names exact; `out, in = shape`, b = bits,
g = group_size or in (per-channel), G = ceil(in / g) groups, the last one
ragged when g does not divide in):

  qweight  uint8 (out, ceil(in*b/8))   codes in [0, 2^b), each row packed with
                                       refq.formats.packing (little-endian
                                       bitstream, code k at bits [k*b,(k+1)*b));
                                       row padding bits are stored and counted.
  scales   float16 (out, G)            scale of group j of row r.
  qzeros   uint8 (ceil(out*G*b/8),)    asymmetric only: integer zero points in
                                       [0, 2^b), the (out, G) row-major matrix
                                       flattened and packed as ONE bitstream at
                                       b bits (same bit order).  Absent when
                                       sym=True: the zero is then the constant
                                       2^(b-1) for every group (GPTQ's
                                       (maxq + 1) / 2) and costs no bits.
  perm     uint16 (in,) [uint32 if in > 65536]
                                       only for act_order with group_size and
                                       not static_groups: stored column k holds
                                       original column perm[k], i.e. the codes
                                       (and the groups) are in GPTQ's
                                       processing order; groups are runs of g
                                       stored columns.  Dequantize:
                                       W_hat[:, perm] = stored_dequant.
                                       In every other case the columns are in
                                       the original order and no perm is stored
                                       (per-channel or static groups do not
                                       depend on the processing order).

Stored column c belongs to group c // g.  meta() carries bits, group_size and
sym, which are needed to decode.  The dequantized values are exact in float32:
an fp16 scale (11-bit mantissa) times an integer of at most 8 bits.
"""

import numpy as np

from refq.errors import RefqError
from refq.formats.base import QuantizedWeight, register_format
from refq.formats.packing import pack, packed_nbytes, unpack


def perm_dtype(n):
    """Smallest unsigned dtype holding column indices 0..n-1."""
    return np.uint16 if n <= 65536 else np.uint32


@register_format
class UniformWeight(QuantizedWeight):
    FORMAT = "uniform"
    FORMAT_VERSION = 1
    COMPONENTS = {"qweight": "codes", "scales": "scales", "qzeros": "zeros", "perm": "perm"}

    def __init__(self, shape, bits, group_size, sym, qweight, scales, qzeros=None, perm=None,
                 method="rtn", options=None, info=None):
        super().__init__(shape, method, options or {}, info)
        self.bits = int(bits)
        self.group_size = None if group_size is None else int(group_size)
        self.sym = bool(sym)
        self.qweight = qweight  # (out, ceil(in*bits/8)) uint8
        self.scales = scales    # (out, G) float16
        self.qzeros = qzeros    # (ceil(out*G*bits/8),) uint8 or None (sym)
        self.perm = perm        # (in,) uint16/uint32 or None
        self._validate()

    # ---- construction from unpacked arrays --------------------------------
    @classmethod
    def from_codes(cls, codes, scales, zeros, bits, group_size, sym, perm=None,
                   method="rtn", options=None, info=None):
        """codes (out, in) ints in stored column order; scales (out, G) (rounded
        to float16 here); zeros (out, G) integers (ignored when sym); perm (in,)
        or None."""
        out, n = codes.shape
        qweight = pack(codes, bits)
        scales16 = np.ascontiguousarray(scales, dtype=np.float16)
        qzeros = None
        if not sym:
            qzeros = pack(np.asarray(zeros).astype(np.int64).reshape(-1), bits)
        if perm is not None:
            perm = np.asarray(perm).astype(perm_dtype(n))
        return cls((out, n), bits, group_size, sym, qweight, scales16, qzeros, perm,
                   method=method, options=options, info=info)

    # ---- geometry ---------------------------------------------------------
    @property
    def n_groups(self):
        g = self.group_size or self.shape[1]
        return -(-self.shape[1] // g)

    def group_index(self):
        """(in,) group of each STORED column."""
        g = self.group_size or self.shape[1]
        return np.arange(self.shape[1]) // g

    def _validate(self):
        out, n = self.shape
        G, b = self.n_groups, self.bits
        what = f"uniform weight {self.info.get('name') or ''}".rstrip()

        def check(name, arr, dtype, shape):
            if arr is None:
                raise RefqError(f"{what}: tensor '{name}' is missing")
            if arr.dtype != dtype or tuple(arr.shape) != tuple(shape):
                raise RefqError(f"{what}: tensor '{name}' must be {np.dtype(dtype).name} {tuple(shape)}, "
                                f"got {arr.dtype} {tuple(arr.shape)}")

        if not 1 <= b <= 8:
            raise RefqError(f"{what}: bits must be in 1..8, got {b}")
        check("qweight", self.qweight, np.uint8, (out, packed_nbytes(n, b)))
        check("scales", self.scales, np.float16, (out, G))
        if self.sym:
            if self.qzeros is not None:
                raise RefqError(f"{what}: tensor 'qzeros' must be absent when sym=True")
        else:
            check("qzeros", self.qzeros, np.uint8, (packed_nbytes(out * G, b),))
        if self.perm is not None:
            check("perm", self.perm, perm_dtype(n), (n,))
            if not np.array_equal(np.sort(self.perm.astype(np.int64)), np.arange(n)):
                raise RefqError(f"{what}: tensor 'perm' is not a permutation of 0..{n - 1}")

    # ---- decoding -----------------------------------------------------------
    def codes(self):
        """(out, in) uint8 codes in stored column order."""
        return unpack(self.qweight, self.bits, self.shape[1])

    def original_order(self):
        """-> (codes (out, in) uint8, g_idx (in,) int64) in the ORIGINAL column order:
        column j's code and the group whose scale and zero it uses (stored column k is
        original column perm[k]).  The act-order layout other runtimes expect (g_idx)."""
        codes, gidx = self.codes(), self.group_index()
        if self.perm is None:
            return codes, gidx
        p = self.perm.astype(np.int64)
        full = np.empty_like(codes)
        full[:, p] = codes
        g_idx = np.empty_like(gidx)
        g_idx[p] = gidx
        return full, g_idx

    def zeros(self):
        """(out, G) float32 zero points."""
        out, G = self.shape[0], self.n_groups
        if self.sym:
            return np.full((out, G), 2 ** (self.bits - 1), dtype=np.float32)
        return unpack(self.qzeros, self.bits, out * G).reshape(out, G).astype(np.float32)

    def dequantize(self):
        gidx = self.group_index()                                   # (in,)
        s = self.scales.astype(np.float32)[:, gidx]                 # (out, in)
        z = self.zeros()[:, gidx]                                   # (out, in)
        w = s * (self.codes().astype(np.float32) - z)               # (out, in), stored order
        if self.perm is None:
            return w
        full = np.empty_like(w)
        full[:, self.perm.astype(np.int64)] = w
        return full

    # ---- storage ------------------------------------------------------------
    def tensors(self):
        t = {"qweight": self.qweight, "scales": self.scales}
        if self.qzeros is not None:
            t["qzeros"] = self.qzeros
        if self.perm is not None:
            t["perm"] = self.perm
        return t

    META_FIELDS = ('bits', 'group_size', 'sym')

    @classmethod
    def from_tensors(cls, tensors, meta):
        shape, v = cls.read_meta(tensors, meta, dict.fromkeys(cls.META_FIELDS))
        bits, group_size, sym = (v[k] for k in cls.META_FIELDS)
        return cls(shape, bits, group_size, sym,
                   np.asarray(tensors.get("qweight")) if "qweight" in tensors else None,
                   np.asarray(tensors.get("scales")) if "scales" in tensors else None,
                   np.asarray(tensors["qzeros"]) if "qzeros" in tensors else None,
                   np.asarray(tensors["perm"]) if "perm" in tensors else None,
                   method=meta.get("method", "unknown"), options=meta.get("options", {}),
                   info=meta.get("info", {}))
