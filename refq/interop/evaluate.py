"""`refq eval --protocol refq|gptq|llama.cpp [--reference MODEL]`: other tools' conventions.

Tokenization per protocol (README, "Evaluation protocols", has the sources):

    refq       tokenizer.encode(text) with no special tokens (DESIGN.md's contract)
    gptq       as `tokenizer(text)` in transformers: special tokens added (a
               BOS at the start when the tokenizer's post-processor adds one)
    llama.cpp  as llama-perplexity's common_tokenize(text, add_special=true):
               BOS prepended when the vocabulary asks for one
               (tokenizer_config.json add_bos_token, else what the tokenizer's
               post-processor does), and each chunk's first token replaced by BOS

The windows and scored tokens are llama_np.generate.eval_windows.
"""
import json
import os

from refq.errors import RefqError

DEFAULT_CTX = {"refq": 512, "gptq": 2048, "llama.cpp": 512}


def vocab_adds_bos(folder, tok):
    """The BOS id if the vocabulary asks for a BOS before a text, else None."""
    path = os.path.join(folder, "tokenizer_config.json")
    add = None
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                add = json.load(f).get("add_bos_token")
        except (OSError, ValueError, AttributeError):
            add = None
    with_special = tok._tok.encode("a", add_special_tokens=True).ids
    plain = tok._tok.encode("a", add_special_tokens=False).ids
    post_adds = len(with_special) > len(plain) and with_special[1:] == plain
    if add is None:
        add = post_adds
    if not add:
        return None
    if post_adds:
        return with_special[0]
    cfg = json.load(open(os.path.join(folder, "config.json"), encoding="utf-8"))
    bos = cfg.get("bos_token_id")
    if bos is None:
        raise RefqError(f"{path}: add_bos_token is true but config.json has no bos_token_id")
    return int(bos)


def encode(tok, folder, text, protocol):
    """-> (ids, bos_id or None) as `protocol` tokenizes text."""
    if protocol == "refq":
        return tok.encode(text), None
    if protocol == "gptq":
        return tok._tok.encode(text, add_special_tokens=True).ids, None
    bos = vocab_adds_bos(folder, tok)
    ids = tok.encode(text)
    return ([bos] + ids if bos is not None else ids), bos


def check_length(n, ctx, protocol, text):
    if protocol == "llama.cpp" and n < 2 * ctx:
        raise RefqError(f"--text {text}: {n} tokens; the llama.cpp protocol needs at least "
                        f"2 x --ctx = {2 * ctx} (llama-perplexity refuses fewer)")
    if protocol == "gptq" and n < ctx:
        raise RefqError(f"--text {text}: {n} tokens; the gptq protocol needs at least one "
                        f"window of --ctx {ctx}")
    if n < 2:
        raise RefqError(f"--text {text}: has {n} token(s); perplexity needs at least 2")
