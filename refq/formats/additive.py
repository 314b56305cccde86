"""The "additive" format: M codebooks of vectors, summed per group of inputs (AQLM).

    W_hat[i, k*g:(k+1)*g] = scale[i] * sum_m codebooks[m, codes[i, k, m]]

A row i of the weight is cut into K = in/g groups of g consecutive inputs;
group k of row i is the sum of one vector from each of the M codebooks
(additive quantization), times the row's scale.

Stored tensors (`out, in = shape`, M = num_codebooks, B = nbits_per_codebook,
g = in_group_size, K = in / g):

  codes      uint8 (out, K, M) when B <= 8, uint16 (out, K, M) when 9 <= B <= 16
             codes[i, k, m] in [0, 2^B): the vector of codebook m used by
             group k of row i.  Not bit-packed: a B-bit code takes the
             whole byte (or two) it is stored in, and is counted so.
  codebooks  float16 (M, 2^B, g)   codebooks[m, c] = vector c of codebook m
  scales     float16 (out,)        one scale per output row

bits_per_weight = 8 * (all those bytes) / (out * in)
                = M * 8 * bytes(code) / g            codes   (2.0 for 2x8 g8)
                + M * 2^B * g * 16 / (out * in)      codebooks
                + 16 / in                            scales

Dequantization is defined in float32 in this order (FORMAT.md's reader does
exactly the same, so both agree bit for bit): acc = C_0[b_0]; acc += C_1[b_1];
...; acc += C_{M-1}[b_{M-1}] (each fp16 value converted to float32 first),
then W_hat = float32(scale) * acc.
"""

import numpy as np

from refq.errors import RefqError
from refq.formats.base import QuantizedWeight, register_format


def code_dtype(nbits):
    """Smallest unsigned dtype holding codes of `nbits` bits (1..16)."""
    return np.uint8 if nbits <= 8 else np.uint16


@register_format
class AdditiveWeight(QuantizedWeight):
    FORMAT = "additive"
    FORMAT_VERSION = 1
    COMPONENTS = {"codes": "codes", "codebooks": "codebooks", "scales": "scales"}

    def __init__(self, shape, num_codebooks, nbits_per_codebook, in_group_size,
                 codes, codebooks, scales, method="aqlm", options=None, info=None):
        super().__init__(shape, method, options or {}, info)
        self.num_codebooks = int(num_codebooks)
        self.nbits_per_codebook = int(nbits_per_codebook)
        self.in_group_size = int(in_group_size)
        self.codes = codes            # (out, K, M) uint8 / uint16
        self.codebooks = codebooks    # (M, 2^B, g) float16
        self.scales = scales          # (out,) float16
        self._validate()

    # ---- construction -------------------------------------------------------
    @classmethod
    def from_arrays(cls, codes, codebooks, scales, nbits_per_codebook,
                    method="aqlm", options=None, info=None):
        """codes (out, K, M) ints; codebooks (M, 2^B, g) and scales (out,)
        floats (rounded to float16 here)."""
        codes = np.asarray(codes)
        out, K, M = codes.shape
        g = np.shape(codebooks)[2]
        return cls((out, K * g), M, nbits_per_codebook, g,
                   np.ascontiguousarray(codes.astype(code_dtype(nbits_per_codebook))),
                   np.ascontiguousarray(codebooks, dtype=np.float16),
                   np.ascontiguousarray(scales, dtype=np.float16),
                   method=method, options=options, info=info)

    def _validate(self):
        out, n = self.shape
        M, B, g = self.num_codebooks, self.nbits_per_codebook, self.in_group_size
        what = f"additive weight {self.info.get('name') or ''}".rstrip()
        if M < 1:
            raise RefqError(f"{what}: num_codebooks must be >= 1, got {M}")
        if not 1 <= B <= 16:
            raise RefqError(f"{what}: nbits_per_codebook must be in 1..16, got {B}")
        if g < 1 or n % g:
            raise RefqError(f"{what}: in_group_size {g} does not divide in_features {n}")

        def check(name, arr, dtype, shape):
            if arr is None:
                raise RefqError(f"{what}: tensor '{name}' is missing")
            if arr.dtype != dtype or tuple(arr.shape) != tuple(shape):
                raise RefqError(f"{what}: tensor '{name}' must be {np.dtype(dtype).name} {tuple(shape)}, "
                                f"got {arr.dtype} {tuple(arr.shape)}")

        check("codes", self.codes, code_dtype(B), (out, n // g, M))
        check("codebooks", self.codebooks, np.float16, (M, 2 ** B, g))
        check("scales", self.scales, np.float16, (out,))
        if self.codes.size and int(self.codes.max()) >= 2 ** B:
            raise RefqError(f"{what}: tensor 'codes' has a code >= 2^{B}")

    # ---- decoding -------------------------------------------------------------
    def dequantize(self):
        out, n = self.shape
        cb = self.codebooks.astype(np.float32)                       # (M, 2^B, g)
        codes = self.codes.astype(np.int64)                          # (out, K, M)
        acc = cb[0][codes[:, :, 0]]                                  # (out, K, g)
        for m in range(1, self.num_codebooks):
            acc += cb[m][codes[:, :, m]]
        acc = acc.reshape(out, n)                                    # (out, in)
        return self.scales.astype(np.float32)[:, None] * acc

    # ---- storage --------------------------------------------------------------
    def tensors(self):
        return {"codes": self.codes, "codebooks": self.codebooks, "scales": self.scales}

    META_FIELDS = ('num_codebooks', 'nbits_per_codebook', 'in_group_size')

    @classmethod
    def from_tensors(cls, tensors, meta):
        shape, v = cls.read_meta(tensors, meta, dict.fromkeys(cls.META_FIELDS, int))
        M, B, g = (v[k] for k in cls.META_FIELDS)
        get = lambda k: np.asarray(tensors[k]) if k in tensors else None  # noqa: E731
        return cls(shape, M, B, g, get("codes"), get("codebooks"), get("scales"),
                   method=meta.get("method", "unknown"), options=meta.get("options", {}),
                   info=meta.get("info", {}))
