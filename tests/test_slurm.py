"""SLURM for real: `--profile profiles/slurm` against a one-node cluster (munged, slurmctld and slurmd from
Debian's slurm-wlm and munge, started here on loopback, no accounting), and the sbatch requests of the GPU
preset against fake SLURM commands (no GPU, no cluster needed).

The cluster fixture installs the packages with apt-get when they are missing (as root or through passwordless
sudo; CADDIE_SLURM_INSTALL=0 forbids it) and skips, saying why, only where they can be neither found nor
installed. It runs the daemons in the foreground as child processes with their state, spool, logs and munge
socket in the test's temporary folder, and stops every process it started at the end, whatever happens.

Cost on 2 CPU cores: 3.5 to 5 minutes (the full run of a 1-arm, 1-seed tiny config as 6 SLURM jobs ~1.5 min,
the cancelled and resumed training ~1 min, the preset's requests ~1 min, the cluster's start a few seconds;
the packages' install, when needed, 10 s to a minute more). Most of it is the plugin's status checks and each
job's own snakemake start, not the tiny model's computing.
"""
import contextlib
import getpass
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from test_pipeline import SNAKEMAKE, copy_workflow, tiny_config

pytestmark = pytest.mark.pipeline
LOCAL_RULES = {"all", "aggregate_plan", "all_tokenize", "all_curriculum", "all_train", "all_quantize",
               "all_rescue", "all_evaluate", "export", "artifact_size"}  # the last two write small files
PACKAGES = ("slurm-wlm", "munge")  # slurm-wlm: slurmctld, slurmd and the client commands
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "sinfo", "srun")
# Status checks every few seconds instead of the plugin's 40 s (a real cluster keeps the default).
FAST_CHECKS = ("--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2")


class SlurmUnavailable(RuntimeError):
    """SLURM and munge can be neither found nor installed; the message says why."""


def find_commands() -> dict | None:
    found = {name: shutil.which(name, path=SBIN_PATH) for name in COMMANDS}
    return found if all(found.values()) else None


def _root_prefix() -> list[str] | None:
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True,
                                               stdin=subprocess.DEVNULL).returncode == 0:
        return ["sudo", "-n"]
    return None


def install_slurm(timeout: int = 900) -> None:
    """apt-get install Debian's slurm-wlm and munge (no recommends; the package scripts start no daemon
    without an init system, and this test starts its own); raises SlurmUnavailable with the reason."""
    if os.environ.get("CADDIE_SLURM_INSTALL", "1").lower() in ("0", "no", "false"):
        raise SlurmUnavailable("slurm-wlm/munge are not installed and CADDIE_SLURM_INSTALL forbids installing them")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm/munge are not installed and there is no apt-get to install them with")
    prefix = _root_prefix()
    if prefix is None:
        raise SlurmUnavailable("slurm-wlm/munge are not installed, and installing them needs root or passwordless "
                               "sudo (apt-get install slurm-wlm munge)")
    apt = [*prefix, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-q"]
    try:
        subprocess.run([*apt, "update"], capture_output=True, timeout=min(timeout, 300), stdin=subprocess.DEVNULL)
        done = subprocess.run([*apt, "install", "-y", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=120",
                               *PACKAGES], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} did not finish in {timeout} s") from None
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: " + " | ".join(tail))


def require_commands() -> dict:
    found = find_commands()
    if found:
        return found
    install_slurm()
    found = find_commands()
    if not found:
        missing = [name for name in COMMANDS if not shutil.which(name, path=SBIN_PATH)]
        raise SlurmUnavailable(f"apt-get installed {' '.join(PACKAGES)}, but {', '.join(missing)} is not on PATH")
    return found


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def write_script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


# Records each sbatch call (its arguments, and the job id it printed) as a JSON line in $CADDIE_SBATCH_LOG, then
# answers as the given command would: the real sbatch, or a fake one that hands out job ids.
RECORDING_SBATCH = '''#!{python}
import fcntl, json, os, subprocess, sys
real = {real!r}
if real:
    done = subprocess.run([real, *sys.argv[1:]], capture_output=True, text=True, stdin=sys.stdin)
    out, err, rc = done.stdout, done.stderr, done.returncode
with open(os.environ["CADDIE_SBATCH_LOG"], "a+") as log:
    fcntl.flock(log, fcntl.LOCK_EX)  # the plugin submits from two threads
    if not real:
        log.seek(0)
        out, err, rc = str(sum(1 for _ in log) + 1) + "\\n", "", 0
    log.write(json.dumps({{"argv": sys.argv[1:], "out": out.strip(), "rc": rc}}) + "\\n")
sys.stdout.write(out)
sys.stderr.write(err)
sys.exit(rc)
'''


def sbatch_calls(log: Path) -> list[dict]:
    """The recorded sbatch calls, each as {"rule", "id", "rc", "args": {flag: value}, "argv"}."""
    calls = []
    for line in log.read_text().splitlines() if log.exists() else []:
        call = json.loads(line)
        args, argv = {}, call["argv"]
        i = 0
        while i < len(argv):
            arg = argv[i]
            if arg.startswith("--wrap"):
                pass
            elif arg.startswith("--") and "=" in arg:
                key, value = arg.split("=", 1)
                args[key] = value
            elif arg in ("--job-name", "--output", "--comment", "--mem", "--mem-per-cpu", "-p", "-A", "-t", "-D",
                         "-C", "--clusters"):
                args[arg] = argv[i + 1]
                i += 1
            else:
                args[arg] = True
            i += 1
        rule = re.match(r"rule_(.+?)(?:_wildcards_.*)?$", args.get("--comment", ""))
        calls.append({"rule": rule[1] if rule else None, "id": call["out"].split(";")[0], "rc": call["rc"],
                      "args": args, "argv": argv})
    return calls


class Cluster:
    """munged + slurmctld + slurmd for one node on 127.0.0.1, everything under `root`."""

    def __init__(self, root: Path, commands: dict):
        self.root, self.commands = root, commands
        self.node = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = root / "slurm.conf"
        self.bin = root / "bin"  # on PATH before the real commands: srun and sbatch shims (write_shims)
        self.sbatch_log = root / "sbatch.jsonl"
        self.marker = f"CADDIE_SLURM_TEST={root}"  # in the environment of every process this cluster runs
        # The machine's memory, but at least tokenize's 16 GB request (config_overrides: slurmd takes the
        # configured CPUs and memory as they are; the tiny jobs use a few hundred MB).
        self.memory_mb = max(16384, int(_mem_total_mb() * 0.8))

    @property
    def env(self) -> dict:
        key, value = self.marker.split("=", 1)
        return dict(os.environ, SLURM_CONF=str(self.conf), PATH=f"{self.bin}{os.pathsep}{SBIN_PATH}",
                    CADDIE_SBATCH_LOG=str(self.sbatch_log), **{key: value})

    def write_config(self) -> None:
        user = getpass.getuser()
        ctld_port, slurmd_port = free_ports(2)
        for name in ("munge", "state", "spool", "log", "bin"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o755)  # munged wants the socket's folder open to every user
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.conf.write_text(textwrap.dedent(f"""\
            ClusterName=caddie-test
            SlurmctldHost={self.node}(127.0.0.1)
            SlurmctldPort={ctld_port}
            SlurmdPort={slurmd_port}
            AuthType=auth/munge
            CredType=cred/munge
            AuthInfo=socket={self.root}/munge/munge.socket
            SlurmUser={user}
            SlurmdUser={user}
            StateSaveLocation={self.root}/state
            SlurmdSpoolDir={self.root}/spool
            SlurmctldPidFile={self.root}/slurmctld.pid
            SlurmdPidFile={self.root}/slurmd.pid
            SlurmctldLogFile={self.root}/log/slurmctld.log
            SlurmdLogFile={self.root}/log/slurmd.log
            ProctrackType=proctrack/linuxproc
            TaskPlugin=task/none
            JobAcctGatherType=jobacct_gather/none
            AccountingStorageType=accounting_storage/none
            JobCompType=jobcomp/none
            SelectType=select/cons_tres
            SelectTypeParameters=CR_Core_Memory
            SlurmdParameters=config_overrides
            MpiDefault=none
            MailProg=/bin/true
            ReturnToService=2
            KillWait=5
            NodeName={self.node} NodeAddr=127.0.0.1 CPUs=2 RealMemory={self.memory_mb} State=UNKNOWN
            PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
            """))
        self.write_shims()

    def write_shims(self) -> None:
        # The plugin's job step (snakemake-executor-plugin-slurm-jobstep 0.6.1) runs the rule through `srun`
        # with every SLURM_* variable but the allocation's ids removed from its environment, SLURM_CONF
        # included: on this node, whose slurm.conf is not in /etc/slurm, srun would find no configuration.
        write_script(self.bin / "srun", f"#!/bin/sh\nSLURM_CONF={self.conf} exec {self.commands['srun']} \"$@\"\n")
        write_script(self.bin / "sbatch", RECORDING_SBATCH.format(python=sys.executable, real=self.commands["sbatch"]))

    def start(self) -> None:
        self.write_config()
        munge = self.root / "munge"
        self.spawn("munged", [self.commands["munged"], "--foreground", "--force", f"--socket={munge}/munge.socket",
                              f"--key-file={munge}/munge.key", f"--pid-file={munge}/munged.pid",
                              f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"])
        self.wait_for(lambda: (munge / "munge.socket").exists(), 30, "munged's socket")
        self.spawn("slurmctld", [self.commands["slurmctld"], "-D", "-i"])
        self.wait_for(lambda: self.run("scontrol", "ping").returncode == 0, 60, "slurmctld to answer")
        self.spawn("slurmd", [self.commands["slurmd"], "-D", "-N", self.node])
        self.wait_for(lambda: self.run("sinfo", "-h", "-n", self.node, "-o", "%T").stdout.strip() == "idle", 60,
                      f"node {self.node} to be idle")

    def spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env, start_new_session=True)
        out.close()

    def wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            dead = {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}
            if dead:
                raise RuntimeError(f"waiting for {what}: {dead} exited\n{self.logs()}")
            if ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"{what} not ready after {timeout} s\n{self.logs()}")

    def logs(self, lines: int = 15) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def run(self, command: str, *args, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([self.commands.get(command, command), *args], capture_output=True, text=True,
                              env=self.env, timeout=timeout, stdin=subprocess.DEVNULL)

    def ctld_log(self) -> str:
        path = self.root / "log" / "slurmctld.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def exit_codes(self) -> dict[str, int]:
        """{job id: exit status} of the jobs slurmctld saw end, from its log (there is no accounting)."""
        return {m[1]: int(m[2]) for m in re.finditer(r"_job_complete: JobId=(\d+) WEXITSTATUS (\d+)", self.ctld_log())}

    def stop(self) -> None:
        """Cancel the jobs, stop the daemons, then kill whatever is left that this cluster ran: the job steps and
        the jobs' processes carry the marker in their environment (inherited from slurmd or the submitter)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                self.run("scancel", f"--user={getpass.getuser()}", timeout=15)
                deadline = time.time() + 20
                while time.time() < deadline and self.run("squeue", "-h", "-t", "R,CG", timeout=10).stdout.strip():
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        for pid in self.marked_processes():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def marked_processes(self) -> list[int]:
        marker, pids = self.marker.encode(), []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
        return pids


def _mem_total_mb() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 16384


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        commands = require_commands()
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    cluster = Cluster(tmp_path_factory.mktemp("slurm"), commands)
    try:
        try:
            cluster.start()
        except RuntimeError as e:
            if os.geteuid() != 0:
                pytest.skip(f"a one-node SLURM cluster did not start without root (slurmd launches jobs as root): {e}")
            raise
        yield cluster
    finally:
        cluster.stop()


# ---------------------------------------------------------------------------------------------------------------
# The real cluster: a 1-arm, 1-seed tiny config through --profile profiles/slurm.

ITERATIONS, CHECKPOINT_EVERY = 200, 20


def slurm_config() -> dict:
    """test_pipeline's tiny config, narrowed to one arm, one seed, one eval mode, and trained long enough
    (~5 s) to be cancelled after its first checkpoint."""
    cfg = tiny_config()
    cfg["seeds"] = [1]
    cfg["arms"] = {"baseline": {}}
    d = cfg["defaults"]
    d["curriculum"]["enabled"] = False
    d["evaluate"]["modes"] = ["standard"]
    d["train"].update(iterations=ITERATIONS, checkpoint_every=CHECKPOINT_EVERY, log_every=50)
    return cfg


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """One copy of the workflow that every run here copies again, so that all of them plan the same keys. The
    config goes into its config.yaml: a --configfile is merged into config.yaml and cannot remove its arms."""
    work = copy_workflow(tmp_path_factory.mktemp("source"))
    (work / "config.yaml").write_text(yaml.safe_dump(slurm_config()))
    return work


def clone(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest, symlinks=True)
    return dest


def profile_run(cluster, work, *args, timeout=600) -> subprocess.CompletedProcess:
    """The README's command, plus --max-threads 2 (the node has 2 CPUs) and fast status checks."""
    return subprocess.run([SNAKEMAKE, "--profile", "profiles/slurm", "--max-threads", "2", *FAST_CHECKS, *args],
                          cwd=work, env=cluster.env, capture_output=True, text=True, timeout=timeout)


def planned(work, env, *args) -> dict:
    done = subprocess.run([SNAKEMAKE, "--profile", "profiles/slurm", "-n", *args], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout.split("Job stats:")[-1] if "Job stats:" in done.stdout else ""
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


@pytest.fixture(scope="module")
def full_run(cluster, source, tmp_path_factory):
    work = clone(source, tmp_path_factory.mktemp("full") / "work")
    plan = planned(work, cluster.env)
    cluster.sbatch_log.unlink(missing_ok=True)
    started = time.time()
    done = profile_run(cluster, work)
    seconds = time.time() - started
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:] + cluster.logs()
    print(f"full run through SLURM: {seconds:.0f} s, jobs {plan}")
    return {"work": work, "plan": plan, "calls": sbatch_calls(cluster.sbatch_log), "seconds": seconds}


def test_every_rule_but_the_local_ones_ran_as_a_slurm_job(cluster, full_run):
    calls = full_run["calls"]
    assert calls and all(c["rc"] == 0 and c["id"].isdigit() for c in calls), calls
    submitted = {}
    for call in calls:
        submitted[call["rule"]] = submitted.get(call["rule"], 0) + 1
    expected = {rule: n for rule, n in full_run["plan"].items() if rule not in LOCAL_RULES}
    assert set(expected) == {"tokenize", "train", "quantize", "evaluate", "aggregate"}
    assert submitted == expected
    ended = cluster.exit_codes()  # slurmctld's own record: each job ran on the node and exited 0
    assert {c["id"]: ended.get(c["id"]) for c in calls} == {c["id"]: 0 for c in calls}


def test_slurm_requests_are_the_rules_own_with_nothing_global(full_run):
    """CPU jobs ask for no GPU (no global gpu from profiles/default or elsewhere), one task, the rule's threads
    (capped by --max-threads 2) and its memory; the runtimes come from the profile."""
    by_rule = {c["rule"]: c["args"] for c in full_run["calls"]}
    for rule, args in by_rule.items():
        assert not any(k in args for k in ("--gpus", "--gres", "--ntasks-per-gpu", "-A")), (rule, args)
        assert args["--ntasks"] == "1" and args["--cpus-per-task"] in ("1", "2"), (rule, args)
        assert args["-p"] == "debug", (rule, args)  # the cluster's default partition
    assert {rule: args["--mem"] for rule, args in by_rule.items()} == {
        "tokenize": "16000", "train": "8000", "quantize": "8000", "evaluate": "4000", "aggregate": "4000"}
    assert by_rule["train"]["-t"] == "30" and by_rule["tokenize"]["-t"] == "60"
    assert by_rule["train"]["--cpus-per-task"] == "2" and by_rule["evaluate"]["--cpus-per-task"] == "1"


def test_the_reports_appear(full_run):
    reports = full_run["work"] / "reports"
    for name in ("results.csv", "stats.json", "report.md", "report.html"):
        assert (reports / name).stat().st_size > 0
    assert "baseline" in (reports / "results.csv").read_text()


def test_a_rerun_has_nothing_to_do(cluster, full_run):
    done = subprocess.run([SNAKEMAKE, "--profile", "profiles/slurm", "-n"], cwd=full_run["work"], env=cluster.env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Nothing to be done" in done.stdout + done.stderr, done.stdout[-3000:]


def train_summary(work: Path) -> dict:
    [summary] = (work / "artifacts" / "train").glob("*/seed1/summary.json")
    return json.loads(summary.read_text())


def test_a_cancelled_train_job_is_noticed_and_its_rerun_resumes_to_the_same_weights(cluster, full_run, tmp_path):
    """A copy of the full run without its checkpoint trains again; scancel'ed after its first resumable
    checkpoint, the job fails at the plugin's next status check, and the rerun continues from that checkpoint
    to the weights of the run that was never interrupted."""
    uninterrupted = train_summary(full_run["work"])["model_sha256"]
    work = clone(full_run["work"], tmp_path / "work")
    [run_dir] = (work / "artifacts" / "train").glob("*/seed1")
    for name in ("model.pt", "metrics.jsonl", "summary.json", "train.log"):
        (run_dir / name).unlink()
    cluster.sbatch_log.unlink(missing_ok=True)
    first = subprocess.Popen([SNAKEMAKE, "--profile", "profiles/slurm", "--max-threads", "2", *FAST_CHECKS,
                              "all_train"], cwd=work, env=cluster.env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not (run_dir / "resume" / "state.pt").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert (run_dir / "resume" / "state.pt").exists(), "the train job never wrote a checkpoint"
        [train] = [c for c in sbatch_calls(cluster.sbatch_log) if c["rule"] == "train"]
        cancelled = time.time()
        assert cluster.run("scancel", train["id"]).returncode == 0
        out, _ = first.communicate(timeout=300)
        noticed = time.time() - cancelled
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode != 0 and "SLURM status is: 'CANCELLED'" in out, out[-3000:]
    assert not (run_dir / "model.pt").exists(), "training ended before it was cancelled"
    print(f"scancel noticed after {noticed:.0f} s")

    second = profile_run(cluster, work, "all_train")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    resumed = re.search(r"# resumed at step (\d+)", log)
    assert log.count("# started at step 0") == 1 and resumed and 0 < int(resumed[1]) < ITERATIONS, log
    summary = train_summary(work)
    assert summary["resumed"] and summary["steps"] == ITERATIONS
    assert summary["model_sha256"] == uninterrupted


# ---------------------------------------------------------------------------------------------------------------
# The GPU preset's requests, against fake SLURM commands: sbatch records its arguments and hands out job ids,
# squeue says every job COMPLETED (having run nothing, it leaves the outputs missing: snakemake stops after the
# first submissions; a FAILED job would stretch the plugin's checks to 20 s), there is no accounting.

FAKE_COMMANDS = {
    "squeue": """#!{python}
import json, os
with open(os.environ["CADDIE_SBATCH_LOG"]) as f:
    for line in f:
        print(json.loads(line)["out"] + "|COMPLETED")
""",
    "scontrol": "#!/bin/sh\n[ \"$1 $2\" = \"show config\" ] && echo 'MinJobAge               = 300 sec'\nexit 0\n",
    "sinfo": "#!/bin/sh\nprintf 'PARTITION\\ncpu*\\ngpu\\n'\n",
    "sacct": "#!/bin/sh\necho 'Slurm accounting storage is disabled' >&2\nexit 1\n",
    "sacctmgr": "#!/bin/sh\necho myproject\n",
    "sshare": "#!/bin/sh\nexit 1\n",
    "scancel": "#!/bin/sh\nexit 0\n",
    "srun": "#!/bin/sh\necho 'fake srun: no cluster here' >&2\nexit 1\n",
}


def fake_slurm(folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    write_script(folder / "sbatch", RECORDING_SBATCH.format(python=sys.executable, real=None))
    for name, text in FAKE_COMMANDS.items():
        write_script(folder / name, text.format(python=sys.executable) if "{python}" in text else text)
    log = folder / "sbatch.jsonl"
    log.touch()
    return dict(os.environ, PATH=f"{folder}{os.pathsep}{os.environ.get('PATH', '')}", CADDIE_SBATCH_LOG=str(log))


PLAN_SCRIPT = """
import json, sys, yaml
from stages import config as caddie
cfg = yaml.safe_load(open("config.yaml"))
for path in sys.argv[1:]:
    cfg = caddie.deep_merge(cfg, yaml.safe_load(open(path)))
caddie.validate(cfg)
print(json.dumps({"seeds": cfg["seeds"], "plan": caddie.plan(cfg)}))
"""

STAGE_FILES = {"tokenize": ("manifest.json", "tokenizer.model", "summary.json"),
               "train": ("model.pt", "metrics.jsonl", "summary.json", "train.log"),
               "quantize": ("artifact.bin", "summary.json")}


def preset_workflow(work: Path, preset: str) -> dict:
    """A copy of the workflow with fake challenge data where the preset looks for it, and placeholder outputs
    staggered by seed, so that every GPU stage has jobs ready at once: seed 1 has its tokenizer and shards, seed
    2 also its checkpoints (quantize, prequant evaluations), seed 3 its artifacts too (rescue, quant evaluations)."""
    work.mkdir(parents=True)
    copy_workflow(work)
    tok = yaml.safe_load((work / preset).read_text())["defaults"]["tokenize"]["challenge"]
    shards = work / tok["dir"]
    shards.mkdir(parents=True)
    for name in ("fineweb_train_000000.bin", "fineweb_val_000000.bin"):
        (shards / name).write_bytes(b"\0" * 1024)
    (work / tok["tokenizer"]).parent.mkdir(parents=True, exist_ok=True)
    (work / tok["tokenizer"]).write_bytes(b"not a real model")
    done = subprocess.run([sys.executable, "-c", PLAN_SCRIPT, preset], cwd=work, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout)
    plan, seeds = info["plan"], info["seeds"]
    assert len(seeds) >= 3
    seeds_with = {"tokenize": [None], "train": seeds[1:3], "quantize": seeds[2:3]}
    for stage, with_outputs in seeds_with.items():  # in the order of the stages: every output after its inputs
        for keys in plan["arms"].values():
            for seed in with_outputs:
                folder = work / "artifacts" / stage / keys[stage] / (f"seed{seed}" if seed else "")
                folder.mkdir(parents=True, exist_ok=True)
                for name in STAGE_FILES[stage]:
                    (folder / name).write_text("placeholder\n")
    return plan


def edited_profile(work: Path) -> None:
    """profiles/mine: a copy of profiles/slurm with the lines of its CLUSTER blocks uncommented, as the README
    says to: an account, the GPU model of the CUDA stages, and the CPU and GPU partitions of partitions.yaml."""
    shutil.copytree(work / "profiles" / "slurm", work / "profiles" / "mine")
    path = work / "profiles" / "mine" / "config.yaml"
    text = path.read_text()
    for line in ("- slurm_account=myproject", "gpu_model: h100", "evaluate: {gpu_model: h100}",
                 "quantize: {gpu_model: h100}", "rescue: {gpu_model: h100}", "slurm-partition-config: partitions.yaml"):
        text, found = re.subn(rf"^(\s*)# ({re.escape(line)})", r"\1\2", text, flags=re.M)
        assert found == 1, line
    path.write_text(text)
    profile = yaml.safe_load(text)
    assert {rule: res.get("gpu_model") for rule, res in profile["set-resources"].items()} == \
        dict.fromkeys(("train", "evaluate", "quantize", "rescue"), "h100")


def fake_run(work: Path, env: dict, *args) -> subprocess.CompletedProcess:
    done = subprocess.run([SNAKEMAKE, *args, "--latency-wait", "1", "--slurm-init-seconds-before-status-checks", "1",
                           "--seconds-between-status-checks", "1"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0 and "MissingOutputException" in done.stdout + done.stderr, done.stdout[-3000:]
    return done


def preset_requests(work: Path, env: dict, profile: str) -> dict:
    """{rule: [sbatch args of each of its submitted jobs]} of one run of the preset through `profile`."""
    log = Path(env["CADDIE_SBATCH_LOG"])
    log.write_text("")
    done = fake_run(work, env, "--profile", profile, "--configfile", "presets/h100x8-sp1024.yaml")
    calls = sbatch_calls(log)
    assert calls, done.stdout[-3000:] + done.stderr[-3000:]
    # No global budget (a `resources: gpu=N` from profiles/default, which Snakemake loads beside --profile, would
    # let only N GPUs' worth of jobs be in the queue at once); snakemake names one when it has it.
    assert "Provided resources" not in done.stdout + done.stderr
    requests = {}
    for call in calls:
        requests.setdefault(call["rule"], []).append(call["args"])
    return requests


def test_the_gpu_preset_asks_slurm_for_each_stages_gpus_cpus_and_memory(tmp_path):
    work = tmp_path / "work"
    plan = preset_workflow(work, "presets/h100x8-sp1024.yaml")
    env = fake_slurm(tmp_path / "fake-slurm")
    preset = yaml.safe_load((work / "presets/h100x8-sp1024.yaml").read_text())["defaults"]
    train_gpus, eval_gpus = preset["train"]["nproc"], preset["evaluate"]["nproc"]
    assert train_gpus == eval_gpus == 8
    expected = {  # rule: (GPUs, CPUs, memory in MB), as README's table of the preset says
        "train": (train_gpus, 8 * train_gpus, 25000 * train_gpus),
        "evaluate": (eval_gpus, 8 * eval_gpus, 16000 * eval_gpus),
        "quantize": (1, 8, 16000),
        "rescue": (1, 8, 16000),
    }
    rescued = bool(plan["stages"]["rescue"])
    stages = {"train", "quantize", "evaluate"} | ({"rescue"} if rescued else set())

    requests = preset_requests(work, env, "profiles/slurm")  # as shipped: the cluster's default partition
    assert set(requests) == stages, set(requests)
    for rule, calls in requests.items():
        gpus, cpus, mem = expected[rule]
        for args in calls:
            assert (args.get("--gpus"), args.get("--cpus-per-task"), args.get("--mem")) == \
                (str(gpus), str(cpus), str(mem)), (rule, args)
            assert "--ntasks-per-gpu" not in args and "--ntasks" not in args  # one task; torchrun spawns the ranks
            assert args["-p"] == "cpu" and "-A" not in args  # the default partition; no accounting, no account
            assert args["-t"] == ("30" if rule == "train" else "60")
    assert len(requests["train"]) == len(plan["stages"]["train"])  # the first seed's, one per train key

    edited_profile(work)
    requests = preset_requests(work, env, "profiles/mine")
    assert set(requests) == stages
    for rule, calls in requests.items():
        gpus, cpus, mem = expected[rule]
        for args in calls:
            assert (args.get("--gpus"), args.get("--cpus-per-task"), args.get("--mem")) == \
                (f"h100:{gpus}", str(cpus), str(mem)), (rule, args)
            assert args["-p"] == "gpu" and args["-A"] == "myproject", (rule, args)


def test_cpu_jobs_of_an_edited_profile_go_to_the_cpu_partition_without_a_gpu(tmp_path):
    """The GPU model is set on the CUDA stages only: tokenize (and every CPU job) asks for no GPU and goes to
    the CPU partition, with the rule's threads and memory."""
    (tmp_path / "work").mkdir()
    work = copy_workflow(tmp_path / "work")
    edited_profile(work)
    env = fake_slurm(tmp_path / "fake-slurm")
    done = fake_run(work, env, "--profile", "profiles/mine")
    calls = sbatch_calls(Path(env["CADDIE_SBATCH_LOG"]))
    assert [c["rule"] for c in calls] == ["tokenize"], done.stdout[-3000:] + done.stderr[-3000:]
    args = calls[0]["args"]
    assert "--gpus" not in args and args["-p"] == "cpu" and args["-A"] == "myproject"
    assert (args["--cpus-per-task"], args["--mem"], args["--ntasks"]) == ("8", "16000", "1")
