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
        xs = np.sort(np.asarray(x, self.f))
        u, cnt = np.unique(xs, return_counts=True)         # equal values share a cluster
        d = u.size
        if d <= k:
            return {"centroids": np.concatenate([u, np.full(k - d, u[-1], self.f)])}
        # centred prefix sums (fewer cancellations in float32)
        mu = self.f.type(np.mean(xs))
        v = u - mu
        P0 = np.concatenate([[0], np.cumsum(cnt.astype(self.f))]).astype(self.f)
        P1 = np.concatenate([[0], np.cumsum(cnt * v)]).astype(self.f)
        P2 = np.concatenate([[0], np.cumsum(cnt * v * v)]).astype(self.f)

        def cost(i, j):                                     # values [i, j), vectorised over i
            s0, s1 = P0[j] - P0[i], P1[j] - P1[i]
            return np.maximum((P2[j] - P2[i]) - s1 * s1 / s0, 0)

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
        cents = np.array([np.sum(cnt[a:b] * u[a:b]) / np.sum(cnt[a:b])
                          for a, b in zip(bounds[:-1], bounds[1:])], self.f)
        return {"centroids": cents}


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
