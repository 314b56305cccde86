"""FORMAT.md's reader (numpy + safetensors only) decodes what refq writes.

The python block of FORMAT.md is executed as written, against checkpoints
refq packs, so the specification cannot drift from the code.
"""
import os
import re

import numpy as np
import pytest

from refq.calibrate import calibration_windows, quantize_layers
from refq.checkpoint import load_packed, save_packed

FORMAT_MD = os.path.join(os.path.dirname(os.path.dirname(__file__)), "FORMAT.md")


def _reader_snippet(fmt):
    """The python block of FORMAT.md whose first line is `# format: FMT`."""
    text = open(FORMAT_MD, encoding="utf-8").read()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S)
              if b.startswith(f"# format: {fmt}\n")]
    assert len(blocks) == 1, f"FORMAT.md needs exactly one python block for format {fmt}"
    return blocks[0]


@pytest.mark.parametrize("opts", [
    dict(method="gptq", bits=3, group_size=8, act_order=True),     # perm stored, ragged rows
    dict(method="gptq", bits=4, group_size=None, sym=True),        # no qzeros
    dict(method="rtn", bits=2, group_size=12),                     # ragged last group (32 = 12+12+8)
    dict(method="rtn", bits=5, group_size=16),
    dict(method="claq", bits=2.5, outlier_reservation=True, or_ratio_low=0.05),   # codebook + CSR
    dict(method="claq", bits=3, ap=False),
    dict(method="quantease", bits=3, group_size=8, outlier_frac=0.02, iters=3),   # uniform_sparse + perm
    dict(method="quantease", bits=2, act_order=False, outlier_frac=0.05, iters=2),
    dict(method="spqr", bits=3, group_size=8, qq_group_size=16),                 # ragged qq blocks (40 rows)
    dict(method="spqr", bits=4, group_size=4, qq_bits=None, sym=True, act_order=False),
    dict(method="squeezellm", bits=3, outlier_iqr=1.5, sensitive_frac=0.01),
    dict(method="squeezellm", bits=2),                                           # no outliers
    dict(method="slim", rank_ratio=0.2),                                         # 2:4 + SLiM-Quant + fp16 L, R
    dict(method="slim", pruner="sparsegpt", adapter_bits=4, adapter_group_size=8),  # 4-bit adapters
    dict(method="slim-quant", bits=3),                                           # dense, one scale
    dict(method="wanda", sparsity=0.5),                                          # unstructured fp16
    dict(method="sparsegpt", bits=4),                                            # 2:4 codes, row grid + qzeros
    dict(method="magnitude", sparsity=0.3, bits=3, sym=True),                    # unstructured codes stream
    dict(method="aqlm", num_codebooks=2, nbits_per_codebook=4, in_group_size=8, max_iters=2),  # additive
])
def test_format_md_reader_decodes_every_layer(tiny_ckpt, tmp_path, opts):
    import refq
    from llama_np import load_model
    folder, _ = tiny_ckpt(layers=1, hidden=32, ff=40)
    model = load_model(folder)
    windows = calibration_windows(np.arange(2, 64).repeat(4), 4, 16, seed=0)
    opts = dict(opts)
    method = opts.pop("method")
    quantized = {}

    def quantize(name, W, H):
        quantized[name] = refq.quantize_weight(W, H, method, **opts)
        return quantized[name]

    quantize_layers(model, windows, quantize)
    out = str(tmp_path / "packed")
    save_packed(out, folder, model, quantized, {"method": method, "options": opts})
    _, _, _, qws = load_packed(out)
    for name in quantized:
        code = _reader_snippet(quantized[name].FORMAT).replace('"DIR/', f'"{out}/')
        env = {}
        exec(code.replace('"model.layers.0.self_attn.q_proj"', repr(name)), env)
        np.testing.assert_array_equal(env["W"], qws[name].dequantize())
        np.testing.assert_array_equal(env["W"], quantized[name].dequantize())
