"""GPU slots: each job gets its own device ids from the node's pool, so concurrent jobs never share a GPU.

Snakemake counts GPUs (a rule's `resources: gpu=N` against `--resources gpu=8`) but does not say which
ones a job may use. The GPU rules therefore run their command through

    python -m stages.gpus --count N [--optional] -- <command ...>

which takes N free ids from the pool, sets CUDA_VISIBLE_DEVICES to them and execs the command. An id is
held by an fcntl.flock on its lock file; the command inherits the locks and holds them until it exits,
and the kernel drops them however it exits (a crashed or killed job frees its GPUs by itself). When too
few ids are free the job waits, with a line in its log. Waiting jobs queue behind one another (the first
in line holds queue.lock), so a job that needs 8 GPUs is not overtaken forever by 1-GPU jobs.

The pool: CADDIE_GPUS ("0,1,2,3,4,5,6,7"; "" = none), else the CUDA_VISIBLE_DEVICES this process was
given (what SLURM hands a job), else every device torch sees. The locks: one file per id in
$CADDIE_GPU_LOCKS, else /tmp/caddie-gpus, shared by every caddie checkout on the node; inside a SLURM job
in a folder of that job's own, since SLURM may number each job's GPUs from 0.

--count 0 runs the command unchanged. --optional (a stage on `device: auto`) runs it with no GPU when the
pool is empty (CUDA_VISIBLE_DEVICES=""), where a plain request is an error, as is asking for more GPUs
than the pool has.
"""
import argparse
import contextlib
import fcntl
import os
import re
import sys
import time
from pathlib import Path

DEFAULT_LOCKS = Path("/tmp/caddie-gpus")


class GpuError(RuntimeError):
    """A request the pool can never satisfy."""


def log(message: str) -> None:
    print(f"stages.gpus: {message}", file=sys.stderr, flush=True)


def parse_ids(text: str) -> list[str]:
    ids = [part.strip() for part in text.split(",")]
    return list(dict.fromkeys(i for i in ids if i))  # unique, in the given order


def gpu_pool(env=os.environ) -> tuple[list[str], str]:
    """(device ids, where they came from)."""
    if "CADDIE_GPUS" in env:
        return parse_ids(env["CADDIE_GPUS"]), "CADDIE_GPUS"
    if "CUDA_VISIBLE_DEVICES" in env:
        return parse_ids(env["CUDA_VISIBLE_DEVICES"]), "CUDA_VISIBLE_DEVICES"
    try:
        import torch  # only here: the other pools need no torch, and a CPU-only install may lack CUDA
        count = torch.cuda.device_count()
    except Exception:  # no torch, or a broken driver: no GPU to hand out
        count = 0
    return [str(i) for i in range(count)], "torch.cuda.device_count()"


def lock_folder(env=os.environ) -> Path:
    folder = Path(env["CADDIE_GPU_LOCKS"]) if env.get("CADDIE_GPU_LOCKS") else DEFAULT_LOCKS
    if env.get("SLURM_JOB_ID"):
        folder = folder / f"slurm-{env['SLURM_JOB_ID']}"
    return folder


def _open_lock(path: Path) -> int:
    # Read-only is enough for flock, so another user's lock file of a shared folder works too.
    return os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _make_folder(folder: Path) -> None:
    """Create the lock folder; those under the node-wide default are sticky and world-writable, like /tmp,
    so that every user's jobs can add lock files there."""
    for path in [*reversed(folder.parents), folder]:
        if path.exists():
            continue
        with contextlib.suppress(FileExistsError):
            path.mkdir()
        if path == DEFAULT_LOCKS or DEFAULT_LOCKS in path.parents:
            with contextlib.suppress(PermissionError):  # another user made it first
                os.chmod(path, 0o1777)


def _take(count: int, pool: list[str], folder: Path):
    """({id: fd} for `count` free ids, or None having taken none, [the ids found busy])."""
    held, busy = {}, []
    for gpu in pool:
        fd = _open_lock(folder / f"gpu-{re.sub(r'[^A-Za-z0-9._-]', '_', gpu)}.lock")
        if _try_lock(fd):
            held[gpu] = fd
            if len(held) == count:
                return held, busy
        else:
            os.close(fd)
            busy.append(gpu)
    release(held)
    return None, busy


def release(held: dict) -> None:
    for fd in held.values():
        os.close(fd)


def acquire(count: int, pool: list[str], folder: Path, poll: float = 0.5) -> dict:
    """Hold `count` ids of `pool`, waiting in line until they are free. Returns {id: lock fd}."""
    if count > len(pool):
        raise GpuError(f"this job needs {count} GPU(s) but the pool has {len(pool)} ({','.join(pool) or 'none'}); "
                       "set CADDIE_GPUS to the node's device ids, or give the stage fewer processes (nproc) "
                       "or device: cpu")
    _make_folder(folder)
    line = _open_lock(folder / "queue.lock")
    try:
        if not _try_lock(line):
            log(f"waiting for {count} GPU(s): another job is first in line for the pool ({folder})")
            fcntl.flock(line, fcntl.LOCK_EX)
        started = time.monotonic()
        waited = False
        while True:
            held, busy = _take(count, pool, folder)
            if held is not None:
                if waited:
                    log(f"got GPU(s) {','.join(held)} after {time.monotonic() - started:.0f} s")
                return held
            if not waited:
                log(f"waiting for {count} free GPU(s) of {len(pool)}: {','.join(busy)} busy "
                    f"(held by other jobs; locks in {folder})")
                waited = True
            time.sleep(poll)
    finally:
        os.close(line)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv:
        log("usage: python -m stages.gpus --count N [--optional] -- command ...")
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m stages.gpus", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, required=True, help="GPUs the command holds (0: run it unchanged)")
    parser.add_argument("--optional", action="store_true",
                        help="with an empty pool, run the command without GPUs instead of failing")
    args, command = parser.parse_args(argv[:split]), argv[split + 1:]
    if not command:
        parser.error("no command after --")
    env = dict(os.environ)
    if args.count > 0:
        pool, source = gpu_pool(env)
        if not pool and args.optional:
            log(f"no GPU in the pool ({source}): running without one")
            env["CUDA_VISIBLE_DEVICES"] = ""
        else:
            try:
                held = acquire(args.count, pool, lock_folder(env))
            except GpuError as e:
                log(f"{e} (pool from {source})")
                return 2
            for fd in held.values():
                os.set_inheritable(fd, True)  # the command holds the locks until it exits
            env["CUDA_VISIBLE_DEVICES"] = ",".join(held)
            log(f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']} (pool {','.join(pool)} from {source})")
    try:
        os.execvpe(command[0], command, env)
    except OSError as e:
        log(f"cannot run {command[0]!r}: {e.strerror}")
        return 127


if __name__ == "__main__":
    sys.exit(main())
