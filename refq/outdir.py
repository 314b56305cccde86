"""Output folders: checked before any work, written beside, renamed when complete.

Every refq command that writes a folder (quantize --out, compare --out, golden
write DIR) follows the same four rules, so that no user file is ever lost:

  1. check_output() runs BEFORE any calibration or computation. It refuses
       * an empty path, the root folder, $HOME, the current folder or one of
         its ancestors, and any folder that is or contains an input (the
         model being quantized, the calibration text, ...);
       * a path that exists and is not a folder;
       * a non-empty folder without --force, and a non-empty folder that does
         not carry the command's marker (a folder refq did not write) even
         with --force. The markers (FORMAT.md, "What refq may replace"):
         a packed checkpoint's config.json with quantization_config.quant_method
         "refq"; a golden suite's manifest.json; compare's compare.json;
       * a location where the folder cannot be created and written (under a
         regular file, in a read-only or immutable folder, under /proc): it
         creates and removes a probe folder in the nearest existing ancestor.
  2. The output is written into a hidden sibling `.NAME.tmp-PID` (tmp_path()).
  3. commit() swaps it in: the old folder (if --force) is renamed aside to
     `.NAME.old-PID`, the new one renamed into place, then the old one removed.
     At no moment is there neither the old nor the new complete folder.
  4. Leftovers `.NAME.tmp-PID` / `.NAME.old-PID` of a run that was killed
     (SIGKILL, power loss) are removed by the next run on the same output
     when process PID is no longer alive (check_output reports each one);
     SIGINT and SIGTERM clean up on the way out (refq.cli turns SIGTERM into
     an exception, like SIGINT).
"""
import os
import re
import shutil
import tempfile

from refq.errors import RefqError


def _real(path):
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _within(inner, outer):
    """True if path `inner` is `outer` or lies below it (both real paths)."""
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True            # someone else's process (or a pid we cannot test): keep it
    return True


def write_file_atomic(path, write, suffix=""):
    """write(f) into a temporary file beside `path` (f: opened "wb"), then rename it onto
    path: a reader sees the old file or the whole new one, never half of one; the
    temporary file is removed if write fails.  suffix: the temporary name's ending
    (for writers that choose a format by it, e.g. matplotlib's savefig)."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def tmp_path(out):
    """The hidden sibling the output is written into: `.NAME.tmp-PID`."""
    a = os.path.abspath(out)
    return os.path.join(os.path.dirname(a), f".{os.path.basename(a)}.tmp-{os.getpid()}")


def remove_leftovers(out, log=None):
    """Remove `.NAME.tmp-PID` / `.NAME.old-PID` beside out whose process is dead.

    -> the paths removed. Those of a live process (another run writing the
    same output right now) are reported through log and kept.
    """
    a = os.path.abspath(out)
    parent, base = os.path.dirname(a), os.path.basename(a)
    pattern = re.compile(r"\." + re.escape(base) + r"\.(tmp|old)-(\d+)$")
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    removed = []
    for n in sorted(names):
        m = pattern.match(n)
        if not m:
            continue
        p = os.path.join(parent, n)
        pid = int(m.group(2))
        if pid == os.getpid() or _pid_alive(pid):
            if log and pid != os.getpid():
                log(f"note: {p} belongs to running process {pid}; left alone")
            continue
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                os.remove(p)
            except OSError:
                pass
        if not os.path.exists(p):
            removed.append(p)
            if log:
                log(f"note: removed {p}, left by an interrupted run (process {pid})")
    return removed


def _probe_writable(out, option):
    """Create and remove a folder where `out` will be created (its nearest existing
    ancestor must be a folder we can write into)."""
    a = os.path.abspath(out)
    anc = os.path.dirname(a)
    while not os.path.lexists(anc):
        anc = os.path.dirname(anc)
    if not os.path.isdir(anc):
        raise RefqError(f"{option} {out}: {anc} is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".refq-probe-", dir=anc)
        os.rmdir(probe)
    except OSError as e:
        raise RefqError(f"{option} {out}: cannot create a folder in {anc} "
                        f"({e.strerror or e})") from None


def check_output(out, force, is_ours, marker, inputs=(), option="--out", log=None,
                 reuse=False):
    """Refuse, before any work, an output folder that refq must not write (rules
    at the top of this file). -> None, or raises RefqError naming `option`.

    is_ours(folder) -> True if the folder carries the command's marker, which
    `marker` describes in words for the error message. inputs: paths the
    command reads (model folder, texts); the output may neither be nor contain one.
    reuse: an existing folder is written into, not replaced (refq compare
    resumes in its --out), so the --force / marker rule does not apply.
    """
    if not isinstance(out, str) or out.strip() == "":
        raise RefqError(f"{option} {out!r}: empty path")
    real = _real(out)
    shown = f"{option} {out}"
    if real == os.sep:
        raise RefqError(f"{shown}: is the root folder; give a new folder to write")
    home = _real("~")
    if real == home:
        raise RefqError(f"{shown}: is your home folder; give a new folder to write")
    if _within(_real(os.getcwd()), real):
        raise RefqError(f"{shown}: is the current folder or contains it; "
                        "give a new folder to write, such as ./out")
    for p in inputs:
        if p and _within(_real(p), real):
            raise RefqError(f"{shown}: is or contains the input {p}; "
                            "write the output somewhere else")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise RefqError(f"{shown}: exists and is not a folder")
    if os.path.isdir(out) and not reuse:
        if os.path.islink(out.rstrip(os.sep) or out):
            raise RefqError(f"{shown}: is a symbolic link; give the folder itself")
        try:
            entries = os.listdir(out)
        except OSError as e:
            raise RefqError(f"{shown}: cannot list ({e.strerror})") from None
        if entries:
            if not force:
                raise RefqError(f"{shown}: folder exists and is not empty "
                                "(use --force to replace it)")
            if not is_ours(out):
                raise RefqError(f"{shown}: not a folder refq wrote ({marker}); "
                                "not replacing it, even with --force")
    _probe_writable(out, option)
    remove_leftovers(out, log)


def commit(tmp, out):
    """Put the complete folder `tmp` in place of `out` (rule 3 above)."""
    a = os.path.abspath(out)
    old = None
    if os.path.isdir(a):
        old = os.path.join(os.path.dirname(a), f".{os.path.basename(a)}.old-{os.getpid()}")
        os.rename(a, old)
    try:
        os.rename(tmp, a)
    except BaseException:
        if old is not None:
            os.rename(old, a)            # put the previous folder back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
