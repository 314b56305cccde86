"""`refq export CKPT --to gptq|aqlm|gguf --out DIR`: a refq checkpoint in another runtime's layout.

    gptq  DIR/model.safetensors + config.json (quantization_config) +
          quantize_config.json + the tokenizer files: the Hugging Face GPTQ
          layout that transformers / AutoGPTQ / GPTQModel / vLLM load, from
          refq's `uniform` format (rtn, gptq, quantease without outliers).
          --checkpoint-format gptq (default: zeros stored minus one) or gptq_v2.
    aqlm  the same files in the Hugging Face AQLM layout, from `additive` (aqlm).
    gguf  DIR/model.gguf for llama.cpp: Q4_0 / Q8_0 exactly, Q4_1 for
          asymmetric 4-bit codes (minimum rounded to fp16), F16 otherwise
          (--exact: Q8_0 / F32 instead of the lossy two). CKPT may also be a
          dense Hugging Face folder (everything F32).

The layouts, with their sources, are in FORMAT.md ("Interop"). A format that
cannot map is refused with one line saying why; nothing is written then: the
output is built in a temporary sibling folder and renamed when complete.
"""
import json
import os
import shutil
import sys
import time

import numpy as np

from refq.errors import RefqError

TARGETS = ("gptq", "aqlm", "gguf")
_COPY = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def _load_source(src):
    """(LlamaConfig, Checkpoint, source config dict, {linear: QuantizedWeight}, packed?)."""
    from llama_np import Checkpoint, LlamaConfig
    from refq.loading import is_packed
    if not os.path.isdir(src):
        raise RefqError(f"{src}: no such folder")
    if is_packed(src):
        from refq.checkpoint import load_packed
        cfg, ckpt, qc, qws = load_packed(src)
        packed = True
    else:
        cfg, ckpt, qws, packed = LlamaConfig.load(src), Checkpoint(src), {}, False
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        raw_cfg = json.load(f)
    return cfg, ckpt, raw_cfg, qws, packed


def _linear_names(cfg):
    from llama_np.model import LINEAR_NAMES
    return [f"model.layers.{i}.{n}" for i in range(cfg.num_hidden_layers) for n in LINEAR_NAMES]


def _hf_folder(tmp, src, cfg, ckpt, raw_cfg, qws, to, checkpoint_format):
    """Write the GPTQ or AQLM Hugging Face folder into tmp."""
    from safetensors.numpy import save_file

    from refq.interop import aqlm, gptq
    if not qws:
        raise RefqError(f"{src}: not a refq packed checkpoint; nothing to export as {to}")
    tensors, dense = {}, []
    for full in _linear_names(cfg):
        if full not in qws:
            if to == "gptq":
                raise RefqError(f"{full}: stored dense; a GPTQ checkpoint quantizes every linear")
            dense.append(full + ".weight")
            continue
        fields = (gptq.export_layer(full, qws[full], checkpoint_format) if to == "gptq"
                  else aqlm.export_layer(full, qws[full]))
        tensors.update(fields)
    owned = tuple(n + "." for n in qws)
    for name in ckpt.names():                 # embeddings, norms, biases, dense linears
        if not name.startswith(owned):
            tensors[name] = np.asarray(ckpt.raw(name))
    if to == "gptq":
        qc = gptq.quantization_config(qws, checkpoint_format)
        src_qc = raw_cfg.get("quantization_config") or {}
        qc["true_sequential"] = bool((src_qc.get("calibration") or {}).get("true_sequential", False))
    else:
        not_q = dense + ["model.embed_tokens.weight"]
        if not cfg.tie_word_embeddings:
            not_q.append("lm_head.weight")
        qc = aqlm.quantization_config(qws, not_q)
    out_cfg = dict(raw_cfg)
    out_cfg["quantization_config"] = qc            # replaces refq's own
    tensors = {k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())}
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(out_cfg, f, indent=2)
    if to == "gptq":
        with open(os.path.join(tmp, "quantize_config.json"), "w", encoding="utf-8") as f:
            json.dump(qc, f, indent=2)
    for name in _COPY:
        p = os.path.join(src, name)
        if os.path.isfile(p):
            shutil.copyfile(p, os.path.join(tmp, name))
    return []


def export_checkpoint(src, to, out, checkpoint_format="gptq", exact=False, log=None):
    """Export the refq checkpoint `src` to folder `out` (which must not exist).

    to: "gptq" | "aqlm" | "gguf". checkpoint_format: "gptq" | "gptq_v2" (GPTQ
    only). exact: GGUF only, never a lossy type (Q8_0 / F32 instead of Q4_1 /
    F16). Returns {"to", "out", "files": {name: bytes}, "bytes", "seconds",
    "tensors": [{"name", "type", "exact", "note"}] (GGUF)}.
    """
    from refq.interop.gptq import CHECKPOINT_FORMATS
    log = log or (lambda *a: None)
    if to not in TARGETS:
        raise RefqError(f"--to {to}: unknown format (known: {', '.join(TARGETS)})")
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise RefqError(f"--checkpoint-format {checkpoint_format}: unknown "
                        f"(known: {', '.join(CHECKPOINT_FORMATS)})")
    if os.path.lexists(out):
        raise RefqError(f"--out {out}: already exists (refq export never overwrites)")
    t0 = time.perf_counter()
    cfg, ckpt, raw_cfg, qws, packed = _load_source(src)
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise RefqError(f"--out {out}: parent folder {parent} does not exist")
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        if to == "gguf":
            from refq.interop.gguf_export import write_gguf
            linears = {n: qws[n] if n in qws else ckpt.get(n + ".weight") for n in _linear_names(cfg)}
            report = write_gguf(os.path.join(tmp, "model.gguf"), src, cfg, ckpt.get, linears,
                                exact=exact)
            for r in report:
                if not r["exact"]:
                    log(f"warning: {r['name']}: {r['type']}: {r['note']}")
        else:
            report = _hf_folder(tmp, src, cfg, ckpt, raw_cfg, qws, to, checkpoint_format)
        files = {f: os.path.getsize(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))}
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"to": to, "out": out, "files": files, "bytes": sum(files.values()),
            "seconds": round(time.perf_counter() - t0, 3), "tensors": report}


# --------------------------------------------------------------------------- CLI
def cmd_export(args):
    r = export_checkpoint(args.ckpt, args.to, args.out, args.checkpoint_format, args.exact,
                          log=lambda *a: print(*a, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(r))
    else:
        kinds = {}
        for t in r["tensors"]:
            kinds[t["type"]] = kinds.get(t["type"], 0) + 1
        what = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        print(f"{args.ckpt}: exported to {args.to} in {r['out']} ({r['bytes'] / 2**20:.2f} MiB"
              f"{'; linears: ' + what if what else ''}) in {r['seconds']:.1f} s", file=sys.stderr)
    return 0


def add_commands(sub):
    s = sub.add_parser("export", help="write a refq checkpoint in the GPTQ / AQLM (Hugging Face) "
                       "or GGUF (llama.cpp) layout")
    s.add_argument("ckpt", metavar="CKPT", help="refq packed checkpoint (or, for gguf, an HF folder)")
    s.add_argument("--to", required=True, metavar="FORMAT", help="gptq | aqlm | gguf")
    s.add_argument("--out", required=True, help="output folder (must not exist)")
    s.add_argument("--checkpoint-format", default="gptq", metavar="gptq|gptq_v2",
                   help="GPTQ zero-point convention: gptq (stored minus one, default) or gptq_v2")
    s.add_argument("--exact", action="store_true",
                   help="GGUF: never a lossy type (Q8_0 instead of Q4_1, F32 instead of F16)")
    s.add_argument("--json", action="store_true", help="print the export report as JSON on stdout")
    s.set_defaults(func=cmd_export)
