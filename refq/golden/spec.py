"""The golden suite's specification: what a porter reads.

- the inputs (seeded synthetic matrices, a real SmolLM2 slice) and the cases (method + options);
- the NEUTRAL form of each stored format: unpacked integer codes and float
  scales, the form a port returns and the decode tier hands to a port;
- the tolerance rules of the three tiers, each derived from the arithmetic that
  produces the value (see GOLDEN.md, "Tolerances");
- the end-to-end bands (how much worse than refq's layer loss a port may be).

The sub-steps of the steps tier are in refq/golden/steps.py; reading files and
verifying are in io.py / verify.py.  Nothing here writes or reads files.
"""
import os

import numpy as np

SUITE = "refq-golden"
SUITE_VERSION = 2
KNOWN_SUITE_VERSIONS = (2,)
TIERS = ("decode", "steps", "e2e")
RESERVED = ("W_hat", "loss", "y")       # case fields that are not tensors() of the format
T_TOKENS = 4                            # rows of x (below the CPU kernels' BLAS threshold)
U32 = 2.0 ** -24                        # unit roundoff of float32
U64 = 2.0 ** -53                        # unit roundoff of float64

# ============================================================================ inputs
# Synthetic inputs: name -> (seed, out, in).  Every one is regenerated from its
# seed at write time and stored, so verify never regenerates them.
SYNTHETIC = {
    "gauss-24x64": (1, 24, 64),
    "edge-48x128": (2, 48, 128),
}
REAL_INPUT = "smollm2-l0-q_proj-48x128"   # only when the model is available
REAL_TOKENS = 256


def hessian(X):
    """H = mean x xᵀ in float64.  X (n, in).  (GPTQ's reference uses 2/n Σ x xᵀ = 2 H.)"""
    X = X.astype(np.float64)
    return (X.T @ X) / X.shape[0]


def make_synthetic(name):
    """-> (dict W, H, x, description) for a SYNTHETIC input, from its seed alone."""
    seed, out, n = SYNTHETIC[name]
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((out, n)) * 0.05).astype(np.float32)
    # correlated activations with per-channel scales (a few large channels)
    mix = rng.standard_normal((n, n)) / np.sqrt(n)
    X = rng.standard_normal((8 * n, n)) @ (np.eye(n) + 0.5 * mix)
    X *= np.exp(rng.standard_normal(n) * 0.5)
    desc = "Gaussian W (sigma 0.05); H from 8*in correlated activations with log-normal channel scales"
    if name.startswith("edge"):
        s = 0.05
        W[:, 5] = 0.0                                  # a zero column
        W[3, :] = np.float32(0.37)                     # a constant row
        W[7, 11] = np.float32(40 * s)                  # huge outliers
        W[10, 40] = np.float32(-80 * s)
        W[20, 100] = np.float32(25 * s)
        levels = np.array([-0.1, -0.05, 0.0, 0.05, 0.1], np.float32)
        W[12, :] = levels[rng.integers(0, 5, n)]       # ties: few distinct values
        half = rng.standard_normal(n // 2).astype(np.float32) * s
        W[13, :] = np.repeat(half, 2)                  # ties: every value twice
        W[14, :] = -W[13, :]                           # equal magnitudes, opposite signs
        X[:, 9] = 0.0                                  # a dead input channel (H row/col 9 = 0)
        X[:, 21] = X[:, 20]                            # two identical channels (ties in diag H)
        X[:, 60] *= 30.0                               # one dominant activation channel
        desc = ("Gaussian W (sigma 0.05) with column 5 zero, row 3 constant 0.37, outliers "
                "W[7,11]=+40s W[10,40]=-80s W[20,100]=+25s, row 12 from 5 levels, row 13 "
                "pairs of equal values, row 14 = -row 13; H with channel 9 dead, channels "
                "20 and 21 identical, channel 60 scaled by 30")
    x = rng.standard_normal((T_TOKENS, n)).astype(np.float32)
    return {"W": W, "H": hessian(X), "x": x}, desc


def make_real(model_path):
    """A 48x128 slice of SmolLM2 layer 0's q_proj; H from its real inputs.

    X = input_layernorm(embed(first REAL_TOKENS tokens of data/calib.txt))[:, :128].
    """
    from llama_np import Tokenizer, load_model
    from llama_np.model import rms_norm
    model, tok = load_model(model_path), Tokenizer(model_path)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "data", "calib.txt"), encoding="utf-8") as f:
        ids = tok.encode(f.read(20_000))[:REAL_TOKENS]
    layer = model.layers[0]
    h = rms_norm(model.embed(ids), layer.input_norm, model.cfg.rms_norm_eps)   # (T, d)
    W = np.ascontiguousarray(layer.linears["self_attn.q_proj"].dequantize()[:48, :128],
                             dtype=np.float32)
    X = h[:, :128]
    x = np.ascontiguousarray(h[-T_TOKENS:, :128], dtype=np.float32)
    desc = (f"SmolLM2-135M-Instruct layer 0 self_attn.q_proj[:48, :128]; H = mean x x^T of "
            f"input_layernorm(embed(first {REAL_TOKENS} tokens of data/calib.txt))[:, :128]; "
            f"x = the last {T_TOKENS} of those rows")
    return {"W": W, "H": hessian(X), "x": x}, desc


# ============================================================================ cases
# method -> [(label, input, options)].  Options are the explicit ones; the
# manifest stores the complete validated options, so a later change of a
# default does not change what a case means.  "REAL" = the SmolLM2 slice.
G, E, R = "gauss-24x64", "edge-48x128", "REAL"
CASES = {
    "rtn": [("w4", G, dict(bits=4)),
            ("w3g24-sym", G, dict(bits=3, group_size=24, sym=True)),      # ragged last group
            ("w4g32-mse", E, dict(bits=4, group_size=32, mse=True)),
            ("w2g64", R, dict(bits=2, group_size=64))],
    "gptq": [("w4", G, dict(bits=4, blocksize=16)),
             ("w3g24-act", G, dict(bits=3, group_size=24, act_order=True, blocksize=16)),
             ("w3g32-act-static", E, dict(bits=3, group_size=32, act_order=True,
                                          static_groups=True, blocksize=32)),
             ("w4g32-act", R, dict(bits=4, group_size=32, act_order=True, blocksize=32))],
    "claq": [("b3", G, dict(bits=3, ap=False, blocksize=16)),
             ("ap2.5-or", E, dict(bits=2.5, outlier_reservation=True, blocksize=32)),
             ("ap3", R, dict(bits=3, blocksize=32))],
    "quantease": [("w4", G, dict(bits=4, iters=5)),
                  ("w3g32-outliers", E, dict(bits=3, group_size=32, iters=5, outlier_frac=0.01)),
                  ("w3g32-real", R, dict(bits=3, group_size=32, iters=5))],
    "spqr": [("w3g16", G, dict(bits=3)),
             ("w3g16-edge", E, dict(bits=3)),
             ("w3g16-real", R, dict(bits=3))],
    "squeezellm": [("w3", G, dict(bits=3)),
                   ("w3-sparse", E, dict(bits=3, sensitive_frac=0.01)),
                   ("w4-sparse-real", R, dict(bits=4, sensitive_frac=0.005))],
    "aqlm": [("2x6g8", G, dict(num_codebooks=2, nbits_per_codebook=6, in_group_size=8,
                               max_iters=3, seed=0)),
             ("1x8g4-edge", E, dict(num_codebooks=1, nbits_per_codebook=8, in_group_size=4,
                                    max_iters=2, seed=0)),
             ("2x6g8-real", R, dict(num_codebooks=2, nbits_per_codebook=6, in_group_size=8,
                                    max_iters=2, seed=0))],
    "slim-quant": [("w4", G, dict(bits=4)), ("w4-edge", E, dict(bits=4)),
                   ("w3-real", R, dict(bits=3))],
    "slim": [("w4-24", G, dict(bits=4, rank_ratio=0.1, adapter_group_size=32)),
             ("w4-24-edge", E, dict(bits=4, rank_ratio=0.1, adapter_group_size=32)),
             ("w4-24-real", R, dict(bits=4, rank_ratio=0.1, adapter_group_size=32))],
    "wanda": [("24", G, dict()), ("24-edge", E, dict()), ("24-real", R, dict())],
    "sparsegpt": [("24", G, dict(blocksize=16)), ("24-edge", E, dict(blocksize=32)),
                  ("24-real", R, dict(blocksize=32))],
    "magnitude": [("24", G, dict()), ("24-edge", E, dict())],
}
DEFAULT_CASES = [("default", G, {})]    # a registered method not listed above


def cases_for(method):
    return CASES.get(method, DEFAULT_CASES)


# ============================================================================ e2e bands
# A port's whole quantization passes the e2e tier when its bits per weight equal
# refq's (if it reports them) and its layer loss is at most BAND x refq's loss
# (plus the loss's own float64 rounding).  One-shot methods make the same
# decisions as refq except where float rounding flips one, which GPTQ-style error
# feedback then carries on: measured on the shipped cases with independent
# float32 ports, <= 1.005x (tests/test_golden_ports.py); 1.02 leaves room.
# Iterative methods (local search from a seeded start) get a wider band.
E2E_BAND = {"aqlm": 1.10, "quantease": 1.05, "squeezellm": 1.05, "slim": 1.05}
E2E_BAND_DEFAULT = 1.02


def e2e_band(method):
    return E2E_BAND.get(method, E2E_BAND_DEFAULT)


# ============================================================================ neutral form
NEUTRAL = {
    "uniform": "codes (out, in) int32, original column order; scales (out, G) float32; "
               "zeros (out, G) float32 (integers); g_idx (in,) int32, the group of each "
               "original column.  W_hat[r, c] = scales[r, g] * (codes[r, c] - zeros[r, g]), "
               "g = g_idx[c]",
    "uniform_sparse": "as uniform, plus outliers (out, in) float32 (dense, mostly 0), added: "
                      "W_hat = uniform part + outliers",
    "codebook": "codes (out, in) int32; centroids (in, 2^max_bits) float32, row c = the "
                "2^column_bits[c] centroids of column c, ascending, padded with 0; "
                "column_bits (in,) int32; outliers (out, in) float32 (dense, mostly 0).  "
                "W_hat[r, c] = centroids[c, codes[r, c]] + outliers[r, c]",
    "row_lut": "codes (out, in) int32; lut (out, 2^bits) float32; outliers (out, in) float32.  "
               "W_hat[r, c] = lut[r, codes[r, c]] + outliers[r, c]",
    "additive": "codes (out, K, M) int32; codebooks (M, 2^B, g) float32; scales (out,) "
                "float32.  W_hat[r, k*g:(k+1)*g] = scales[r] * sum_m codebooks[m, codes[r, k, m]] "
                "(summed in order m = 0, 1, ... in float32, then multiplied)",
}
NEUTRAL_CODES = {"uniform": "codes", "uniform_sparse": "codes", "codebook": "codes",
                 "row_lut": "codes", "additive": "codes"}


def neutral_fields(q):
    """A QuantizedWeight -> its neutral fields (dict), or {} when its format has none."""
    f = q.FORMAT
    out, n = q.shape
    if f in ("uniform", "uniform_sparse"):
        codes, g_idx = q.original_order()                      # original column order
        codes, g_idx = codes.astype(np.int32), g_idx.astype(np.int32)
        d = {"codes": codes, "scales": q.scales.astype(np.float32),
             "zeros": q.zeros().astype(np.float32), "g_idx": g_idx}
        if f == "uniform_sparse":
            d["outliers"] = q.outliers.to_dense().astype(np.float32)
        return d
    if f == "codebook":
        cb = q.column_bits.astype(np.int64)
        cents = np.zeros((n, 2 ** int(cb.max())), np.float32)
        for b in q.codebooks:
            cols = q.columns(b)
            cents[cols, :2 ** b] = q.codebooks[b].astype(np.float32)
        return {"codes": q.codes().astype(np.int32), "centroids": cents,
                "column_bits": cb.astype(np.int32),
                "outliers": q.outliers.to_dense().astype(np.float32)}
    if f == "row_lut":
        return {"codes": q.codes().astype(np.int32), "lut": q.lut.astype(np.float32),
                "outliers": q.outliers.to_dense().astype(np.float32)}
    if f == "additive":
        return {"codes": q.codes.astype(np.int32), "codebooks": q.codebooks.astype(np.float32),
                "scales": q.scales.astype(np.float32)}
    return {}


def decode_neutral(fmt, d):
    """The reference decoder of the neutral form -> (W_hat (out, in) float32, magnitude (out, in)
    float64, roundings): |W_hat_port - W_hat| <= roundings * 2^-24 * magnitude for any float32
    evaluation of the formula in NEUTRAL (each rounding adds at most u * |partial result|)."""
    f = fmt["format"]
    if f in ("uniform", "uniform_sparse"):
        gi = np.asarray(d["g_idx"], np.int64)
        s = np.asarray(d["scales"], np.float32)[:, gi]
        W = s * (np.asarray(d["codes"], np.float32) - np.asarray(d["zeros"], np.float32)[:, gi])
        mag, k = np.abs(W.astype(np.float64)), 1       # exact in float32: fp16 x 9-bit integer
        if f == "uniform_sparse":
            S = np.asarray(d["outliers"], np.float32)
            mag = mag + np.abs(S)
            W = W + S
            k = 2
        return W, mag, k
    if f == "codebook":
        codes = np.asarray(d["codes"], np.int64)
        cents = np.asarray(d["centroids"], np.float32)
        W = cents[np.arange(codes.shape[1])[None, :], codes]
        S = np.asarray(d["outliers"], np.float32)
        return W + S, np.abs(W.astype(np.float64)) + np.abs(S), 1
    if f == "row_lut":
        codes = np.asarray(d["codes"], np.int64)
        W = np.take_along_axis(np.asarray(d["lut"], np.float32), codes, axis=1)
        S = np.asarray(d["outliers"], np.float32)
        return W + S, np.abs(W.astype(np.float64)) + np.abs(S), 1
    if f == "additive":
        codes = np.asarray(d["codes"], np.int64)               # (out, K, M)
        C = np.asarray(d["codebooks"], np.float32)             # (M, nc, g)
        out, K, M = codes.shape
        g = C.shape[2]
        acc = C[0][codes[:, :, 0]]                             # (out, K, g)
        mag = np.abs(acc.astype(np.float64))
        for m in range(1, M):
            v = C[m][codes[:, :, m]]
            acc = acc + v
            mag = mag + np.abs(v)
        s = np.asarray(d["scales"], np.float32)[:, None, None]
        W = (s * acc).reshape(out, K * g)
        return W, (np.abs(s) * mag).reshape(out, K * g), M + 1
    return None


# ============================================================================ tolerances
def gamma(n, u=U32):
    """γ_n = n u / (1 - n u): the bound on the relative error of a float sum of n terms."""
    return n * u / (1 - n * u)


def what_tolerance(mag, roundings):
    """Elementwise W_hat tolerance of the decode tier (from decode_neutral's magnitude)."""
    return roundings * U32 * mag


def y_tolerance(x, W_hat, tau):
    """Elementwise tolerance of y = x @ W_hatᵀ (T, out): both the reference kernel and the
    port sum n float32 products in any order (each error <= γ_n Σ|x||ŵ|, so 2 γ_n between
    them), plus what W_hat's own tolerance tau (out, in) can move: |x| @ tauᵀ."""
    ax = np.abs(np.asarray(x, np.float64))
    n = ax.shape[1]
    return 2 * gamma(n + 1) * (ax @ np.abs(np.asarray(W_hat, np.float64)).T) + ax @ tau.T


def int_magnitude(q):
    """A[r, c] = |s| (q_c + |z|) (float64, input-column order) of a weight that the "cpu-int"
    kernel runs (uniform, uniform_sparse, spqr), or None for the other formats (they run
    the exact "cpu" kernel under that name). The int kernel's float work (int32 block sums
    scaled, summed over blocks, then s (Σ - z X̃) per group) handles terms of this size."""
    f = q.FORMAT
    if f in ("uniform", "uniform_sparse"):
        d = neutral_fields(q)
        gi = d["g_idx"].astype(np.int64)
        return np.abs(d["scales"][:, gi].astype(np.float64)) * (
            d["codes"] + np.abs(d["zeros"][:, gi].astype(np.float64)))
    if f == "spqr":                                    # codes, scales, zeros in stored order
        codes = q.codes().astype(np.float64)
        gi = np.arange(codes.shape[1]) // q.group_size
        A = np.abs(q.scales()[:, gi].astype(np.float64)) * (codes + np.abs(q.zeros()[:, gi]))
        perm = q.fields.get("perm")
        if perm is not None:                           # stored column k is original perm[k]
            A2 = np.empty_like(A)
            A2[:, perm.astype(np.int64)] = A
            A = A2
        return A
    return None


def y_int_tolerance(x, W_hat, A):
    """What the "cpu-int" kernel may add to y's error (refq.kernels.cpu.uniform_int_cpu):
    it multiplies x̃ = sx_b round(x / sx_b), x rounded to int16 per block b of columns with
    sx_b = max_{c in b} |x_c| / 32767 <= m_t = max_c |x[t, c]| / 32767 (whatever the
    blocking), so |x - x̃| <= m_t / 2 and |x̃| <= |x| + m_t / 2; its integer sums are exact
    and its float work (B blocks + G groups <= 2n sums, conversions) is bounded by
    (2n + 4) u Σ_c A_rc |x̃_c|:
        ½ m_t Σ_c |Ŵ_rc|  +  (2n + 4) u Σ_c A_rc (|x_tc| + m_t / 2)."""
    ax = np.abs(np.asarray(x, np.float64))
    n = ax.shape[1]
    m = ax.max(axis=1, keepdims=True) / 32767.0                       # (T, 1)
    aW = np.abs(np.asarray(W_hat, np.float64))
    return 0.5 * m * aW.sum(axis=1)[None, :] + (2 * n + 4) * U32 * ((ax + m / 2) @ A.T)


def loss_rounding(W, W_hat, H):
    """Float64 rounding of trace(E H Eᵀ) computed two ways (ours and a port's): 2 γ_{2n+1}
    Σ |E| |H| |E|."""
    E = np.abs(np.asarray(W, np.float64) - np.asarray(W_hat, np.float64))
    n = E.shape[1]
    return 2 * gamma(2 * n + 1, U64) * float(np.sum((E @ np.abs(H)) * E)) + 1e-300


def loss_tolerance(W, W_hat, H, tau):
    """How far loss = trace(E H Eᵀ), E = W - Ŵ, can move when every Ŵ moves by at most tau
    (elementwise): for Ŵ' = Ŵ + D, |D| <= tau,
        L(Ŵ') - L(Ŵ) = -2 tr(D H Eᵀ) + tr(D H Dᵀ)
        |.| <= 2 Σ tau ⊙ |E H| + Σ_r tau_r |H| tau_rᵀ,
    plus the float64 rounding of both evaluations.  Any Ŵ within W_hat's tolerance
    therefore has a loss within this one (tests/test_golden.py checks it)."""
    Ed = np.asarray(W, np.float64) - np.asarray(W_hat, np.float64)
    tau = np.asarray(tau, np.float64)
    aH = np.abs(H)
    first = 2 * float(np.sum(tau * np.abs(Ed @ H)))
    second = float(np.sum((tau @ aH) * tau))
    return (first + second) * (1 + 4 * gamma(2 * Ed.shape[1] + 1, U64)) \
        + loss_rounding(W, W_hat, H)


def stored_tolerance(name, ref):
    """refq's own stored fields (checked only when verifying refq itself): integers exact,
    float16 fields within one float16 ulp, other floats 2^-16 relative.  -> rule dict."""
    ref = np.asarray(ref)
    if ref.dtype.kind in "biu":
        return {"compare": "exact",
                "reason": "integer / packed field (codes, indices, zero points, bit "
                          "widths, permutations): any difference is a different quantization"}
    if ref.dtype == np.float16:
        return {"compare": "allclose", "atol": 2.0 ** -24, "rtol": 2.0 ** -10,
                "reason": "stored as float16: one float16 ulp (2^-10 relative; atol = the "
                          "smallest float16 subnormal)"}
    m = float(np.max(np.abs(ref.astype(np.float64)))) if ref.size else 0.0
    return {"compare": "allclose", "atol": m * 2.0 ** -20, "rtol": 2.0 ** -16,
            "reason": f"stored as {ref.dtype.name}, computed by float arithmetic in another "
                      "order (2^-16 relative, 2^-20 * max|ref|)"}
