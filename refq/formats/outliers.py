"""Sparse outliers in CSR: the "sparse" half of every dense-and-sparse format.

Several methods keep a few weights outside the low-bit grid (CLAQ's outlier
reservation, SpQR's outliers, SqueezeLLM's sparse matrix, QuantEase's S).
They all store them the same way, as an ADDITIVE sparse matrix S (out, in):

    W_hat = dense_part + S

so a kernel computes y = x dense_partᵀ + x Sᵀ, the second term a plain CSR
product.  A method that "keeps a weight in fp16" stores at that position
S[r, c] = fp16(w[r, c] - dense_part[r, c]) (the dense part there is whatever
its code decodes to); the tests check the sum, not the split.

Stored fields (prefix `outlier_`, all counted in bits_per_weight):

  outlier_rowptr  int32 (out + 1,)    row r's entries are [rowptr[r], rowptr[r+1])
  outlier_cols    uint16 (nnz,)       column of each entry, ascending within a row
                                      (uint32 when in > 65536)
  outlier_values  float16 (nnz,)      the value added at (r, cols[k])

An empty S (nnz = 0) is stored as no fields at all (no rowptr either), so a
format without outliers pays nothing.  Cost: (32 (out+1) + 32 nnz) bits for
in <= 65536, i.e. 32 bits per outlier plus one int32 per row.
"""

import numpy as np

from refq.errors import RefqError

FIELDS = ("outlier_rowptr", "outlier_cols", "outlier_values")


def col_dtype(n_in):
    """Smallest unsigned dtype for column indices 0..n_in-1."""
    return np.uint16 if n_in <= 65536 else np.uint32


class CSR:
    """S (out, in) as rowptr (out+1,) int32, cols (nnz,) uint16|uint32, values (nnz,) float16."""

    def __init__(self, shape, rowptr, cols, values):
        self.shape = (int(shape[0]), int(shape[1]))
        self.rowptr, self.cols, self.values = rowptr, cols, values

    @classmethod
    def from_dense(cls, S):
        """S (out, in) float: its nonzero entries (after rounding to fp16) become the CSR."""
        S = np.asarray(S)
        out, n = S.shape
        S16 = S.astype(np.float16)
        rows, cols = np.nonzero(S16)                       # row-major: rows ascending, cols ascending
        rowptr = np.zeros(out + 1, dtype=np.int32)
        np.cumsum(np.bincount(rows, minlength=out), out=rowptr[1:])
        return cls((out, n), rowptr, cols.astype(col_dtype(n)), S16[rows, cols])

    @classmethod
    def from_mask(cls, values, mask):
        """Entries of `values` (out, in) where mask is True (zeros after fp16 rounding dropped)."""
        return cls.from_dense(np.where(mask, values, 0.0))

    @property
    def nnz(self):
        return int(self.values.shape[0])

    def rows(self):
        """(nnz,) int64 row of each entry."""
        return np.repeat(np.arange(self.shape[0]), np.diff(self.rowptr.astype(np.int64)))

    def to_dense(self):
        """-> (out, in) float32."""
        S = np.zeros(self.shape, dtype=np.float32)
        S[self.rows(), self.cols.astype(np.int64)] = self.values.astype(np.float32)
        return S

    # ---- storage ------------------------------------------------------------
    def tensors(self):
        """{field: array}; empty dict when nnz == 0."""
        if self.nnz == 0:
            return {}
        return {"outlier_rowptr": self.rowptr, "outlier_cols": self.cols,
                "outlier_values": self.values}

    @classmethod
    def from_tensors(cls, tensors, shape, what="weight"):
        """Inverse of tensors(); validates dtypes, shapes, ordering and ranges."""
        out, n = int(shape[0]), int(shape[1])
        present = [f for f in FIELDS if f in tensors]
        if not present:
            return cls.empty(shape)
        if len(present) != len(FIELDS):
            missing = sorted(set(FIELDS) - set(present))
            raise RefqError(f"{what}: tensor '{missing[0]}' is missing")
        rowptr, cols, values = (np.asarray(tensors[f]) for f in FIELDS)
        if rowptr.dtype != np.int32 or rowptr.shape != (out + 1,):
            raise RefqError(f"{what}: tensor 'outlier_rowptr' must be int32 ({out + 1},), "
                            f"got {rowptr.dtype} {rowptr.shape}")
        nnz = int(rowptr[-1])
        if rowptr[0] != 0 or np.any(np.diff(rowptr.astype(np.int64)) < 0):
            raise RefqError(f"{what}: tensor 'outlier_rowptr' must start at 0 and not decrease")
        if cols.dtype != col_dtype(n) or cols.shape != (nnz,):
            raise RefqError(f"{what}: tensor 'outlier_cols' must be {np.dtype(col_dtype(n)).name} "
                            f"({nnz},), got {cols.dtype} {cols.shape}")
        if values.dtype != np.float16 or values.shape != (nnz,):
            raise RefqError(f"{what}: tensor 'outlier_values' must be float16 ({nnz},), "
                            f"got {values.dtype} {values.shape}")
        if nnz and int(cols.max()) >= n:
            raise RefqError(f"{what}: tensor 'outlier_cols' has a column >= in_features {n}")
        return cls((out, n), rowptr, cols, values)

    @classmethod
    def empty(cls, shape):
        n = int(shape[1])
        return cls(shape, np.zeros(int(shape[0]) + 1, np.int32), np.zeros(0, col_dtype(n)),
                   np.zeros(0, np.float16))
