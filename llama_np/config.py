"""The model's hyper-parameters, read from a Hugging Face config.json.

One dataclass covers LLaMA, Mistral and Qwen2-style checkpoints: they differ
only in defaults (q/k/v biases for Qwen2, an explicit head_dim for some) and in
where the RoPE base lives (`rope_theta`, or `rope_parameters.rope_theta` in
transformers 5.x configs).
"""
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from refq.errors import RefqError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int               # d, the width of the residual stream
    intermediate_size: int         # the SwiGLU MLP's inner width
    num_hidden_layers: int
    num_attention_heads: int       # query heads
    num_key_value_heads: int       # key/value heads (grouped-query attention)
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None   # None, or {"rope_type": "linear"|"llama3", ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False          # q/k/v (not o) projections carry a bias
    max_position_embeddings: int = 2048
    model_type: str = "llama"
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[object] = None
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d, source="config.json"):
        mt = d.get("model_type", "llama")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise RefqError(f"{source}: unsupported model_type {mt!r} "
                            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        for key in ("vocab_size", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads"):
            if key not in d:
                raise RefqError(f"{source}: missing key {key!r}")
            if not isinstance(d[key], int) or d[key] <= 0:
                raise RefqError(f"{source}: {key} must be a positive integer, got {d[key]!r}")
        n_heads = d["num_attention_heads"]
        n_kv = d.get("num_key_value_heads") or n_heads
        if n_heads % n_kv:
            raise RefqError(f"{source}: num_attention_heads={n_heads} is not a multiple "
                            f"of num_key_value_heads={n_kv}")
        head_dim = d.get("head_dim") or d["hidden_size"] // n_heads
        # RoPE base: transformers 5.x nests it in rope_parameters.
        rope = d.get("rope_parameters") or {}
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling")
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = rope
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind not in ("default", "linear", "llama3"):
                raise RefqError(f"{source}: unsupported rope_scaling type {kind!r} "
                                "(supported: default, linear, llama3)")
            scaling = None if kind == "default" else dict(scaling, rope_type=kind)
            f = scaling and scaling.get("factor")
            if scaling and (isinstance(f, bool) or not isinstance(f, (int, float)) or f <= 0):
                raise RefqError(f"{source}: rope_scaling {kind!r} needs a positive "
                                f"'factor', got {f!r}")
        bias = d.get("attention_bias", mt == "qwen2")
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)), rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(bias),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            model_type=mt, bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"), extra=d,
        )

    @classmethod
    def load(cls, folder):
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise RefqError(f"{path}: no such file (is {folder!r} a Hugging Face model folder?)")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, ValueError) as e:
            raise RefqError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise RefqError(f"{path}: expected a JSON object")
        return cls.from_dict(d, source=path)
