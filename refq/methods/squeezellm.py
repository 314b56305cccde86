"""SqueezeLLM: sensitivity-weighted non-uniform quantization, dense-and-sparse.

Kim, Hooper, Gholami, Dong, Li, Shen, Mahoney, Keutzer, "SqueezeLLM:
Dense-and-Sparse Quantization" (ICML 2024, arXiv 2306.07629); reference code
SqueezeAILab/SqueezeLLM quantization/nuq.py (per-row sklearn KMeans with
sample weights), squeezellm/outliers.py, quantization/generate_outlier_config.py.

Objective (paper eq. 4), per output row r, with sensitivities F_rc >= 0:

    min over a table c_r (2^b values) and codes:   Σ_c F_rc (w_rc - c_r[code_rc])²

a weighted 1-D k-means, solved EXACTLY here by dynamic programming
(refq.methods.kmeans1d; the official code runs sklearn's Lloyd iterations,
a local optimum, with random_state 0 and max_iter 50).

Sensitivity (the weight source, pluggable: SENSITIVITY below, option
`sensitivity`).  The paper uses the Fisher diagonal, F_rc = sum over
calibration windows of the squared gradient of the loss w.r.t. W_rc:
sensitivity "fisher" (refq/fisher.py, computed once on the unquantized model
by llama_np's backward pass before quantization).  refq's default "hessian_diag" is
F_rc = H_cc = mean x_c²: the Fisher of the layer's output error under the
assumption that the output gradients are uncorrelated with equal variance
(∂L/∂W_rc = g_r x_c, E[g_r² x_c²] ∝ E[x_c²]); it is constant down a column,
and is also the diagonal of the GPTQ objective tr((W - Ŵ) H (W - Ŵ)ᵀ).  A new
source is one entry of SENSITIVITY: fn(W (out, in), H (in, in), name) -> (out, in) >= 0.

Dense-and-sparse (paper §4.2), both parts optional:
- `outlier_iqr` r: with q1, q3 the quartiles of ALL entries of W and
  t = max(|q1 - r (q3 - q1)|, |q3 + r (q3 - q1)|) (the official
  generate_outlier_config.py, symmetric), every |w| >= t is an outlier.
  r = inf (default) keeps none.
- `sensitive_frac` p: the round(p * out * in) entries of largest sensitivity
  (ties: larger |w| first, then row-major order) are kept too (the official
  `--sensitivity`, there given in percent; here a fraction).
- Outliers are left out of their row's k-means; they are stored in the shared
  additive CSR: S = fp16(w - lut[code]) with code the nearest table entry.

Codes: every entry gets the nearest value of its row's float16 table (the
k-means labels are the nearest centroids already; rounding the table to fp16
can move a boundary, so the codes are recomputed against what is stored).

Stored: format "row_lut" (refq/formats/row_lut.py): b-bit codes, one fp16
table of 2^b entries per row, CSR outliers:
    bits = b + 16 * 2^b / in + 32 (out + 1 + nnz) / (out * in).
"""

import math
import time

import numpy as np

from refq.errors import RefqError
from refq.fisher import fisher_sensitivity
from refq.methods.kmeans1d import kmeans1d, nearest_centroid
from refq.options import BITS, Option, defaults
from refq.formats.row_lut import RowLutWeight
from refq.numeric import layer_loss

SENSITIVITY = {
    # name -> fn(W (out, in) float64, H (in, in) float64, tensor name) -> (out, in) float64 >= 0
    "hessian_diag": lambda W, H, name: np.broadcast_to(np.maximum(np.diag(H), 0.0), W.shape),
    "fisher": fisher_sensitivity,
}

OPTIONS = (
    BITS.but(default=3, help="bits per code (a table of 2^bits fp16 values per row)"),
    Option("outlier_iqr", "float", math.inf, "r: weights beyond the quartiles by r times the "
           "interquartile range are kept as fp16 outliers (inf: none)", range="(0, inf]"),
    Option("sensitive_frac", "float", 0.0, "fraction of the weights of largest sensitivity "
           "kept as fp16 outliers (0: none)", range="[0, 1)"),
    Option("sensitivity", "choice", "hessian_diag", "weights of the per-row k-means",
           choices=tuple(SENSITIVITY)),
)
DEFAULTS = defaults(OPTIONS)


def iqr_outliers(W, r):
    """(out, in) bool: |w| >= max(|q1 - r iqr|, |q3 + r iqr|) over all entries; r = inf: none."""
    if not math.isfinite(r):
        return np.zeros(W.shape, dtype=bool)
    q1, q3 = np.quantile(W, 0.25), np.quantile(W, 0.75)
    t = max(abs(q1 - r * (q3 - q1)), abs(q3 + r * (q3 - q1)))
    return np.abs(W) >= t


def sensitive_outliers(W, F, frac):
    """(out, in) bool: the round(frac * size) entries of largest F (ties: larger |w|, then index)."""
    k = int(round(frac * W.size))
    mask = np.zeros(W.size, dtype=bool)
    if k > 0:
        order = np.lexsort((np.arange(W.size), -np.abs(W).ravel(), -np.asarray(F).ravel()))
        mask[order[:k]] = True
    return mask.reshape(W.shape)


def quantize_squeezellm(W, H, opts, name=""):
    """W (out, in) float64, H (in, in) float64 -> RowLutWeight."""
    tick = time.perf_counter()
    bits = opts["bits"]
    k = 2 ** bits
    out, n = W.shape
    F = np.asarray(SENSITIVITY[opts["sensitivity"]](W, H, name), dtype=np.float64)   # (out, n)
    if F.shape != W.shape or not np.all(np.isfinite(F)) or np.any(F < 0):
        raise RefqError(f"{name or 'squeezellm'}: sensitivity {opts['sensitivity']!r} "
                        f"is not a finite (out, in) array >= 0")
    M = iqr_outliers(W, opts["outlier_iqr"]) | sensitive_outliers(W, F, opts["sensitive_frac"])

    lut = np.empty((out, k))                            # (out, 2^b)
    codes = np.empty((out, n), dtype=np.uint8)          # (out, n)
    for r in range(out):                                # one weighted k-means per row (eq. 4)
        keep = ~M[r] if not M[r].all() else np.ones(n, dtype=bool)
        cents, _ = kmeans1d(W[r, keep], k, weights=F[r, keep], what=f"{name or 'squeezellm'} row {r}")
        lut[r] = np.sort(cents.astype(np.float16).astype(np.float64))
        codes[r] = nearest_centroid(W[r], lut[r])
    dense = np.take_along_axis(lut, codes.astype(np.int64), axis=1)    # (out, n)
    S = np.where(M, W - dense, 0.0)                     # additive outliers (fp16 in the CSR)
    info = {"name": name, "outliers_iqr": int(iqr_outliers(W, opts["outlier_iqr"]).sum())}
    qw = RowLutWeight.from_codes(codes, lut, bits, S=S if M.any() else None,
                                 options=opts, info=info)
    qw.info["outliers"] = qw.outliers.nnz
    qw.info["seconds"] = time.perf_counter() - tick
    if H is not None:
        qw.info["loss"] = layer_loss(W, qw.dequantize(), H)
    return qw
