"""AQLM: additive multi-codebook quantization of a linear layer.

Egiazarian, Panferov, Kuznedelev, Frantar, Babenko, Alistarh, "Extreme
Compression of Large Language Models via Additive Quantization", ICML 2024
(arXiv 2401.06118); reference code Vahe1994/AQLM (src/aq.py, aq_engine.py,
src/beam_search_xtx.py).  Stored in the "additive" format
(refq/formats/additive.py).  Labels (AQ), (L), (N1)-(N3), (S), (B) are this
file's and its helpers' equations (the paper states the same objects in §3).

Representation (paper §3, "additive quantization" of groups of g weights):
row i of W is cut into K = in/g groups of g inputs, and

    W_hat[i, group k] = s_i * Σ_{m<M} C_m[b_ikm]                           (AQ)

with M codebooks C_m of 2^B vectors of length g, codes b_ikm in [0, 2^B) and
one scale s_i per output row.  Written z_i = W_hat[i] / s_i (the unscaled row).

Objective (paper §3, ||W X - W_hat X||², through H = mean x xᵀ):

    L = tr((W - W_hat) H (W - W_hat)ᵀ) = Σ_i r_i H r_iᵀ,   r_i = w_i - s_i z_i    (L)

It is a sum over rows, so rows never interact except through the shared
codebooks.  The method alternates between a codebook/scale update and a code
update, after a residual k-means initialization; every step lowers (L) or
leaves it:

0. Init.  s_i = RMS of row i.  Residual k-means on the normalized groups
   w_i[group k] / s_i (Euclidean, Lloyd's, refq.methods.kmeans, like the
   official code): codebook 0 is the k-means of the groups, codebook 1 the
   k-means of what codebook 0 leaves, and so on.

1. Codebooks given codes and scales (refq.methods.aqlm_codebooks): (L) is a
   convex quadratic in the codebook entries θ; its minimizer solves the normal
   equations (N1)-(N2), taken in proximal form (N3) (A singular).  With P =
   M 2^B g unknowns:
   - P <= DIRECT_MAX (e.g. 2x8 g8: P = 4096): round 1 forms A and solves by
     Cholesky (the exact minimizer); every later round takes REFINE_ITERS (10)
     conjugate-gradient steps warm-started at the old codebooks and
     preconditioned by round 1's Cholesky factor: not the exact minimizer,
     but each step an exact line search that lowers (L);
   - larger P (e.g. 1x16 g8: P = 524288): A is never formed; PCG with a
     block-Jacobi preconditioner, warm-started, run to convergence.
   Then the scales, exactly (S): s_i = (z_i H w_iᵀ) / (z_i H z_iᵀ).
   Both are rounded to float16 (what the format stores) and the loss is
   recomputed with the rounded values; a step that would raise it (possible
   only through that rounding) is rejected.

2. Codes given codebooks and scales (refq.methods.aqlm_beam): beam search per
   row over the groups and codebooks in a seeded random order, with the exact
   change of (L) for each candidate code (B), the coupling between groups
   through H included.  Beam size 1 is coordinate descent.

Stop when a round (1 + 2) improves L by less than relative_tolerance * L, or
after max_iters rounds.  L never rises from one step to the next (asserted
in debug mode, recorded in info["loss_history"], tested).

Options (CLI flags with dashes): num_codebooks M (2), nbits_per_codebook B
(8), in_group_size g (8), beam_size (1), max_iters (20), relative_tolerance
(0.01), seed (0).  Defaults are "2x8 g8", which fits every linear of small
models; the paper's "1x16 g8" needs at least 2^16 groups (out * in / 8) per
layer, so it is refused on e.g. a 576x576 linear (41,472 groups).

Bits per weight (stored bytes, refq.formats.additive):
    M * 8 * bytes(code) / g  +  M * 2^B * g * 16 / (out * in)  +  16 / in
e.g. 2x8 g8 on 576x576: 2 + 0.198 + 0.028 = 2.226.

Implementation notes
- Everything in float64; codebooks and scales are float16-representable
  after every step.  Numba kernels are parallel only over independent
  outputs (rows, points, codewords), each accumulated in a fixed order, so
  the result does not depend on the number of threads.
- Not done here: the paper's block/global fine-tuning after quantization.
"""

import math
import time

import numpy as np

from refq.errors import RefqError
from refq.options import SEED, Option, defaults
from refq.formats.additive import AdditiveWeight
# the parts (names that lived in this file before the split stay importable from here)
from refq.methods.aqlm_beam import beam_search, codebook_quadratics  # noqa: F401
from refq.methods.aqlm_codebooks import (DIRECT_MAX, PCG_MAX_ITERS, PCG_RTOL,  # noqa: F401
                                         PROX, REFINE_ITERS, codebook_solver, normal_cholesky,
                                         normal_matrix, solve_codebooks, solve_scales,
                                         unscaled_rows, update_codebooks)
from refq.methods.kmeans import KMEANS_MAX_ITERS, KMEANS_WORK, kmeans  # noqa: F401
from refq.numeric import FP16_MAX, fp16  # noqa: F401

OPTIONS = (
    Option("num_codebooks", "int", 2, "M: codebooks summed per group of weights", range="[1, 64]"),
    Option("nbits_per_codebook", "int", 8, "B: bits per code (2^B vectors per codebook)",
           range="[1, 16]"),
    Option("in_group_size", "int", 8, "g: consecutive input weights coded together",
           range="[1, 64]"),
    Option("beam_size", "int", 1, "candidates kept per step of the code search", range="[1, 1024]"),
    Option("max_iters", "int", 20, "rounds of (codebooks, scales, codes) updates at most",
           range="[1, 10000]"),
    Option("relative_tolerance", "float", 0.01, "stop when a round lowers the loss by less "
           "than this fraction", range="[0, inf)"),
    SEED.but(help="seed of the k-means initialisation and the code-search order (set by "
             "--seed)", common=True),
)
DEFAULTS = defaults(OPTIONS)




# ---------------------------------------------------------------------------
# the loss (L)
# ---------------------------------------------------------------------------
def row_losses(W, What, H):
    """(w_i - ŵ_i) H (w_i - ŵ_i)ᵀ per row -> (out,) float64."""
    E = W - What                                   # (out, in)
    return np.einsum("ij,ij->i", E @ H, E)


def total_loss(W, H, scales, codes, C):
    """(L) for scales (out,), codes (out, K, M), codebooks C (M, nc, g) -> float."""
    return float(np.sum(row_losses(W, scales[:, None] * unscaled_rows(codes, C), H)))


# ---------------------------------------------------------------------------
# 0. initialization: residual k-means on the normalized groups
# ---------------------------------------------------------------------------
def init_residual_kmeans(W, scales, M, nc, g, rng):
    """-> codes (out, K, M) int64, C (M, nc, g) float64 (float16 values)."""
    out, n = W.shape
    K = n // g
    R = (W / scales[:, None]).reshape(out * K, g)  # (N, g) normalized groups
    codes = np.zeros((out, K, M), dtype=np.int64)
    C = np.zeros((M, nc, g))
    for m in range(M):                             # codebook m fits what 0..m-1 leave
        labels, Cm = kmeans(R, nc, rng)
        C[m] = fp16(Cm, saturate=True)
        codes[:, :, m] = labels.reshape(out, K)
        R = R - C[m][labels]
    return codes, C


# ---------------------------------------------------------------------------
# 2. codes: beam search (refq.methods.aqlm_beam)
# ---------------------------------------------------------------------------
def code_step(W, H, scales, codes, C, beam_size, rng):
    """Step 2 for all rows, groups and codebooks visited in a seeded random order."""
    K, M = codes.shape[1], codes.shape[2]
    group_order = rng.permutation(K).astype(np.int64)
    book_order = rng.permutation(M).astype(np.int64)
    Q = codebook_quadratics(H, C, K)                             # (K, M, nc)
    R = W - scales[:, None] * unscaled_rows(codes, C)            # (out, in) residuals
    new, _ = beam_search(R, R @ H, H, scales, C, Q, codes,      # (B), rows in parallel
                         group_order, book_order, beam_size)
    return new


# ---------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------
def _check_monotone(prev, new, what, name):
    # debug-mode assertion (python -O removes it): no step may raise the loss.  The loss
    # tr(ΔW H ΔWᵀ) is computed in an expanded form, so a layer fitted exactly gives a tiny
    # value of either sign: the slack is relative to |prev| (prev*(1+1e-9) was below an
    # equal negative loss, and failed)
    assert new <= prev + 1e-9 * abs(prev) + 1e-300, \
        f"aqlm {name}: loss rose in {what}: {prev!r} -> {new!r}"


def check_shape(shape, opts, name=""):
    """RefqError (one line) when the layer cannot take these options."""
    prefix = f"{name}: " if name else ""
    out, n = shape
    M, B, g = opts["num_codebooks"], opts["nbits_per_codebook"], opts["in_group_size"]
    if n % g:
        raise RefqError(f"{prefix}in_features {n} is not divisible by in_group_size {g} "
                        f"(--in-group-size)")
    groups = out * (n // g)
    if 2 ** B > groups:
        raise RefqError(f"{prefix}a {B}-bit codebook has {2 ** B} codes but this {out}x{n} layer "
                        f"has only {groups} groups of {g} weights; use fewer bits per codebook "
                        f"(--nbits-per-codebook <= {int(math.log2(groups))}, e.g. 2x8 instead of 1x16)")


def quantize_aqlm(W, H, opts, name=""):
    """W (out, in) float64, H (in, in) float64 (mean x xᵀ) -> AdditiveWeight."""
    tick = time.perf_counter()
    check_shape(W.shape, opts, name)
    M, B, g = opts["num_codebooks"], opts["nbits_per_codebook"], opts["in_group_size"]
    nc = 2 ** B
    rng = np.random.default_rng(opts["seed"])
    W = np.ascontiguousarray(W, dtype=np.float64)                # (out, in)
    H = np.ascontiguousarray(H, dtype=np.float64)                # (in, in)

    rms = np.sqrt(np.mean(W * W, axis=1))                        # (out,)
    scales = fp16(np.where(rms > 0, rms, 1.0), saturate=True)
    scales[scales == 0] = 1.0                                    # rms below fp16's range
    codes, C = init_residual_kmeans(W, scales, M, nc, g, rng)    # (out, K, M), (M, nc, g)
    loss = total_loss(W, H, scales, codes, C)
    history = [loss]
    factor = None                                                # round 1's Cholesky factor
    iters = 0
    for iters in range(1, opts["max_iters"] + 1):
        start = loss
        # 1. codebooks: (N3) by Cholesky in round 1, then 10 warm PCG steps per round
        #    (large P: PCG to convergence); then scales (S); both rounded to fp16
        C_new, factor = update_codebooks(W, H, scales, codes, C, factor)
        C_new = fp16(C_new, saturate=True)
        s_new = fp16(solve_scales(W, H, scales, codes, C_new), saturate=True)   # (S)
        loss_a = total_loss(W, H, s_new, codes, C_new)           # (L)
        if loss_a <= loss:                                       # else: fp16 rounding lost
            C, scales, loss = C_new, s_new, loss_a               # more than the solve won
        history.append(loss)
        # 2. codes: beam search with the exact change of (L), (B)
        codes = code_step(W, H, scales, codes, C, opts["beam_size"], rng)
        loss_b = total_loss(W, H, scales, codes, C)
        _check_monotone(loss, loss_b, "the code step", name)
        loss = loss_b
        history.append(loss)
        if start - loss <= opts["relative_tolerance"] * start:
            break

    info = {"name": name, "loss": loss, "iterations": iters,
            "codebook_solver": codebook_solver(M, nc, g),
            "loss_history": [float(v) for v in history]}
    qw = AdditiveWeight.from_arrays(codes, C, scales, B, method="aqlm", options=opts, info=info)
    qw.info["seconds"] = time.perf_counter() - tick
    return qw
