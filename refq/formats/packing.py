"""Bit packing of small unsigned integer codes (1..8 bits) into bytes.

Bit order (the on-disk contract; simple to implement in any language):

    Each row of n codes, each `bits` wide, is one little-endian bitstream of
    n * bits bits, stored in ceil(n * bits / 8) bytes.
    Code k of the row occupies stream bits [k*bits, (k+1)*bits), least
    significant bit of the code first.  Stream bit i lives in byte i // 8 at
    bit position i % 8 (bit 0 = the byte's least significant bit).
    The unused high bits of the row's last byte (when n * bits is not a
    multiple of 8) are zero.  Rows start on a byte boundary; every row has
    the same number of bytes.

    Reading code k in C:
        uint32_t bit = k * bits, v = 0;
        for (int t = 0; t < bits; t++, bit++)
            v |= ((row[bit >> 3] >> (bit & 7)) & 1u) << t;

Example, bits = 3, codes [5, 3, 7, 1] (binary 101, 011, 111, 001):
    stream bits 0..11 (LSB of each code first) = 1 0 1 | 1 1 0 | 1 1 1 | 1 0 0
    byte 0 = stream bits 0..7  -> 0b11_011_101 = 0xDD
    byte 1 = stream bits 8..11 -> 0b0000_0011   = 0x03  (4 padding bits = 0)
"""

import numpy as np

from refq.errors import RefqError

# Rows are packed in chunks so the temporary (rows, n, bits) bit array stays
# below ~64 MB even for the largest layers.
_CHUNK_BITS = 1 << 26


def packed_nbytes(n, bits):
    """Bytes used by one packed row of n codes of `bits` bits."""
    return (n * bits + 7) // 8


def _check_bits(bits):
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise RefqError(f"pack: bits must be an integer in 1..8, got {bits!r}")


def pack(codes, bits):
    """Pack codes (..., n) of unsigned ints < 2**bits into uint8 (..., ceil(n*bits/8)).

    A 1-D array is one row.  Leading dimensions are kept.
    """
    _check_bits(bits)
    codes = np.asarray(codes)
    if codes.ndim == 0:
        raise RefqError("pack: codes must have at least one dimension")
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise RefqError(f"pack: codes out of range [0, {1 << bits}) for bits={bits}")
    lead, n = codes.shape[:-1], codes.shape[-1]
    rows = codes.reshape(-1, n).astype(np.uint8)                  # (R, n)
    nbytes = packed_nbytes(n, bits)
    out = np.empty((rows.shape[0], nbytes), dtype=np.uint8)       # (R, nbytes)
    shifts = np.arange(bits, dtype=np.uint8)                      # (bits,)
    step = max(1, _CHUNK_BITS // max(1, n * bits))
    for r0 in range(0, rows.shape[0], step):
        chunk = rows[r0:r0 + step]
        # stream[r, k*bits + t] = bit t of code k
        stream = ((chunk[:, :, None] >> shifts) & 1).reshape(chunk.shape[0], n * bits)
        out[r0:r0 + step] = np.packbits(stream, axis=1, bitorder="little")
    return out.reshape(lead + (nbytes,))


def unpack(packed, bits, n):
    """Inverse of pack: uint8 (..., ceil(n*bits/8)) -> uint8 codes (..., n)."""
    _check_bits(bits)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise RefqError(f"unpack: packed codes must be uint8, got {packed.dtype}")
    nbytes = packed_nbytes(n, bits)
    if packed.ndim == 0 or packed.shape[-1] != nbytes:
        raise RefqError(f"unpack: expected {nbytes} bytes per row for n={n}, bits={bits}, "
                        f"got shape {packed.shape}")
    lead = packed.shape[:-1]
    rows = packed.reshape(-1, nbytes)                             # (R, nbytes)
    out = np.empty((rows.shape[0], n), dtype=np.uint8)            # (R, n)
    weights = (1 << np.arange(bits)).astype(np.uint8)             # (bits,)
    step = max(1, _CHUNK_BITS // max(1, n * bits))
    for r0 in range(0, rows.shape[0], step):
        chunk = rows[r0:r0 + step]
        stream = np.unpackbits(chunk, axis=1, count=n * bits, bitorder="little")
        out[r0:r0 + step] = (stream.reshape(chunk.shape[0], n, bits) * weights).sum(
            axis=2, dtype=np.uint8)
    return out.reshape(lead + (n,))
