"""llama_np: a LLaMA forward pass in numpy, readable top to bottom.

    from llama_np import load_model, Tokenizer
    model = load_model(folder)          # config.json + *.safetensors
    logits = model.forward(ids)         # (T, vocab)
    loss, grads = loss_and_grads(model, ids)   # mean NLL of one window, {name: dloss/dparam}
"""
from .config import LlamaConfig
from .checkpoint import Checkpoint
from .model import Llama, DecoderLayer, Linear, KVCache, load_model, LINEAR_GROUPS, LINEAR_NAMES
from .tokenizer import Tokenizer
from .generate import perplexity, generate, sample_next
from .backward import loss_and_grads

__all__ = ["LlamaConfig", "Checkpoint", "Llama", "DecoderLayer", "Linear", "KVCache",
           "load_model", "Tokenizer", "perplexity", "generate", "sample_next",
           "LINEAR_GROUPS", "LINEAR_NAMES", "loss_and_grads"]
