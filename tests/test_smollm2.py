"""llama_np on the real default model against numbers produced by transformers.

The fixture tests/fixtures/smollm2_reference.npz was written once by
tests/fixtures/make_reference.py (transformers 5.x, torch CPU fp32, loading the
GGUF file itself with its own converter: an independent path from ours).
"""
import os

import numpy as np
import pytest

from llama_np import Tokenizer, generate, load_model, perplexity
from llama_np.generate import log_softmax_nll

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "smollm2_reference.npz")
EVAL = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "eval.txt")


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURE, allow_pickle=False))


@pytest.fixture(scope="module")
def model(smollm2_path):
    return load_model(smollm2_path)


@pytest.fixture(scope="module")
def tok(smollm2_path):
    return Tokenizer(smollm2_path)


def test_config_facts(model):
    c = model.cfg
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.rms_norm_eps == 1e-5


def test_tokenizer_matches_reference(tok, ref):
    with open(EVAL, encoding="utf-8") as f:
        ids = tok.encode(f.read())
    assert np.array_equal(np.array(ids), ref["eval_ids"])


def test_logits_match_transformers(model, ref):
    logits = model.forward(ref["win_ids"])                         # (256, V)
    assert np.array_equal(logits.argmax(-1), ref["win_argmax"])
    got = logits[:, ref["probe_ids"]]
    np.testing.assert_allclose(got, ref["probe_logits"], atol=1e-4, rtol=0)
    m = logits.max(-1, keepdims=True).astype(np.float64)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(-1))
    np.testing.assert_allclose(lse, ref["win_lse"], atol=1e-4, rtol=0)


def test_perplexity_matches_transformers(model, ref):
    ids = ref["eval_ids"]
    ppl, n, _ = perplexity(model, ids[:2048], ctx=512)
    assert n == int(ref["ppl_tokens"])
    assert abs(ppl / float(ref["ppl_ctx512"]) - 1) < 1e-5
    ppl128, _, _ = perplexity(model, ids[:1000], ctx=128)
    assert abs(ppl128 / float(ref["ppl_ctx128_first1000"]) - 1) < 1e-5


def test_greedy_paris(model, tok, ref):
    prompt = tok.encode("The capital of France is")
    assert np.array_equal(prompt, ref["greedy_prompt_ids"])
    new = generate(model, prompt, len(ref["greedy_new_ids"]))
    assert np.array_equal(new, ref["greedy_new_ids"])
    assert tok.decode(new).startswith(" Paris")


def test_kv_cache_matches_full_forward(model, ref):
    ids = ref["win_ids"][:40]
    full = model.forward(ids)
    cache = model.new_cache(len(ids))
    parts = [model.forward(ids[:25], cache=cache)]
    parts += [model.forward(ids[t:t + 1], cache=cache) for t in range(25, len(ids))]
    # float32 BLAS sums in a different order for 1 row than for 25 (GEMV vs GEMM):
    # over 30 layers that leaves ~5e-5 on logits of size ~25, i.e. 1e-5 of the scale.
    scale = np.abs(full).max()
    np.testing.assert_allclose(np.concatenate(parts), full, atol=1e-5 * scale, rtol=0)
    assert np.array_equal(np.concatenate(parts).argmax(-1), full.argmax(-1))


def test_nll_helper_matches_float64(ref, model):
    logits = model.forward(ref["win_ids"][:32])
    t = ref["win_ids"][1:33]
    l64 = logits.astype(np.float64)
    want = np.log(np.exp(l64 - l64.max(-1, keepdims=True)).sum(-1)) + l64.max(-1) - l64[np.arange(32), t]
    np.testing.assert_allclose(log_softmax_nll(logits, t), want, rtol=1e-6, atol=1e-6)
