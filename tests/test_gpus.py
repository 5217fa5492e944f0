"""stages.gpus on CPU with a fake pool: concurrent jobs get disjoint device ids, waits, errors, killed jobs."""
import fcntl
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from stages import gpus

POOL = [str(i) for i in range(8)]
# A job: records when it ran and what it was given, after stages.gpus exec'd it (so while it holds the ids).
RECORDER = ("import json, os, sys, time; start = time.time(); time.sleep(float(sys.argv[2])); "
            "open(sys.argv[1], 'w').write(json.dumps({'start': start, 'end': time.time(), "
            "'visible': os.environ.get('CUDA_VISIBLE_DEVICES')}))")


def env_with(locks, pool=",".join(POOL), **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID")}
    env.update(CADDIE_GPU_LOCKS=str(locks), PYTHONPATH=str(ROOT), **extra)
    if pool is not None:
        env["CADDIE_GPUS"] = pool
    return env


def start(count, command, env, *flags, **kw):
    return subprocess.Popen([sys.executable, "-m", "stages.gpus", "--count", str(count), *flags, "--", *command],
                            cwd=ROOT, env=env, **kw)


def run(count, command, env, *flags):
    return subprocess.run([sys.executable, "-m", "stages.gpus", "--count", str(count), *flags, "--", *command],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def print_visible():
    return [sys.executable, "-c", "import os; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))"]


def busy_ids(locks):
    """The ids whose lock another process holds."""
    busy = []
    for gpu in POOL:
        path = Path(locks) / f"gpu-{gpu}.lock"
        if not path.exists():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy.append(gpu)
        finally:
            os.close(fd)
    return busy


def wait_until(condition, seconds=30):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_concurrent_jobs_never_share_a_device(tmp_path):
    env = env_with(tmp_path / "locks")
    counts = [1] * 4 + [8] + [1] * 4  # the 8-GPU job arrives among the 1-GPU ones
    jobs = []
    for i, count in enumerate(counts):
        out = tmp_path / f"job{i}.json"
        jobs.append((count, out, start(count, [sys.executable, "-c", RECORDER, str(out), "1.5"], env,
                                       stderr=subprocess.PIPE, text=True)))
    for _, _, proc in jobs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    records = []
    for count, out, _ in jobs:
        record = json.loads(out.read_text())
        ids = record["visible"].split(",")
        assert len(ids) == len(set(ids)) == count and set(ids) <= set(POOL), record
        records.append((record["start"], record["end"], set(ids)))
    assert next(ids for _, _, ids in records if len(ids) == 8) == set(POOL)
    overlapping = 0
    for (s1, e1, ids1), (s2, e2, ids2) in itertools.combinations(records, 2):
        if s1 < e2 and s2 < e1:
            overlapping += 1
            assert not ids1 & ids2, (ids1, ids2)
    assert overlapping, "the jobs ran one at a time: nothing was tested"


def test_a_job_waits_for_busy_devices_then_gets_them(tmp_path):
    locks = tmp_path / "locks"
    env = env_with(locks)
    holder = start(6, [sys.executable, "-c", "import time; time.sleep(60)"], env)
    try:
        wait_until(lambda: len(busy_ids(locks)) == 6)
        waiter = start(4, print_visible(), env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert waiter.poll() is None, "4 GPUs cannot be free while 6 of 8 are held"
    finally:
        holder.kill()
        holder.wait()
    out, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 0, err
    assert "waiting for 4 free GPU(s) of 8" in err and "busy" in err, err
    assert len(eval(out).split(",")) == 4


def test_a_killed_job_releases_its_devices(tmp_path):
    locks = tmp_path / "locks"
    env = env_with(locks)
    job = start(8, [sys.executable, "-c", "import time; time.sleep(60)"], env)
    wait_until(lambda: busy_ids(locks) == POOL)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert busy_ids(locks) == []
    done = run(8, print_visible(), env)
    assert done.returncode == 0 and eval(done.stdout) == ",".join(POOL), done.stderr


def test_asking_for_more_than_the_pool_is_a_clear_error(tmp_path):
    done = run(9, print_visible(), env_with(tmp_path / "locks"))
    assert done.returncode == 2 and done.stdout == ""
    assert "this job needs 9 GPU(s) but the pool has 8 (0,1,2,3,4,5,6,7)" in done.stderr
    assert "pool from CADDIE_GPUS" in done.stderr
    done = run(1, print_visible(), env_with(tmp_path / "locks", pool=""))
    assert done.returncode == 2 and "needs 1 GPU(s) but the pool has 0 (none)" in done.stderr


def test_count_zero_runs_the_command_unchanged(tmp_path):
    done = run(0, print_visible(), env_with(tmp_path / "locks", CUDA_VISIBLE_DEVICES="5"))
    assert done.returncode == 0 and eval(done.stdout) == "5" and done.stderr == ""
    assert not (tmp_path / "locks").exists()


def test_optional_runs_without_a_gpu_when_the_pool_is_empty(tmp_path):
    done = run(2, print_visible(), env_with(tmp_path / "locks", pool=""), "--optional")
    assert done.returncode == 0 and eval(done.stdout) == "", done.stderr
    assert "no GPU in the pool" in done.stderr
    done = run(2, print_visible(), env_with(tmp_path / "locks", pool="3,4,5"), "--optional")
    assert done.returncode == 0 and eval(done.stdout) == "3,4"


def test_the_pool_and_the_lock_folder(tmp_path):
    assert gpus.gpu_pool({"CADDIE_GPUS": " 2, 3,,2 ", "CUDA_VISIBLE_DEVICES": "0"}) == (["2", "3"], "CADDIE_GPUS")
    assert gpus.gpu_pool({"CUDA_VISIBLE_DEVICES": "4,5"}) == (["4", "5"], "CUDA_VISIBLE_DEVICES")
    assert gpus.gpu_pool({"CADDIE_GPUS": ""}) == ([], "CADDIE_GPUS")
    assert gpus.lock_folder({}) == gpus.DEFAULT_LOCKS
    assert gpus.lock_folder({"CADDIE_GPU_LOCKS": str(tmp_path)}) == tmp_path
    # SLURM may number every job's GPUs from 0: each SLURM job has locks of its own
    assert gpus.lock_folder({"CADDIE_GPU_LOCKS": str(tmp_path), "SLURM_JOB_ID": "77"}) == tmp_path / "slurm-77"


def test_waiting_jobs_keep_their_place_in_line(tmp_path):
    """A job waiting for the whole pool is not overtaken by later 1-GPU jobs that find a GPU free."""
    locks = tmp_path / "locks"
    env = env_with(locks)
    holder = start(1, [sys.executable, "-c", "import time; time.sleep(60)"], env)
    try:
        wait_until(lambda: len(busy_ids(locks)) == 1)
        big_log = tmp_path / "big.log"
        with big_log.open("w") as log:
            big = start(8, [sys.executable, "-c", RECORDER, str(tmp_path / "big.json"), "0.5"], env, stderr=log)
        wait_until(lambda: "waiting for 8 free GPU(s) of 8: 0 busy" in big_log.read_text())
        small = start(1, [sys.executable, "-c", RECORDER, str(tmp_path / "small.json"), "0"], env,
                      stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert small.poll() is None, "the 1-GPU job overtook the waiting 8-GPU job"
    finally:
        holder.kill()
        holder.wait()
    assert big.wait(timeout=30) == 0
    _, err = small.communicate(timeout=30)
    assert small.returncode == 0 and "another job is first in line" in err, err
    big_run, small_run = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("big", "small"))
    assert small_run["start"] >= big_run["end"]


def test_a_command_is_required():
    assert gpus.main(["--count", "1"]) == 2  # no "--"
    with pytest.raises(SystemExit):
        gpus.main(["--count", "1", "--"])
