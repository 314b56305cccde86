"""The GPTQ Hugging Face layout (AutoGPTQ / GPTQModel / transformers), both ways.

Per quantized linear NAME (out, in) with b bits, groups of g inputs, G groups
(FORMAT.md, "Interop: GPTQ", gives the sources):

    NAME.qweight  int32 (in*b/32, out)   column j of W: its in codes along the
                                         input dimension as ONE little-endian,
                                         LSB-first bitstream of 32-bit words
                                         (code i at bits [i*b, (i+1)*b) of the
                                         column's stream; 3-bit codes straddle
                                         words), in ORIGINAL input order
    NAME.qzeros   int32 (G, out*b/32)    row k: the out zero points of group k,
                                         packed the same way along the output
                                         dimension; stored minus one when
                                         checkpoint_format is "gptq" (v1), as
                                         is for "gptq_v2"
    NAME.scales   float16 (G, out)
    NAME.g_idx    int32 (in,)            group of each original input column

    W[j, i] = scales[g_idx[i], j] * (code[i, j] - zero[g_idx[i], j])

refq's `uniform` format is the same arithmetic (an fp16 scale times a small
integer difference), so both directions are exact.  Act-order: refq stores
the codes in processing order with `perm`; GPTQ stores them in original
order with g_idx[perm[k]] = k // g.
"""
import numpy as np

from refq.errors import RefqError

BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


# --------------------------------------------------------------------------- packing
def pack_int32(codes, bits, axis):
    """codes (..) ints in [0, 2^bits) -> int32 words, one bitstream along `axis`.

    Along `axis`, the n codes become n*bits/32 words; code i sits at stream
    bits [i*bits, (i+1)*bits), stream bit s in word s // 32 at bit s % 32
    (little-endian words, so stream bit s is bit s % 8 of byte s // 8).
    """
    c = np.moveaxis(np.asarray(codes, dtype=np.int64), axis, -1)           # (..., n)
    n = c.shape[-1]
    assert (n * bits) % 32 == 0
    stream = ((c[..., None] >> np.arange(bits)) & 1).astype(np.uint8)      # (..., n, bits)
    stream = stream.reshape(*c.shape[:-1], n * bits)
    by = np.ascontiguousarray(np.packbits(stream, axis=-1, bitorder="little"))
    return np.ascontiguousarray(np.moveaxis(by.view("<i4"), -1, axis))


def unpack_int32(words, bits, axis):
    """The inverse of pack_int32: int32 words -> int64 codes along `axis`."""
    w = np.ascontiguousarray(np.moveaxis(np.asarray(words, dtype="<i4"), axis, -1))
    stream = np.unpackbits(w.view(np.uint8), axis=-1, bitorder="little")   # (..., words*32)
    stream = stream.reshape(*w.shape[:-1], -1, bits).astype(np.int64)     # (..., n, bits)
    codes = (stream << np.arange(bits)).sum(-1)
    return np.moveaxis(codes, -1, axis)


# --------------------------------------------------------------------------- export
def export_layer(name, q, checkpoint_format):
    """A refq UniformWeight -> {NAME.field: array} in the GPTQ layout."""
    from refq.formats.uniform import UniformWeight
    if not isinstance(q, UniformWeight):
        raise RefqError(f"{name}: format {q.FORMAT!r} has no GPTQ equivalent "
                        "(only 'uniform': rtn, gptq, quantease without outliers)")
    out, n = q.shape
    b = q.bits
    if b not in BITS:
        raise RefqError(f"{name}: {b}-bit codes; GPTQ kernels and loaders take bits {BITS}")
    if n % 32 or out % 32:
        raise RefqError(f"{name}: shape ({out}, {n}); the GPTQ layout packs 32 codes per "
                        "group of words and needs in and out features that are multiples of 32")
    g = q.group_size or n
    G = q.n_groups
    codes, g_idx = q.original_order()                           # original column order
    codes = codes.astype(np.int64)                              # (out, in)
    zeros = q.zeros().astype(np.int64)                          # (out, G)
    if checkpoint_format == "gptq":
        if (zeros == 0).any():
            raise RefqError(f"{name}: an asymmetric zero point is 0, which the v1 GPTQ "
                            "convention (zeros stored minus one) would wrap; use "
                            "--checkpoint-format gptq_v2")
        zeros = zeros - 1
    assert g_idx.max() < G and g == (q.group_size or n)
    return {
        name + ".qweight": pack_int32(codes.T, b, axis=0),      # (in*b/32, out)
        name + ".qzeros": pack_int32(zeros.T, b, axis=1),       # (G, out*b/32)
        name + ".scales": np.ascontiguousarray(q.scales.T),     # (G, out) float16
        name + ".g_idx": g_idx.astype(np.int32),                # (in,)
    }


def quantization_config(qws, checkpoint_format):
    """The config.json `quantization_config` (also written as quantize_config.json)."""
    from refq._version import __version__
    first = next(iter(qws.values()))
    bits, g, sym = first.bits, first.group_size, first.sym
    for name, q in qws.items():
        if (q.bits, q.group_size, q.sym) != (bits, g, sym):
            raise RefqError(f"{name}: bits/group_size/sym ({q.bits}, {q.group_size}, {q.sym}) "
                            f"differ from the other layers' ({bits}, {g}, {sym}); a GPTQ "
                            "config holds one setting for the whole model")
    opts = first.options
    return {"quant_method": "gptq", "bits": bits, "group_size": -1 if g is None else g,
            "desc_act": any(q.perm is not None for q in qws.values()), "sym": sym,
            "static_groups": bool(opts.get("static_groups", False)),
            "true_sequential": False, "damp_percent": opts.get("percdamp", 0.01),
            "checkpoint_format": checkpoint_format,
            "meta": {"quantizer": [f"refq:{__version__}"], "method": first.method}}


# --------------------------------------------------------------------------- import
def import_layer(name, get, qc, shape):
    """{NAME.field} of a GPTQ checkpoint -> a refq UniformWeight, exactly.

    get(tensor name) -> stored array. qc: the config's quantization_config.
    """
    from refq.formats.uniform import UniformWeight
    out, n = shape
    b = int(qc.get("bits", 0))
    if b not in BITS:
        raise RefqError(f"quantization_config.bits {qc.get('bits')!r} is not one of {BITS}")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in CHECKPOINT_FORMATS:
        raise RefqError(f"quantization_config.checkpoint_format {fmt!r} is not supported "
                        f"(supported: {', '.join(CHECKPOINT_FORMATS)})")
    qweight, qzeros, scales = get(name + ".qweight"), get(name + ".qzeros"), get(name + ".scales")
    g_idx = get(name + ".g_idx", optional=True)
    for t, dt, shp in ((qweight, np.int32, (n * b // 32, out)), (qzeros, np.int32, None),
                       (scales, np.float16, None)):
        if t.dtype != dt or (shp and tuple(t.shape) != shp):
            raise RefqError(f"{name}: a GPTQ tensor has {t.dtype} {tuple(t.shape)}, expected "
                            f"{np.dtype(dt).name}{' ' + str(shp) if shp else ''}")
    G = scales.shape[0]
    if tuple(scales.shape) != (G, out) or tuple(qzeros.shape) != (G, out * b // 32):
        raise RefqError(f"{name}: scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} "
                        f"do not fit {out} outputs at {b} bits")
    gs = int(qc.get("group_size", -1))
    g = n if gs in (-1, 0) else gs
    if g_idx is None:
        g_idx = np.arange(n) // g
    g_idx = np.asarray(g_idx).astype(np.int64)
    if g_idx.shape != (n,) or g_idx.min() < 0 or g_idx.max() >= G:
        raise RefqError(f"{name}: g_idx must be ({n},) with groups in [0, {G})")
    codes = unpack_int32(qweight, b, axis=0).T                  # (out, in) original order
    zeros = unpack_int32(qzeros, b, axis=1).T                   # (out, G)
    if fmt == "gptq":
        zeros = zeros + 1
    if zeros.max() >= 2 ** b:
        raise RefqError(f"{name}: a zero point of {int(zeros.max())} does not fit {b} bits "
                        "(a v1 checkpoint whose zero 0 wrapped?)")
    # refq's groups are runs of g stored columns: sort the columns by group
    # (stable); that is a valid refq layout when group k has g columns (the
    # last one possibly fewer), as GPTQ's act-order and plain orders give.
    perm = np.argsort(g_idx, kind="stable")
    counts = np.bincount(g_idx, minlength=G)
    want = np.minimum(g, n - g * np.arange(G))
    if G != -(-n // g) or not np.array_equal(counts, want):
        raise RefqError(f"{name}: g_idx does not describe groups of {g} columns")
    trivial = np.array_equal(perm, np.arange(n))
    sym = bool(np.all(zeros == 2 ** (b - 1)))
    return UniformWeight.from_codes(
        codes[:, perm], scales.T, zeros, b, None if g == n else g, sym,
        perm=None if trivial else perm, method="gptq",
        options={"bits": b, "group_size": None if g == n else g, "sym": sym,
                 "act_order": not trivial, "source": "gptq checkpoint"},
        info={"name": name})
