"""Bit packing: hand-worked bit order, round trips for every width and ragged sizes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refq.errors import RefqError
from refq.formats.packing import pack, packed_nbytes, unpack


def reference_pack_row(codes, bits):
    """Independent, bit-by-bit transcription of the documented order."""
    out = bytearray((len(codes) * bits + 7) // 8)
    pos = 0
    for c in codes:
        for t in range(bits):
            if (int(c) >> t) & 1:
                out[pos // 8] |= 1 << (pos % 8)
            pos += 1
    return np.frombuffer(bytes(out), dtype=np.uint8)


def test_bit_order_bits3_hand_worked():
    # 5=101b, 3=011b, 7=111b, 1=001b; LSB first: 1,0,1 | 1,1,0 | 1,1,1 | 1,0,0
    # byte0 = bits0..7 = 1,0,1,1,1,0,1,1 (bit0 first) = 0b11011101 = 0xDD
    # byte1 = bits8..11 = 1,1,0,0 = 0b0011 = 0x03
    packed = pack(np.array([5, 3, 7, 1]), 3)
    assert packed.dtype == np.uint8
    assert packed.tolist() == [0xDD, 0x03]
    assert unpack(packed, 3, 4).tolist() == [5, 3, 7, 1]


def test_bit_order_bits4_and_bits1():
    assert pack(np.array([0x1, 0xF, 0x2]), 4).tolist() == [0xF1, 0x02]
    assert pack(np.array([1, 0, 0, 0, 0, 0, 0, 1, 1]), 1).tolist() == [0x81, 0x01]


def test_rows_start_on_byte_boundary():
    codes = np.array([[7, 7, 7], [1, 2, 3]])
    p = pack(codes, 3)  # 9 bits per row -> 2 bytes per row
    assert p.shape == (2, 2)
    assert p[1].tolist() == reference_pack_row([1, 2, 3], 3).tolist()


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 31, 33, 100])
def test_roundtrip_and_reference(bits, n):
    rng = np.random.default_rng(bits * 1000 + n)
    codes = rng.integers(0, 2 ** bits, size=(5, n))
    p = pack(codes, bits)
    assert p.shape == (5, packed_nbytes(n, bits)) == (5, -(-n * bits // 8))
    for r in range(5):
        assert p[r].tolist() == reference_pack_row(codes[r], bits).tolist()
    np.testing.assert_array_equal(unpack(p, bits, n), codes)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 4), n=st.integers(1, 70), seed=st.integers(0, 2**32 - 1))
def test_roundtrip_hypothesis(bits, rows, n, seed):
    codes = np.random.default_rng(seed).integers(0, 2 ** bits, size=(rows, n)).astype(np.uint8)
    p = pack(codes, bits)
    np.testing.assert_array_equal(unpack(p, bits, n), codes)
    # padding bits of each row are zero
    pad = p.shape[1] * 8 - n * bits
    if pad:
        assert np.all(p[:, -1] >> (8 - pad) == 0)


def test_out_of_range_codes_rejected():
    with pytest.raises(RefqError):
        pack(np.array([8]), 3)
    with pytest.raises(RefqError):
        pack(np.array([-1]), 3)
    with pytest.raises(RefqError):
        unpack(np.zeros(3, np.uint8), 3, 4)  # 4 codes of 3 bits need 2 bytes
