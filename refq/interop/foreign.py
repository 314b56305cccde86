"""Read a GPTQ or AQLM Hugging Face checkpoint made by another tool into refq's formats.

`foreign_method(folder)` says whether config.json's quantization_config is
one of them; `load_foreign(folder)` returns what refq.checkpoint.load_packed
returns, (LlamaConfig, Checkpoint, quantization_config, {name: QuantizedWeight}),
so `refq eval/generate/info` run such a checkpoint through refq's own
formats and kernels (GPTQ -> `uniform`, AQLM -> `additive`, exactly).
"""
import json
import os

import numpy as np

from refq.errors import RefqError

FOREIGN = ("gptq", "aqlm")


def foreign_method(folder):
    """'gptq' / 'aqlm' if folder's config.json has that quantization_config, else None."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            qc = json.load(f).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    m = qc.get("quant_method") if isinstance(qc, dict) else None
    return m if m in FOREIGN else None


def load_foreign(folder):
    from llama_np import Checkpoint, LlamaConfig
    from llama_np.model import LINEAR_NAMES
    from refq.interop import aqlm, gptq
    cfg = LlamaConfig.load(folder)
    qc = cfg.extra["quantization_config"]
    method = qc["quant_method"]
    ckpt = Checkpoint(folder)
    d, hd = cfg.hidden_size, cfg.head_dim
    nh, nkv, ff = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    shapes = {"self_attn.q_proj": (nh * hd, d), "self_attn.k_proj": (nkv * hd, d),
              "self_attn.v_proj": (nkv * hd, d), "self_attn.o_proj": (d, nh * hd),
              "mlp.gate_proj": (ff, d), "mlp.up_proj": (ff, d), "mlp.down_proj": (d, ff)}

    def get(name, optional=False):
        if optional and name not in ckpt:
            return None
        return np.asarray(ckpt.raw(name))

    reader = gptq.import_layer if method == "gptq" else aqlm.import_layer
    field = ".qweight" if method == "gptq" else ".codes"
    qws = {}
    for i in range(cfg.num_hidden_layers):
        for short in LINEAR_NAMES:
            full = f"model.layers.{i}.{short}"
            if full + field not in ckpt:
                if full + ".weight" not in ckpt:
                    raise RefqError(f"{folder}: linear {full} has neither {field[1:]} nor weight")
                continue                                   # stored dense
            try:
                qws[full] = reader(full, get, qc, shapes[short])
            except RefqError as e:
                raise RefqError(f"{folder}: {e}") from None
    opts = {k: v for k, v in qc.items() if k not in ("quant_method", "meta")}
    rqc = {"quant_method": method, "method": f"{method} (imported {method.upper()} checkpoint)",
           "options": opts, "format_version": qc.get("checkpoint_format", method),
           "layers": {n: q.meta() for n, q in qws.items()}}
    return cfg, ckpt, rqc, qws
