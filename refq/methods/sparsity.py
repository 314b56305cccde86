"""Pruning: magnitude, Wanda and SparseGPT, 2:4 semi-structured or unstructured.

Every pruner picks a mask M (1 = kept) and returns W_c = M ⊙ W' (W' = W for
magnitude and Wanda; W' = W after OBS compensation for SparseGPT).  The kept
values are stored in fp16 (bits = 16, the default) or, when bits < 16, as
b-bit codes on a min-max grid per output row (refq.methods.rtn.find_params).
Objective measured everywhere: the layer loss tr((W - W_c) H (W - W_c)ᵀ).

Patterns (option `sparsity`)
  "2:4"   in every row, every run of 4 consecutive inputs (columns 4t..4t+3)
          keeps exactly 2 weights: what sparse tensor cores accelerate.
  p       a fraction 0 < p < 1 (e.g. 0.5): unstructured; int(p * in) weights
          pruned in every row (magnitude, Wanda), or int(p * out * B) in every
          block of B columns (SparseGPT's adaptive mask selection).

Magnitude   score_ij = |W_ij|.  (The official SLiM code uses one threshold per
            layer for unstructured magnitude pruning; refq prunes per row so
            that every pruner keeps the same count in every row.)

Wanda       (Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach
            for Large Language Models", arXiv 2306.11695, eq. 1)
                score_ij = |W_ij| · ‖X_j‖₂
            ‖X_j‖ is the norm of input j over the calibration tokens; with
            H = mean x xᵀ, ‖X_j‖ = sqrt(ntokens · H_jj) ∝ sqrt(H_jj), and a
            common factor does not change any comparison, so refq uses
            sqrt(H_jj).  Weights are compared within one output row (Wanda's
            "per output" comparison group), within each group of 4 for 2:4.

Tie rule (magnitude and Wanda): when scores tie, the weight with the LOWER
column index is kept (sorting is stable).  Ties are common on SmolLM2, whose
weights sit on a 4-bit grid (it ships as GGUF Q4_1): about 1.7% of 2:4
magnitude decisions on a layer are ties, which torch.topk (the official code)
breaks the other way; either choice is arbitrary.

SparseGPT   (Frantar, Alistarh, "SparseGPT: Massive Language Models Can Be
            Accurately Pruned in One-Shot", arXiv 2301.00774; reference code
            IST-DASLab/sparsegpt `fasterprune`)
  Objective: min over mask M and kept values  tr((W - W_c) H (W - W_c)ᵀ).
  Columns are processed left to right, exactly as in GPTQ (the loop of
  refq.methods.gptq_skeleton; this file holds only the per-column step):
  with U the upper Cholesky factor of the damped H⁻¹ (H⁻¹ = Uᵀ U),
      mask selection (paper §3.3, eq. 7, "OBS saliency")
          ε_ij = w_ij² / [H⁻¹]_jj² = w_ij² / U_jj²   (on the CURRENT, updated w)
          2:4:          at the first column of every group of 4, prune the 2
                        weights of smallest ε in each row's group
          unstructured: at the first column of every block of B columns,
                        prune the int(p · out · B) weights of smallest ε in
                        the (out, B) block ("adaptive mask selection", §3.3)
      column j (Algorithm 1):
          q_j   = 0 where pruned, else w_j (or its b-bit grid value)
          err_j = (w_j - q_j) / U_jj
          W[:, k] -= err_j · U_jk      for k > j          (OBS update, eq. 3)
  with GPTQ's lazy block updates (blocks of `blocksize` columns).  Joint
  quantization (bits < 16, paper §3.5): the grid of each row is fit on the
  dense W before the sweep (as the reference code), and every kept weight is
  rounded to it in the same sweep, so the OBS update compensates pruning and
  rounding together.
  Ties: the smallest ε are chosen by a stable sort (lower index pruned first).
  The reference code prunes every weight <= the k-th smallest ε (k+1 or more on
  ties); refq prunes exactly k.

Dead inputs (H_jj = 0): SparseGPT sets H_jj = 1 and W[:, j] = 0 (as GPTQ);
Wanda scores them 0, so they are pruned first.

Stored as format "slim" (refq.formats.slim): the kept values (fp16 or codes)
plus their positions: 2 bits per kept value for 2:4 (1 bit per weight), a 1-bit
mask for unstructured.  bits_per_weight for 2:4 fp16: 16/2 + 2/2 = 9.
"""

import time

import numpy as np
from numba import njit

from refq.errors import RefqError
from refq.formats.slim import SlimWeight
from refq.methods.gptq_skeleton import obs_update, prepare, sweep
from refq.methods.rtn import find_params
from refq.options import BITS, BLOCKSIZE, PERCDAMP, SYM, Option, defaults, no_effect
from refq.numeric import layer_loss

SPARSITY = Option("sparsity", "float", "2:4", "'2:4' (2 of every 4 consecutive inputs kept), "
                  "or the fraction p of each row's weights pruned", range="(0, 1)",
                  also={"2:4": "2:4"})
OPTIONS = (
    SPARSITY,
    BITS.but(default=16, also={16: 16},
             help="bits of the kept weights (a min-max grid per row); 16: kept in fp16"),
    SYM.but(help=SYM.help + "; with --bits below 16"),
)
SPARSEGPT_OPTIONS = OPTIONS + (PERCDAMP, BLOCKSIZE)
DEFAULTS = defaults(OPTIONS)
SPARSEGPT_DEFAULTS = defaults(SPARSEGPT_OPTIONS)


# ---------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------
def parse_sparsity(v):
    """A validated `sparsity` -> ("2:4", 0.5) or ("unstructured", p)."""
    return ("2:4", 0.5) if v == "2:4" else ("unstructured", float(v))


def validate(opts, given=()):
    """Checks across options (refq.api.validate_options calls it; `given`: the
    options set explicitly on the command line). -> error text or None."""
    return no_effect(given, ["sym"], opts["bits"] != 16, "the kept weights are quantized "
                     "(--bits below 16)")


def validate_sparsegpt(opts, given=()):
    if opts["sparsity"] == "2:4" and opts["blocksize"] % 4:
        return f"blocksize must be a multiple of 4 for 2:4 sparsity, got {opts['blocksize']}"
    return validate(opts, given)


def check_shape(shape, pattern, name=""):
    """2:4 needs in_features divisible by 4 (one-line RefqError otherwise)."""
    if pattern == "2:4" and shape[1] % 4:
        raise RefqError(f"{name or 'weight'}: 2:4 sparsity needs in_features divisible by 4, "
                        f"got shape {tuple(shape)}")


def check_layer_shape(shape, opts, name=""):
    """Method.check_shape: the same check from the options, before any calibration."""
    check_shape(shape, parse_sparsity(opts["sparsity"])[0], name)


# ---------------------------------------------------------------------------
# masks from scores (magnitude, Wanda)
# ---------------------------------------------------------------------------
@njit(cache=True)
def keep_2_of_4(score):
    """score (out, in) float64, in % 4 == 0 -> keep (out, in) bool.

    In every row and every group of 4 consecutive columns, keep the 2 largest
    scores; a tie keeps the lower column index.
    """
    out, n = score.shape
    keep = np.zeros((out, n), dtype=np.bool_)
    for r in range(out):
        for c0 in range(0, n, 4):
            # the best and second best column of the group (strict > keeps the first of a tie)
            a = c0
            for c in range(c0 + 1, c0 + 4):
                if score[r, c] > score[r, a]:
                    a = c
            b = -1
            for c in range(c0, c0 + 4):
                if c != a and (b < 0 or score[r, c] > score[r, b]):
                    b = c
            keep[r, a] = True
            keep[r, b] = True
    return keep


def keep_per_row(score, p):
    """score (out, in) -> keep (out, in) bool: prune the int(p * in) smallest per row (stable)."""
    out, n = score.shape
    k = int(p * n)
    order = np.argsort(score, axis=1, kind="stable")          # (out, in) ascending
    keep = np.ones((out, n), dtype=bool)
    np.put_along_axis(keep, order[:, :k], False, axis=1)
    return keep


def mask_from_scores(score, pattern, p):
    if pattern == "2:4":
        return keep_2_of_4(np.ascontiguousarray(score, dtype=np.float64))
    return keep_per_row(score, p)


def magnitude_mask(W, pattern, p):
    """W (out, in) -> keep (out, in) bool by |W_ij|."""
    return mask_from_scores(np.abs(W), pattern, p)


def wanda_scores(W, H):
    """|W_ij| · sqrt(H_jj)  (Wanda eq. 1 with ‖X_j‖ ∝ sqrt(H_jj)).  -> (out, in) float64."""
    xnorm = np.sqrt(np.maximum(np.diag(H), 0.0))               # (in,)
    return np.abs(W) * xnorm[None, :]


def wanda_mask(W, H, pattern, p):
    return mask_from_scores(wanda_scores(W, H), pattern, p)


def row_grid(W, bits, sym, name=""):
    """Min-max grid per row of W (out, in) -> scale (out,), zero (out,) float64."""
    return find_params(W, bits, sym, False, name)


def quantize_on_grid(W, scale, zero, maxq):
    """W (out, in), scale/zero (out,) -> codes (out, in) float64, W_hat (out, in) float64."""
    codes = np.clip(np.rint(W / scale[:, None]) + zero[:, None], 0, maxq)
    return codes, scale[:, None] * (codes - zero[:, None])


# ---------------------------------------------------------------------------
# SparseGPT: numba kernel for the columns of one block (Algorithm 1, inner loop)
# ---------------------------------------------------------------------------
@njit(cache=True)
def _sparsegpt_block(Wt, U, Err, keep_t, codes_t, scale, zero, maxq, quant, choose24,
                     block_start, block_end):
    """Prune (and round) the columns block_start..block_end-1, in place.

    Wt      (n, out) float64  weights, row j = column j of W; updated in place,
                              on return row j holds the stored value of column j
    U       (n, n)   float64  upper Cholesky factor of the damped H^-1
    Err     (B, out) float64  out: (w_j - q_j) / U_jj of the block's columns
    keep_t  (n, out) bool     kept weights; chosen here for 2:4 when choose24,
                              else given (unstructured: chosen per block before)
    codes_t (n, out) uint8    out: codes of the kept weights (quant only)
    scale, zero (out,) float64  grid of each row (quant only)
    """
    out = Wt.shape[1]
    qj = np.empty(out)                                     # (out,) q_j
    for j in range(block_start, block_end):
        if choose24 and j % 4 == 0:
            # ε = w² / U_kk² for the 4 columns of the group; keep the 2 largest (eq. 7)
            for r in range(out):
                a = j
                ea = Wt[j, r] ** 2 / U[j, j] ** 2
                for c in range(j + 1, j + 4):
                    e = Wt[c, r] ** 2 / U[c, c] ** 2
                    if e > ea:
                        a, ea = c, e
                b = -1
                eb = 0.0
                for c in range(j, j + 4):
                    e = Wt[c, r] ** 2 / U[c, c] ** 2
                    if c != a and (b < 0 or e > eb):
                        b, eb = c, e
                for c in range(j, j + 4):
                    keep_t[c, r] = (c == a) or (c == b)
        for r in range(out):
            w = Wt[j, r]
            q = 0.0                                        # pruned: q = 0
            if keep_t[j, r]:
                q = w
                if quant:                                  # kept: round to the row's grid
                    c = np.rint(w / scale[r]) + zero[r]
                    if c < 0.0:
                        c = 0.0
                    elif c > maxq:
                        c = float(maxq)
                    codes_t[j, r] = np.uint8(c)
                    q = scale[r] * (c - zero[r])
            qj[r] = q
        obs_update(Wt, U, Err, qj, j, block_start, block_end)   # err_j, W[:, k>j] (eq. 3, GPTQ eq. 5)


def sparsegpt_prune(W, H, pattern, p, percdamp=0.01, blocksize=128, grid=None,
                    keep=None, name=""):
    """SparseGPT sweep.

    W (out, in) float64, H (in, in) float64 (mean x xᵀ).
    grid: None (kept values left in float) or (scale (out,), zero (out,), bits)
    keep: None (the mask is chosen by the sweep) or a fixed keep mask (out, in) bool
          (then only the OBS compensation runs; used by SLiM's refit)
    -> dict(W_c (out, in) float64, keep (out, in) bool, codes (out, in) uint8 or None,
            percdamp_used, retries, dead)
    """
    out, n = W.shape
    prep = prepare(W, H, percdamp, False, name or "sparsegpt")   # dead inputs, U, Wt = Wᵀ
    Wt, U = prep.Wt, prep.U                                      # (n, out), (n, n)

    quant = grid is not None
    if quant:
        scale, zero, bits = grid
        scale = np.ascontiguousarray(scale, dtype=np.float64)
        zero = np.ascontiguousarray(zero, dtype=np.float64)
        maxq = 2 ** bits - 1
    else:
        scale = zero = np.zeros(out)
        maxq = 0
    fixed = keep is not None
    keep_t = (np.ascontiguousarray(keep.T) if fixed else np.ones((n, out), dtype=np.bool_))
    codes_t = np.zeros((n, out), dtype=np.uint8)                  # (n, out)
    diagU = np.diag(U)

    def start_block(b0, b1):
        if not fixed and pattern != "2:4":
            # adaptive mask selection for the whole block: prune the k smallest ε
            eps = (Wt[b0:b1] / diagU[b0:b1, None]) ** 2          # (B, out)
            k = int(p * eps.size)
            flat = np.argsort(eps.T.reshape(-1), kind="stable")[:k]   # row-major (out, B) order
            blk = np.ones(eps.T.shape, dtype=np.bool_)           # (out, B)
            blk.reshape(-1)[flat] = False
            keep_t[b0:b1] = blk.T

    def quantize_columns(j0, j1, b0, b1, Err):
        _sparsegpt_block(Wt, U, Err, keep_t, codes_t, scale, zero, maxq, quant,
                         (not fixed) and pattern == "2:4", b0, b1)

    sweep(Wt, U, blocksize, quantize_columns, start_block=start_block)
    return {"W_c": np.ascontiguousarray(Wt.T), "keep": np.ascontiguousarray(keep_t.T),
            "codes": np.ascontiguousarray(codes_t.T) if quant else None,
            "percdamp_used": float(prep.percdamp_used), "retries": int(prep.retries),
            "dead": int(prep.dead.sum())}


# ---------------------------------------------------------------------------
# the methods
# ---------------------------------------------------------------------------
def _pack(W, H, opts, name, method, keep, W_c, codes, scale, zero, info, tick):
    pattern, _ = parse_sparsity(opts["sparsity"])
    bits = opts["bits"]
    qw = SlimWeight.from_parts(
        W.shape, pattern, keep, values=W_c if bits == 16 else None,
        codes=codes if bits < 16 else None, bits=bits,
        grid=None if bits == 16 else "row", sym=opts["sym"], scales=scale, zeros=zero,
        method=method, options=opts, info=dict(info, name=name))
    qw.info["loss"] = layer_loss(W, qw.dequantize(), H) if H is not None else None
    qw.info["seconds"] = time.perf_counter() - tick
    return qw


def _prune_then_round(W, H, opts, name, method, keep, tick):
    """Magnitude / Wanda: zero the pruned weights; round the kept ones if bits < 16."""
    bits = opts["bits"]
    if bits == 16:
        return _pack(W, H, opts, name, method, keep, W * keep, None, None, None, {}, tick)
    # the grid of each row is fit on its kept values only (pruned ones are 0 and need no grid)
    kept = np.where(keep, W, 0.0)
    scale, zero = _kept_row_grid(W, keep, bits, opts["sym"], name)
    codes, W_hat = quantize_on_grid(kept, scale, zero, 2 ** bits - 1)
    return _pack(W, H, opts, name, method, keep, W_hat * keep, codes * keep, scale, zero, {}, tick)


def _kept_row_grid(W, keep, bits, sym, name):
    """Min-max grid per row over the kept weights (0 included in the range, as GPTQ)."""
    lo = np.where(keep, W, np.inf).min(axis=1)
    hi = np.where(keep, W, -np.inf).max(axis=1)
    lo = np.where(np.isfinite(lo), lo, 0.0)
    hi = np.where(np.isfinite(hi), hi, 0.0)
    return find_params(np.stack([lo, hi], axis=1), bits, sym, False, name)


def prune_magnitude(W, H, opts, name=""):
    """W (out, in) float64; H optional (only for the loss in info). -> SlimWeight."""
    tick = time.perf_counter()
    pattern, p = parse_sparsity(opts["sparsity"])
    check_shape(W.shape, pattern, name)
    return _prune_then_round(W, H, opts, name, "magnitude", magnitude_mask(W, pattern, p), tick)


def prune_wanda(W, H, opts, name=""):
    """W (out, in) float64, H (in, in) float64. -> SlimWeight."""
    tick = time.perf_counter()
    pattern, p = parse_sparsity(opts["sparsity"])
    check_shape(W.shape, pattern, name)
    return _prune_then_round(W, H, opts, name, "wanda", wanda_mask(W, H, pattern, p), tick)


def prune_sparsegpt(W, H, opts, name=""):
    """W (out, in) float64, H (in, in) float64. -> SlimWeight."""
    tick = time.perf_counter()
    pattern, p = parse_sparsity(opts["sparsity"])
    check_shape(W.shape, pattern, name)
    bits = opts["bits"]
    grid = None
    scale = zero = None
    if bits < 16:                        # grid per row, fit on the dense W before the sweep
        scale, zero = row_grid(W, bits, opts["sym"], name)
        grid = (scale, zero, bits)
    res = sparsegpt_prune(W, H, pattern, p, opts["percdamp"], opts["blocksize"], grid, name=name)
    info = {"percdamp_used": res["percdamp_used"], "damping_retries": res["retries"],
            "dead_inputs": res["dead"]}
    return _pack(W, H, opts, name, "sparsegpt", res["keep"], res["W_c"], res["codes"],
                 scale, zero, info, tick)
