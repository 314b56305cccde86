"""Work spread over threads, with results that do not depend on how many.

    for r in ordered_map(fn, items, threads):   # fn(item) on worker threads,
        ...                                     # results in item order

Inside ordered_map every BLAS call (numpy's and scipy's OpenBLAS) runs on
one thread: each product is computed whole by one thread, so its bits are
those of a single-threaded run.  (OpenBLAS's own threading gives other last
bits for some shapes, its Cholesky for example, and under load its spinning
threads are slower than one thread per worker.)
"""
import collections
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager


def blas_threads():
    """How many threads the BLAS would use (OPENBLAS_NUM_THREADS etc., else the cores)."""
    try:
        from threadpoolctl import threadpool_info
        n = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
        if n:
            return max(n)
    except Exception:                               # no threadpoolctl, or a BLAS it can't read
        pass
    return os.cpu_count() or 1


@contextmanager
def single_threaded_blas():
    """BLAS and LAPACK on one thread inside the block (numpy's and scipy's)."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def numba_threadsafe():
    """Whether numba's parallel kernels may be launched from several threads at once
    (not with its 'workqueue' threading layer)."""
    try:
        import numba
        from numba.np.ufunc import parallel
        parallel._launch_threads()
        return numba.threading_layer() != "workqueue"
    except Exception:
        return False


@contextmanager
def workers(threads=None):
    """-> (ThreadPoolExecutor or None, number of workers), BLAS single-threaded inside.
    threads: default blas_threads()."""
    n = max(1, int(threads or blas_threads()))
    with single_threaded_blas():
        if n == 1:
            yield None, 1
        else:
            with ThreadPoolExecutor(n, thread_name_prefix="llama_np") as pool:
                yield pool, n


def in_order(pool, fn, items, ahead):
    """fn(item) for every item on the pool's threads (inline if pool is None);
    yields the results in item order, with at most `ahead` items started and
    not yet yielded."""
    if pool is None:
        for it in items:
            yield fn(it)
        return
    started = collections.deque()
    for it in items:
        started.append(pool.submit(fn, it))
        if len(started) >= ahead:
            yield started.popleft().result()
    while started:
        yield started.popleft().result()


def ordered_map(fn, items, threads=None):
    """fn(item) for every item on `threads` workers; yields the results in item order."""
    with workers(threads) as (pool, n):
        yield from in_order(pool, fn, items, n)
