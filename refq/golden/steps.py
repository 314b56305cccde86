"""The steps tier: deterministic sub-steps of each method, teacher-forced.

Every step gets refq's state at that point as its input (stored in the suite),
so a rounding difference earlier in a port cannot cascade into it.  A port
implements a step as a function named `step_<kind>` taking the step's inputs
and parameters as keyword arguments and returning a dict of its outputs.

Each KIND below says what its inputs and outputs are (shapes, order, the
convention a port must follow), how refq computes the reference (with refq's
own functions), and how a port's answer is judged (the tolerance and why).

The inputs are recorded by trace_<method>: a plain-numpy replay of refq's
algorithm that calls refq's sub-step functions and records the state at a few
points.  tests/test_golden.py checks that each replay reproduces refq's full
result bit for bit, so the recorded states are refq's.
"""
import numpy as np

from refq.golden.spec import U32

# refq internals the steps call (their current public names; see GOLDEN.md)
from refq.methods.gptq import inverse_cholesky
from refq.methods.rtn import find_params, quantize_codes, dequantize_codes
from refq.numeric import fp16


# ============================================================================ helpers
def _refq_function(name, *modules):
    """refq's function `name` from the first of `modules` that has it (a sub-step may move
    between modules when the method files are reorganized; results stay bit-identical)."""
    import importlib
    for m in modules:
        try:
            fn = getattr(importlib.import_module(m), name, None)
        except ImportError:
            continue
        if fn is not None:
            return fn
    raise ImportError(f"refq has no {name} in {', '.join(modules)}")


def _msg(ok, text):
    return {"ok": bool(ok), "msg": text}


def _arr(d, name, shape=None, kind=None):
    """Fetch output `name` of a port's answer as an array, checking its shape."""
    if name not in d:
        raise StepMismatch(f"output {name!r} not returned")
    a = np.asarray(d[name])
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise StepMismatch(f"output {name!r}: shape {tuple(a.shape)}, expected {tuple(shape)}")
    if kind == "int" and a.dtype.kind not in "biu":
        if a.dtype.kind != "f" or not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise StepMismatch(f"output {name!r}: not integers ({a.dtype})")
    if kind == "float" and a.dtype.kind not in "fiu":
        raise StepMismatch(f"output {name!r}: not numbers ({a.dtype})")
    return a


class StepMismatch(Exception):
    """A port's answer to a step has the wrong form (missing output, shape, dtype)."""


def _near_half(t, margin):
    """Entries of t within `margin` of a rounding boundary k + 1/2 (either code is correct)."""
    return np.abs(np.abs(t - np.floor(t)) - 0.5) <= margin


def _worst(err, bound):
    bad = err > bound
    return int(np.count_nonzero(bad)), float(np.max(err)) if err.size else 0.0


# ============================================================================ kinds
class Kind:
    """One sub-step: name, documentation, reference and judge."""
    name = ""
    doc = ""

    def reference(self, inputs, params):       # -> dict outputs, computed by refq
        raise NotImplementedError

    def judge(self, inputs, params, ref, got):  # -> {"ok", "msg", ...}
        raise NotImplementedError


class DampedInverseCholesky(Kind):
    name = "damped_inverse_cholesky"
    doc = ("GPTQ/CLAQ/SparseGPT: H (n, n) float64 (= mean x xᵀ, dead channels already set to "
           "H_jj = 1, columns already in processing order), percdamp -> U (n, n): the upper "
           "Cholesky factor of (H + percdamp * mean(diag H) * I)^-1, i.e. Hd^-1 = Uᵀ U.  "
           "(GPTQ's reference code scales H by 2/n sum x xᵀ = 2 H: its U is this one / sqrt 2.)")

    def reference(self, inputs, params):
        U, _, _ = inverse_cholesky(inputs["H"], params["percdamp"])
        return {"U": U}

    def judge(self, inputs, params, ref, got):
        U = _arr(got, "U", ref["U"].shape, "float").astype(np.float64)
        R = ref["U"]
        n = R.shape[0]
        # Cholesky forward error: ||dU||_F / ||U||_F <= c n u cond for inputs rounded to
        # float32 (u = 2^-24) and float32 arithmetic, cond = that of the diagonally scaled
        # damped Hessian (params["cond"]); c = 4.
        tol = 4 * n * U32 * params["cond"]
        rel = float(np.linalg.norm(U - R) / np.linalg.norm(R))
        lower = float(np.max(np.abs(np.tril(U, -1)))) if n > 1 else 0.0
        ok = rel <= tol and lower <= tol * float(np.max(np.abs(R)))
        return dict(_msg(ok, f"U: relative Frobenius error {rel:.3g} (tolerance {tol:.3g} = "
                             f"4 n 2^-24 cond(D^-1/2 Hd D^-1/2))" + ("" if lower == 0 else
                                                      f", below-diagonal max {lower:.3g}")),
                    err=rel, tol=tol)


class UniformGrid(Kind):
    name = "uniform_grid"
    doc = ("RTN/GPTQ: the grid of one group.  W (out, m) float64: the weights from the group's "
           "first column on (GPTQ: processing order, already updated by every earlier column); "
           "the group is the first min(group_size, m) columns (group_size None: all m).  "
           "bits, sym, mse -> scale (out,), zero (out,).  Min-max with 0 in the range (an all-0 "
           "row uses [-1, 1]); sym: xmax = max(|xmin|, xmax), xmin = -xmax if xmin < 0; "
           "scale = (xmax - xmin) / (2^bits - 1) ROUNDED TO FLOAT16 (the stored value) before "
           "zero = round_half_even(-xmin / scale) clipped to [0, 2^bits - 1] (sym: 2^(bits-1)).  "
           "mse: GPTQ's clipping search over p = 1 - i/100, i < 80, keeping the p with the "
           "smallest sum |W_hat - w|^2.4 (the first on ties).")

    def reference(self, inputs, params):
        W = inputs["W"]
        g = params["group_size"] or W.shape[1]
        s, z = find_params(W[:, :g], params["bits"], params["sym"], params["mse"])
        return {"scale": s, "zero": z}

    def judge(self, inputs, params, ref, got):
        out = ref["scale"].shape[0]
        s = _arr(got, "scale", (out,), "float").astype(np.float64).reshape(out)
        z = _arr(got, "zero", (out,), "float").astype(np.float64).reshape(out)
        rs, rz = ref["scale"], ref["zero"]
        maxq = 2 ** params["bits"] - 1
        W = inputs["W"][:, :params["group_size"] or inputs["W"].shape[1]]
        if params["mse"]:
            # judged by the search's own objective: the port's grid must be as good as refq's
            def err(sc, zc):
                q = dequantize_codes(quantize_codes(W, sc, zc, maxq), sc, zc)
                return np.sum(np.abs(q - W) ** 2.4, axis=1)
            e_got, e_ref = err(np.maximum(s, 1e-300), z), err(rs, rz)
            bound = e_ref * (1 + 2.0 ** -10) + 1e-300
            n_bad, _ = _worst(e_got - e_ref, bound - e_ref)
            return dict(_msg(n_bad == 0, f"{n_bad} of {out} rows have a grid with a larger "
                                         f"sum |W_hat - w|^2.4 than refq's (by more than 2^-10 "
                                         f"relative)"), n_bad=n_bad)
        # scale: exactly the float16 value refq stores, unless the unrounded range / maxq sits
        # within float32 rounding of a float16 rounding boundary (then either neighbour)
        xmin = np.minimum(W.min(axis=1), 0.0)
        xmax = np.maximum(W.max(axis=1), 0.0)
        if params["sym"]:
            xmax = np.maximum(np.abs(xmin), xmax)
            xmin = np.where(xmin < 0, -xmax, xmin)
        both0 = (xmin == 0) & (xmax == 0)
        xmin, xmax = np.where(both0, -1.0, xmin), np.where(both0, 1.0, xmax)
        raw = (xmax - xmin) / maxq
        ulp16 = np.spacing(rs.astype(np.float16)).astype(np.float64)
        mid = np.where(raw >= rs, rs + ulp16 / 2, rs - ulp16 / 2)      # nearest f16 boundary
        amb_s = np.abs(raw - mid) <= 8 * U32 * raw
        ds = np.abs(s - rs)
        bad_s = (ds > 0) & ~(amb_s & (ds <= ulp16 * 1.0001))
        # zero: exact unless the scale differs or -xmin/scale sits on a rounding boundary
        amb = _near_half(-xmin / rs, 8 * U32 * (np.abs(xmin / rs) + 1)) | (ds > 0)
        bad_z = (z != rz) & ~(amb & (np.abs(z - rz) <= 1))
        n_s, n_z = int(bad_s.sum()), int(bad_z.sum())
        parts = []
        if n_s:
            r = int(np.flatnonzero(bad_s)[0])
            parts.append(f"scale is not refq's float16 value in {n_s} of {out} rows (row {r}: "
                         f"{s[r]:.8g}, expected {rs[r]:.8g}; the scale must be rounded to "
                         "float16 before the zero and the codes are chosen)")
        if n_z:
            r = int(np.flatnonzero(bad_z)[0])
            parts.append(f"zero differs in {n_z} of {out} rows (row {r}: {z[r]:g}, "
                         f"expected {rz[r]:g})")
        return dict(_msg(not parts, "; ".join(parts) or
                         f"scale and zero equal in {out} rows"),
                    n_bad=n_s + n_z)


class UniformCodes(Kind):
    name = "uniform_codes"
    doc = ("RTN/GPTQ: the codes of columns given their grid.  W (out, m) float64, scale (out,), "
           "zero (out,), bits -> codes (out, m) integers = clip(round_half_even(W / scale) + "
           "zero, 0, 2^bits - 1), with the stored float16 scale.  An entry whose W / scale lies "
           "within float32 rounding of a boundary k + 1/2 may take either code.")

    def reference(self, inputs, params):
        return {"codes": quantize_codes(inputs["W"], inputs["scale"], inputs["zero"],
                                        2 ** params["bits"] - 1)}

    def judge(self, inputs, params, ref, got):
        R = ref["codes"]
        C = _arr(got, "codes", R.shape, "int").astype(np.float64)
        t = inputs["W"] / inputs["scale"][:, None]
        amb = _near_half(t, 8 * U32 * (np.abs(t) + 1))
        maxq = 2 ** params["bits"] - 1
        alt = np.clip(np.where(t - np.floor(t) >= 0.5, np.floor(t), np.floor(t) + 1)
                      + inputs["zero"][:, None], 0, maxq)
        bad = (C != R) & ~(amb & (C == alt))
        n = int(bad.sum())
        if n:
            r, c = map(int, np.argwhere(bad)[0])
            return dict(_msg(False, f"{n} of {R.size} codes differ (first at [{r}, {c}]: "
                                    f"{C[r, c]:g}, expected {R[r, c]:g}); {int(amb.sum())} "
                                    f"entries on a rounding boundary were free"), n_bad=n)
        return dict(_msg(True, f"{R.size} codes equal ({int(amb.sum())} on a rounding "
                               f"boundary, either code accepted)"), n_bad=0)


def block_update(W, U, codes, scale, zero):
    """GPTQ's lazy-batch block (paper eq. 4-5), codes given.  W (out, m) columns from the block
    start, U (B, m) the block's rows of U from the block start, codes/scale/zero (out, B)
    -> Err (out, B), W_rest (out, m - B).  The same float64 operations, in the same order,
    as refq.methods.gptq's numba loop (tests/test_golden.py checks the replay)."""
    Wt = np.array(W.T, dtype=np.float64)               # (m, out): column j = row j
    B = codes.shape[1]
    Err = np.zeros((B, W.shape[0]))
    for j in range(B):
        q = scale[:, j] * (codes[:, j] - zero[:, j])   # the stored value of column j
        Err[j] = (Wt[j] - q) / U[j, j]                 # err_j = (w_j - q_j) / U_jj   (eq. 5)
        Wt[j + 1:B] -= np.outer(U[j, j + 1:B], Err[j])  # W[:, k] -= err_j U_jk, k in the block
    rest = Wt[B:] - U[:, B:].T @ Err                   # the columns after the block (eq. 4)
    return Err.T.copy(), rest.T.copy()


class GptqBlockUpdate(Kind):
    name = "gptq_block_update"
    doc = ("GPTQ: one block of the error feedback, the block's codes given.  W (out, m) float64: "
           "the processing-order columns from the block start to the end, as refq holds them "
           "when the block starts; U (B, m): rows of U for the block's columns, from the block "
           "start; codes, scale, zero (out, B): each block column's code and grid -> Err (out, B) "
           "with Err[:, j] = (w_j - scale_j (codes_j - zero_j)) / U[j, j], w_j updated by the "
           "block's earlier columns (w_k -= Err[:, j] U[j, k]); W_rest (out, m - B) = "
           "W[:, B:] - Err @ U[:, B:].")

    def reference(self, inputs, params):
        Err, rest = block_update(inputs["W"], inputs["U"], inputs["codes"], inputs["scale"],
                                 inputs["zero"])
        return {"Err": Err, "W_rest": rest}

    def judge(self, inputs, params, ref, got):
        W, U = inputs["W"], inputs["U"]
        out, B = ref["Err"].shape
        Eg = _arr(got, "Err", ref["Err"].shape, "float").astype(np.float64)
        Rg = _arr(got, "W_rest", ref["W_rest"].shape, "float").astype(np.float64)
        # error bound propagated through the recurrence (float32 inputs and arithmetic):
        # d_j = (c u (j+2) M_j + sum_{i<j} d_i |U_ij|) / |U_jj|, M_j = |w_j| + |q_j| + sum |Err_i U_ij|
        q = inputs["scale"] * (inputs["codes"] - inputs["zero"])
        aU = np.abs(U)
        aE = np.abs(ref["Err"])
        d = np.zeros((out, B))
        c = 4 * U32
        for j in range(B):
            M = np.abs(W[:, j]) + np.abs(q[:, j]) + aE[:, :j] @ aU[:j, j]
            d[:, j] = (c * (j + 2) * M + d[:, :j] @ aU[:j, j]) / aU[j, j]
        dR = c * (B + 2) * (np.abs(W[:, B:]) + aE @ aU[:, B:]) + d @ aU[:, B:]
        parts = []
        for nm, got_a, ref_a, tol in (("Err", Eg, ref["Err"], d), ("W_rest", Rg, ref["W_rest"], dR)):
            err = np.abs(got_a - ref_a)
            bad = ~(err <= tol)
            if bad.any():
                r, k = map(int, np.argwhere(bad)[0])
                parts.append(f"{nm}: {int(bad.sum())} of {bad.size} values outside the propagated "
                             f"float32 error bound (first [{r}, {k}]: {got_a[r, k]:.6g}, expected "
                             f"{ref_a[r, k]:.6g}, bound {tol[r, k]:.3g})")
        return dict(_msg(not parts, "; ".join(parts) or "Err and W_rest within the propagated "
                                                         "float32 error bound"))


class Kmeans1d(Kind):
    name = "kmeans1d"
    doc = ("CLAQ: the EXACT 1-D k-means of a column (global optimum, e.g. by dynamic programming "
           "over the sorted values; Lloyd's algorithm is not enough).  x (m,) float64: the values "
           "the centroids are fit on (CLAQ: the current, error-updated column, without its "
           "reserved outliers when or_fit = after), k -> centroids (k,) ascending (fewer than k "
           "distinct values: each one, then the largest repeated), cost = sum (x - nearest)^2.  "
           "CLAQ then rounds the centroids to float16 before choosing codes.")

    def reference(self, inputs, params):
        from refq.methods.kmeans1d import kmeans1d, kmeans_cost
        c, lab = kmeans1d(inputs["x"], int(params["k"]))
        return {"centroids": c, "cost": np.array(kmeans_cost(inputs["x"], c, lab))}

    def judge(self, inputs, params, ref, got):
        from refq.methods.kmeans1d import nearest_centroid
        k = int(params["k"])
        x = inputs["x"]
        c = np.sort(_arr(got, "centroids", (k,), "float").astype(np.float64))
        cost = float(np.sum((x - c[nearest_centroid(x, c)]) ** 2))
        rc = float(ref["cost"])
        # at the optimum the cost is stationary in the centroids: centroids off by
        # delta <= 8 m u max|x| (float32 means) add at most m delta^2; a float32 DP compares
        # costs to about m u sum (x - mean)^2.
        m = x.size
        delta = 8 * m * U32 * float(np.max(np.abs(x)))
        tol = m * delta ** 2 + 4 * m * U32 * float(np.sum((x - x.mean()) ** 2)) * 1e-3 + 1e-300
        dc = float(np.max(np.abs(c - ref["centroids"])))
        ok = cost <= rc + tol
        return dict(_msg(ok, f"cost {cost:.9g} vs refq's optimum {rc:.9g} (tolerance +{tol:.3g}); "
                             f"max centroid difference {dc:.3g}"),
                    err=cost - rc, tol=tol)


class ClaqAllocateBits(Kind):
    name = "claq_allocate_bits"
    doc = ("CLAQ adaptive precision: scores (in,) int (outlier score of each column, s_j = "
           "#{r: |W_rj| >= t mean|W|}), bits (average) -> column_bits (in,): b in [2,3): "
           "the top round((b-2)/2 * in) columns by score get 4 bits, the rest 2; b in [3,4]: the "
           "top round((b-3) * in) get 4, the rest 3.  Ranked by decreasing score, ties by "
           "increasing column index; round = floor(x + 1/2).")

    def reference(self, inputs, params):
        from refq.methods.claq import allocate_bits
        return {"column_bits": allocate_bits(inputs["scores"], params["bits"])}

    def judge(self, inputs, params, ref, got):
        R = ref["column_bits"]
        C = _arr(got, "column_bits", R.shape, "int")
        n = int(np.count_nonzero(C != R))
        return dict(_msg(n == 0, f"{n} of {R.size} column widths differ" if n else
                         f"{R.size} column widths equal"))


class ClaqOutliers(Kind):
    name = "claq_outliers"
    doc = ("CLAQ outlier reservation: w (out,) float64 the current column, n_res -> reserved "
           "(out,) bool: the n_res smallest and the n_res largest values (stable order: ties "
           "by row index).")

    def reference(self, inputs, params):
        w, n_res = inputs["w"], int(params["n_res"])
        order = np.argsort(w, kind="mergesort")
        res = np.zeros(w.size, bool)
        res[order[:n_res]] = True
        res[order[w.size - n_res:]] = True
        return {"reserved": res}

    def judge(self, inputs, params, ref, got):
        R = ref["reserved"]
        C = _arr(got, "reserved", R.shape).astype(bool)
        n = int(np.count_nonzero(C != R))
        return dict(_msg(n == 0, f"{n} of {R.size} rows differ in the reserved set" if n else
                         f"reserved set equal ({int(R.sum())} rows)"))


class AqlmCodebooks(Kind):
    name = "aqlm_codebooks"
    doc = ("AQLM step 1: codebooks given codes and scales, by least squares.  W (out, in), "
           "H (in, in), scales (out,), codes (out, K, M) int, codebooks (M, 2^B, g) the current "
           "ones -> codebooks (M, 2^B, g) minimizing trace((W - W_hat) H (W - W_hat)ᵀ) with "
           "W_hat[r, k g:(k+1) g] = scales[r] sum_m codebooks[m, codes[r, k, m]] (refq adds a "
           "proximal term 1e-10 mean(diag A) ||C - C_old||^2, negligible).  Judged by the "
           "objective, not element by element (the minimizer need not be unique).")

    def reference(self, inputs, params):
        solve_codebooks = _refq_function("solve_codebooks", "refq.methods.aqlm",
                                         "refq.methods.aqlm_codebooks")
        C, _ = solve_codebooks(inputs["W"], inputs["H"], inputs["scales"],
                               inputs["codes"].astype(np.int64), inputs["codebooks"], "direct")
        return {"codebooks": C}

    @staticmethod
    def reconstruct(inp, C):
        codes = inp["codes"].astype(np.int64)
        out, K, M = codes.shape
        g = C.shape[2]
        Z = np.zeros((out, K, g))
        for m in range(M):
            Z += C[m][codes[:, :, m]]
        return inp["scales"][:, None] * Z.reshape(out, K * g)

    def objective(self, inp, C):
        E = inp["W"] - self.reconstruct(inp, C)
        return float(np.sum((E @ inp["H"]) * E))

    def judge(self, inputs, params, ref, got):
        from refq.golden.spec import loss_tolerance
        R = ref["codebooks"]
        C = _arr(got, "codebooks", R.shape, "float").astype(np.float64)
        lg, lr = self.objective(inputs, C), self.objective(inputs, R)
        # a float32 solution is at best a few ulps from the optimum: W_hat within
        # tau = 16 u |W_hat| moves the objective by at most loss_tolerance(tau)
        Wr = self.reconstruct(inputs, R)
        tol = loss_tolerance(inputs["W"], Wr, inputs["H"], 16 * U32 * np.abs(Wr))
        return dict(_msg(lg <= lr + tol, f"objective {lg:.9g} vs refq's {lr:.9g} (tolerance "
                                         f"+{tol:.3g})"), err=lg - lr, tol=tol)


def _judge_2of4(score, R, C):
    """keep masks (out, n) bool, groups of 4 columns: exactly 2 kept per group; equal to refq's
    except where the scores of a kept and a dropped weight are within float32 rounding."""
    out, n = R.shape
    G = n // 4
    Rg, Cg = R.reshape(out, G, 4), C.reshape(out, G, 4)
    sg = score.reshape(out, G, 4)
    two = Cg.sum(axis=2) == 2
    diff = np.any(Rg != Cg, axis=2)
    # a differing group is fine when the port's 2nd kept score ties refq's 2nd kept score
    kept_min = lambda K: np.min(np.where(K, sg, np.inf), axis=2)     # noqa: E731
    tie = np.abs(kept_min(Cg) - kept_min(Rg)) <= 8 * U32 * np.max(sg, axis=2)
    bad = ~two | (diff & ~tie)
    nb = int(bad.sum())
    if nb:
        r, g = map(int, np.argwhere(bad)[0])
        return _msg(False, f"{nb} of {out * G} groups of 4 differ (first: row {r}, columns "
                           f"{4 * g}..{4 * g + 3}: kept {np.flatnonzero(Cg[r, g]).tolist()}, "
                           f"expected {np.flatnonzero(Rg[r, g]).tolist()})")
    return _msg(True, f"{out * G} groups of 4 equal ({int((diff & tie).sum())} ties)")


class WandaMask2of4(Kind):
    name = "wanda_mask_2of4"
    doc = ("Wanda 2:4: W (out, in), H (in, in) -> keep (out, in) bool: score |W_rc| sqrt(H_cc) "
           "(Wanda eq. 1 with ||X_c|| proportional to sqrt(H_cc)); in every row and every group "
           "of 4 consecutive columns keep the 2 largest scores, a tie keeps the lower column.")

    def reference(self, inputs, params):
        from refq.methods.sparsity import wanda_mask
        return {"keep": wanda_mask(inputs["W"], inputs["H"], "2:4", 0.5)}

    def judge(self, inputs, params, ref, got):
        from refq.methods.sparsity import wanda_scores
        C = _arr(got, "keep", ref["keep"].shape).astype(bool)
        return _judge_2of4(wanda_scores(inputs["W"], inputs["H"]), ref["keep"], C)


class SparsegptMask2of4(Kind):
    name = "sparsegpt_mask_2of4"
    doc = ("SparseGPT 2:4, one group: W (out, 4) the group's 4 columns as the sweep holds them "
           "when it reaches the group (updated by every earlier column), d (4,) their diagonal "
           "entries of U -> keep (out, 4) bool: the 2 largest w^2 / d^2 per row (SparseGPT eq. 7), "
           "a tie keeps the lower column.")

    def reference(self, inputs, params):
        from refq.methods.sparsity import keep_2_of_4
        score = inputs["W"] ** 2 / inputs["d"][None, :] ** 2
        return {"keep": keep_2_of_4(np.ascontiguousarray(score))}

    def judge(self, inputs, params, ref, got):
        C = _arr(got, "keep", ref["keep"].shape).astype(bool)
        return _judge_2of4(inputs["W"] ** 2 / inputs["d"][None, :] ** 2, ref["keep"], C)


class WeightedKmeans1d(Kmeans1d):
    name = "weighted_kmeans1d"
    doc = ("SqueezeLLM: the EXACT weighted 1-D k-means of a row.  x (m,) the row without its "
           "outliers, weights (m,) >= 0 (the sensitivities, refq: diag H), k -> centroids (k,) "
           "minimizing sum weights (x - nearest)^2 (a port may return them in any order).  "
           "SqueezeLLM then rounds them to float16 and sorts them.")

    def reference(self, inputs, params):
        from refq.methods.kmeans1d import kmeans1d, kmeans_cost
        c, lab = kmeans1d(inputs["x"], int(params["k"]), weights=inputs["weights"])
        return {"centroids": c,
                "cost": np.array(kmeans_cost(inputs["x"], c, lab, inputs["weights"]))}

    def judge(self, inputs, params, ref, got):
        from refq.methods.kmeans1d import nearest_centroid
        k = int(params["k"])
        x, w = inputs["x"], inputs["weights"]
        if not np.any(w > 0):
            w = np.ones_like(x)
        c = np.sort(_arr(got, "centroids", (k,), "float").astype(np.float64))
        cost = float(np.sum(w * (x - c[nearest_centroid(x, c)]) ** 2))
        rc = float(ref["cost"])
        m = x.size
        delta = 8 * m * U32 * float(np.max(np.abs(x)))
        xbar = float(np.sum(w * x) / np.sum(w))
        tol = float(np.sum(w)) * delta ** 2 + 4 * m * U32 * 1e-3 * float(np.sum(w * (x - xbar) ** 2)) \
            + 1e-300
        dc = float(np.max(np.abs(c - ref["centroids"])))
        return dict(_msg(cost <= rc + tol, f"weighted cost {cost:.9g} vs refq's optimum {rc:.9g} "
                                           f"(tolerance +{tol:.3g}); max centroid difference "
                                           f"{dc:.3g}"), err=cost - rc, tol=tol)



class QuanteaseSweep(Kind):
    name = "quantease_sweep"
    doc = ("QuantEase: one cyclic coordinate-descent sweep with the grids fixed.  W (out, n) the "
           "target (W - S; columns in sweep order), H (n, n) in sweep order, W_hat (out, n) the "
           "current grid values, scale, zero (out, n) the grid of each entry, bits -> W_hat "
           "(out, n) after the pass j = 0..n-1: for each column with H_jj > 0, u = W_hat_j + "
           "R_j / H_jj with R = (W - W_hat) H up to date, W_hat_j = scale (clip(round_half_even"
           "(u / scale) + zero, 0, 2^bits - 1) - zero) (QuantEase Lemma 1).  Judged by the "
           "objective f = tr((W - W_hat) H (W - W_hat)ᵀ): a rounding tie flipped by float32 "
           "moves the rest of the sweep, so the codes are compared, not required.")

    def reference(self, inputs, params):
        from refq.methods.quantease import _loss_t, _sweep
        W, H, Wh = inputs["W"], inputs["H"], inputs["W_hat"]
        n, out = W.shape[1], W.shape[0]
        What_t = np.ascontiguousarray(Wh.T.copy())
        sc = np.ascontiguousarray(inputs["scale"].T)           # one "group" per column
        ze = np.ascontiguousarray(inputs["zero"].T)
        codes_t = np.ascontiguousarray(
            np.clip(np.rint(What_t / sc) + ze, 0, 255).astype(np.uint8))
        _, Rt = _loss_t(np.ascontiguousarray(W.T) - What_t, np.ascontiguousarray(H))
        _sweep(What_t, codes_t, Rt, np.ascontiguousarray(H), sc, ze,
               np.arange(n, dtype=np.int64), 2 ** params["bits"] - 1)
        return {"W_hat": What_t.T.copy()}

    @staticmethod
    def objective(inp, Wh):
        E = inp["W"] - Wh
        return float(np.sum((E @ inp["H"]) * E))

    def judge(self, inputs, params, ref, got):
        R = ref["W_hat"]
        G = _arr(got, "W_hat", R.shape, "float").astype(np.float64)
        # every entry must be a point of its grid
        q = (G / inputs["scale"]) + inputs["zero"]
        off = np.abs(q - np.rint(q)) > 1e-3
        lg, lr = self.objective(inputs, G), self.objective(inputs, R)
        band = 2.0 ** -16
        frac = float(np.mean(np.abs(G - R) > 0.5 * inputs["scale"]))
        ok = lg <= lr * (1 + band) + 1e-300 and not off.any()
        extra = f"; {int(off.sum())} entries not on their grid" if off.any() else ""
        return dict(_msg(ok, f"objective {lg:.9g} vs refq's {lr:.9g} (band {band:.3g} relative); "
                             f"{100 * frac:.2f}% of entries on another grid point{extra}"),
                    err=lg - lr)



_AQLM_MODULES = ("refq.methods.aqlm", "refq.methods.aqlm_beam", "refq.methods.aqlm_codebooks")


class AqlmBeamPass(Kind):
    name = "aqlm_beam_pass"
    doc = ("AQLM step 2: one pass of beam search over the codes, codebooks and scales fixed.  "
           "W (out, in), H (in, in), scales (out,), codes (out, K, M) the current codes, "
           "codebooks (M, 2^B, g), group_order (K,), book_order (M,), beam_size -> codes "
           "(out, K, M).  For each row independently: for each group k in group_order and each "
           "codebook m in book_order, every beam tries every code of C_m for (k, m), scored by "
           "the exact objective (w - W_hat) H (w - W_hat)ᵀ; the beam_size best (beam, code) "
           "pairs survive (ties: the current code first, then the lower beam and code); the "
           "result is the best beam at the end.  Judged by the objective (a near-tie broken "
           "the other way by float32 changes the codes, not the quality).")

    def reference(self, inputs, params):
        beam_search = _refq_function("beam_search", *_AQLM_MODULES)
        codebook_quadratics = _refq_function("codebook_quadratics", *_AQLM_MODULES)
        unscaled_rows = _refq_function("unscaled_rows", *_AQLM_MODULES)
        W, H, s = inputs["W"], inputs["H"], inputs["scales"]
        codes = inputs["codes"].astype(np.int64)
        C = inputs["codebooks"]
        Q = codebook_quadratics(H, C, codes.shape[1])
        R = W - s[:, None] * unscaled_rows(codes, C)
        new, _ = beam_search(R, R @ H, H, s, C, Q, codes,
                             inputs["group_order"].astype(np.int64),
                             inputs["book_order"].astype(np.int64), int(params["beam_size"]))
        return {"codes": new.astype(np.int32)}

    def judge(self, inputs, params, ref, got):
        R = ref["codes"]
        Cg = _arr(got, "codes", R.shape, "int").astype(np.int64)
        nc = inputs["codebooks"].shape[1]
        if Cg.min() < 0 or Cg.max() >= nc:
            return _msg(False, f"codes: values outside [0, {nc})")
        inp = dict(inputs)
        obj = AqlmCodebooks()
        lg = obj.objective(dict(inp, codes=Cg), inputs["codebooks"])
        lr = obj.objective(dict(inp, codes=R.astype(np.int64)), inputs["codebooks"])
        l0 = obj.objective(inp, inputs["codebooks"])
        band = 2.0 ** -16
        frac = float(np.mean(Cg != R))
        ok = lg <= lr * (1 + band) + 1e-300
        return dict(_msg(ok, f"objective {lg:.9g} vs refq's {lr:.9g} (before the pass {l0:.9g}; "
                             f"band {band:.3g} relative); {100 * frac:.2f}% of codes differ"),
                    err=lg - lr)



class SpqrGroup(Kind):
    name = "spqr_group"
    doc = ("SpQR: the statistics of one group.  X (out, g): the group's columns as the sweep "
           "holds them when the group starts (processing order), d (g,): their U_jj; bits, sym, "
           "qq_bits, qq_group, thr (the absolute outlier threshold tau * mean_j var_r(W_j) / "
           "U_jj^2, ddof 1, on the permuted W) -> likely (out, g) bool: the leave-one-out "
           "outliers (removing the weight lowers the row's sum ((x - q(x)) / d)^2, grid refit "
           "without it, by more than thr); scale, zero (out,): the group's grid fit without "
           "them (bilevel: the weights left out replaced by the mean of the row's others; scale "
           "and zero each quantized to qq_bits over blocks of qq_group rows, min-max with float16 "
           "lo and step, values float32(lo + step * code)).")

    def reference(self, inputs, params):
        from refq.methods.spqr import fit_group, likely_outliers
        X, d = inputs["X"], inputs["d"]
        bits, sym, qq = params["bits"], params["sym"], params["qq_bits"]
        likely = likely_outliers(X, d, bits, sym, params["thr"], qq is not None)
        if qq is None:
            Xf = np.where(likely, 0.0, X)
        else:
            cnt = np.maximum((~likely).sum(axis=1, keepdims=True), 1)
            mean = np.where(likely, 0.0, X).sum(axis=1, keepdims=True) / cnt
            Xf = np.where(likely, mean, X)
        scale, zero, _ = fit_group(Xf, bits, sym, qq, params["qq_group"])
        return {"likely": likely, "scale": scale, "zero": zero}

    def judge(self, inputs, params, ref, got):
        out, g = inputs["X"].shape
        L = _arr(got, "likely", (out, g)).astype(bool)
        sc = _arr(got, "scale", (out,), "float").astype(np.float64)
        ze = _arr(got, "zero", (out,), "float").astype(np.float64)
        parts = []
        nl = int(np.count_nonzero(L != ref["likely"]))
        if nl:
            parts.append(f"likely outliers differ in {nl} of {L.size} weights")
        # the statistics are float16 / float32 values: one float16 ulp of tolerance
        for nm, a, r in (("scale", sc, ref["scale"]), ("zero", ze, ref["zero"])):
            bad = np.abs(a - r) > 2.0 ** -10 * np.abs(r) + 2.0 ** -24
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                parts.append(f"{nm} differs in {int(bad.sum())} of {out} rows (row {i}: "
                             f"{a[i]:.8g}, expected {r[i]:.8g})")
        return _msg(not parts, "; ".join(parts) or
                    f"likely outliers ({int(ref['likely'].sum())}), scale and zero equal")



class SlimAlpha(Kind):
    name = "slim_alpha"
    doc = ("SLiM-Quant: the clip alpha of a tensor-wide symmetric grid.  values (any shape), "
           "weights (same shape; given only with act_weighted: H_jj, else every value counts 1), "
           "bits -> alpha minimizing the histogram objective "
           "J(alpha) = sum_i count_i e_i^2 / sum count over max(512, min(m // 1000, 20000)) bins "
           "of |values| on [0, max|values|] (weighted counts), e_i = v_i - step round(v_i / step) "
           "below alpha (step = alpha / (2^(bits-1) - 1)) and v_i - alpha above, v_i the bin "
           "centres; refq scans 11 evenly spaced centres, then every centre between the "
           "neighbours of the best.  Judged by J: a port's alpha must be as good as refq's.")

    def reference(self, inputs, params):
        from refq.methods.slim import slim_quant_alpha
        a, j = slim_quant_alpha(inputs["values"], params["bits"], inputs.get("weights"))
        return {"alpha": np.array(a), "J": np.array(j)}

    def judge(self, inputs, params, ref, got):
        from refq.methods.slim import histogram_abs, slim_quant_objective
        a = float(np.asarray(_arr(got, "alpha", None, "float")).reshape(-1)[0])
        counts, centres = histogram_abs(inputs["values"], inputs.get("weights"))
        j = slim_quant_objective(counts, centres, a, params["bits"]) if a > 0 else np.inf
        jr = float(ref["J"])
        ok = j <= jr * (1 + 2.0 ** -16) + 1e-300
        return dict(_msg(ok, f"J(alpha = {a:.6g}) = {j:.6g} vs refq's J({float(ref['alpha']):.6g})"
                             f" = {jr:.6g} (band 2^-16 relative)"), err=j - jr)


class SlimAdapterSvd(Kind):
    name = "slim_adapter_svd"
    doc = ("SLiM adapters: E (out, in) the compression error W - W_c, xbar (in,) the activation "
           "rms sqrt(H_jj) (dead inputs: the smallest positive), rank r -> L (out, r), R (r, in) "
           "with L R the best rank-r approximation of E in the norm ||(.) diag(xbar)||_F (SVD of "
           "E diag(xbar) = U S V^T; L = U_r, R = S_r V_r^T diag(xbar)^-1).  Judged by the "
           "product's error (the factors are unique only up to signs and rotations).")

    def reference(self, inputs, params):
        from refq.methods.slim import low_rank_adapters
        L, R = low_rank_adapters(inputs["E"], inputs["xbar"], int(params["rank"]))
        return {"L": L, "R": R}

    def judge(self, inputs, params, ref, got):
        E, xb, r = inputs["E"], inputs["xbar"], int(params["rank"])
        L = _arr(got, "L", (E.shape[0], r), "float").astype(np.float64)
        R = _arr(got, "R", (r, E.shape[1]), "float").astype(np.float64)
        err = float(np.linalg.norm((E - L @ R) * xb[None, :]))
        er = float(np.linalg.norm((E - ref["L"] @ ref["R"]) * xb[None, :]))
        # Eckart-Young: er is the optimum; a float32 SVD is within about n u ||E diag(xbar)||
        tol = 8 * E.shape[1] * U32 * float(np.linalg.norm(E * xb[None, :]))
        return dict(_msg(err <= er + tol, f"||(E - L R) diag(xbar)||_F = {err:.8g} vs the optimum "
                                          f"{er:.8g} (tolerance +{tol:.3g})"), err=err - er)


KINDS = {k.name: k for k in (DampedInverseCholesky(), UniformGrid(), UniformCodes(),
                             GptqBlockUpdate(), Kmeans1d(), ClaqAllocateBits(), ClaqOutliers(),
                             AqlmCodebooks(), WandaMask2of4(), SparsegptMask2of4(),
                             WeightedKmeans1d(), QuanteaseSweep(), AqlmBeamPass(),
                             SpqrGroup(), SlimAlpha(), SlimAdapterSvd())}


# ============================================================================ traces
def _step(sid, kind, inputs, params, shared=None):
    """shared: {input name: tensor of the case's input file} for inputs that are exactly the
    case's W or H (as float64): stored once, in the inputs file."""
    inputs = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
    return {"id": sid, "kind": kind, "inputs": inputs, "params": params, "shared": shared or {}}


def _spots(n, step):
    """Indices 0 and the one holding the middle, on a grid of `step` (distinct, sorted)."""
    return sorted({0, (n // 2) // step * step})


def trace_rtn(W, H, opts):
    """-> (steps, result) for RTN: the grid and codes of the first and the last group."""
    W = np.asarray(W, np.float64)
    out, n = W.shape
    g = opts["group_size"] or n
    maxq = 2 ** opts["bits"] - 1
    steps, codes = [], np.empty((out, n))
    starts = list(range(0, n, g))
    for gi, c0 in enumerate(starts):
        c1 = min(c0 + g, n)
        s, z = find_params(W[:, c0:c1], opts["bits"], opts["sym"], opts["mse"])
        codes[:, c0:c1] = quantize_codes(W[:, c0:c1], s, z, maxq)
        if gi in (0, len(starts) - 1):
            p = dict(bits=opts["bits"], sym=opts["sym"], mse=opts["mse"],
                     group_size=opts["group_size"])
            steps.append(_step(f"grid-{gi}", "uniform_grid", {"W": W[:, c0:]}, p,
                               shared={"W": "W"} if c0 == 0 else None))
            steps.append(_step(f"codes-{gi}", "uniform_codes",
                               {"W": W[:, c0:c1], "scale": s, "zero": z}, {"bits": opts["bits"]}))
    return steps, {"codes": codes}


def _gptq_prepare(W, H, opts):
    W = np.array(W, dtype=np.float64)
    H = np.array(H, dtype=np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    n = W.shape[1]
    if opts.get("act_order"):
        perm = np.argsort(-np.diag(H), kind="stable")
        H = H[perm][:, perm]
    else:
        perm = np.arange(n)
    return W, H, perm


def _cond(H, percdamp):
    """Condition number of the damped Hessian after diagonal scaling, D^-1/2 Hd D^-1/2 (what
    bounds the error of a Cholesky factorization, van der Sluis / Demmel)."""
    Hd = H + percdamp * float(np.mean(np.diag(H))) * np.eye(H.shape[0])
    s = 1 / np.sqrt(np.diag(Hd))
    return float(np.linalg.cond(Hd * s[:, None] * s[None, :]))


def trace_gptq(W, H, opts):
    """Replay refq's GPTQ (refq.methods.gptq.quantize_gptq) in numpy, recording: the damped
    inverse Cholesky factor, the grid of the first and the last group, the codes of the first
    and the middle column, the first block and the block holding the middle column.
    -> (steps, {"codes": (out, n) processing order, "perm", "scales" (G, out), "zeros"})."""
    bits, gs, sym, mse = opts["bits"], opts["group_size"], opts["sym"], opts["mse"]
    static, bs = opts["static_groups"], opts["blocksize"]
    maxq = 2 ** bits - 1
    W, Hp, perm = _gptq_prepare(W, H, opts)
    out, n = W.shape
    g = gs or n
    G = -(-n // g)
    scales, zeros = np.empty((G, out)), np.empty((G, out))
    gp = dict(bits=bits, sym=sym, mse=mse, group_size=gs)
    steps = [_step("cholesky", "damped_inverse_cholesky", {"H": Hp},
                   {"percdamp": opts["percdamp"], "cond": _cond(Hp, opts["percdamp"])},
                   shared={"H": "H"} if np.array_equal(Hp, H) else None)]
    if static:                                   # all grids up front, original order
        for gi, c0 in enumerate(range(0, n, g)):
            scales[gi], zeros[gi] = find_params(W[:, c0:c0 + g], bits, sym, mse)
            if gi in (0, G - 1):
                steps.append(_step(f"grid-{gi}", "uniform_grid", {"W": W[:, c0:]}, gp))
    gidx = ((perm // g) if static else (np.arange(n) // g)).astype(np.int64)
    U, _, _ = inverse_cholesky(Hp, opts["percdamp"])
    Wt = np.ascontiguousarray(W[:, perm].T)      # (n, out)
    Err = np.zeros((min(bs, n), out))
    codes_t = np.zeros((n, out))
    code_cols = {0, n // 2}
    blocks = set(_spots(n, bs)) if n > bs else set()
    after = {}                                   # b0 -> (Err (out, B), W_rest (out, n - b1))
    for b0 in range(0, n, bs):
        b1 = min(b0 + bs, n)
        if b0 in blocks:
            start_state = Wt[b0:].T.copy()
        for j in range(b0, b1):
            if not static and j % g == 0:        # a group starts: fit its grid now
                ge = min(j + g, n)
                cols = Wt[j:ge].copy()
                if ge > b1:
                    cols[b1 - j:] -= U[b0:j, b1:ge].T @ Err[:j - b0]
                scales[j // g], zeros[j // g] = find_params(cols.T, bits, sym, mse)
                if j // g in (0, G - 1):
                    state = Wt[j:].copy()        # every later column, pending updates applied
                    state[:ge - j] = cols
                    if ge < n and b1 < n:
                        lo = max(b1, ge)
                        state[lo - j:] -= U[b0:j, lo:].T @ Err[:j - b0]
                    steps.append(_step(f"grid-{j // g}", "uniform_grid", {"W": state.T}, gp))
            s, z = scales[gidx[j]], zeros[gidx[j]]
            w = Wt[j]
            q = np.clip(np.rint(w / s) + z, 0, maxq)
            if j in code_cols:
                steps.append(_step(f"codes-col{j}", "uniform_codes",
                                   {"W": w[:, None].copy(), "scale": s, "zero": z}, {"bits": bits}))
            codes_t[j] = q
            e = j - b0
            Err[e] = (w - s * (q - z)) / U[j, j]
            Wt[j + 1:b1] -= np.outer(U[j, j + 1:b1], Err[e])
        if b0 in blocks:
            cols = np.arange(b0, b1)
            steps.append(_step(f"block-{b0}", "gptq_block_update",
                               {"W": start_state, "U": U[b0:b1, b0:],
                                "codes": codes_t[b0:b1].T.copy(),
                                "scale": scales[gidx[cols]].T.copy(),
                                "zero": zeros[gidx[cols]].T.copy()}, {}))
        if b1 < n:
            Wt[b1:] -= U[b0:b1, b1:].T @ Err[:b1 - b0]
        if b0 in blocks:
            after[b0] = (Err[:b1 - b0].T.copy(), Wt[b1:].T.copy())
    return steps, {"codes": codes_t.T, "perm": perm, "scales": scales, "zeros": zeros,
                   "blocks": after}


def claq_column(w, b, n_res, fit_after):
    """CLAQ's quantization of one (error-updated) column, as refq.methods.claq does it:
    reserve the n_res smallest and largest values (stable order), fit the exact k-means on
    the rest (or_fit after) or on all, round the centroids to float16 and sort them, code
    every value by its nearest centroid (ties to the lower), keep the reserved values as
    float16 corrections.  -> (q (out,) the values used, centroids (2^b,), codes (out,),
    reserved (out,) bool, fit (m,) the values the centroids were fit on)."""
    from refq.methods.kmeans1d import kmeans1d_centroids, nearest_centroid
    out = w.size
    order = np.argsort(w, kind="mergesort")
    reserved = np.zeros(out, bool)
    if n_res:
        reserved[order[:n_res]] = True
        reserved[order[out - n_res:]] = True
    fit = w[~reserved] if (n_res and fit_after and 2 * n_res < out) else w
    c = np.sort(fp16(kmeans1d_centroids(np.ascontiguousarray(fit), 1 << b)))
    codes = nearest_centroid(w, c)
    q = c[codes]
    S = np.where(reserved, fp16(w - q), 0.0)
    return q + S, c, codes, reserved, fit


def trace_claq(W, H, opts):
    """Replay refq's CLAQ column loop (refq.methods.claq.quantize_claq) in numpy, recording
    the bit allocation (adaptive precision), the k-means of the first and the middle column,
    and the outlier set of the first column with reserved values.
    -> (steps, {"codes": (in, out) processing order, "perm", "cents": (in, 256)})."""
    from refq.methods.claq import allocate_bits, outlier_scores, reservation_counts
    W, Hp, perm = _gptq_prepare(W, H, opts)
    out, n = W.shape
    steps = []
    scores = outlier_scores(W, opts["outlier_threshold"])
    if opts["column_bits"] is not None:
        col_bits = np.asarray(opts["column_bits"], np.int64)
    elif float(opts["bits"]).is_integer():
        col_bits = np.full(n, int(opts["bits"]), np.int64)
    else:
        col_bits = allocate_bits(scores, opts["bits"])
        steps.append(_step("allocate-bits", "claq_allocate_bits", {"scores": scores},
                           {"bits": opts["bits"]}))
    n_res = (reservation_counts(scores, out, opts["or_ratio_high"], opts["or_ratio_low"],
                                opts["or_top_frac"]) if opts["outlier_reservation"]
             else np.zeros(n, np.int64))
    U, _, _ = inverse_cholesky(Hp, opts["percdamp"])
    Wt = np.ascontiguousarray(W[:, perm].T)
    bits_p, nres_p = col_bits[perm], n_res[perm]
    cents_t = np.zeros((n, 256))
    codes_t = np.zeros((n, out), np.int64)
    bs = opts["blocksize"]
    Err = np.zeros((min(bs, n), out))
    fit_after = opts["or_fit"] == "after"
    km_cols, or_done = {0, n // 2}, False
    for b0 in range(0, n, bs):
        b1 = min(b0 + bs, n)
        for j in range(b0, b1):
            w = Wt[j].copy()
            r = int(nres_p[j])
            q, c, codes, res, fit = claq_column(w, int(bits_p[j]), r, fit_after)
            if r and not or_done:
                steps.append(_step(f"outliers-col{j}", "claq_outliers", {"w": w}, {"n_res": r}))
                or_done = True
            if j in km_cols:
                steps.append(_step(f"kmeans-col{j}", "kmeans1d", {"x": fit},
                                   {"k": 2 ** int(bits_p[j])}))
            cents_t[j, :c.size], codes_t[j] = c, codes
            e = j - b0
            Err[e] = (w - q) / U[j, j]                     # err_j = (w_j - q_j) / U_jj
            Wt[j + 1:b1] -= np.outer(U[j, j + 1:b1], Err[e])
        if b1 < n:
            Wt[b1:] -= U[b0:b1, b1:].T @ Err[:b1 - b0]
    return steps, {"codes": codes_t, "perm": perm, "cents": cents_t}


def trace_aqlm(W, H, opts, q):
    """AQLM: the codebook least-squares step at refq's final codes and scales, and one
    beam-search pass from refq's initial state (residual k-means codes and codebooks, row
    scales = float16 rms; refq.methods.aqlm.quantize_aqlm's start), with group and codebook
    orders from a fixed seed."""
    W = np.asarray(W, np.float64)
    final = {"W": W, "H": np.asarray(H, np.float64),
             "scales": q.scales.astype(np.float64), "codes": q.codes.astype(np.int32),
             "codebooks": q.codebooks.astype(np.float64)}
    init_residual_kmeans = _refq_function("init_residual_kmeans", *_AQLM_MODULES,
                                          "refq.methods.kmeans")
    M, B, g = opts["num_codebooks"], opts["nbits_per_codebook"], opts["in_group_size"]
    rms = np.sqrt(np.mean(W * W, axis=1))
    scales = fp16(np.where(rms > 0, rms, 1.0))
    scales[scales == 0] = 1.0
    codes0, C0 = init_residual_kmeans(W, scales, M, 2 ** B, g, np.random.default_rng(opts["seed"]))
    rng = np.random.default_rng(0)
    start = dict(final, scales=scales, codes=codes0.astype(np.int32), codebooks=C0,
                 group_order=rng.permutation(codes0.shape[1]).astype(np.int32),
                 book_order=rng.permutation(M).astype(np.int32))
    return [_step("codebooks-final", "aqlm_codebooks", final, {}, shared={"W": "W", "H": "H"}),
            _step("beam-init", "aqlm_beam_pass", start, {"beam_size": int(opts["beam_size"])},
                  shared={"W": "W", "H": "H"})]


def trace_spqr(W, H, opts):
    """SpQR: the first group (no earlier column has updated it yet, so its state is the
    dead-fixed, act-order-permuted W), as refq.methods.spqr.quantize_spqr fits it."""
    import math
    W, Hp, perm = _gptq_prepare(W, H, opts)
    out, n = W.shape
    g = opts["group_size"]
    U, _, _ = inverse_cholesky(Hp, opts["percdamp"])
    Ud = np.diag(U).copy()
    Wt = np.ascontiguousarray(W[:, perm].T)
    scale = float(np.mean(np.var(Wt, axis=1, ddof=1) / Ud ** 2)) if out > 1 else 0.0
    tau = opts["outlier_threshold"]
    thr = tau * scale if math.isfinite(tau) else math.inf
    if not (math.isfinite(thr) and opts["leave_one_out"]):
        return []
    return [_step("group-0", "spqr_group", {"X": Wt[:g].T.copy(), "d": Ud[:g].copy()},
                  {"bits": opts["bits"], "sym": opts["sym"], "qq_bits": opts["qq_bits"],
                   "qq_group": opts["qq_group_size"], "thr": thr})]


def trace_slim(W, H, opts, method):
    """SLiM-Quant: the alpha of the layer (slim-quant: on W; slim: on the kept values of the
    first compression); SLiM: the adapters' SVD of the first compression's error."""
    from refq.methods import slim
    W = np.asarray(W, np.float64)
    wts = slim.col_weights(W, H) if opts.get("act_weighted") else None

    def alpha_inputs(values, weights):               # weights only with act_weighted
        return {"values": values} if weights is None else {"values": values, "weights": weights}
    if method == "slim-quant":
        return [_step("alpha", "slim_alpha", alpha_inputs(W, wts), {"bits": opts["bits"]},
                      shared={"values": "W"})]
    import refq.methods.sparsity as sp
    pattern, p = sp.parse_sparsity(opts["sparsity"])
    keep = (sp.wanda_mask(W, H, pattern, p) if opts["pruner"] == "wanda" else
            sp.magnitude_mask(W, pattern, p) if opts["pruner"] == "magnitude" else None)
    W_c, keep, _, _, _ = slim._compress(W, H, keep, pattern, p, opts["bits"], opts, "", False)
    st = []
    if opts["pruner"] != "sparsegpt" and opts["bits"] < 16:
        st.append(_step("alpha", "slim_alpha",
                        alpha_inputs(W[keep], None if wts is None else wts[keep]),
                        {"bits": opts["bits"]}))
    r = slim.adapter_rank(W.shape, opts["rank"], opts["rank_ratio"])
    if r > 0:
        st.append(_step("adapters", "slim_adapter_svd",
                        {"E": W - W_c, "xbar": slim.activation_rms(H)}, {"rank": r}))
    return st


def trace_wanda(W, H, opts):
    """Wanda's 2:4 mask of the whole layer (2:4 cases only)."""
    if opts.get("sparsity") not in ("2:4", None):
        return []
    return [_step("mask", "wanda_mask_2of4", {"W": np.asarray(W, np.float64), "H": H}, {},
                  shared={"W": "W", "H": "H"})]


def trace_sparsegpt(W, H, opts):
    """Replay refq's SparseGPT 2:4 sweep (refq.methods.sparsity.sparsegpt_prune) in numpy,
    recording the 2:4 choice of the first group of the first block and of the block holding
    the middle column, with the state the sweep has when it reaches them.
    -> (steps, {"keep" (out, in), "W_c" (out, in)})."""
    from refq.methods.sparsity import keep_2_of_4, row_grid
    out, n = W.shape
    if opts.get("sparsity") != "2:4":
        return [], None
    W = np.array(W, dtype=np.float64)
    H = np.array(H, dtype=np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U, _, _ = inverse_cholesky(H, opts["percdamp"])
    bits = opts["bits"]
    quant = bits < 16
    if quant:
        scale, zero = row_grid(W, bits, opts["sym"])
        maxq = 2 ** bits - 1
    bs = opts["blocksize"]
    Wt = np.ascontiguousarray(W.T)                     # (n, out)
    keep_t = np.ones((n, out), dtype=bool)
    Err = np.zeros((min(bs, n), out))
    steps, record = [], set(_spots(n, bs))
    for b0 in range(0, n, bs):
        b1 = min(b0 + bs, n)
        for j in range(b0, b1):
            d = U[j, j]
            if j % 4 == 0:                             # eps = w^2 / U_kk^2, keep 2 of 4 (eq. 7)
                eps = Wt[j:j + 4] ** 2 / np.diag(U)[j:j + 4, None] ** 2
                if j == b0 and b0 in record:
                    steps.append(_step(f"group-col{b0}", "sparsegpt_mask_2of4",
                                       {"W": Wt[j:j + 4].T.copy(),
                                        "d": np.diag(U)[j:j + 4].copy()}, {}))
                keep_t[j:j + 4] = keep_2_of_4(np.ascontiguousarray(eps.T)).T
            w = Wt[j].copy()
            q = np.where(keep_t[j], w, 0.0)
            if quant:
                c = np.clip(np.rint(w / scale) + zero, 0, maxq)
                q = np.where(keep_t[j], scale * (c - zero), 0.0)
            e = j - b0
            Err[e] = (w - q) / d
            Wt[j] = q
            Wt[j + 1:b1] -= np.outer(U[j, j + 1:b1], Err[e])
        if b1 < n:
            Wt[b1:] -= U[b0:b1, b1:].T @ Err[:b1 - b0]
    return steps, {"keep": keep_t.T.copy(), "W_c": Wt.T.copy()}


def trace_squeezellm(W, H, opts):
    """The weighted k-means of the first and the middle row, with the row's outliers left
    out, as refq.methods.squeezellm.quantize_squeezellm runs it."""
    from refq.methods.squeezellm import SENSITIVITY, iqr_outliers, sensitive_outliers
    W = np.asarray(W, np.float64)
    out, n = W.shape
    F = np.asarray(SENSITIVITY[opts["sensitivity"]](W, H, ""), dtype=np.float64)
    M = iqr_outliers(W, opts["outlier_iqr"]) | sensitive_outliers(W, F, opts["sensitive_frac"])
    steps = []
    for r in sorted({0, out // 2}):
        keep = ~M[r] if not M[r].all() else np.ones(n, dtype=bool)
        steps.append(_step(f"kmeans-row{r}", "weighted_kmeans1d",
                           {"x": W[r, keep], "weights": F[r, keep]}, {"k": 2 ** opts["bits"]}))
    return steps


def trace_quantease(W, H, opts):
    """The first CD sweep, from refq's initial quantizer (refq.methods.quantease._init), in
    refq's sweep order, on the target W - S0."""
    from refq.methods.quantease import _init, topk_mask
    W = np.asarray(W, np.float64)
    out, n = W.shape
    k = int(round(opts["outlier_frac"] * out * n))
    M = topk_mask(W, k)
    order, gidx, scales, zeros, codes_t, _, _ = _init(np.where(M, 0.0, W), H, opts, "")
    Hs = np.ascontiguousarray(H[order][:, order])
    Wt = np.ascontiguousarray(W[:, order].T)
    What_t = scales[gidx] * (codes_t - zeros[gidx])
    St = fp16(np.where(M[:, order].T, Wt - What_t, 0.0)) if k else np.zeros((n, out))
    return [_step("sweep-1", "quantease_sweep",
                  {"W": (Wt - St).T.copy(), "H": Hs, "W_hat": What_t.T.copy(),
                   "scale": scales[gidx].T.copy(), "zero": zeros[gidx].T.copy()},
                  {"bits": opts["bits"]}, shared={"H": "H"} if np.array_equal(Hs, H) else None)]


def case_steps(method, W, H, opts, q, real=False):
    """The teacher-forced steps of one case -> list of {"id", "kind", "inputs", "params"}.
    real: the case is on the real SmolLM2 slice (QuantEase's sweep is left out there: its
    inputs would add 0.4 MB for a step the synthetic cases already pin)."""
    if method == "rtn":
        return trace_rtn(W, H, opts)[0]
    if method == "gptq":
        return trace_gptq(W, H, opts)[0]
    if method == "claq":
        return trace_claq(W, H, opts)[0]
    if method == "aqlm":
        return trace_aqlm(W, H, opts, q)
    if method == "wanda":
        return trace_wanda(W, H, opts)
    if method == "sparsegpt":
        return trace_sparsegpt(W, H, opts)[0]
    if method == "squeezellm":
        return trace_squeezellm(W, H, opts)
    if method == "spqr":
        return trace_spqr(W, H, opts)
    if method in ("slim", "slim-quant"):
        return trace_slim(W, H, opts, method)
    if method == "quantease" and not real:
        return trace_quantease(W, H, opts)
    return []


# Sub-steps the issue lists that are not in the steps tier yet (GOLDEN.md says so):
NOT_YET = ["SpQR: the groups after the first (they need a replay of SpQR's loop)",
           "SLiM: the refit after the adapters, the adapters' quantization"]
