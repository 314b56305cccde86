"""A complete worked port of RTN and GPTQ in plain numpy float32 (no refq import).

    refq golden verify data/golden --impl gptq_port --methods rtn gptq     (from examples/)
    refq golden verify data/golden --impl examples.gptq_port --methods rtn gptq   (repo root)

Written from the GPTQ paper (Frantar et al., ICLR 2023, Algorithm 1) and the
conventions in GOLDEN.md, the way a porter to C++/CUDA/Rust would write it:
float32 arithmetic throughout, one column at a time, without refq's lazy
blocks.  It provides every entry point a port can provide (GOLDEN.md,
"Writing a port"):

    decode(fmt, fields, x)                    decode tier: neutral fields -> W_hat, y
    quantize(method, W, H, options)           e2e tier: the whole quantization
    step_damped_inverse_cholesky(H, percdamp) steps tier: one function per sub-step,
    step_uniform_grid(W, group_size, bits, sym, mse)      named step_<kind>
    step_uniform_codes(W, scale, zero, bits)
    step_gptq_block_update(W, U, codes, scale, zero)

Each entry returns a dict of numpy arrays in the neutral form.  `Port(dtype)`
builds the same port in another precision (tests/test_golden_ports.py runs it in
float64 too, and injects bugs into it to check that the suite catches them).
"""
import numpy as np


class Port:
    def __init__(self, dtype=np.float32):
        self.f = np.dtype(dtype)

    # ------------------------------------------------------------------ decode tier
    def decode(self, fmt, fields, x):
        """uniform: W_hat[r, c] = scales[r, g] * (codes[r, c] - zeros[r, g]), g = g_idx[c]."""
        if fmt["format"] != "uniform":
            raise NotImplementedError(f"format {fmt['format']}")
        g = fields["g_idx"].astype(np.int64)
        s = fields["scales"].astype(self.f)[:, g]
        W_hat = s * (fields["codes"].astype(self.f) - fields["zeros"].astype(self.f)[:, g])
        return {"W_hat": W_hat, "y": x.astype(self.f) @ W_hat.T}

    # ------------------------------------------------------------------ sub-steps
    def step_damped_inverse_cholesky(self, H, percdamp):
        """U upper triangular with (H + percdamp mean(diag H) I)^-1 = Uᵀ U (paper eq. 5)."""
        H = H.astype(self.f)
        n = H.shape[0]
        Hd = H + self.f.type(percdamp) * np.mean(np.diag(H)) * np.eye(n, dtype=self.f)
        Hinv = np.linalg.inv(Hd)                           # as the reference: inverse, then
        L = np.linalg.cholesky(Hinv)                       # lower Cholesky of H^-1 = L Lᵀ
        return {"U": L.T.copy()}                           # U = Lᵀ

    def step_uniform_grid(self, W, group_size, bits, sym, mse):
        """Min-max grid of the group = the first group_size columns of W (quant.py find_params)."""
        W = W.astype(self.f)
        W = W[:, :group_size or W.shape[1]]
        maxq = 2 ** bits - 1
        xmin = np.minimum(W.min(axis=1), 0)
        xmax = np.maximum(W.max(axis=1), 0)
        if sym:
            xmax = np.maximum(np.abs(xmin), xmax)
            xmin = np.where(xmin < 0, -xmax, xmin)
        both0 = (xmin == 0) & (xmax == 0)
        xmin, xmax = np.where(both0, -1, xmin), np.where(both0, 1, xmax)
        scale, zero = self._scale_zero(xmin, xmax, maxq, sym)
        if mse:                                            # clipping search, norm 2.4
            best = np.full(W.shape[0], np.inf, dtype=self.f)
            for i in range(80):
                p = self.f.type(1 - i / 100)
                s1, z1 = self._scale_zero(p * xmin, p * xmax, maxq, sym)
                q = self._codes(W, s1, z1, maxq)
                err = np.sum(np.abs(s1[:, None] * (q - z1[:, None]) - W) ** 2.4, axis=1)
                better = err < best
                best[better], scale[better], zero[better] = err[better], s1[better], z1[better]
        return {"scale": scale, "zero": zero}

    def _scale_zero(self, xmin, xmax, maxq, sym):
        scale = ((xmax - xmin) / maxq).astype(np.float16).astype(self.f)   # the STORED scale
        scale = np.maximum(scale, self.f.type(2.0 ** -24))
        if sym:
            zero = np.full_like(scale, (maxq + 1) / 2)
        else:
            zero = np.clip(np.rint(-xmin / scale), 0, maxq)               # half to even
        return scale, zero.astype(self.f)

    def _codes(self, W, scale, zero, maxq):
        return np.clip(np.rint(W / scale[:, None]) + zero[:, None], 0, maxq)

    def step_uniform_codes(self, W, scale, zero, bits):
        W, scale, zero = W.astype(self.f), scale.astype(self.f), zero.astype(self.f)
        return {"codes": self._codes(W, scale, zero, 2 ** bits - 1).astype(np.int32)}

    def step_gptq_block_update(self, W, U, codes, scale, zero):
        """One lazy block (paper eq. 4-5) with the block's codes given."""
        W, U = W.astype(self.f).copy(), U.astype(self.f)
        B = codes.shape[1]
        Q = scale.astype(self.f) * (codes.astype(self.f) - zero.astype(self.f))   # (out, B)
        Err = np.zeros((W.shape[0], B), self.f)
        for j in range(B):
            Err[:, j] = (W[:, j] - Q[:, j]) / U[j, j]
            W[:, j + 1:B] -= np.outer(Err[:, j], U[j, j + 1:B])
        return {"Err": Err, "W_rest": W[:, B:] - Err @ U[:, B:]}

    # ------------------------------------------------------------------ e2e tier
    def quantize(self, method, W, H, options):
        if method not in ("rtn", "gptq"):
            raise NotImplementedError(method)          # reported as "not checked"
        o = options
        bits, gs, sym, mse = o["bits"], o["group_size"], o["sym"], o["mse"]
        out, n = W.shape
        g = gs or n
        maxq = 2 ** bits - 1
        W = W.astype(self.f).copy()
        if method == "rtn":
            codes = np.zeros((out, n), np.int32)
            scales, zeros = [], []
            for c0 in range(0, n, g):
                s = self.step_uniform_grid(W[:, c0:], g, bits, sym, mse)
                codes[:, c0:c0 + g] = self._codes(W[:, c0:c0 + g], s["scale"], s["zero"], maxq)
                scales.append(s["scale"])
                zeros.append(s["zero"])
            g_idx = np.arange(n) // g
            return self._result(codes, np.stack(scales, 1), np.stack(zeros, 1), g_idx, bits,
                                gs, sym, False)
        H = H.astype(self.f).copy()
        dead = np.diag(H) == 0                             # inputs that never fire
        H[dead, dead] = 1
        W[:, dead] = 0
        static = o["static_groups"]
        G = -(-n // g)
        scales = np.zeros((out, G), self.f)
        zeros = np.zeros((out, G), self.f)
        if static:                                         # every grid on the original W
            for k in range(G):
                s = self.step_uniform_grid(W[:, k * g:], g, bits, sym, mse)
                scales[:, k], zeros[:, k] = s["scale"], s["zero"]
        perm = np.argsort(-np.diag(H), kind="stable") if o["act_order"] else np.arange(n)
        W, H = W[:, perm], H[perm][:, perm]                # processing order
        U = self.step_damped_inverse_cholesky(H, o["percdamp"])["U"]
        codes = np.zeros((out, n), np.int32)
        for j in range(n):                                 # Algorithm 1, one column at a time
            k = perm[j] // g if static else j // g
            if not static and j % g == 0:                  # a group starts: fit on updated W
                s = self.step_uniform_grid(W[:, j:], g, bits, sym, mse)
                scales[:, k], zeros[:, k] = s["scale"], s["zero"]
            q = self._codes(W[:, j:j + 1], scales[:, k], zeros[:, k], maxq)[:, 0]
            codes[:, j] = q
            err = (W[:, j] - scales[:, k] * (q - zeros[:, k])) / U[j, j]
            W[:, j + 1:] -= np.outer(err, U[j, j + 1:])    # OBS update of the later columns
        full = np.empty_like(codes)
        full[:, perm] = codes                              # back to the original order
        if static:
            g_idx = np.arange(n) // g
        else:
            g_idx = np.empty(n, np.int64)
            g_idx[perm] = np.arange(n) // g
        stored_perm = o["act_order"] and gs is not None and not static
        return self._result(full, scales, zeros, g_idx, bits, gs, sym, stored_perm)

    def _result(self, codes, scales, zeros, g_idx, bits, gs, sym, stored_perm):
        out, n = codes.shape
        W_hat = scales[:, g_idx] * (codes.astype(self.f) - zeros[:, g_idx])
        G = scales.shape[1]
        nbytes = out * -(-n * bits // 8) + 2 * out * G   # FORMAT.md "uniform": qweight, scales,
        if not sym:
            nbytes += -(-out * G * bits // 8)               # qzeros,
        if stored_perm:
            nbytes += 2 * n                                 # perm (uint16)
        return {"W_hat": W_hat, "codes": codes, "scales": scales, "zeros": zeros,
                "g_idx": g_idx.astype(np.int32), "bits_per_weight": 8 * nbytes / (out * n)}


_port = Port(np.float32)
decode = _port.decode
quantize = _port.quantize
step_damped_inverse_cholesky = _port.step_damped_inverse_cholesky
step_uniform_grid = _port.step_uniform_grid
step_uniform_codes = _port.step_uniform_codes
step_gptq_block_update = _port.step_gptq_block_update
