"""Independent ports of CLAQ's column k-means and AQLM's codebook step, written from the
papers (no refq import), for tests/test_golden_ports.py.  RTN and GPTQ are the worked
example, examples/gptq_port.py.  Each class takes the float type it computes in."""
import numpy as np


class KmeansPort:
    """CLAQ (Wang et al. 2024) eq. 3: the exact 1-D k-means of a column, by dynamic
    programming over the sorted values (clusters are contiguous runs):
    D[m][j] = min_i D[m-1][i] + cost(i, j), cost from prefix sums of x and x²."""

    def __init__(self, dtype=np.float32):
        self.f = np.dtype(dtype)

    def step_kmeans1d(self, x, k):
        return self.step_weighted_kmeans1d(x, np.ones(len(x)), k)

    def step_weighted_kmeans1d(self, x, weights, k):
        """SqueezeLLM eq. 4 (and CLAQ's with unit weights): the same DP, weighted sums."""
        x = np.asarray(x, self.f)
        w = np.asarray(weights, self.f)
        if not np.any(w > 0):
            w = np.ones_like(w)
        u, inv = np.unique(x, return_inverse=True)          # equal values share a cluster
        cnt = np.bincount(inv, weights=w).astype(self.f)    # summed weights
        d = u.size
        if d <= k:
            return {"centroids": np.concatenate([u, np.full(k - d, u[-1], self.f)])}
        # centred prefix sums (fewer cancellations in float32)
        mu = self.f.type(np.sum(cnt * u) / np.sum(cnt))
        v = u - mu
        P0 = np.concatenate([[0], np.cumsum(cnt.astype(self.f))]).astype(self.f)
        P1 = np.concatenate([[0], np.cumsum(cnt * v)]).astype(self.f)
        P2 = np.concatenate([[0], np.cumsum(cnt * v * v)]).astype(self.f)

        def cost(i, j):                                     # values [i, j), vectorised over i
            s0, s1 = P0[j] - P0[i], P1[j] - P1[i]
            with np.errstate(divide="ignore", invalid="ignore"):
                c = (P2[j] - P2[i]) - s1 * s1 / s0
            return np.where(s0 > 0, np.maximum(c, 0), 0)    # a cluster of zero weight costs 0

        D = np.full((k, d + 1), np.inf, self.f)
        T = np.zeros((k, d + 1), np.int64)
        D[0, 1:] = cost(np.zeros(d, np.int64), np.arange(1, d + 1))
        for m in range(1, k):
            for j in range(m + 1, d + 1):
                i = np.arange(m, j)
                c = D[m - 1, i] + cost(i, j)
                t = int(np.argmin(c))
                D[m, j], T[m, j] = c[t], i[t]
        starts, j = [], d                                   # backtrack the split points
        for m in range(k - 1, 0, -1):
            j = T[m, j]
            starts.append(j)
        bounds = [0] + starts[::-1] + [d]
        cents = np.array([np.sum(cnt[a:b] * u[a:b]) / np.sum(cnt[a:b]) if np.sum(cnt[a:b]) > 0
                          else np.mean(u[a:b]) for a, b in zip(bounds[:-1], bounds[1:])], self.f)
        return {"centroids": cents}


class ClaqPort(KmeansPort):
    """CLAQ §3.2-3.3: adaptive precision (eq. 6-7) and outlier reservation, plus the k-means."""

    def step_claq_allocate_bits(self, scores, bits):
        n = len(scores)
        lo, frac = (2, (bits - 2) / 2) if bits < 3 else (3, bits - 3)
        n_hi = int(np.floor(frac * n + 0.5))
        out = np.full(n, lo)
        out[np.argsort(-np.asarray(scores), kind="stable")[:n_hi]] = 4   # ties: lower index
        return {"column_bits": out}

    def step_claq_outliers(self, w, n_res):
        order = np.argsort(np.asarray(w, self.f), kind="stable")
        keep = np.zeros(len(w), bool)
        keep[order[:n_res]] = True
        keep[order[len(w) - n_res:]] = True
        return {"reserved": keep}


class KmeansLloydShort(KmeansPort):
    """Injected bug: Lloyd's algorithm from quantile starts, stopped one step before it
    converges (not the exact optimum)."""

    def step_kmeans1d(self, x, k):
        x = np.sort(np.asarray(x, self.f))
        c = x[((np.arange(k) + 0.5) / k * x.size).astype(int)].copy()
        prev = c.copy()
        for _ in range(300):
            lab = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
            new = np.array([x[lab == m].mean() if np.any(lab == m) else c[m]
                            for m in range(k)], self.f)
            if np.array_equal(new, c):
                break
            prev, c = c, new
        return {"centroids": np.sort(prev)}


class AqlmCodebookPort:
    """AQLM (Egiazarian et al. 2024) step 1: with codes and scales fixed, the codebooks
    minimize trace((W - Ŵ) H (W - Ŵ)ᵀ), Ŵ_i = s_i Σ_m C_m[b_im] per group: a linear least
    squares problem θ -> Ŵ, solved here from its normal equations A θ = y,
    A = Σ_i s_i² S_iᵀ H S_i, y = Σ_i s_i S_iᵀ H w_i (S_i picks codewords into row i)."""

    def __init__(self, dtype=np.float32, transpose=False):
        self.f = np.dtype(dtype)
        self.transpose = transpose

    def step_aqlm_codebooks(self, W, H, scales, codes, codebooks):
        f = self.f
        W, H, s = W.astype(f), H.astype(f), scales.astype(f)
        out, K, M = codes.shape
        _, nc, g = codebooks.shape
        n = K * g
        P = M * nc * g
        col = np.repeat(np.arange(n), M)                    # (n*M,) input column of each term
        Hr = H[np.ix_(col, col)]                            # (n*M, n*M), the same for every row
        HW = W @ H                                          # (out, n)
        k_of, a_of = np.arange(n) // g, np.arange(n) % g
        A = np.zeros((P, P), f)
        y = np.zeros(P, f)
        for i in range(out):
            b = codes[i].astype(np.int64)                   # (K, M)
            p = ((np.arange(M)[None, :] * nc + b[k_of]) * g + a_of[:, None]).reshape(-1)
            np.add.at(A, (p[:, None], p[None, :]), s[i] * s[i] * Hr)
            np.add.at(y, p, s[i] * HW[i][col])
        used = np.diag(A) > 0                               # codewords that some group uses
        Au = A[np.ix_(used, used)]
        theta = codebooks.reshape(-1).astype(f)             # unused codewords: unchanged
        # proximal term lam ||θ - θ_old||², lam = 1e-10 mean diag A (refq's convention)
        lam = 1e-10 * np.mean(np.diag(Au))
        Au[np.diag_indices_from(Au)] += lam
        theta[used] = np.linalg.solve(Au, y[used] + lam * theta[used])
        C = theta.reshape(M, nc, g)
        if self.transpose:                                  # injected bug
            C = theta.reshape(M, g, nc).transpose(0, 2, 1)
        return {"codebooks": C}


class MaskPort:
    """2:4 masks.  Wanda (Sun et al. 2024) eq. 1: score |W_ij| ||X_j||, with ||X_j||² ∝ H_jj;
    SparseGPT (Frantar & Alistarh 2023) eq. 7: w² / [H^-1]_jj = (w / U_jj)².  In every row and
    group of 4 columns keep the 2 largest scores (a stable sort keeps the lower column on ties)."""

    def __init__(self, dtype=np.float32):
        self.f = np.dtype(dtype)

    @staticmethod
    def _keep(score):
        out, n = score.shape
        g = score.reshape(out, n // 4, 4)
        order = np.argsort(-g, axis=2, kind="stable")[:, :, :2]
        keep = np.zeros(g.shape, bool)
        np.put_along_axis(keep, order, True, axis=2)
        return keep.reshape(out, n)

    def step_wanda_mask_2of4(self, W, H):
        W, H = W.astype(self.f), H.astype(self.f)
        return {"keep": self._keep(np.abs(W) * np.sqrt(np.maximum(np.diag(H), 0))[None, :])}

    def step_sparsegpt_mask_2of4(self, W, d):
        W, d = W.astype(self.f), d.astype(self.f)
        return {"keep": self._keep((W / d[None, :]) ** 2)}


class QuanteasePort:
    """QuantEase (Behdin et al. 2023) Lemma 1: with the other columns fixed, the best column j
    on its grid is the rounding of u_j = w_j + Σ_{k≠j} (w_k - ŵ_k) H_kj / H_jj; a sweep
    applies it to j = 0..n-1 in turn (computed directly, not incrementally)."""

    def __init__(self, dtype=np.float32):
        self.f = np.dtype(dtype)

    def step_quantease_sweep(self, W, H, W_hat, scale, zero, bits):
        f = self.f
        W, H, Wh = W.astype(f), H.astype(f), W_hat.astype(f).copy()
        s, z = scale.astype(f), zero.astype(f)
        for j in range(W.shape[1]):
            if H[j, j] <= 0:
                continue
            E = W - Wh
            u = Wh[:, j] + (E @ H[:, j]) / H[j, j]            # = w_j + Σ_{k≠j} e_k H_kj / H_jj
            q = np.clip(np.rint(u / s[:, j]) + z[:, j], 0, 2 ** bits - 1)
            Wh[:, j] = s[:, j] * (q - z[:, j])
        return {"W_hat": Wh}


class AqlmBeamPort:
    """AQLM (Egiazarian et al. 2024) step 2 with beam size 1: for each row, group k and
    codebook m in the given orders, replace the code of (k, m) by the one that lowers
    (w - ŵ) H (w - ŵ)ᵀ the most (keep the current code unless another is strictly better;
    ties: the lower code).  Changing group k by Δ (g,) moves the loss by
    -2 s Δᵀ (H r)_k + s² Δᵀ H_kk Δ, r = w - ŵ the row's residual."""

    def __init__(self, dtype=np.float32):
        self.f = np.dtype(dtype)

    def step_aqlm_beam_pass(self, W, H, scales, codes, codebooks, group_order, book_order,
                            beam_size):
        if beam_size != 1:
            raise NotImplementedError("beam size > 1")
        f = self.f
        W, H, s, C = W.astype(f), H.astype(f), scales.astype(f), codebooks.astype(f)
        codes = codes.astype(np.int64).copy()
        out, K, M = codes.shape
        g = C.shape[2]
        for i in range(out):
            z = np.zeros(K * g, f)
            for m in range(M):
                z += C[m][codes[i, :, m]].reshape(-1)
            r = W[i] - s[i] * z                                   # residual (in,)
            for k in group_order:
                sl = slice(k * g, (k + 1) * g)
                Hkk = H[sl, sl]
                for m in book_order:
                    old = codes[i, k, m]
                    D = C[m] - C[m][old]                           # (nc, g) Δ of every code
                    hr = H[sl] @ r                                 # (H r)_k
                    dL = -2 * s[i] * (D @ hr) + s[i] ** 2 * np.einsum("ca,ab,cb->c", D, Hkk, D)
                    c = int(np.argmin(dL))
                    if dL[c] < 0:
                        r[sl] -= s[i] * D[c]
                        codes[i, k, m] = c
        return {"codes": codes}


class SlimPort:
    """SLiM (Mozaffari et al. 2025).  SLiM-Quant: the clip alpha minimizing the histogram
    estimate of the quantization + clipping error of |W| (the official bin count, 11 coarse
    centres then the fine scan between the best one's neighbours).  Adapters: the best rank-r
    approximation of the compression error in the activation-weighted norm, by an SVD of
    E diag(xbar)."""

    def __init__(self, dtype=np.float32):
        self.f = np.dtype(dtype)

    def step_slim_alpha(self, values, bits, weights=None):
        a = np.abs(np.asarray(values, np.float64)).reshape(-1)
        nb = max(512, min(a.size // 1000, 20000))
        top = a.max() or 1.0
        w = None if weights is None else np.asarray(weights, np.float64).reshape(-1)
        counts, edges = np.histogram(a, bins=nb, range=(0.0, top), weights=w)
        v = ((edges[:-1] + edges[1:]) / 2).astype(self.f)
        counts = counts.astype(self.f)
        m = 2 ** (bits - 1) - 1

        def J(alpha):
            step = alpha / m
            e = np.where(v < alpha, v - step * np.rint(v / step), v - alpha)
            return np.sum(counts * e * e) / np.sum(counts)
        coarse = [round(k * (nb - 1) / 10) for k in range(11)]
        t = int(np.argmin([J(v[i]) for i in coarse]))
        cand = range(coarse[max(t - 1, 0)], coarse[min(t + 1, 10)] + 1)
        return {"alpha": np.array(v[min(cand, key=lambda i: J(v[i]))])}

    def step_slim_adapter_svd(self, E, xbar, rank):
        E, xb = E.astype(self.f), xbar.astype(self.f)
        U, S, Vt = np.linalg.svd(E * xb[None, :], full_matrices=False)
        return {"L": U[:, :rank], "R": (S[:rank, None] * Vt[:rank]) / xb[None, :]}
