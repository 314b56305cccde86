"""Resumable `refq quantize`: the state after each finished decoder layer.

A run keeps, in a folder beside its output (`.NAME.refq-resume` for --out
NAME), everything needed to continue after its last finished decoder layer:

    fingerprint.json    what the run is: model files, method and options,
                        calibration text (sha256), nsamples, seqlen, seed, ...
    layer-I.npz         the quantized tensors of layer I's linears ("name/field"),
                        and the layer's other parameters as they are after it
                        ("params/input_layernorm.weight", ..., q/k/v biases):
                        AQLM's block fine-tuning changes them
    layer-I.json        their meta(), the CLI's rows (loss, bits per weight) and
                        the layer's note (its fine-tuning record)
    inputs-K.npy        the input of decoder layer K (n, seqlen, d) float32,
                        i.e. the outputs of the quantized layers 0..K-1
    done.json           {"layers": K}: layers 0..K-1 are finished

Every file is written under a temporary name and renamed into place, and
done.json is renamed last, so a kill at any moment leaves a state that names
only complete files. A run restarted with the same arguments (the same
fingerprint) loads layers 0..K-1 and inputs-K and continues at layer K; the
computation from there is the same as an uninterrupted run's (the results do
not depend on threads), so the output has the same bytes. A state with
another fingerprint is discarded. The folder is made when the first layer
is finished (a run that fails before leaves nothing) and removed once the
output is written.
"""
import hashlib
import json
import os
import shutil

import numpy as np

from refq.outdir import write_file_atomic


def state_dir(out):
    """The resume folder of output folder `out`: a hidden sibling."""
    parent, base = os.path.split(os.path.abspath(out))
    return os.path.join(parent, f".{base}.refq-resume")


def model_fingerprint(folder):
    """{file: [size, sha256 of its first and last MiB]} for the model folder's files
    (reading whole multi-GB files at every start would cost more than it protects)."""
    files = {}
    for f in sorted(os.listdir(folder)):
        p = os.path.join(folder, f)
        if not os.path.isfile(p):
            continue
        size = os.path.getsize(p)
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
        files[f] = [size, h.hexdigest()]
    return files


def _write_json(path, obj):
    # keys in their order: a restored meta() is the same dict
    write_file_atomic(path, lambda f: f.write(json.dumps(obj).encode("utf-8")))


class ResumeState:
    """The resume folder of one `refq quantize` run.

    fingerprint: a JSON-serialisable dict saying what the run is.
    notes: {full linear name: JSON-serialisable row}, filled by the caller as
    linears are quantized, saved with their layer and given back on restore.
    layer_notes: {layer index: JSON-serialisable}, the same per decoder layer.
    """

    def __init__(self, folder, fingerprint):
        self.folder = folder
        self.fingerprint = json.loads(json.dumps(fingerprint))     # as it reads back
        self.notes = {}
        self.layer_notes = {}

    def _path(self, name):
        return os.path.join(self.folder, name)

    def layers_done(self):
        """K if the folder holds a finished state of this very run, else 0."""
        try:
            with open(self._path("fingerprint.json")) as f:
                if json.load(f) != self.fingerprint:
                    return 0
            with open(self._path("done.json")) as f:
                return int(json.load(f)["layers"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def restore(self):
        """-> (K, inputs of layer K (n, T, d) or None, [(full name, QuantizedWeight)] of
        layers 0..K-1, [{parameter name: array}] of layers 0..K-1 (set_layer_params)).
        Starts a fresh state (K = 0) if there is none for this run."""
        from refq.formats.base import load_quantized
        k = self.layers_done()
        if k == 0:                  # none, or another run's: made afresh by the first save()
            shutil.rmtree(self.folder, ignore_errors=True)
            return 0, None, [], []
        restored, params = [], []
        for i in range(k):
            with open(self._path(f"layer-{i}.json")) as f:
                info = json.load(f)
            with np.load(self._path(f"layer-{i}.npz"), allow_pickle=False) as z:
                arrays = {key: z[key] for key in z.files}
            for name, meta in info["meta"].items():
                tensors = {key.split("/", 1)[1]: a for key, a in arrays.items()
                           if key.split("/", 1)[0] == name}
                restored.append((name, load_quantized(tensors, meta)))
                if name in info["notes"]:
                    self.notes[name] = info["notes"][name]
            params.append({key.split("/", 1)[1]: a for key, a in arrays.items()
                           if key.split("/", 1)[0] == "params"})
            if info.get("layer_note") is not None:
                self.layer_notes[i] = info["layer_note"]
        X = np.load(self._path(f"inputs-{k}.npy"), allow_pickle=False)
        return k, X, restored, params

    def save(self, i, X, layer_done, layer=None):
        """Layer i is finished: its quantized linears [(full name, q)], its other
        parameters (layer: the DecoderLayer, see layer_params), and X (n, T, d) the
        input of layer i+1."""
        arrays, meta = {}, {}
        for name, q in layer_done:
            meta[name] = q.meta()
            for field, t in q.tensors().items():
                arrays[f"{name}/{field}"] = np.asarray(t)
        if layer is not None:
            for name, t in layer_params(layer).items():
                arrays[f"params/{name}"] = np.asarray(t)

        if not os.path.exists(self._path("fingerprint.json")):
            os.makedirs(self.folder, exist_ok=True)
            _write_json(self._path("fingerprint.json"), self.fingerprint)
        write_file_atomic(self._path(f"layer-{i}.npz"), lambda f: np.savez(f, **arrays))
        _write_json(self._path(f"layer-{i}.json"),
                    {"meta": meta, "notes": {n: self.notes[n] for n, _ in layer_done
                                             if n in self.notes},
                     "layer_note": self.layer_notes.get(i)})
        write_file_atomic(self._path(f"inputs-{i + 1}.npy"),
                          lambda f: np.save(f, X, allow_pickle=False))
        _write_json(self._path("done.json"), {"layers": i + 1})
        old = self._path(f"inputs-{i}.npy")
        if os.path.exists(old):
            os.remove(old)

    def remove(self):
        shutil.rmtree(self.folder, ignore_errors=True)


def layer_params(layer):
    """{name: array} of a decoder layer's parameters other than its seven linears:
    the two RMSNorm weights and the q/k/v biases if any (names relative to the layer)."""
    p = {"input_layernorm.weight": layer.input_norm,
         "post_attention_layernorm.weight": layer.post_norm}
    p.update({f"{n}.bias": b for n, b in layer.biases.items()})
    return p


def set_layer_params(layer, params):
    """Put back what layer_params gave (a restored layer's norms and biases)."""
    for name, a in params.items():
        if name == "input_layernorm.weight":
            layer.input_norm = a
        elif name == "post_attention_layernorm.weight":
            layer.post_norm = a
        else:
            layer.biases[name[:-len(".bias")]] = a


def run_fingerprint(model_folder, method, options, calib_text, **calibration):
    """What a `refq quantize` run is, for ResumeState: the model's files, the
    method and its options (all of them, defaults filled in), the calibration
    text's sha256 and the calibration settings (nsamples, seqlen, seed, ...)."""
    from refq._version import __version__
    return {"refq_version": __version__, "model": model_fingerprint(model_folder),
            "method": method, "options": options,
            "calib_sha256": hashlib.sha256(calib_text.encode()).hexdigest(),
            "calibration": calibration}
