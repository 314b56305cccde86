"""llama.cpp's own Q4_0 rounding of SmolLM2, as a Hugging Face folder refq can evaluate.

    python benchmarks/q4_0_reference.py OUT_DIR [--model HF_FOLDER]

Every linear is quantized with gguf-py's Q4_0 quantizer (gguf.quants, the numpy
port of ggml's quantize_row_q4_0_ref, which gguf-py's tests check bit for bit
against the C library; llama-quantize uses that routine for Q4_0 when no
importance matrix is given) and dequantized back; embedding, norms and the
(tied) lm_head are left in float32, as in a refq GGUF export. The folder is what
llama-quantize --token-embedding-type f32 ... Q4_0 would produce, dequantized,
so `refq eval --protocol llama.cpp` on it is llama.cpp's plain-rounding baseline
next to refq's RTN / GPTQ checkpoints exported to Q4_0.
"""
import argparse
import os
import shutil
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main():
    import gguf
    from safetensors.numpy import save_file

    from llama_np import Checkpoint
    from refq.fetch import resolve_model
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    src = resolve_model(args.model)
    if os.path.exists(args.out):
        sys.exit(f"{args.out}: exists")
    ck = Checkpoint(src)
    tensors = {}
    for name in ck.names():
        W = np.asarray(ck.get(name), np.float32)
        if name.endswith("_proj.weight"):
            q = gguf.quants.quantize(W, gguf.GGMLQuantizationType.Q4_0)
            W = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q4_0).astype(np.float32)
        tensors[name] = np.ascontiguousarray(W)
    tmp = args.out + ".tmp"
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if os.path.isfile(os.path.join(src, f)):
            shutil.copyfile(os.path.join(src, f), os.path.join(tmp, f))
    os.rename(tmp, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
