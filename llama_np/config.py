"""The model's hyper-parameters, read from a Hugging Face config.json.

One dataclass covers LLaMA, Mistral and Qwen2-style checkpoints: they differ
only in defaults (q/k/v biases for Qwen2, an explicit head_dim for some) and in
where the RoPE base lives (`rope_theta`, or `rope_parameters.rope_theta` in
transformers 5.x configs).
"""
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

from refq.errors import RefqError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
REQUIRED = object()

# --------------------------------------------------------------------------- the checks
# Every config.json field llama_np reads, with the values it can compute with.
# kind: "int>0" | "int>=0" | "number>0" (finite, not a bool) | "bool" | "object" |
# a tuple of allowed strings; "?" after it: null (or absent) means the default.
FIELDS = (
    # key                        kind            default       what it is
    ("model_type",               SUPPORTED_MODEL_TYPES, "llama", "architecture family"),
    ("vocab_size",               "int>0",        REQUIRED,     "rows of the embedding and lm_head"),
    ("hidden_size",              "int>0",        REQUIRED,     "width of the residual stream"),
    ("intermediate_size",        "int>0",        REQUIRED,     "width of the MLP"),
    ("num_hidden_layers",        "int>0",        REQUIRED,     "decoder layers"),
    ("num_attention_heads",      "int>0",        REQUIRED,     "query heads"),
    ("num_key_value_heads",      "int>0?",       None,         "key/value heads (None: = query heads)"),
    ("head_dim",                 "int>0?",       None,         "per head (None: hidden_size / heads)"),
    ("rms_norm_eps",             "number>0",     1e-5,         "RMSNorm epsilon"),
    ("rope_theta",               "number>0",     None,         "RoPE base (or rope_parameters.rope_theta)"),
    ("rope_parameters",          "object?",      None,         "transformers 5.x: RoPE base and scaling"),
    ("rope_scaling",             "object?",      None,         "RoPE scaling (linear, llama3)"),
    ("tie_word_embeddings",      "bool",         False,        "lm_head is the embedding"),
    ("attention_bias",           "bool",         None,         "q/k/v biases (default: qwen2 only)"),
    ("max_position_embeddings",  "int>0",        2048,         "positions the model was trained on"),
    ("bos_token_id",             "int>=0?",      None,         "begin-of-sequence token"),
    ("eos_token_id",             "int>=0 list?", None,         "end-of-sequence token(s)"),
    ("hidden_act",               ("silu",),      "silu",       "MLP activation (llama_np computes SwiGLU)"),
    ("mlp_bias",                 "bool",         False,        "biases on the MLP (llama_np has none)"),
)
SCALING_FIELDS = (
    ("factor",                           "number>0", REQUIRED, "linear, llama3"),
    ("low_freq_factor",                  "number>0", 1.0,      "llama3"),
    ("high_freq_factor",                 "number>0", 4.0,      "llama3"),
    ("original_max_position_embeddings", "int>0",    8192,     "llama3"),
)
_WORDS = {"int>0": "a positive integer", "int>=0": "an integer >= 0",
          "number>0": "a positive finite number", "bool": "true or false",
          "object": "a JSON object", "int>=0 list": "an integer >= 0 or a list of them"}


def _ok(kind, v):
    is_int = isinstance(v, int) and not isinstance(v, bool)
    if isinstance(kind, tuple):
        return v in kind
    if kind == "int>0":
        return is_int and v > 0
    if kind == "int>=0":
        return is_int and v >= 0
    if kind == "number>0":
        return (isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(v) and v > 0)
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "object":
        return isinstance(v, dict)
    if kind == "int>=0 list":
        return _ok("int>=0", v) or (isinstance(v, list) and all(_ok("int>=0", x) for x in v))
    raise ValueError(kind)


def check_fields(d, table, where):
    """{key: value} for every key of `table`, defaults filled in; a value of the
    wrong type or range is a RefqError naming `where` and the key."""
    out = {}
    for key, kind, default, _ in table:
        nullable = isinstance(kind, str) and kind.endswith("?")
        kind = kind.rstrip("?") if isinstance(kind, str) else kind
        v = d.get(key)
        if key not in d or (v is None and nullable):
            if default is REQUIRED:
                raise RefqError(f"{where}: missing key {key!r}")
            out[key] = default
            continue
        if not _ok(kind, v):
            want = (f"one of {', '.join(kind)}" if isinstance(kind, tuple) else _WORDS[kind])
            raise RefqError(f"{where}: {key} must be {want}"
                            f"{' or null' if nullable else ''}, got {v!r}")
        out[key] = v
    return out


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
        """Every field checked by type and range (FIELDS), then the cross-field rules."""
        if not isinstance(d, dict):
            raise RefqError(f"{source}: expected a JSON object")
        if "model_type" in d and d["model_type"] not in SUPPORTED_MODEL_TYPES:
            raise RefqError(f"{source}: unsupported model_type {d['model_type']!r} "
                            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        f = check_fields(d, FIELDS, source)
        mt = f["model_type"]
        n_heads = f["num_attention_heads"]
        n_kv = f["num_key_value_heads"] or n_heads
        if n_heads % n_kv:
            raise RefqError(f"{source}: num_attention_heads={n_heads} is not a multiple "
                            f"of num_key_value_heads={n_kv}")
        head_dim = f["head_dim"]
        if head_dim is None:
            if f["hidden_size"] % n_heads:
                raise RefqError(f"{source}: hidden_size {f['hidden_size']} is not a multiple of "
                                f"num_attention_heads {n_heads} (and no head_dim is given)")
            head_dim = f["hidden_size"] // n_heads
        if head_dim % 2:
            raise RefqError(f"{source}: head_dim {head_dim} must be even (RoPE rotates pairs)")
        # RoPE base: transformers 5.x nests it in rope_parameters.
        rope = f["rope_parameters"] or {}
        theta = f["rope_theta"]
        if theta is None:
            theta = check_fields(rope, (("rope_theta", "number>0", 10000.0, ""),),
                                 f"{source}: rope_parameters")["rope_theta"]
        scaling, where = f["rope_scaling"], f"{source}: rope_scaling"
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling, where = rope, f"{source}: rope_parameters"
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind not in ("default", "linear", "llama3"):
                raise RefqError(f"{where}: unsupported rope type {kind!r} "
                                "(supported: default, linear, llama3)")
            if kind == "default":
                scaling = None
            else:
                sf = check_fields(scaling, SCALING_FIELDS, where)
                if kind == "llama3" and not sf["high_freq_factor"] > sf["low_freq_factor"]:
                    raise RefqError(f"{where}: high_freq_factor {sf['high_freq_factor']} must "
                                    f"exceed low_freq_factor {sf['low_freq_factor']}")
                scaling = dict(scaling, rope_type=kind, **sf)
        bias = f["attention_bias"]
        return cls(
            vocab_size=f["vocab_size"], hidden_size=f["hidden_size"],
            intermediate_size=f["intermediate_size"],
            num_hidden_layers=f["num_hidden_layers"],
            num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim,
            rms_norm_eps=float(f["rms_norm_eps"]), rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=f["tie_word_embeddings"],
            attention_bias=(mt == "qwen2") if bias is None else bias,
            max_position_embeddings=f["max_position_embeddings"],
            model_type=mt, bos_token_id=f["bos_token_id"],
            eos_token_id=f["eos_token_id"], extra=d,
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
