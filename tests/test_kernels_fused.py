"""Fused products (refq.kernels.fuse, cpu.uniform_fuse): weights that share their
input multiplied as one stacked weight, against the separate products (the same
bits) and against x @ dequantize().T (the independent truth)."""
import numpy as np
import pytest

import refq.kernels as K
from refq.formats.uniform import UniformWeight
from refq.formats.uniform_sparse import UniformSparseWeight
from refq.kernels import cpu as kc

TOL = 1e-5


def uniform(rng, out, n, bits, g, perm=None, sym=False, S=None):
    G = -(-n // (g or n))
    codes = rng.integers(0, 2 ** bits, (out, n))
    scales = rng.random((out, G)) * 0.1 + 0.01
    zeros = rng.integers(0, 2 ** bits, (out, G))
    if S is not None:
        return UniformSparseWeight.from_codes(codes, scales, zeros, bits, g, sym, perm, S=S)
    return UniformWeight.from_codes(codes, scales, zeros, bits, g, sym, perm)


def group(rng, outs, n, bits, g, perm=True, **kw):
    """Weights of the given output sizes sharing one act-order permutation (as
    GPTQ's q/k/v, which share a Hessian)."""
    p = rng.permutation(n) if perm else None
    return [uniform(rng, o, n, bits, g, p, **kw) for o in outs]


# SmolLM2's q/k/v (576, 192, 192 rows of 576) at w3 g128 act-order: at T = 4 the stacked
# product (2.2M multiply-adds) runs the parallel kernel while each separate one (<= 1.3M)
# runs its serial twin (cpu.PAR_MIN_WORK); smaller shapes for the other widths
CASES = [
    ("w3 g128 act-order qkv", (576, 192, 192), 576, 3, 128, True, False),
    ("w2 g64 act-order", (48, 16, 16), 128, 2, 64, True, True),
    ("w4 g32 no perm", (40, 24), 96, 4, 32, False, False),
    ("w4 per-row", (24, 40), 64, 4, None, True, False),
]


@pytest.mark.parametrize("kernel", ["cpu", "cpu-int"])
@pytest.mark.parametrize("name,outs,n,bits,g,perm,sym", CASES, ids=[c[0] for c in CASES])
def test_fused_equals_separate_products(name, outs, n, bits, g, perm, sym, kernel):
    rng = np.random.default_rng(1)
    qs = group(rng, outs, n, bits, g, perm, sym=sym)
    for q in qs:
        q.kernel = kernel
    fused = qs[0].fuse(qs[1:])
    assert isinstance(fused, K.FusedProduct) and fused.shape == (sum(outs), n)
    W = np.concatenate([q.dequantize() for q in qs]).astype(np.float64)
    for T in (1, 2, 4, 5, 13):                  # 13: past the BLAS threshold, member products
        x = rng.standard_normal((T, n)).astype(np.float32)
        y = fused.matmul(x)
        sep = np.concatenate([q.matmul(x) for q in qs], axis=1)
        assert y.dtype == np.float32 and y.shape == (T, sum(outs))
        np.testing.assert_array_equal(y, sep)   # the same bits as one call per weight
        ref = x.astype(np.float64) @ W.T
        bound = 1e-3 if kernel == "cpu-int" else TOL    # cpu-int: its own stated bound (test_kernels_int)
        assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < bound
        # per-weight outputs: the same arrays, split back
        for yi, q in zip(fused.products(x), qs):
            np.testing.assert_array_equal(yi, q.matmul(x))
    # leading dimensions as matmul takes them
    x3 = rng.standard_normal((2, 1, n)).astype(np.float32)
    np.testing.assert_array_equal(fused.matmul(x3)[:, 0], fused.matmul(x3[:, 0]))
    assert [y.shape for y in fused.products(x3)] == [(2, 1, o) for o in outs]


def test_fused_kernel_really_runs_once():
    """T = 1 goes through the stacked kernel state, not the member products."""
    rng = np.random.default_rng(2)
    qs = group(rng, (32, 16), 64, 3, 32)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    calls = []
    orig = kc.uniform_apply

    def spy(st, x2):
        calls.append(st["shape"])
        return orig(st, x2)
    kc.uniform_apply = spy
    try:
        qs[0].fuse(qs[1:]).matmul(x)
        stacked = list(calls)
        calls.clear()
        for q in qs:
            q.matmul(x)
    finally:
        kc.uniform_apply = orig
    assert stacked == [(48, 64)] and calls == [(32, 64), (16, 64)]


def test_fuse_declines_what_it_cannot_stack():
    rng = np.random.default_rng(3)
    a, b = group(rng, (16, 16), 64, 3, 32)
    other_perm = uniform(rng, 16, 64, 3, 32, rng.permutation(64))
    assert a.fuse([other_perm]) is None                           # act-order differs
    assert a.fuse([uniform(rng, 16, 64, 3, 32)]) is None          # perm vs none
    assert a.fuse([uniform(rng, 16, 64, 4, 32, a.perm)]) is None  # bits differ
    assert a.fuse([uniform(rng, 16, 64, 3, 16, a.perm)]) is None  # groups differ
    assert a.fuse([uniform(rng, 16, 32, 3, 32)]) is None          # input width differs
    assert a.fuse([]) is None
    b.kernel = "dequant"
    assert a.fuse([b]) is None                                    # another kernel
    b.kernel = "cpu"
    assert a.fuse([b]) is not None
    # bit-extraction layout (g not on a unit) and CSR outliers: not stacked
    c, d = group(rng, (8, 8), 60, 3, 20)
    assert c.fuse([d]) is None
    S = np.where(rng.random((8, 64)) < 0.1, 1.0, 0.0)
    e, f = group(rng, (8, 8), 64, 4, 16, S=S)
    assert type(e) is UniformSparseWeight and e.fuse([f]) is None


def test_fused_follows_tensors_replaced_in_place():
    """A member's tensors replaced after fusing (its kernel state is rebuilt): the
    stacked product is rebuilt too, or, when the layouts no longer match, runs one
    call per weight; either way the same bits as the separate products."""
    rng = np.random.default_rng(4)
    qs = group(rng, (24, 16, 8), 64, 3, 32)
    fused = qs[0].fuse(qs[1:])
    x = rng.standard_normal((1, 64)).astype(np.float32)

    def check():
        want = np.concatenate([q.matmul(x) for q in qs], axis=1)
        np.testing.assert_array_equal(fused.matmul(x), want)
        W = np.concatenate([q.dequantize() for q in qs]).astype(np.float64)
        ref = x.astype(np.float64) @ W.T
        assert np.linalg.norm(want - ref) / np.linalg.norm(ref) < TOL
    check()
    qs[1].scales = (qs[1].scales.astype(np.float32) * 2).astype(np.float16)
    check()
    qs[2].perm = rng.permutation(64).astype(qs[2].perm.dtype)      # another act-order
    check()


def test_fused_after_member_products():
    """Members already multiplied on their own (each holds its own lane copy of the
    codes in its kernel state) fuse into the right stacked product, not the first
    member's copy."""
    rng = np.random.default_rng(5)
    qs = group(rng, (64, 32, 32), 128, 3, 64)
    x = rng.standard_normal((1, 128)).astype(np.float32)
    sep = np.concatenate([q.matmul(x) for q in qs], axis=1)
    fused = qs[0].fuse(qs[1:])
    np.testing.assert_array_equal(fused.matmul(x), sep)
