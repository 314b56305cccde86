"""The "uniform_sparse" format: the "uniform" format plus additive CSR outliers.

    W_hat = uniform_dequant(qweight, scales, qzeros, perm)  +  S

The dense part is EXACTLY the "uniform" format (same tensors, same meta
fields: bits, group_size, sym, same meaning of `perm`), so a "uniform" reader
decodes it unchanged.  S (out, in) is the shared dense-and-sparse outlier
matrix of refq.formats.outliers, in ORIGINAL column coordinates (never
permuted, also when `perm` is stored):

  outlier_rowptr  int32 (out + 1,)
  outlier_cols    uint16 (nnz,) [uint32 if in > 65536]
  outlier_values  float16 (nnz,)

Used by QuantEase with outliers (--outlier-frac > 0).  A weight with no
outlier (nnz = 0) is stored as plain "uniform" by the methods, so this format
always carries the three CSR fields.

bits_per_weight counts, besides the uniform fields, 32 bits per outlier
(fp16 value + uint16 column) and 32 bits per row (+1) for the row pointers
(component "outliers" of bits_breakdown).
"""

import numpy as np

from refq.errors import RefqError
from refq.formats.base import register_format
from refq.formats.outliers import CSR, FIELDS
from refq.formats.uniform import UniformWeight


@register_format
class UniformSparseWeight(UniformWeight):
    FORMAT = "uniform_sparse"
    FORMAT_VERSION = 1
    COMPONENTS = dict(UniformWeight.COMPONENTS, **{f: "outliers" for f in FIELDS})

    def __init__(self, shape, bits, group_size, sym, qweight, scales, qzeros=None, perm=None,
                 outliers=None, method="quantease", options=None, info=None):
        super().__init__(shape, bits, group_size, sym, qweight, scales, qzeros, perm,
                         method=method, options=options, info=info)
        self.outliers = outliers if outliers is not None else CSR.empty(shape)   # CSR (out, in)

    @classmethod
    def from_codes(cls, codes, scales, zeros, bits, group_size, sym, perm=None, S=None,
                   method="quantease", options=None, info=None):
        """As UniformWeight.from_codes, plus S (out, in) float (original column order;
        rounded to float16, its nonzeros become the CSR)."""
        u = UniformWeight.from_codes(codes, scales, zeros, bits, group_size, sym, perm)
        csr = CSR.from_dense(np.zeros(u.shape) if S is None else S)
        return cls(u.shape, bits, group_size, sym, u.qweight, u.scales, u.qzeros, u.perm,
                   csr, method=method, options=options, info=info)

    def dequantize(self):
        return super().dequantize() + self.outliers.to_dense()   # (out, in) float32

    def tensors(self):
        t = super().tensors()
        t.update(self.outliers.tensors())
        return t

    @classmethod
    def from_tensors(cls, tensors, meta):
        cls.read_meta(tensors, meta)
        dense = {k: v for k, v in tensors.items() if k not in FIELDS}
        u = UniformWeight.from_tensors(dense, dict(meta, format="uniform",
                                                   format_version=UniformWeight.FORMAT_VERSION))
        csr = CSR.from_tensors(tensors, u.shape, "uniform_sparse")
        return cls(u.shape, u.bits, u.group_size, u.sym, u.qweight, u.scales, u.qzeros, u.perm,
                   csr, method=u.method, options=u.options, info=u.info)
