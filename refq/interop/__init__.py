"""Bridges to other runtimes' layouts (FORMAT.md, "Interop").

gptq.py         the Hugging Face GPTQ layout <-> refq `uniform` (export and import)
aqlm.py         the Hugging Face AQLM layout <-> refq `additive` (export and import)
gguf_export.py  refq checkpoint -> one GGUF file for llama.cpp
foreign.py      load a GPTQ / AQLM checkpoint made by another tool (refq eval/generate/info)
"""
