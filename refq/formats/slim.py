"""The "slim" format: a compressed base weight (dense, 2:4 or unstructured
sparse; fp16 or b-bit values) plus optional low-rank adapters.

    W_hat = W_c + L R            y = x W_cᵀ + (x Rᵀ) Lᵀ
    W_c  (out, in)  the compressed base: zero where pruned, the stored value elsewhere
    L    (out, r), R (r, in)  adapters (absent when r = 0)

Methods: slim-quant (dense, b-bit, one scale per tensor), wanda, magnitude,
sparsegpt (2:4 or unstructured, fp16 or b-bit per-row grids), slim (2:4 +
SLiM-Quant + adapters).  FORMAT.md has the reader; the layout in short
(`out, in = shape`, b = bits):

Positions of the kept values (pattern)
  dense          no position field; every weight is stored, in row-major order.
  2:4            idx24   uint8 (out, ceil(in/8))   for kept value k of a row (k =
                         0 .. in/2-1, two per group of 4 columns, in ascending
                         column order) its position 0..3 inside group k // 2:
                         column = 4 (k // 2) + idx; a row of in/2 2-bit codes
                         packed as refq.formats.packing (1 bit per weight).
  unstructured   mask    uint8 (out, ceil(in/8))   1 = kept; one row of in 1-bit
                         codes per output row, packed the same way.  The kept
                         values are in row-major order (row 0's kept columns
                         ascending, then row 1's ...); nnz = number of 1 bits.
Kept values (bits)
  bits = 16      values  float16 (out, in/2) for 2:4, (nnz,) unstructured,
                         (out, in) dense.
  bits = 2..8    qvalues uint8: codes in [0, 2^b), packed; per row
                         (out, ceil(in/2*b/8)) for 2:4, (out, ceil(in*b/8))
                         dense; one bitstream (ceil(nnz*b/8),) unstructured.
                 scales  float16 (1,) grid "tensor" (SLiM-Quant), (out,) grid
                         "row"; value = scale * (code - zero)
                 qzeros  uint8 (ceil(out*b/8),): grid "row" with sym false only,
                         the integer zero of each row packed as one bitstream;
                         otherwise zero = 2^(b-1).
Adapters (rank r = meta["rank"] > 0)
  adapter_bits = null   lora_L float16 (out, r), lora_R float16 (r, in)
  adapter_bits = a      lora_L_q uint8 (out, ceil(r*a/8)), lora_L_scales float16
                        (out, ceil(r/g)); lora_R_q uint8 (r, ceil(in*a/8)),
                        lora_R_scales float16 (r, ceil(in/g)); g = adapter_group_size
                        (groups of g consecutive entries along each row, the last
                        one shorter); value = scale * (code - 2^(a-1))

Every field is counted by bits_per_weight (stored bytes), so the adapters and
the position metadata are included.
"""

import numpy as np

from refq.errors import RefqError
from refq.formats.base import QuantizedWeight, register_format
from refq.formats.packing import pack, packed_nbytes, unpack

PATTERNS = ("dense", "2:4", "unstructured")


def _pack_stream(values, bits):
    """1-D ints -> one packed bitstream (uint8)."""
    return pack(np.asarray(values).astype(np.int64).reshape(-1), bits)


@register_format
class SlimWeight(QuantizedWeight):
    FORMAT = "slim"
    FORMAT_VERSION = 1
    COMPONENTS = {"values": "values", "qvalues": "values", "scales": "scales",
                  "qzeros": "zeros", "idx24": "positions", "mask": "positions",
                  "lora_L": "adapters", "lora_R": "adapters",
                  "lora_L_q": "adapters", "lora_L_scales": "adapters",
                  "lora_R_q": "adapters", "lora_R_scales": "adapters"}

    def __init__(self, shape, pattern, bits, grid, sym, rank, adapter_bits, adapter_group_size,
                 fields, method="slim", options=None, info=None):
        super().__init__(shape, method, options or {}, info)
        self.pattern = pattern
        self.bits = int(bits)
        self.grid = grid                     # None (fp16 values), "tensor" or "row"
        self.sym = bool(sym)
        self.rank = int(rank)
        self.adapter_bits = None if not adapter_bits else int(adapter_bits)
        self.adapter_group_size = None if adapter_group_size is None else int(adapter_group_size)
        self.fields = dict(fields)           # name -> ndarray, exactly what is stored
        self._base = None
        self._lr = None
        self._validate()

    # ---- construction ---------------------------------------------------------
    @classmethod
    def from_parts(cls, shape, pattern, keep, values=None, codes=None, bits=16, grid=None,
                   sym=True, scales=None, zeros=None, adapters=None, method="slim",
                   options=None, info=None):
        """Build from unpacked arrays.

        keep    (out, in) bool (ignored for pattern "dense")
        values  (out, in) float: the base W_c (bits = 16; rounded to fp16 here)
        codes   (out, in) ints in [0, 2^bits) (bits < 16), at the kept positions
        scales  float (1,) for grid "tensor", (out,) for grid "row"; rounded to fp16
        zeros   (out,) ints, grid "row" asymmetric only
        adapters None or dict(L (out, r), R (r, in)) floats stored fp16, or
                 dict(L_codes, L_scales, R_codes, R_scales, bits, group_size)
        """
        out, n = int(shape[0]), int(shape[1])
        f = {}
        if pattern == "dense":
            sel = None
        else:
            keep = np.asarray(keep, dtype=bool)
            if pattern == "2:4":
                if n % 4 or not np.all(keep.reshape(out, n // 4, 4).sum(axis=2) == 2):
                    raise RefqError("slim: a 2:4 mask must keep exactly 2 of every 4 columns")
                cols = np.nonzero(keep)[1].reshape(out, n // 2)           # (out, in/2) ascending
                f["idx24"] = pack(cols % 4, 2)
            elif pattern == "unstructured":
                f["mask"] = pack(keep.astype(np.uint8), 1)
            else:
                raise RefqError(f"slim: unknown pattern {pattern!r}")
            sel = keep

        def kept(A):
            if sel is None:
                return np.asarray(A)
            if pattern == "2:4":
                return np.asarray(A)[sel].reshape(out, n // 2)
            return np.asarray(A)[sel]                                      # (nnz,) row-major

        if bits == 16:
            f["values"] = np.ascontiguousarray(kept(values), dtype=np.float16)
        else:
            c = kept(np.asarray(codes).astype(np.int64))
            f["qvalues"] = _pack_stream(c, bits) if pattern == "unstructured" else pack(c, bits)
            f["scales"] = np.ascontiguousarray(np.asarray(scales).reshape(-1), dtype=np.float16)
            if grid == "row" and not sym:
                f["qzeros"] = _pack_stream(zeros, bits)
        rank, a_bits, a_group = 0, None, None
        if adapters is not None:
            if "L" in adapters:
                f["lora_L"] = np.ascontiguousarray(adapters["L"], dtype=np.float16)
                f["lora_R"] = np.ascontiguousarray(adapters["R"], dtype=np.float16)
                rank = f["lora_L"].shape[1]
            else:
                a_bits, a_group = int(adapters["bits"]), adapters["group_size"]
                rank = adapters["L_codes"].shape[1]
                f["lora_L_q"] = pack(adapters["L_codes"], a_bits)
                f["lora_L_scales"] = np.ascontiguousarray(adapters["L_scales"], dtype=np.float16)
                f["lora_R_q"] = pack(adapters["R_codes"], a_bits)
                f["lora_R_scales"] = np.ascontiguousarray(adapters["R_scales"], dtype=np.float16)
        return cls((out, n), pattern, bits, None if bits == 16 else grid, sym, rank, a_bits,
                   a_group, f, method=method, options=options, info=info)

    # ---- geometry / checks ------------------------------------------------------
    def nnz(self):
        """Number of stored base values."""
        out, n = self.shape
        if self.pattern == "dense":
            return out * n
        if self.pattern == "2:4":
            return out * n // 2
        return int(unpack(self.fields["mask"], 1, n).sum())

    def _expected(self):
        """{field: (dtype, shape)} implied by meta (and, unstructured, by the mask)."""
        out, n = self.shape
        b, r = self.bits, self.rank
        e = {}
        if self.pattern == "2:4":
            e["idx24"] = (np.uint8, (out, packed_nbytes(n // 2, 2)))
        elif self.pattern == "unstructured":
            e["mask"] = (np.uint8, (out, packed_nbytes(n, 1)))
        per_row = {"dense": n, "2:4": n // 2}.get(self.pattern)
        if b == 16:
            e["values"] = (np.float16, (out, per_row) if per_row else (self.nnz(),))
        else:
            e["qvalues"] = (np.uint8, (out, packed_nbytes(per_row, b)) if per_row
                            else (packed_nbytes(self.nnz(), b),))
            e["scales"] = (np.float16, (1,) if self.grid == "tensor" else (out,))
            if self.grid == "row" and not self.sym:
                e["qzeros"] = (np.uint8, (packed_nbytes(out, b),))
        if r:
            if self.adapter_bits is None:
                e["lora_L"] = (np.float16, (out, r))
                e["lora_R"] = (np.float16, (r, n))
            else:
                a, g = self.adapter_bits, self.adapter_group_size
                e["lora_L_q"] = (np.uint8, (out, packed_nbytes(r, a)))
                e["lora_L_scales"] = (np.float16, (out, -(-r // g)))
                e["lora_R_q"] = (np.uint8, (r, packed_nbytes(n, a)))
                e["lora_R_scales"] = (np.float16, (r, -(-n // g)))
        return e

    def _validate(self):
        out, n = self.shape
        what = f"slim weight {self.info.get('name') or ''}".rstrip()
        if self.pattern not in PATTERNS:
            raise RefqError(f"{what}: unknown pattern {self.pattern!r} (known: {', '.join(PATTERNS)})")
        if self.pattern == "2:4" and n % 4:
            raise RefqError(f"{what}: 2:4 pattern needs in_features divisible by 4, got {n}")
        if not (2 <= self.bits <= 8 or self.bits == 16):
            raise RefqError(f"{what}: bits must be 2..8 or 16, got {self.bits}")
        if self.bits < 16 and self.grid not in ("tensor", "row"):
            raise RefqError(f"{what}: grid must be 'tensor' or 'row', got {self.grid!r}")
        if self.grid == "tensor" and not self.sym:
            raise RefqError(f"{what}: grid 'tensor' is symmetric only")
        if self.rank < 0 or self.rank > min(out, n):
            raise RefqError(f"{what}: rank {self.rank} outside 0..{min(out, n)}")
        if self.adapter_bits is not None and (not 2 <= self.adapter_bits <= 8
                                              or not self.adapter_group_size
                                              or self.adapter_group_size < 1):
            raise RefqError(f"{what}: adapter_bits must be 2..8 with a positive adapter_group_size")
        if self.pattern == "unstructured":
            m = self.fields.get("mask")
            if m is None:
                raise RefqError(f"{what}: tensor 'mask' is missing")
            if m.dtype != np.uint8 or m.shape != (out, packed_nbytes(n, 1)):
                raise RefqError(f"{what}: tensor 'mask' must be uint8 {(out, packed_nbytes(n, 1))}, "
                                f"got {m.dtype} {m.shape}")
        expected = self._expected()
        for name, (dtype, shape) in expected.items():
            a = self.fields.get(name)
            if a is None:
                raise RefqError(f"{what}: tensor '{name}' is missing")
            if a.dtype != dtype or tuple(a.shape) != tuple(shape):
                raise RefqError(f"{what}: tensor '{name}' must be {np.dtype(dtype).name} "
                                f"{tuple(shape)}, got {a.dtype} {tuple(a.shape)}")
        extra = set(self.fields) - set(expected)
        if extra:
            raise RefqError(f"{what}: unexpected tensors {sorted(extra)}")
        if self.pattern == "2:4":
            idx = unpack(self.fields["idx24"], 2, n // 2).reshape(out, n // 4, 2)
            if np.any(idx[:, :, 0] >= idx[:, :, 1]):
                raise RefqError(f"{what}: tensor 'idx24' must hold two ascending positions per group")

    # ---- decoding -----------------------------------------------------------------
    def keep(self):
        """(out, in) bool: True where a base value is stored."""
        out, n = self.shape
        if self.pattern == "dense":
            return np.ones((out, n), dtype=bool)
        if self.pattern == "unstructured":
            return unpack(self.fields["mask"], 1, n).astype(bool)
        idx = unpack(self.fields["idx24"], 2, n // 2).astype(np.int64)       # (out, in/2)
        cols = 4 * (np.arange(n // 2) // 2) + idx                            # (out, in/2)
        keep = np.zeros((out, n), dtype=bool)
        np.put_along_axis(keep, cols, True, axis=1)
        return keep

    def stored_values(self):
        """Base values in storage order: (out, in/2) 2:4, (out, in) dense, (nnz,) unstructured; float32."""
        out, n = self.shape
        if self.bits == 16:
            return self.fields["values"].astype(np.float32)
        b = self.bits
        if self.pattern == "unstructured":
            nnz = self.nnz()
            codes = unpack(self.fields["qvalues"], b, nnz).astype(np.float32)
            rows = np.nonzero(self.keep())[0]                                # (nnz,)
        else:
            per_row = n if self.pattern == "dense" else n // 2
            codes = unpack(self.fields["qvalues"], b, per_row).astype(np.float32)
            rows = np.arange(out)[:, None]
        s = self.fields["scales"].astype(np.float32)
        if self.grid == "tensor":
            scale, zero = s[0], np.float32(2 ** (b - 1))
        else:
            scale = s[rows]
            if self.sym:
                zero = np.float32(2 ** (b - 1))
            else:
                zero = unpack(self.fields["qzeros"], b, out).astype(np.float32)[rows]
        return scale * (codes - zero)

    def base(self):
        """W_c (out, in) float32 (cached)."""
        if self._base is None:
            out, n = self.shape
            v = self.stored_values()
            if self.pattern == "dense":
                W = v.reshape(out, n)
            else:
                W = np.zeros((out, n), dtype=np.float32)
                W[self.keep()] = v.reshape(-1)          # row-major, columns ascending
            self._base = np.ascontiguousarray(W, dtype=np.float32)
        return self._base

    def adapters(self):
        """(L (out, r), R (r, in)) float32, or None when rank is 0."""
        if not self.rank:
            return None
        if self._lr is None:
            if self.adapter_bits is None:
                self._lr = (self.fields["lora_L"].astype(np.float32),
                            self.fields["lora_R"].astype(np.float32))
            else:
                a, g = self.adapter_bits, self.adapter_group_size
                self._lr = tuple(dequantize_rows(unpack(self.fields[f"lora_{x}_q"], a, m),
                                                 self.fields[f"lora_{x}_scales"], a, g)
                                 for x, m in (("L", self.rank), ("R", self.shape[1])))
        return self._lr

    def dequantize(self):
        W = self.base().copy()
        lr = self.adapters()
        if lr is not None:
            W += lr[0] @ lr[1]
        return W

    def matmul(self, x, kernel=None):
        """x (..., in) -> x W_cᵀ + (x Rᵀ) Lᵀ, (..., out) float32.

        Reference path for every `kernel` (no packed 2:4 kernel yet): W_c is
        decoded once (cached) and the adapters are applied as two thin products.
        """
        x = np.asarray(x, dtype=np.float32)
        if x.shape[-1] != self.shape[1]:
            raise RefqError(f"matmul: x has {x.shape[-1]} features, weight expects {self.shape[1]}")
        y = x @ self.base().T
        lr = self.adapters()
        if lr is not None:
            y += (x @ lr[1].T) @ lr[0].T
        return y

    # ---- storage --------------------------------------------------------------------
    def tensors(self):
        return dict(self.fields)

    META_FIELDS = ('pattern', 'bits', 'grid', 'sym', 'rank', 'adapter_bits', 'adapter_group_size')

    @classmethod
    def from_tensors(cls, tensors, meta):
        shape, v = cls.read_meta(tensors, meta, {"pattern": None, "bits": int, "grid": None,
                                                 "sym": bool, "rank": int, "adapter_bits": None,
                                                 "adapter_group_size": None})
        args = tuple(v[k] for k in cls.META_FIELDS)
        return cls(shape, *args, {k: np.asarray(v) for k, v in tensors.items()},
                   method=meta.get("method", "unknown"), options=meta.get("options", {}),
                   info=meta.get("info", {}))


def dequantize_rows(codes, scales, bits, group_size):
    """codes (rows, m) uint8, scales (rows, G) float16 -> (rows, m) float32.

    value = scale[row, c // g] * (code - 2^(bits-1))
    """
    gidx = np.arange(codes.shape[1]) // group_size
    return scales.astype(np.float32)[:, gidx] * (codes.astype(np.float32) - 2 ** (bits - 1))
