"""`refq eval --protocol refq|gptq|llama.cpp` and `--reference` (KL divergence, top-1).

Truths used: token counts in closed form from the protocols' definitions
(llama-perplexity scores ctx - 1 - ctx/2 tokens per chunk, the GPTQ reference
ctx - 1 per window, remainders dropped); the gptq protocol equals refq's when
the text is a whole number of windows; per-token NLL and KL recomputed with
scipy.special from full-window logits; KL of a model from itself is 0.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.special import log_softmax, rel_entr, softmax

from conftest import REPO, assert_one_line_error, tiny_text, write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("proto")
    a, b = str(base / "a"), str(base / "b")
    write_tiny_checkpoint(a, seed=0)
    write_tiny_checkpoint(b, seed=0, scale=0.3)    # same vocabulary, other weights
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 64, size=300)
    text = str(base / "t.txt")
    with open(text, "w") as f:
        f.write(tiny_text(ids))
    return {"a": a, "b": b, "text": text, "base": base}


def run_cli(*args):
    p = subprocess.run([sys.executable, "-m", "refq.cli", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def token_ids(folder, text):
    from llama_np import Tokenizer
    return Tokenizer(folder).encode(open(text).read())


def brute_nll(model, ids, starts, ctx, first, bos=None):
    """Sum of -log p over the tokens llama-perplexity's / GPTQ's loops score, by scipy."""
    total, n = 0.0, 0
    for s in starts:
        w = np.array(ids[s:s + ctx])
        if bos is not None:
            w[0] = bos
        lp = log_softmax(model.forward(w).astype(np.float64), axis=-1)   # (ctx, V)
        for t in range(first, ctx - 1):
            total -= lp[t, w[t + 1]]
            n += 1
    return total, n


@pytest.mark.parametrize("ctx", [64, 50])
def test_llamacpp_protocol_counts_and_nll(tiny, ctx):
    from llama_np import load_model
    from llama_np.generate import perplexity
    model = load_model(tiny["a"])
    ids = token_ids(tiny["a"], tiny["text"])
    ppl, n, nll = perplexity(model, ids, ctx, protocol="llama.cpp")
    chunks = len(ids) // ctx
    assert n == chunks * (ctx - 1 - ctx // 2)
    ref, n_ref = brute_nll(model, ids, [i * ctx for i in range(chunks)], ctx, ctx // 2)
    assert n_ref == n
    assert abs(nll - ref) <= 1e-6 * abs(ref)


def test_llamacpp_protocol_bos_replaces_each_chunks_first_token(tiny):
    from llama_np import load_model
    from llama_np.generate import perplexity
    model = load_model(tiny["a"])
    ids = [1] + token_ids(tiny["a"], tiny["text"])      # BOS prepended (id 1 here)
    _, n, nll = perplexity(model, ids, 64, protocol="llama.cpp", bos_id=1)
    ref, n_ref = brute_nll(model, ids, [i * 64 for i in range(len(ids) // 64)], 64, 32, bos=1)
    assert n == n_ref and abs(nll - ref) <= 1e-6 * abs(ref)
    _, _, nll_nobos = perplexity(model, ids, 64, protocol="llama.cpp")
    assert nll_nobos != nll


def test_gptq_protocol(tiny):
    from llama_np import load_model
    from llama_np.generate import perplexity
    model = load_model(tiny["a"])
    ids = token_ids(tiny["a"], tiny["text"])
    ppl, n, nll = perplexity(model, ids, 64, protocol="gptq")
    assert n == (len(ids) // 64) * 63                       # remainder dropped
    whole = ids[:(len(ids) // 64) * 64]                     # a whole number of windows:
    assert perplexity(model, whole, 64, protocol="refq")[:2] == (ppl, n)   # same as refq's
    ref, _ = brute_nll(model, ids, range(0, len(whole), 64), 64, 0)
    assert abs(nll - ref) <= 1e-6 * abs(ref)


def test_kl_divergence_against_scipy(tiny):
    from llama_np import load_model
    from llama_np.generate import kl_divergence
    a, b = load_model(tiny["a"]), load_model(tiny["b"])
    ids = token_ids(tiny["a"], tiny["text"])[:128]
    same = kl_divergence(a, a, ids, 64, protocol="llama.cpp")
    assert same["kld"] == 0 and same["top1"] == 1.0 and same["ppl"] == same["ppl_reference"]
    r = kl_divergence(b, a, ids, 64, protocol="llama.cpp")
    kls, agree = [], []
    for s in (0, 64):
        w = np.array(ids[s:s + 64])
        pa = softmax(a.forward(w).astype(np.float64), axis=-1)[32:63]
        pb = softmax(b.forward(w).astype(np.float64), axis=-1)[32:63]
        kls.extend(rel_entr(pa, pb).sum(-1))
        agree.extend(pa.argmax(-1) == pb.argmax(-1))
    assert r["tokens"] == len(kls) == 62
    assert abs(r["kld"] - np.mean(kls)) <= 1e-9 + 1e-6 * np.mean(kls)
    assert r["kld"] > 0 and r["top1"] == np.mean(agree)


def test_cli_protocols_and_reference(tiny):
    res = {}
    for proto in ("refq", "gptq", "llama.cpp"):
        rc, out, err = run_cli("eval", "--model", tiny["a"], "--text", tiny["text"],
                               "--protocol", proto, "--ctx", "64", "--json")
        assert rc == 0, err
        res[proto] = json.loads(out)
    n_ids = len(token_ids(tiny["a"], tiny["text"]))
    assert res["gptq"]["tokens"] == (n_ids // 64) * 63
    assert res["llama.cpp"]["tokens"] == (n_ids // 64) * 31
    assert set(res["refq"]) == {"ppl", "tokens", "seconds"}          # the contract's keys
    rc, out, err = run_cli("eval", "--model", tiny["b"], "--reference", tiny["a"], "--text",
                           tiny["text"], "--protocol", "llama.cpp", "--ctx", "64", "--json")
    assert rc == 0, err
    r = json.loads(out)
    assert r["kld"] > 0 and 0 <= r["top1"] <= 1 and r["tokens"] == res["llama.cpp"]["tokens"]
    assert r["ppl_reference"] == pytest.approx(res["llama.cpp"]["ppl"], rel=1e-9)
    # too short for llama-perplexity: refused as llama.cpp does, in one line
    rc, out, err = run_cli("eval", "--model", tiny["a"], "--text", tiny["text"],
                           "--protocol", "llama.cpp", "--json")
    assert_one_line_error(rc, out, err, "--text", "1024")
