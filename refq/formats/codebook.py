"""The "codebook" format: one small codebook per COLUMN, mixed bit widths, CSR outliers (CLAQ).

    W_hat[r, c] = codebook_c[code[r, c]]  +  S[r, c]

Every input column c has its own codebook of 2^b_c fp16 centroids (b_c its
bit width, 1..8), and every weight of the column stores a b_c-bit code.  With
adaptive precision the columns have different widths; the columns of one
width are stored together.  S is the additive sparse matrix of reserved
outliers (refq.formats.outliers; absent when there are none).

Stored tensors (`out, in = shape`; for each width b that occurs, in ascending
order of b, n_b = number of columns of width b, cols_b = those columns in
ascending order):

  column_bits   uint8 (in,)                    b_c of every column
  qweight_{b}   uint8 (out, ceil(n_b*b/8))     codes of the columns cols_b, row r
                                               packed as one little-endian
                                               bitstream (refq.formats.packing):
                                               code of column cols_b[k] at
                                               bits [k*b, (k+1)*b)
  codebook_{b}  float16 (n_b, 2^b)             row k = centroids of column
                                               cols_b[k], ascending
  outlier_rowptr, outlier_cols, outlier_values     (optional) CSR, see outliers.py

bits_per_weight = 8 * (all those bytes) / (out * in): codes, codebooks
(2^b * 16 bits per column, i.e. 2^b*16/out bits per weight: 0.11 bit for a
2-bit column of a 576-row layer), the 8-bit width map, and 32 bits per
reserved outlier plus 32 bits per row for the CSR row pointers.
"""

import numpy as np

from refq.errors import RefqError
from refq.formats.base import QuantizedWeight, register_format
from refq.formats.outliers import CSR
from refq.formats.packing import pack, packed_nbytes, unpack


@register_format
class CodebookWeight(QuantizedWeight):
    FORMAT = "codebook"
    FORMAT_VERSION = 1

    def __init__(self, shape, column_bits, qweights, codebooks, outliers=None,
                 method="claq", options=None, info=None):
        super().__init__(shape, method, options or {}, info)
        self.column_bits = column_bits   # (in,) uint8
        self.qweights = qweights         # {b: (out, ceil(n_b*b/8)) uint8}
        self.codebooks = codebooks       # {b: (n_b, 2^b) float16}
        self.outliers = outliers if outliers is not None else CSR.empty(self.shape)
        self._validate()

    COMPONENTS = {"column_bits": "column_bits"}  # the rest are mapped in bits_breakdown

    @property
    def bits_breakdown(self):
        n = self.shape[0] * self.shape[1]
        parts = {"codes": 0, "codebooks": 0, "column_bits": 0, "outliers": 0}
        for name, t in self.tensors().items():
            comp = ("codes" if name.startswith("qweight_") else
                    "codebooks" if name.startswith("codebook_") else
                    "outliers" if name.startswith("outlier_") else name)
            parts[comp] += 8 * int(t.nbytes)
        return {k: v / n for k, v in parts.items()}

    # ---- construction from unpacked arrays --------------------------------
    @classmethod
    def from_codes(cls, codes, centroids, column_bits, outliers=None,
                   method="claq", options=None, info=None):
        """codes (out, in) ints; centroids: list of in arrays, centroids[c] has 2^b_c
        ascending values (rounded to fp16 here); column_bits (in,) ints;
        outliers: CSR or None."""
        out, n = codes.shape
        column_bits = np.asarray(column_bits).astype(np.uint8)
        qweights, codebooks = {}, {}
        for b in np.unique(column_bits):
            b = int(b)
            cols = np.flatnonzero(column_bits == b)
            qweights[b] = pack(np.ascontiguousarray(codes[:, cols]), b)
            codebooks[b] = np.stack([np.asarray(centroids[c], np.float64) for c in cols]
                                    ).astype(np.float16)
        return cls((out, n), column_bits, qweights, codebooks, outliers,
                   method=method, options=options, info=info)

    # ---- validation ---------------------------------------------------------
    def _validate(self):
        out, n = self.shape
        what = f"codebook weight {self.info.get('name') or ''}".rstrip()
        cb = self.column_bits
        if cb is None or cb.dtype != np.uint8 or cb.shape != (n,):
            raise RefqError(f"{what}: tensor 'column_bits' must be uint8 ({n},)")
        widths = sorted(int(b) for b in np.unique(cb))
        if widths and not (1 <= widths[0] and widths[-1] <= 8):
            raise RefqError(f"{what}: tensor 'column_bits' has widths outside 1..8: {widths}")
        if sorted(self.qweights) != widths or sorted(self.codebooks) != widths:
            raise RefqError(f"{what}: qweight_/codebook_ tensors {sorted(self.qweights)}, "
                            f"{sorted(self.codebooks)} do not match the widths {widths}")
        for b in widths:
            nb = int(np.count_nonzero(cb == b))
            q, c = self.qweights[b], self.codebooks[b]
            if q.dtype != np.uint8 or q.shape != (out, packed_nbytes(nb, b)):
                raise RefqError(f"{what}: tensor 'qweight_{b}' must be uint8 "
                                f"{(out, packed_nbytes(nb, b))}, got {q.dtype} {q.shape}")
            if c.dtype != np.float16 or c.shape != (nb, 2 ** b):
                raise RefqError(f"{what}: tensor 'codebook_{b}' must be float16 {(nb, 2 ** b)}, "
                                f"got {c.dtype} {c.shape}")

    # ---- decoding -----------------------------------------------------------
    def columns(self, b):
        """(n_b,) int64 columns of width b, ascending."""
        return np.flatnonzero(self.column_bits == b)

    def codes(self):
        """(out, in) uint8 codes (each column indexes its own codebook)."""
        out, n = self.shape
        codes = np.zeros((out, n), dtype=np.uint8)
        for b, q in self.qweights.items():
            cols = self.columns(b)
            codes[:, cols] = unpack(q, b, cols.size)
        return codes

    def dense_part(self):
        """(out, in) float32: the codebook values alone, without outliers."""
        out, n = self.shape
        W = np.zeros((out, n), dtype=np.float32)
        for b, q in self.qweights.items():
            cols = self.columns(b)
            codes = unpack(q, b, cols.size).astype(np.int64)            # (out, n_b)
            W[:, cols] = self.codebooks[b].astype(np.float32)[np.arange(cols.size), codes]
        return W

    def dequantize(self):
        W = self.dense_part()
        if self.outliers.nnz:
            W += self.outliers.to_dense()
        return W

    # ---- storage ------------------------------------------------------------
    def tensors(self):
        t = {"column_bits": self.column_bits}
        for b in sorted(self.qweights):
            t[f"qweight_{b}"] = self.qweights[b]
            t[f"codebook_{b}"] = self.codebooks[b]
        t.update(self.outliers.tensors())
        return t

    @classmethod
    def from_tensors(cls, tensors, meta):
        shape, _ = cls.read_meta(tensors, meta, check_tensors=False)   # names checked below
        qweights, codebooks = {}, {}
        for name, arr in tensors.items():
            if name.startswith("qweight_") and name[8:].isdigit():
                qweights[int(name[8:])] = np.asarray(arr)
            elif name.startswith("codebook_") and name[9:].isdigit():
                codebooks[int(name[9:])] = np.asarray(arr)
            elif name != "column_bits" and not name.startswith("outlier_"):
                raise RefqError(f"codebook: unexpected tensor {name!r}")
        if "column_bits" not in tensors:
            raise RefqError("codebook: tensor 'column_bits' is missing")
        outliers = CSR.from_tensors(tensors, shape, "codebook")
        return cls(shape, np.asarray(tensors["column_bits"]), qweights, codebooks, outliers,
                   method=meta.get("method", "unknown"), options=meta.get("options", {}),
                   info=meta.get("info", {}))
