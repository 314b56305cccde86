"""Storage formats of quantized weights.

base.py     QuantizedWeight (the common interface), FORMATS registry, load_quantized
packing.py  bit packing of 1..8-bit codes into bytes (documented bit order)
uniform.py  "uniform": integer codes + per-(row, group) scale/zero (RTN, GPTQ)
slim.py     "slim": dense / 2:4 / unstructured base (fp16 or codes) + low-rank adapters
uniform_sparse.py  "uniform_sparse": uniform + CSR outliers (QuantEase with outliers)
spqr.py     "spqr": small groups, quantized scales (bilevel), CSR outliers (SpQR)
row_lut.py  "row_lut": one fp16 lookup table per output row + CSR outliers (SqueezeLLM)
additive.py "additive": M codebooks of g-vectors summed per group, row scales (AQLM)
"""

from refq.formats.base import FORMATS, QuantizedWeight, load_quantized, register_format
from refq.formats.packing import pack, packed_nbytes, unpack
from refq.formats.uniform import UniformWeight
from refq.formats.slim import SlimWeight  # noqa: E402,F401  (registers "slim")
from refq.formats.codebook import CodebookWeight  # noqa: E402  (registers "codebook")
from refq.formats.uniform_sparse import UniformSparseWeight  # noqa: E402,F401
from refq.formats.spqr import SpqrWeight  # noqa: E402,F401
from refq.formats.row_lut import RowLutWeight  # noqa: E402,F401
from refq.formats.additive import AdditiveWeight  # noqa: E402,F401  (registers "additive")

__all__ = ["FORMATS", "QuantizedWeight", "load_quantized", "register_format",
           "pack", "unpack", "packed_nbytes", "UniformWeight"]
