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
