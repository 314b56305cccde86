"""The "row_lut" format: one lookup table (codebook) per output ROW, plus CSR outliers.

    W_hat[r, c] = lut[r, code[r, c]]  +  S[r, c]

Used by SqueezeLLM (non-uniform quantization: the table of row r holds the
2^b weighted k-means centroids of that row).

Stored tensors (`out, in = shape`, b = bits):

  qweight  uint8 (out, ceil(in*b/8))   codes in [0, 2^b), rows packed
                                       (refq.formats.packing)
  lut      float16 (out, 2^b)          the table of each row, ascending
  outlier_rowptr, outlier_cols, outlier_values   CSR (refq.formats.outliers);
                                       absent when there are no outliers

bits_per_weight = b (+ row padding) + 16 * 2^b / in (the tables: 0.22 bit for
b = 3 on a 576-column layer) + 32 * (out + 1 + nnz) / (out * in) for S.
"""

import numpy as np

from refq.errors import RefqError
from refq.formats.base import QuantizedWeight, register_format
from refq.formats.outliers import CSR, FIELDS
from refq.formats.packing import pack, packed_nbytes, unpack


@register_format
class RowLutWeight(QuantizedWeight):
    FORMAT = "row_lut"
    FORMAT_VERSION = 1
    COMPONENTS = dict({"qweight": "codes", "lut": "codebooks"}, **{f: "outliers" for f in FIELDS})

    def __init__(self, shape, bits, qweight, lut, outliers=None, method="squeezellm",
                 options=None, info=None):
        super().__init__(shape, method, options or {}, info)
        self.bits = int(bits)
        self.qweight = qweight      # (out, ceil(in*bits/8)) uint8
        self.lut = lut              # (out, 2^bits) float16
        self.outliers = outliers if outliers is not None else CSR.empty(shape)
        out, n = self.shape
        what = f"row_lut weight {self.info.get('name') or ''}".rstrip()
        if not 1 <= self.bits <= 8:
            raise RefqError(f"{what}: bits must be in 1..8, got {self.bits}")
        for name, arr, dt, shp in (("qweight", qweight, np.uint8, (out, packed_nbytes(n, self.bits))),
                                   ("lut", lut, np.float16, (out, 2 ** self.bits))):
            if arr is None:
                raise RefqError(f"{what}: tensor '{name}' is missing")
            if arr.dtype != dt or tuple(arr.shape) != shp:
                raise RefqError(f"{what}: tensor '{name}' must be {np.dtype(dt).name} {shp}, "
                                f"got {arr.dtype} {tuple(arr.shape)}")

    @classmethod
    def from_codes(cls, codes, lut, bits, S=None, method="squeezellm", options=None, info=None):
        """codes (out, in) ints; lut (out, 2^bits) (rounded to float16 here); S (out, in) or None."""
        out, n = codes.shape
        csr = CSR.from_dense(S) if S is not None else None
        return cls((out, n), bits, pack(codes, bits), np.ascontiguousarray(lut, dtype=np.float16),
                   csr, method=method, options=options, info=info)

    def codes(self):
        """(out, in) uint8."""
        return unpack(self.qweight, self.bits, self.shape[1])

    def dequantize(self):
        lut = self.lut.astype(np.float32)                                 # (out, 2^b)
        w = np.take_along_axis(lut, self.codes().astype(np.int64), axis=1)   # (out, in)
        return w + self.outliers.to_dense()

    def tensors(self):
        t = {"qweight": self.qweight, "lut": self.lut}
        t.update(self.outliers.tensors())
        return t

    META_FIELDS = ('bits',)

    @classmethod
    def from_tensors(cls, tensors, meta):
        shape, v = cls.read_meta(tensors, meta, {"bits": int})
        bits = v["bits"]
        csr = CSR.from_tensors(tensors, shape, "row_lut")
        return cls(shape, bits, np.asarray(tensors["qweight"]) if "qweight" in tensors else None,
                   np.asarray(tensors["lut"]) if "lut" in tensors else None, csr,
                   method=meta.get("method", "unknown"), options=meta.get("options", {}),
                   info=meta.get("info", {}))
