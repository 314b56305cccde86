"""SLiM: one-shot quantization + 2:4 sparsity + saliency-based low-rank adapters.

Mozaffari, Yazdanbakhsh, Mehri Dehnavi, "SLiM: One-shot Quantized Sparse Plus
Low-rank Approximation of LLMs" (arXiv 2410.09615); official code
Mohammad-Mozaffari/slim (slim/quantization/quantization.py, slim/lora.py,
slim/prune.py).  Three pieces, each usable alone:

1. SLiM-Quant (`--method slim-quant`): symmetric uniform quantization with ONE
   clip α per tensor, chosen to minimise the expected error over the
   distribution of |W| (paper §3.1):

       Δ = α / m,  m = 2^(b-1) - 1              (step; codes -m-1 .. m)
       J(α) = ∫_0^α f(x) (x - Δ·round(x/Δ))² dx  +  ∫_α^∞ f(x) (x - α)² dx
              \\_____ quantization error ____/     \\__ clipping error __/

   f is the histogram of |W| (nb = max(512, min(numel // 1000, 20000)) bins
   over [0, max|W|], the official bin count), the integrals are sums over bin
   centres v_i:  J(α) = (1/N) Σ_i count_i · e_i(α).  α is searched among the
   bin centres: a coarse grid of 11 evenly spaced centres, then every centre
   between the coarse neighbours of the best coarse point (the official
   two-stage search).  Then (paper eq. 2)

       q = clamp(round(W · m / α), -m - 1, m),   W_hat = (α / m) · q,

   stored as code q + 2^(b-1) with the fp16 scale α/m (rounded to fp16 before
   the codes are computed).
   Differences from the official code (read, not copied): it models the
   quantization error with step α / 2^b and floor() instead of round(), and
   its histogram spans [min|W|, max|W|]; refq uses the step that is actually
   applied (α / m) with round-to-nearest, on [0, max|W|].  (That proxy clips
   less: on SmolLM2 layers refq's α has the lower weight MSE on all 12 layers
   measured, but not always the lower layer loss, see BENCHMARKS.md.)
   act_weighted (refq's option, not in the paper; default off): weight W_ij
   by H_jj = mean x_j² in the histogram, J(α) = Σ_ij H_jj e(W_ij, α) / Σ H_jj,
   the diagonal part of the layer loss tr(E H Eᵀ) = Σ_ij E_ij² H_jj + (off-
   diagonal terms); the same search.

2. 2:4 sparsity: Wanda or SparseGPT or magnitude (refq.methods.sparsity).

3. Low-rank adapters (paper §3.3, "SLiM-LoRA"): with the compression error
   E = W - W_c and x̄_j = sqrt(H_jj) (the RMS of input j over the
   calibration tokens; H = mean x xᵀ),

       E · diag(x̄) = U S Vᵀ                              (SVD)
       L = U_r            (out, r)
       R = S_r V_rᵀ diag(x̄)⁻¹   (r, in)                    (undo the scaling)
       W_hat = W_c + L R,     y = x W_cᵀ + (x Rᵀ) Lᵀ.

   Scaling by x̄ makes the truncated SVD minimise the activation-weighted error
   Σ_ij (E - LR)_ij² x̄_j² instead of the plain Frobenius norm.  The rank is
   `rank`, or int(rank_ratio · min(out, in)) (official README: 0.1).
   Optionally L and R are quantized (`adapter_bits`, groups of
   `adapter_group_size` along each row, symmetric absmax: value =
   scale (code - 2^(a-1)), scale = max|group| / (2^(a-1) - 1)).
   Loss of the truncation: tr(E_r H E_rᵀ) = Σ_{k>r} s_k² ṽ_kᵀ H̃ ṽ_k with
   H̃ = diag(x̄)⁻¹ H diag(x̄)⁻¹ PSD, so it never rises with r (fp adapters).

`--method slim` (one shot, as the official prune_wanda with quantize_first):
    α0  = SLiM-Quant(kept weights)          (Wanda/magnitude: the mask is known first)
    M   = pruner mask (2:4 or unstructured)
    W_c = M ⊙ Q_α0(W)                        (SparseGPT: its OBS sweep with the
                                              α0-grid, α0 fit on the dense W)
    L, R = adapters(W - W_c)   (quantized if adapter_bits)
    refit: W_c' = M ⊙ Q_α'(W - L R), α' = SLiM-Quant of the new kept values
           (SparseGPT: the sweep again with the mask fixed, on W - L R)
    The refit is the official add_lora's last step (it re-quantizes
    mask ⊙ (W - L R)); refq keeps it only if it lowers the layer loss, and runs
    it after quantizing the adapters, so W_c also absorbs their rounding error.
"""

import time

import numpy as np
from numba import njit

from refq.errors import RefqError
from refq.formats.slim import SlimWeight
from refq.methods import sparsity as sp
from refq.methods.rtn import group_bounds
from refq.options import BITS, BLOCKSIZE, PERCDAMP, Option, defaults, no_effect
from refq.numeric import layer_loss

PRUNERS = ("wanda", "sparsegpt", "magnitude")

SLIM_QUANT_OPTIONS = (
    BITS,
    Option("act_weighted", "bool", False, "weight |W| by the input's mean square in the "
           "clip search (refq's option, not in the paper; needs the Hessian)"),
)
SLIM_OPTIONS = (
    SLIM_QUANT_OPTIONS[0].but(range="[2, 8]", also={16: 16},
                              help="bits per kept weight; 16: kept values in fp16, not quantized"),
    SLIM_QUANT_OPTIONS[1],
    sp.SPARSITY,
    Option("pruner", "choice", "wanda", "how the sparsity mask is chosen", choices=PRUNERS),
    Option("rank", "int", None, "rank of the low-rank adapters L R (0: no adapters)",
           range="[0, inf)", none="int(rank_ratio * min(out, in))"),
    Option("rank_ratio", "float", 0.1, "adapter rank as a fraction of min(out, in), when "
           "--rank is not given", range="[0, 1]"),
    Option("adapter_bits", "int", None, "bits of the quantized adapters (symmetric, groups of "
           "--adapter-group-size)", range="[2, 8]", none="fp16 adapters", also={0: None, 16: None}),
    Option("adapter_group_size", "int", 128, "values per scale of the quantized adapters "
           "(needs --adapter-bits)", range="[1, inf)"),
    Option("refit", "bool", True, "re-quantize mask * (W - L R) after the adapters, kept "
           "only if it lowers the layer loss"),
    PERCDAMP.but(help=PERCDAMP.help + " (pruner sparsegpt)"),
    BLOCKSIZE.but(help=BLOCKSIZE.help + " (pruner sparsegpt)"),
)
SLIM_QUANT_DEFAULTS = defaults(SLIM_QUANT_OPTIONS)
SLIM_DEFAULTS = defaults(SLIM_OPTIONS)

_FP16_TINY = float(np.float16(2.0 ** -24))


def validate_slim(opts, given=()):
    """Checks across options (refq.api.validate_options calls it; `given`: the
    options set explicitly on the command line). -> error text or None."""
    if opts["pruner"] == "sparsegpt" and opts["sparsity"] == "2:4" and opts["blocksize"] % 4:
        return f"blocksize must be a multiple of 4 for 2:4 sparsity, got {opts['blocksize']}"
    no_adapters = opts["rank"] == 0 or (opts["rank"] is None and opts["rank_ratio"] == 0)
    return (no_effect(given, ["percdamp", "blocksize"], opts["pruner"] == "sparsegpt",
                      "pruner is sparsegpt (--pruner sparsegpt)")
            or no_effect(given, ["rank_ratio"], opts["rank"] is None, "rank is none (--rank none)")
            or no_effect(given, ["adapter_bits", "adapter_group_size", "refit"], not no_adapters,
                         "there are adapters (--rank > 0 or --rank-ratio > 0)")
            or no_effect(given, ["adapter_group_size"], opts["adapter_bits"] is not None,
                         "the adapters are quantized (--adapter-bits)")
            or no_effect(given, ["act_weighted"], opts["bits"] != 16,
                         "the kept weights are quantized (--bits below 16)"))


def adapter_rank(shape, rank, rank_ratio, name=""):
    """The rank r to use: `rank` if given, else int(rank_ratio * min(out, in))."""
    limit = min(shape)
    if rank is None:
        return int(rank_ratio * limit)
    if rank > limit:
        raise RefqError(f"{name or 'weight'}: option rank {rank} exceeds min(out, in) = {limit} "
                        f"for shape {tuple(shape)}")
    return int(rank)


# ---------------------------------------------------------------------------
# 1. SLiM-Quant
# ---------------------------------------------------------------------------
def n_bins(numel):
    """Histogram bins of |W| (the official count)."""
    return max(512, min(numel // 1000, 20000))


def histogram_abs(W, weights=None):
    """|W| -> counts (nb,) float64, bin centres (nb,) float64 over [0, max|W|].

    weights (same shape as W) or None: each |W_ij| counts weights_ij instead of 1.
    """
    a = np.abs(np.asarray(W, dtype=np.float64)).reshape(-1)
    nb = n_bins(a.size)
    top = float(a.max()) if a.size else 0.0
    if top == 0.0:
        top = 1.0
    w = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    counts, edges = np.histogram(a, bins=nb, range=(0.0, top), weights=w)
    return counts.astype(np.float64), (edges[:-1] + edges[1:]) / 2


@njit(cache=True)
def slim_quant_objective(counts, centres, alpha, bits):
    """J(α) = (1/N) Σ_i count_i e_i(α): quantization error below α, clipping error above."""
    m = 2.0 ** (bits - 1) - 1.0
    step = alpha / m                                 # Δ = α / (2^(b-1) - 1)
    total = 0.0
    N = 0.0
    for i in range(counts.shape[0]):
        v = centres[i]
        N += counts[i]
        if v < alpha:
            e = v - step * np.rint(v / step)         # x - Δ round(x / Δ)
        else:
            e = v - alpha                            # clipped to α
        total += counts[i] * e * e
    return total / N


def slim_quant_alpha(W, bits, weights=None):
    """The clip α of SLiM-Quant for the values W (any shape).  -> (α, J(α)).

    weights: None (the paper: every weight counts 1) or the same shape as W
    (act_weighted: W_ij counts H_jj, its input's mean square activation).
    """
    counts, centres = histogram_abs(W, weights)
    nb = len(centres)
    coarse = [round(k * (nb - 1) / 10) for k in range(11)]           # 11 evenly spaced centres
    cj = [slim_quant_objective(counts, centres, centres[i], bits) for i in coarse]
    t = int(np.argmin(cj))
    lo, hi = coarse[max(t - 1, 0)], coarse[min(t + 1, 10)]
    best_i, best_j = coarse[t], cj[t]
    for i in range(lo, hi + 1):                                      # fine scan
        j = slim_quant_objective(counts, centres, centres[i], bits)
        if j < best_j:
            best_i, best_j = i, j
    return float(centres[best_i]), float(best_j)


def slim_quant_grid(W, bits, name="", weights=None):
    """W (any shape) -> (scale, α): fp16-representable scale α / (2^(b-1) - 1)."""
    alpha, _ = slim_quant_alpha(W, bits, weights)
    scale = alpha / (2 ** (bits - 1) - 1)
    if scale > float(np.finfo(np.float16).max):
        raise RefqError(f"{name or 'weight'}: weight range too large for a float16 scale")
    scale = max(float(np.float16(scale)), _FP16_TINY)
    return scale, alpha


def slim_quantize(W, scale, bits):
    """W (out, in), scalar scale -> codes (out, in) float64 in [0, 2^b), W_hat (out, in) float64.

    q = clamp(round(W / scale), -2^(b-1), 2^(b-1) - 1);  code = q + 2^(b-1)   (paper eq. 2)
    """
    z = 2 ** (bits - 1)
    codes = np.clip(np.rint(W / scale) + z, 0, 2 ** bits - 1)
    return codes, scale * (codes - z)


def quantize_slim_quant(W, H, opts, name=""):
    """`--method slim-quant`: W (out, in) float64; H optional (loss only). -> SlimWeight (dense)."""
    tick = time.perf_counter()
    bits = opts["bits"]
    weights = None
    if opts["act_weighted"]:
        if H is None:
            raise RefqError(f"{name or 'weight'}: option act_weighted needs the Hessian H")
        weights = col_weights(W, H)
    scale, alpha = slim_quant_grid(W, bits, name, weights)
    codes, _ = slim_quantize(W, scale, bits)
    qw = SlimWeight.from_parts(W.shape, "dense", None, codes=codes, bits=bits, grid="tensor",
                               sym=True, scales=np.array([scale]), method="slim-quant",
                               options=opts, info={"name": name, "alpha": alpha})
    qw.info["loss"] = layer_loss(W, qw.dequantize(), H) if H is not None else None
    qw.info["seconds"] = time.perf_counter() - tick
    return qw


def col_weights(W, H):
    """(out, in) weights H_jj of every W_ij (act_weighted SLiM-Quant)."""
    return np.broadcast_to(np.maximum(np.diag(H), 0.0)[None, :], W.shape)


# ---------------------------------------------------------------------------
# 3. low-rank adapters
# ---------------------------------------------------------------------------
def activation_rms(H):
    """x̄ (in,) = sqrt(H_jj); dead inputs (0) get the smallest positive x̄ (or 1)."""
    xbar = np.sqrt(np.maximum(np.diag(H), 0.0))
    pos = xbar[xbar > 0]
    return np.where(xbar > 0, xbar, pos.min() if pos.size else 1.0)


def low_rank_adapters(E, xbar, rank):
    """E (out, in) float64, x̄ (in,) > 0, rank r -> L (out, r), R (r, in) float64.

    SVD of E diag(x̄) = U S Vᵀ;  L = U_r,  R = S_r V_rᵀ diag(x̄)⁻¹.
    """
    U, S, Vt = np.linalg.svd(E * xbar[None, :], full_matrices=False)   # (out,k) (k,) (k,in)
    L = U[:, :rank]                                                     # (out, r)
    R = (S[:rank, None] * Vt[:rank]) / xbar[None, :]                    # (r, in)
    return np.ascontiguousarray(L), np.ascontiguousarray(R)


def quantize_rows(A, bits, group_size):
    """Symmetric absmax grid per (row, group) of A (rows, m).

        scale = fp16(max |A_group| / (2^(a-1) - 1)),  q = clamp(round(A / scale), -2^(a-1), 2^(a-1) - 1)
        code  = q + 2^(a-1)                           (the official adapter quantizer's grid)

    The largest entry of a group is on the grid (GPTQ's symmetric grid, with
    scale 2 max|A| / (2^a - 1), clips it by half a step; on the SmolLM2 layers
    that made 4-bit adapters up to 2x worse in layer loss).
    -> codes (rows, m) uint8, scales (rows, G) float64 (fp16-representable), A_hat (rows, m) float64.
    """
    rows, m = A.shape
    top = 2 ** (bits - 1) - 1
    bounds = group_bounds(m, group_size)
    codes = np.zeros((rows, m), dtype=np.uint8)
    scales = np.zeros((rows, len(bounds)))
    A_hat = np.zeros((rows, m))
    for gi, (c0, c1) in enumerate(bounds):
        s = np.abs(A[:, c0:c1]).max(axis=1) / top                       # (rows,)
        s = np.maximum(s.astype(np.float16).astype(np.float64), _FP16_TINY)
        q = np.clip(np.rint(A[:, c0:c1] / s[:, None]), -top - 1, top)   # (rows, c1 - c0)
        codes[:, c0:c1] = q + top + 1
        scales[:, gi] = s
        A_hat[:, c0:c1] = s[:, None] * q
    return codes, scales, A_hat


def make_adapters(E, H, rank, adapter_bits, adapter_group_size):
    """-> (L_hat, R_hat) float64 as they will be stored, and the format's `adapters` dict."""
    L, R = low_rank_adapters(E, activation_rms(H), rank)
    if adapter_bits is None:
        L16, R16 = L.astype(np.float16), R.astype(np.float16)
        return (L16.astype(np.float64), R16.astype(np.float64)), {"L": L16, "R": R16}
    Lc, Ls, L_hat = quantize_rows(L, adapter_bits, adapter_group_size)
    Rc, Rs, R_hat = quantize_rows(R, adapter_bits, adapter_group_size)
    return (L_hat, R_hat), {"L_codes": Lc, "L_scales": Ls, "R_codes": Rc, "R_scales": Rs,
                            "bits": adapter_bits, "group_size": adapter_group_size}


# ---------------------------------------------------------------------------
# 4. the pipeline
# ---------------------------------------------------------------------------
def _compress(T, H, keep, pattern, p, bits, opts, name, fixed):
    """Sparse (+ SLiM-Quant) base of the target T (out, in).

    keep: the mask (Wanda / magnitude, or SparseGPT's fixed mask on a refit);
    None for SparseGPT's first sweep.  -> (W_c, keep, codes, scale, alpha)
    """
    wts = col_weights(T, H) if opts["act_weighted"] else None
    if opts["pruner"] == "sparsegpt":
        grid, scale, alpha = None, None, None
        if bits < 16:
            if fixed:
                scale, alpha = slim_quant_grid(T[keep], bits, name, wts if wts is None else wts[keep])
            else:
                scale, alpha = slim_quant_grid(T, bits, name, wts)
            out = T.shape[0]
            grid = (np.full(out, scale), np.full(out, float(2 ** (bits - 1))), bits)
        res = sp.sparsegpt_prune(T, H, pattern, p, opts["percdamp"], opts["blocksize"], grid,
                                 keep=keep if fixed else None, name=name)
        return res["W_c"], res["keep"], res["codes"], scale, alpha
    if bits == 16:
        return T * keep, keep, None, None, None
    scale, alpha = slim_quant_grid(T[keep], bits, name,               # α fit on the kept values
                                   None if wts is None else wts[keep])
    codes, T_hat = slim_quantize(T, scale, bits)
    return T_hat * keep, keep, codes * keep, scale, alpha


def quantize_slim(W, H, opts, name=""):
    """`--method slim`: W (out, in) float64, H (in, in) float64. -> SlimWeight."""
    tick = time.perf_counter()
    pattern, p = sp.parse_sparsity(opts["sparsity"])
    sp.check_shape(W.shape, pattern, name)
    bits = opts["bits"]
    r = adapter_rank(W.shape, opts["rank"], opts["rank_ratio"], name)

    # mask first for Wanda / magnitude (scored on the original W, as the official code)
    if opts["pruner"] == "wanda":
        keep = sp.wanda_mask(W, H, pattern, p)
    elif opts["pruner"] == "magnitude":
        keep = sp.magnitude_mask(W, pattern, p)
    else:
        keep = None
    W_c, keep, codes, scale, alpha = _compress(W, H, keep, pattern, p, bits, opts, name,
                                               fixed=False)
    info = {"name": name, "alpha": alpha, "rank": r}
    adapters = None
    if r > 0:
        (L_hat, R_hat), adapters = make_adapters(W - W_c, H, r, opts["adapter_bits"],
                                                 opts["adapter_group_size"])
        LR = L_hat @ R_hat                                            # (out, in)
        info["refit"] = False
        if opts["refit"]:
            loss_before = layer_loss(W, W_c + LR, H)
            refit = _compress(W - LR, H, keep, pattern, p, bits, opts, name, fixed=True)
            loss_after = layer_loss(W, refit[0] + LR, H)
            if loss_after < loss_before:
                W_c, keep, codes, scale, alpha = refit
                info["refit"] = True
                info["alpha"] = alpha
    qw = SlimWeight.from_parts(
        W.shape, pattern, keep, values=W_c if bits == 16 else None,
        codes=codes if bits < 16 else None, bits=bits, grid=None if bits == 16 else "tensor",
        sym=True, scales=None if scale is None else np.array([scale]), adapters=adapters,
        method="slim", options=opts, info=info)
    qw.info["loss"] = layer_loss(W, qw.dequantize(), H)
    qw.info["seconds"] = time.perf_counter() - tick
    return qw
