"""Scale-out on Dask distributed: `refq quantize|compare --cluster ADDRESS|local:N`.

What runs where (everything else stays on the calling process):

  refq quantize --cluster   The calibration pass of a decoder layer stays on the
      client (it is sequential: layer l+1's inputs are layer l's quantized
      outputs).  The linears that share the layer's Hessians are independent
      quantization tasks: all seven of a layer in the default mode, one group
      (q,k,v | o | gate,up | down) at a time with --true-sequential.  For each
      such batch the client scatters every W (out, in) float32 and every
      distinct H (in, in) float64 once (q, k and v share one H: it travels
      once), submits one task per linear with the method's name and its
      validated options, and gathers the packed fields (tensors() and meta(),
      what a checkpoint stores) from which load_quantized rebuilds the weight.
  refq compare --cluster    Each SPEC (and the unquantized baseline) is one
      task that runs refq.compare.run_spec on a worker: the same child
      `refq quantize` / `refq eval` processes as without a cluster, the same
      DIR/<spec>/result.json written last.  A spec whose result.json exists is
      not run again, on whatever worker it finished: --out must be a folder
      every worker sees (a shared file system; on one machine it always is).

Same bytes as the single process.  Each task runs quantize_weight itself,
unchanged, with BLAS and LAPACK on one thread (threadpoolctl), as the single
process runs it; the quantizers' numba kernels give the same bits whatever
their thread count (tests/test_cluster.py checks gptq, claq and aqlm).  The
Hessians are computed on the client exactly as without a cluster.

Faults.  A task whose worker dies is re-run by Dask on another worker
(retries= for a task that raises, the scheduler's own rescheduling for a lost
worker).  Scattered arrays have no recipe: if the worker that held one dies,
the tasks that needed it are cancelled, and quantize_linears scatters what is
left again and resubmits those tasks (ATTEMPTS times at most).  The results
are the same bytes either way (the tasks are pure functions of what they get).
A cluster that cannot be reached within CONNECT_TIMEOUT seconds is a one-line
RefqError before any work.

`local:N` starts a LocalCluster of N worker processes with one thread each
(NUMBA_NUM_THREADS=1, BLAS on one thread: N workers on N cores do not fight
over them) and shuts it down when the command ends, on an error, on Ctrl-C and
on SIGTERM (refq.cli turns SIGTERM into an exception, so the `with` block
closes the cluster and its worker processes exit).  A remote cluster
(`dask scheduler` + `dask worker tcp://HOST:8786 --nthreads 1`, or
dask-jobqueue on Slurm/PBS) needs refq installed on the workers, and for
compare the shared --out folder and the model.

dask is imported only when --cluster is given.
"""
import contextlib
import re
import uuid
import warnings

from refq.errors import RefqError

CONNECT_TIMEOUT = 10       # seconds to reach a scheduler (and to see its first worker)
RETRIES = 2                # Dask retries of a task that raised
ATTEMPTS = 4               # resubmissions after a worker holding scattered inputs died
LOCAL = re.compile(r"local:(\d+)")


def _dask(option):
    try:
        import distributed
    except ImportError:
        raise RefqError(f"{option}: needs Dask distributed "
                        "(pip install 'dask[distributed]')") from None
    return distributed


@contextlib.contextmanager
def connect(cluster, option="--cluster", log=None):
    """-> a dask.distributed Client for `cluster`, closed (and a local cluster shut
    down) when the block ends, however it ends.

    cluster: "local:N" (a LocalCluster of N worker processes, 1 thread each),
    a scheduler address ("tcp://host:8786", "host:8786"), or a Client (used as
    it is, not closed).  An address that cannot be reached, or a scheduler
    without workers, is a one-line RefqError naming `option`."""
    if not isinstance(cluster, str):            # a Client made by the caller
        yield cluster
        return
    distributed = _dask(option)
    import logging
    m = LOCAL.fullmatch(cluster.strip())
    local = None
    if m:
        n = int(m.group(1))
        if n < 1:
            raise RefqError(f"{option} {cluster}: need at least 1 worker (local:N, N >= 1)")
        # one thread per worker, and so one BLAS / numba thread (the nanny sets
        # OMP/MKL/OPENBLAS_NUM_THREADS=1 itself); no dashboard (no port, no bokeh)
        local = distributed.LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
            silence_logs=logging.ERROR, env={"NUMBA_NUM_THREADS": "1"})
        try:
            client = distributed.Client(local)
        except BaseException:
            local.close()
            raise
    else:
        address = cluster.strip()
        if address.startswith("local:"):
            raise RefqError(f"{option} {cluster}: local:N needs a whole number of workers")
        if not address:
            raise RefqError(f"{option} {cluster!r}: give local:N or a scheduler address "
                            "such as tcp://host:8786")
        _probe(address, option, cluster)
        try:
            client = distributed.Client(address, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RefqError(f"{option} {cluster}: cannot reach the Dask scheduler "
                            f"within {CONNECT_TIMEOUT} s ({why})") from None
        try:
            client.wait_for_workers(1, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError):
            client.close()
            raise RefqError(f"{option} {cluster}: the scheduler has no workers "
                            f"(none joined within {CONNECT_TIMEOUT} s)") from None
    if log is not None:
        n = len(client.scheduler_info(n_workers=-1)["workers"])
        log(f"cluster: {cluster} ({n} worker{'s' if n != 1 else ''})")
    try:
        yield client
    finally:
        client.close()
        if local is not None:
            local.close()


def _probe(address, option, shown):
    """A TCP address must accept a connection: refused or unresolvable is told at once
    (Dask itself keeps retrying until its timeout)."""
    import socket

    from distributed.comm.addressing import parse_address, parse_host_port
    try:
        scheme, loc = parse_address(address)
        if scheme != "tcp":
            return                                   # tls://, ucx://, ...: Dask's own check
        host, port = parse_host_port(loc, 8786)
    except ValueError as e:
        raise RefqError(f"{option} {shown}: not a scheduler address ({e}); give local:N or "
                        "tcp://host:port") from None
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        raise RefqError(f"{option} {shown}: cannot reach the Dask scheduler ({why})") from None


def _result(future):
    """future.result(), or None if it was lost with a worker: cancelled because a
    scattered input (or the result itself) was on a worker that died, or
    KilledWorker.  An exception the task's function raised is raised here."""
    from concurrent.futures import CancelledError

    from distributed import KilledWorker
    try:
        return future.result()
    except (CancelledError, KilledWorker):
        return None


def _quantize_task(method, options, name, W, H, F):
    """On a worker: refq.quantize_weight(W, H, method, name=name, **options), BLAS on
    one thread as in the single process.  F: the linear's Fisher sensitivity
    (SqueezeLLM's sensitivity="fisher"), or None.
    -> (tensors, meta, [warning texts]): the packed fields of the result."""
    import refq.api
    from llama_np.parallel import single_threaded_blas
    from refq.fisher import use_fisher
    with single_threaded_blas(), warnings.catch_warnings(record=True) as caught, \
            (use_fisher({name: F}) if F is not None else contextlib.nullcontext()):
        warnings.simplefilter("always")
        q = refq.api.quantize_weight(W, H, method, name=name, **options)
    return q.tensors(), q.meta(), [str(w.message) for w in caught]


def quantize_linears(client, method, options, items, fisher=None, progress=None, log=None):
    """Quantize the linears `items` on the cluster, one task each.

    items: [(full name, W (out, in) float32, H (in, in) float64 or None)]; the
    same H object given for several linears is scattered once.  options: the
    method's validated options.  fisher(name) -> F or None.
    progress(name) as each linear finishes (in the order they finish); log(text)
    when tasks lost with a worker are submitted again.
    -> [(tensors, meta, [warning texts])] in the order of items.
    """
    results = [None] * len(items)
    todo = list(range(len(items)))
    for attempt in range(ATTEMPTS):
        # every array of the batch scattered once, in one call (random keys: no hashing)
        arrays, index = [], {}
        for k in todo:
            name, W, H = items[k]
            F = fisher(name) if fisher is not None else None
            for a in (W, H, F):
                if a is not None and id(a) not in index:
                    index[id(a)] = len(arrays)
                    arrays.append(a)
        scattered = client.scatter(arrays, hash=False)

        def ref(a):
            return None if a is None else scattered[index[id(a)]]

        futures = {}
        for k in todo:
            name, W, H = items[k]
            F = fisher(name) if fisher is not None else None
            f = client.submit(_quantize_task, method, options, name, ref(W), ref(H), ref(F),
                              retries=RETRIES, pure=False,
                              key=f"refq-quantize-{name}-{uuid.uuid4().hex[:8]}")
            futures[f] = k
        lost = []
        from distributed import as_completed
        for f in as_completed(futures):
            k = futures[f]
            results[k] = _result(f)
            if results[k] is None:
                lost.append(k)
            elif progress is not None:
                progress(items[k][0])
        todo = sorted(lost)
        if not todo:
            return results
        if log is not None:
            log(f"cluster: {len(todo)} task(s) lost with a worker and their inputs; "
                "scattered again and resubmitted")
    raise RefqError(f"--cluster: {', '.join(items[k][0] for k in todo)}: workers lost "
                    f"{ATTEMPTS} times in a row; giving up")
