"""The AQLM Hugging Face layout (the `aqlm` package / transformers), both ways.

Per quantized linear NAME (out, in), M codebooks of 2^B vectors of
out_group x in_group weights (FORMAT.md, "Interop: AQLM", gives the sources):

    NAME.codes      int8 (B <= 8) / int16 (B <= 16)
                    (out/out_group, in/in_group, M); a code c >= 2^(B-1) is
                    stored as c - 2^B (read back as stored mod 2^B)
    NAME.codebooks  float16 (M, 2^B, out_group, in_group)
    NAME.scales     float16 (out/out_group, 1, 1, 1)

    W[o*og + a, k*ig + c] = scales[o] * sum_m codebooks[m, codes[o, k, m], a, c]

refq's `additive` format is the case out_group = 1, so both directions are
exact (the reader sums the M float32 vectors in order, as refq does).
"""
import numpy as np

from refq.errors import RefqError


def int_dtype(nbits):
    """The signed type AQLM stores B-bit codes in."""
    if nbits <= 8:
        return np.int8
    if nbits <= 16:
        return np.int16
    raise RefqError(f"{nbits}-bit codebooks: refq's additive format holds at most 16")


def export_layer(name, q):
    """A refq AdditiveWeight -> {NAME.field: array} in the AQLM layout."""
    from refq.formats.additive import AdditiveWeight
    if not isinstance(q, AdditiveWeight):
        raise RefqError(f"{name}: format {q.FORMAT!r} has no AQLM equivalent "
                        "(only 'additive', method aqlm)")
    out, n = q.shape
    B = q.nbits_per_codebook
    codes = q.codes.astype(np.int64)                                  # (out, K, M)
    codes = np.where(codes >= 2 ** (B - 1), codes - 2 ** B, codes)    # AQLM's signed storage
    return {
        name + ".codes": np.ascontiguousarray(codes.astype(int_dtype(B))),
        name + ".codebooks": np.ascontiguousarray(q.codebooks[:, :, None, :]),  # (M, 2^B, 1, g)
        name + ".scales": np.ascontiguousarray(q.scales.reshape(out, 1, 1, 1)),
    }


def quantization_config(qws, not_quantized):
    first = next(iter(qws.values()))
    key = (first.num_codebooks, first.nbits_per_codebook, first.in_group_size)
    for name, q in qws.items():
        if (q.num_codebooks, q.nbits_per_codebook, q.in_group_size) != key:
            raise RefqError(f"{name}: codebook setting differs from the other layers'; an AQLM "
                            "config holds one setting for the whole model")
    return {"quant_method": "aqlm", "in_group_size": first.in_group_size, "out_group_size": 1,
            "num_codebooks": first.num_codebooks,
            "nbits_per_codebook": first.nbits_per_codebook,
            "linear_weights_not_to_quantize": sorted(not_quantized)}


def import_layer(name, get, qc, shape):
    """{NAME.field} of an AQLM checkpoint -> a refq AdditiveWeight, exactly."""
    from refq.formats.additive import AdditiveWeight
    out, n = shape
    try:
        M, B = int(qc["num_codebooks"]), int(qc["nbits_per_codebook"])
        ig, og = int(qc["in_group_size"]), int(qc.get("out_group_size", 1))
    except (KeyError, TypeError, ValueError) as e:
        raise RefqError(f"AQLM quantization_config lacks a valid {e}") from None
    if og != 1:
        raise RefqError(f"AQLM out_group_size {og}: refq's additive format has out_group_size 1")
    codes, cb, sc = get(name + ".codes"), get(name + ".codebooks"), get(name + ".scales")
    if codes.dtype != int_dtype(B) or tuple(codes.shape) != (out, n // ig, M) or n % ig:
        raise RefqError(f"{name}: codes {codes.dtype} {tuple(codes.shape)}, expected "
                        f"{np.dtype(int_dtype(B)).name} {(out, n // ig, M)}")
    if tuple(cb.shape) != (M, 2 ** B, 1, ig) or cb.dtype != np.float16:
        raise RefqError(f"{name}: codebooks {cb.dtype} {tuple(cb.shape)}, expected float16 "
                        f"{(M, 2 ** B, 1, ig)}")
    if sc.size != out or sc.dtype != np.float16:
        raise RefqError(f"{name}: scales {sc.dtype} {tuple(sc.shape)}, expected float16 "
                        f"({out}, 1, 1, 1)")
    unsigned = np.asarray(codes).astype(np.int64) % (2 ** B)            # (out, K, M)
    return AdditiveWeight.from_arrays(unsigned, np.asarray(cb)[:, :, 0, :],
                                      np.asarray(sc).reshape(out), B, method="aqlm",
                                      options={"num_codebooks": M, "nbits_per_codebook": B,
                                               "in_group_size": ig, "source": "aqlm checkpoint"},
                                      info={"name": name})
