"""The "spqr" format: small-group uniform codes with quantized statistics, plus CSR outliers.

    scale[r, j] = scale_lo[r // qg, j] + scale_step[r // qg, j] * scale_code[r, j]   (float32)
    zero[r, j]  = zero_lo[r // qg, j]  + zero_step[r // qg, j]  * zero_code[r, j]    (float32)
    W_stored[r, c] = scale[r, c // g] * (code[r, c] - zero[r, c // g])               (float32)
    W_hat[:, perm] = W_stored   (when perm is stored)
    W_hat += S                  (CSR outliers, original column order)

Stored tensors (`out, in = shape`, b = bits, g = group_size (divides in),
G = in / g, qq = qq_bits, qg = qq_group_size, R = ceil(out / qg)):

  qweight      uint8 (out, ceil(in*b/8))  codes in stored column order, rows packed
                                          (refq.formats.packing)
  -- qq_bits set (bilevel statistics):
  scale_codes  uint8 (ceil(out*G*qq/8),)  the (out, G) matrix of qq-bit scale codes,
                                          row-major, one bitstream
  scale_lo, scale_step  float16 (R, G)    second-level min and step of the scales of
                                          rows [k*qg, (k+1)*qg) of column group j
  zero_codes   uint8 (ceil(out*G*qq/8),)  asymmetric only: qq-bit codes of the
                                          real-valued zeros, like scale_codes
  zero_lo, zero_step    float16 (R, G)    asymmetric only: their second level
  -- qq_bits null (first-level statistics only, the "uniform" layout):
  scales       float16 (out, G)           the scales
  qzeros       uint8 (ceil(out*G*b/8),)   asymmetric only: integer zeros in [0, 2^b),
                                          (out, G) row-major, one bitstream
  -- both:
  perm         uint16 (in,) [uint32 if in > 65536]  act_order: stored column k is
                                          original column perm[k]
  outlier_rowptr, outlier_cols, outlier_values      CSR outliers (absent when none),
                                          refq.formats.outliers

Symmetric (sym): no zero fields; the zero is 2^(b-1).  The float32
arithmetic above is part of the format (each operation rounded to float32),
so readers get bit-identical weights.
"""

import numpy as np

from refq.errors import RefqError
from refq.formats.base import QuantizedWeight, register_format
from refq.formats.outliers import CSR, FIELDS
from refq.formats.packing import pack, packed_nbytes, unpack
from refq.formats.uniform import perm_dtype


@register_format
class SpqrWeight(QuantizedWeight):
    FORMAT = "spqr"
    FORMAT_VERSION = 1
    COMPONENTS = dict({"qweight": "codes", "scales": "scales", "scale_codes": "scales",
                       "scale_lo": "scales", "scale_step": "scales", "qzeros": "zeros",
                       "zero_codes": "zeros", "zero_lo": "zeros", "zero_step": "zeros",
                       "perm": "perm"}, **{f: "outliers" for f in FIELDS})

    def __init__(self, shape, bits, group_size, sym, qq_bits, qq_group_size, fields,
                 method="spqr", options=None, info=None):
        super().__init__(shape, method, options or {}, info)
        self.bits = int(bits)
        self.group_size = int(group_size)
        self.sym = bool(sym)
        self.qq_bits = None if qq_bits is None else int(qq_bits)
        self.qq_group_size = int(qq_group_size)
        self.fields = {k: v for k, v in fields.items() if k not in FIELDS}   # dense part
        self._validate()
        self.outliers = CSR.from_tensors(fields, self.shape, self._what())

    # ---- construction -------------------------------------------------------
    @classmethod
    def from_parts(cls, codes, bits, group_size, sym, scales, zeros, qq_bits, qq_group_size,
                   second=None, perm=None, S=None, method="spqr", options=None, info=None):
        """codes (out, in) stored order; qq_bits None: scales (out, G) (rounded to
        float16 here), zeros (out, G) integers; qq_bits set: second = {scale_codes,
        zero_codes: (out, G) ints; scale_lo, scale_step, zero_lo, zero_step: (R, G)};
        perm (in,) or None; S (out, in) in original column order, or None."""
        out, n = codes.shape
        f = {"qweight": pack(codes, bits)}
        if qq_bits is None:
            f["scales"] = np.ascontiguousarray(scales, dtype=np.float16)
            if not sym:
                f["qzeros"] = pack(np.asarray(zeros).astype(np.int64).reshape(-1), bits)
        else:
            for what in ("scale",) if sym else ("scale", "zero"):
                f[what + "_codes"] = pack(np.asarray(second[what + "_codes"]).astype(np.int64)
                                          .reshape(-1), qq_bits)
                for k in ("_lo", "_step"):
                    f[what + k] = np.ascontiguousarray(second[what + k], dtype=np.float16)
        if perm is not None:
            f["perm"] = np.asarray(perm).astype(perm_dtype(n))
        if S is not None:
            f.update(CSR.from_dense(S).tensors())
        return cls((out, n), bits, group_size, sym, qq_bits, qq_group_size, f,
                   method=method, options=options, info=info)

    # ---- geometry / validation ----------------------------------------------
    @property
    def n_groups(self):
        return self.shape[1] // self.group_size

    def _what(self):
        return f"spqr weight {self.info.get('name') or ''}".rstrip()

    def _validate(self):
        out, n = self.shape
        b, g, what = self.bits, self.group_size, self._what()
        if not 1 <= b <= 8 or g < 1 or n % g:
            raise RefqError(f"{what}: bits {b} / group_size {g} invalid for in_features {n}")
        G, R = n // g, -(-out // self.qq_group_size)
        want = {"qweight": (np.uint8, (out, packed_nbytes(n, b)))}
        if self.qq_bits is None:
            want["scales"] = (np.float16, (out, G))
            if not self.sym:
                want["qzeros"] = (np.uint8, (packed_nbytes(out * G, b),))
        else:
            if not 1 <= self.qq_bits <= 8:
                raise RefqError(f"{what}: qq_bits must be in 1..8, got {self.qq_bits}")
            for stat in ("scale",) if self.sym else ("scale", "zero"):
                want[stat + "_codes"] = (np.uint8, (packed_nbytes(out * G, self.qq_bits),))
                want[stat + "_lo"] = (np.float16, (R, G))
                want[stat + "_step"] = (np.float16, (R, G))
        optional = {"perm": (perm_dtype(n), (n,))}
        for name in set(self.fields) - set(want) - set(optional):
            raise RefqError(f"{what}: unexpected tensor '{name}'")
        for name, (dt, shape) in list(want.items()) + list(optional.items()):
            arr = self.fields.get(name)
            if arr is None:
                if name in optional:
                    continue
                raise RefqError(f"{what}: tensor '{name}' is missing")
            if arr.dtype != dt or tuple(arr.shape) != tuple(shape):
                raise RefqError(f"{what}: tensor '{name}' must be {np.dtype(dt).name} {tuple(shape)}, "
                                f"got {arr.dtype} {tuple(arr.shape)}")
        if "perm" in self.fields and not np.array_equal(
                np.sort(self.fields["perm"].astype(np.int64)), np.arange(n)):
            raise RefqError(f"{what}: tensor 'perm' is not a permutation of 0..{n - 1}")

    # ---- decoding ---------------------------------------------------------------
    def codes(self):
        """(out, in) uint8 codes in stored column order."""
        return unpack(self.fields["qweight"], self.bits, self.shape[1])

    def _second_level(self, stat):
        """(out, G) float32 = lo + step * code of stat "scale" or "zero" (qq_bits set)."""
        out, G = self.shape[0], self.n_groups
        c = unpack(self.fields[stat + "_codes"], self.qq_bits, out * G).reshape(out, G)
        blk = np.arange(out) // self.qq_group_size                       # (out,)
        lo = self.fields[stat + "_lo"].astype(np.float32)[blk]            # (out, G)
        st = self.fields[stat + "_step"].astype(np.float32)[blk]
        return lo + st * c.astype(np.float32)

    def scales(self):
        """(out, G) float32 scales as used."""
        if self.qq_bits is None:
            return self.fields["scales"].astype(np.float32)
        return self._second_level("scale")

    def zeros(self):
        """(out, G) float32 zero points as used (integers unless bilevel)."""
        out, G = self.shape[0], self.n_groups
        if self.sym:
            return np.full((out, G), 2 ** (self.bits - 1), dtype=np.float32)
        if self.qq_bits is None:
            return unpack(self.fields["qzeros"], self.bits, out * G).reshape(out, G).astype(np.float32)
        return self._second_level("zero")

    def dequantize(self):
        grp = np.arange(self.shape[1]) // self.group_size                 # (in,)
        w = self.scales()[:, grp] * (self.codes().astype(np.float32) - self.zeros()[:, grp])
        if "perm" in self.fields:
            full = np.empty_like(w)
            full[:, self.fields["perm"].astype(np.int64)] = w
            w = full
        return w + self.outliers.to_dense()                               # (out, in) float32

    # ---- storage ------------------------------------------------------------------
    def tensors(self):
        t = dict(self.fields)
        t.update(self.outliers.tensors())
        return t

    META_FIELDS = ('bits', 'group_size', 'sym', 'qq_bits', 'qq_group_size')

    @classmethod
    def from_tensors(cls, tensors, meta):
        shape, v = cls.read_meta(tensors, meta, dict.fromkeys(cls.META_FIELDS), check_tensors=False)
        args = tuple(v[k] for k in cls.META_FIELDS)
        return cls(shape, *args, {k: np.asarray(v) for k, v in tensors.items()},
                   method=meta.get("method", "unknown"), options=meta.get("options", {}),
                   info=meta.get("info", {}))
