"""Storage formats of quantized weights.

base.py     QuantizedWeight (the common interface), FORMATS registry, load_quantized
packing.py  bit packing of 1..8-bit codes into bytes (documented bit order)
uniform.py  "uniform": integer codes + per-(row, group) scale/zero (RTN, GPTQ)
codebook.py "codebook": per-column codebooks, mixed widths, CSR outliers (CLAQ)
outliers.py additive CSR outliers shared by the dense-and-sparse formats
"""

from refq.formats.base import FORMATS, QuantizedWeight, load_quantized, register_format
from refq.formats.packing import pack, packed_nbytes, unpack
from refq.formats.uniform import UniformWeight
from refq.formats.codebook import CodebookWeight  # noqa: E402  (registers "codebook")

__all__ = ["FORMATS", "QuantizedWeight", "load_quantized", "register_format",
           "pack", "unpack", "packed_nbytes", "UniformWeight"]
