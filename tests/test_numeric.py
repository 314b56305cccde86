"""refq/numeric.py: the one float16 rounding and the layer loss, against independent truths.

  * round_fp16 (numba, scalar) equals numpy's float16 cast (IEEE half, ties to even) on
    normal, subnormal, tie and out-of-range values;
  * fp16 (arrays) equals the cast, and with saturate=True clips to ±65504 first;
  * layer_loss equals the trace written out as a double sum;
  * quantize_weight records info["loss"] for every method given H (rtn's own code does not),
    equal to the trace of the stored weight's error.
"""
import numpy as np
import pytest

import refq
from refq.numeric import FP16_MAX, fp16, layer_loss, round_fp16


def test_round_fp16_equals_the_float16_cast():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(2000) * 10.0 ** rng.integers(-9, 5, 2000),   # normals, subnormals
        1.0 + (np.arange(0, 100) + 0.5) * 2.0 ** -10,                    # ties in [1, 2) (spacing 2^-10)
        np.array([0.0, -0.0, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 65504.0, 65519.0,
                  65520.0, -65520.0, 1e6, np.inf, -np.inf]),
    ])
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float64)
    got = np.array([round_fp16(v) for v in x])
    np.testing.assert_array_equal(got, want)


def test_fp16_arrays_and_saturation():
    x = np.array([1.0 / 3.0, -70000.0, 70000.0, 65519.0, 1e-8])
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(fp16(x), x.astype(np.float16).astype(np.float64))
    s = fp16(x, saturate=True)
    assert s[1] == -FP16_MAX and s[2] == FP16_MAX and np.all(np.isfinite(s))


def test_layer_loss_is_the_trace():
    rng = np.random.default_rng(1)
    W, Q = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    X = rng.standard_normal((10, 4))
    H = X.T @ X
    E = W - Q
    want = sum(E[i, a] * H[a, b] * E[i, b] for i in range(3) for a in range(4) for b in range(4))
    assert layer_loss(W, Q, H) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("method", ["rtn", "gptq", "wanda"])
def test_quantize_weight_records_the_loss(method):
    rng = np.random.default_rng(2)
    W = rng.standard_normal((8, 16)).astype(np.float32)
    X = rng.standard_normal((64, 16))
    H = X.T @ X / 64
    q = refq.quantize_weight(W, H, method)
    E = W.astype(np.float64) - q.dequantize().astype(np.float64)
    assert q.info["loss"] == pytest.approx(float(np.trace(E @ H @ E.T)), rel=1e-9)
