"""The whole-model pipeline as a Python API: `refq quantize` is a thin layer over it.

    import refq
    from llama_np import load_model, Tokenizer
    from refq.calibrate import calibration_windows

    model, tok = load_model(folder), Tokenizer(folder)
    windows = calibration_windows(tok.encode(text), nsamples=128, seqlen=512, seed=0)
    run = refq.quantize_model(model, "gptq", {"bits": 3, "group_size": 128}, windows)
    run.bits_per_weight, run.layers          # exact bits, per-linear loss and bits
    run.save("out-dir", folder)              # the packed checkpoint (FORMAT.md)

quantize_model(model, method, options, windows) runs refq.calibrate.quantize_layers
with refq.quantize_weight(W, H, method, **options) on every linear, in place, and
returns what a packed checkpoint needs.  Around it, the parts of the paper
recipes that are not one linear at a time:
  - SqueezeLLM's Fisher sensitivity (options["sensitivity"] == "fisher"):
    computed once on the unquantized model first (refq.fisher);
  - AQLM's / SLiM's block fine-tuning (finetune=options of refq.finetune): each decoder
    layer tuned after its linears are quantized, before it feeds the next;
  - resume (a refq.resume.ResumeState): finished decoder layers are saved and,
    on a restart with the same fingerprint, restored instead of recomputed;
  - cluster (refq.cluster): the linears of a layer quantized as parallel Dask
    tasks instead of one after the other here.
"""
import contextlib
import time
import warnings
from dataclasses import dataclass, field

import refq.api
from refq._version import __version__
from refq.calibrate import quantize_layers
from refq.checkpoint import save_packed
from refq.cluster import connect
from refq.finetune import make_layer_hook
from refq.fisher import fisher_context


@dataclass
class QuantizedModel:
    """What quantize_model returns: everything a packed checkpoint stores or reports."""
    model: object                  # the llama_np model, its linears now quantized
    method: str
    options: dict                  # every option of the method, validated
    quantized: dict                # {full linear name: QuantizedWeight}, in model order
    layers: list                   # [{"name", "loss", "bits_per_weight"}], in model order
    seconds: float                 # quantize_model's wall time
    info: dict = field(default_factory=dict)   # fisher_*, "finetune" record when used

    @property
    def bits_per_weight(self):
        """Every stored bit of the quantized linears / their number of weights."""
        n = sum(q.shape[0] * q.shape[1] for q in self.quantized.values())
        return sum(q.bits_per_weight * q.shape[0] * q.shape[1]
                   for q in self.quantized.values()) / n

    def quantization_config(self, **extra):
        """The quantization_config of the packed checkpoint (checkpoint.save_packed adds
        the format fields): method, options, bits_per_weight, + extra (e.g. calibration)."""
        qc = {"method": self.method, "options": self.options, "refq_version": __version__,
              "bits_per_weight": self.bits_per_weight}
        qc.update(extra)
        if "finetune" in self.info:
            qc["finetune"] = self.info["finetune"]
        return qc

    def save(self, out, src_folder, force=False, **extra):
        """Write the packed checkpoint into folder `out` (src_folder: the HF model folder,
        for config.json and the tokenizer).  extra: more quantization_config keys."""
        save_packed(out, src_folder, self.model, self.quantized,
                    self.quantization_config(**extra), force=force)


def _finetune_hook(opts, record, layer_notes, log):
    """refq.finetune's layer hook, each layer's record also put in layer_notes[i]
    (a ResumeState's: saved with the layer, given back on restore)."""
    tune = make_layer_hook(opts, record, log)

    def hook(i, layer, hs, pos):
        after = tune(i, layer, hs, pos)

        def after_and_note():
            after()
            layer_notes[i] = record[-1]
        return after_and_note
    return hook


def quantize_model(model, method, options, windows, *, true_sequential=False,
                   calib_batch=None, threads=None, finetune=None, resume=None,
                   progress=None, on_layer=None, log=None, cluster=None, on_linear=None):
    """Quantize every linear of `model` (in place) with `method` on calibration `windows`.

    options: the method's options ({} = defaults), as refq.quantize_weight takes them.
    windows (n, T) int: calibration token windows (refq.calibrate.calibration_windows).
    true_sequential, calib_batch, threads: refq.calibrate.quantize_layers's (none of
        them but calib_batch changes a result, and that only in H's float32 rounding).
    finetune: AQLM / SLiM block fine-tuning options (refq.finetune), or None.
    resume: a refq.resume.ResumeState, or None.  With finetune, each layer's state
        holds its fine-tuned parameters and fine-tuning record.
    progress(tokens), on_layer(i, seconds): the calibration's progress; log(text): the
        quantizers' warnings and the Fisher / fine-tuning messages.
    cluster: None (this process), or "local:N", a Dask scheduler address or a
        dask.distributed Client (refq.cluster): each linear is then one task on the
        cluster, the seven of a layer at once; the result is the same bytes.
        on_linear(name) as each linear's task finishes.
    -> QuantizedModel.
    """
    t0 = time.perf_counter()
    full = refq.api.validate_options(method, dict(options))
    log = log or (lambda text: None)
    notes = resume.notes if resume is not None else {}

    def note(name, q, caught):
        for text in caught:  # e.g. GPTQ's "Cholesky failed, retried with more damping"
            log(f"warning: {text}")
        # the loss is recorded once, by quantize_weight
        notes[name] = {"name": name, "loss": q.info["loss"], "bits_per_weight": q.bits_per_weight}
        return q

    def quantize(name, W, H):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            q = refq.api.quantize_weight(W, H, method, name=name, **options)
        return note(name, q, [str(w.message) for w in caught])

    def quantize_on_cluster(items):        # [(name, W, H)]: one Dask task each
        from refq.api import load_quantized
        from refq.cluster import quantize_linears
        from refq.fisher import current_fisher
        packed = quantize_linears(client, method, full, items, fisher=current_fisher,
                                  progress=on_linear, log=log)
        return [note(name, load_quantized(tensors, meta), caught)
                for (name, _, _), (tensors, meta, caught) in zip(items, packed)]

    record, info = [], {}
    layer_notes = resume.layer_notes if resume is not None else {}
    hook = _finetune_hook(finetune, record, layer_notes, log) if finetune else None
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(connect(cluster)) if cluster is not None else None
        with fisher_context(model, windows, full, log=log) as fisher_info:
            done = quantize_layers(model, windows, quantize, true_sequential, log=on_layer,
                                   threads=threads, calib_batch=calib_batch, progress=progress,
                                   resume=resume, layer_hook=hook,
                                   quantize_many=None if client is None else quantize_on_cluster)
    info.update(fisher_info)
    if finetune:
        record = [layer_notes[i] for i in sorted(layer_notes)]   # with the restored layers'
        info["finetune"] = {"options": finetune,
                            "seconds": round(sum(r["seconds"] for r in record), 3),
                            "layers": record}
    quantized = dict(done)                 # with the layers a resumed run restored
    shown = next(iter(quantized.values())).options if quantized else full
    return QuantizedModel(model=model, method=method, options=shown, quantized=quantized,
                          layers=[notes[name] for name, _ in done],
                          seconds=time.perf_counter() - t0, info=info)
