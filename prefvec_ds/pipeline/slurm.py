"""SLURM plumbing for the pipeline: render the one sbatch template, submit, poll, cancel.

Every stage is submitted from `slurm/job.sbatch.tmpl`, rendered from an `SbatchSpec`; the
rendered script is kept in the run folder (`<run_dir>/slurm/<job_name>.sbatch`) next to the
logs it writes (`<run_dir>/logs/`), so what ran can always be read back.

States come from `squeue` while the controller still holds the job (MinJobAge, 300 s by
default) and from `sacct` after that. sacct lags squeue by up to ~2 s on a fresh job, and a job
known to neither yet reads as UNKNOWN: `wait` keeps polling through both.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import string
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from prefvec_ds.atomic import write_text_atomic

#: Found next to the package in a source checkout; PREFVEC_SBATCH_TEMPLATE overrides it.
TEMPLATE_PATH = Path(__file__).resolve().parents[2] / "slurm" / "job.sbatch.tmpl"

#: States after which a job never runs again. PREEMPTED is left out: our jobs are requeue-able,
#: so a preempted job comes back as PENDING.
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED",
})

_ARRAY_RE = re.compile(r"^[0-9][0-9,\-:]*(%\d+)?$")


class SlurmError(RuntimeError):
    """A SLURM command is missing, misconfigured or refused the request."""


class _SbatchTemplate(string.Template):
    """`{{name}}` placeholders: `$` belongs to bash in the template, so it cannot be ours."""

    delimiter = "{{"
    # No escape sequence (the template never needs a literal "{{"; a stray one is an error).
    pattern = r"""\{\{(?:
        (?P<escaped>(?!x)x)|
        (?P<named>[a-z_]+)\}\}|
        (?P<braced>(?!x)x)|
        (?P<invalid>)
    )"""


def _time_limit_seconds(limit: str) -> int | None:
    """Seconds of a SLURM time limit (`MM`, `MM:SS`, `HH:MM:SS`, `D-HH[:MM[:SS]]`); None if
    the string is not one of those."""
    days, _, clock = limit.rpartition("-")
    parts = clock.split(":")
    if not all(p.isdigit() for p in parts + ([days] if days else [])) or len(parts) > 3:
        return None
    numbers = [int(p) for p in parts]
    if days:  # with days the clock starts at hours
        hours, minutes, seconds = (numbers + [0, 0])[:3]
    elif len(numbers) == 3:
        hours, minutes, seconds = numbers
    else:  # without, at minutes
        hours, (minutes, seconds) = 0, (numbers + [0])[:2]
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


@dataclass
class SbatchSpec:
    """One stage as a SLURM batch job; `render` turns it into a script."""

    job_name: str
    """Job name (`--job-name`), also the stem of the script and log file names; no spaces."""
    command: str | Sequence[str]
    """What each task runs: a shell command line (may use $SLURM_ARRAY_TASK_ID and other job
    variables) or an argv list, which is quoted. It receives USR1 before the time limit and
    should save a checkpoint and exit; the job is then requeued."""
    run_dir: Path
    """Run folder: the script goes to `run_dir/slurm/`, stdout/stderr to `run_dir/logs/`."""
    nodes: int = 1
    """Nodes (`--nodes`)."""
    ntasks_per_node: int = 1
    """Tasks (ranks) per node (`--ntasks-per-node`); one per GPU on a GPU cluster."""
    cpus_per_task: int = 1
    """CPU cores per task (`--cpus-per-task`): data loader workers and CPU threads."""
    gpus_per_task: int = 0
    """GPUs per task (`--gpus-per-task`); 0 leaves the directive out (CPU runs)."""
    time: str = "01:00:00"
    """Time limit (`--time`), SLURM syntax: `MM`, `HH:MM:SS`, `D-HH:MM:SS`."""
    signal_seconds: int = 120
    """Seconds before the time limit at which the batch shell gets USR1 (`--signal=B:USR1@N`)
    and forwards it to the step; leave enough for one checkpoint save. SLURM may deliver it up
    to ~60 s earlier than asked (its timer runs every 30 s)."""
    array: str | None = None
    """Job array indices (`--array`, e.g. `0-3` for the four DPO directions, `0-3%2` for at
    most two at once); each task sees SLURM_ARRAY_TASK_ID."""
    launcher: str = "auto"
    """How the command starts: `srun` (one process per task), `direct` (the batch shell runs it
    once, e.g. for the `deepspeed` launcher or mpirun), `auto` (srun when more than one task)."""
    srun_args: tuple[str, ...] = ()
    """Extra `srun` options, e.g. `("--mpi=pmix",)` for an MPI program."""
    env: dict[str, str] = field(default_factory=dict)
    """Variables exported in the job (on top of the submitting environment, which sbatch
    passes on by default)."""
    ds_accelerator: str | None = field(default_factory=lambda: os.environ.get("DS_ACCELERATOR"))
    """DS_ACCELERATOR for DeepSpeed (`cpu` here, unset on a GPU cluster). Default: inherited."""
    torch_extensions_dir: str | None = field(default_factory=lambda: os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "prefvec-ds" / "torch_extensions")))
    """TORCH_EXTENSIONS_DIR: one shared build cache, because DeepSpeed's CPU comm op takes
    ~60 s and 1.6 GB to compile. Default: inherited, else ~/.cache/prefvec-ds/torch_extensions."""
    partition: str | None = None
    """Partition (`--partition`); None: the cluster default."""
    account: str | None = None
    """Account (`--account`); None: the user's default."""
    extra_sbatch: tuple[str, ...] = ()
    """More `#SBATCH` options verbatim, e.g. `("--qos=high", "--exclusive")`."""
    workdir: Path | None = None
    """Working directory of the job (`--chdir`); None: the current directory at render time."""
    after_ok: tuple[str, ...] = ()
    """Job ids that must complete successfully first (`--dependency=afterok:...`). Passed on
    the sbatch command line, not in the script; a failed one cancels this job."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.+\-]+", self.job_name):
            raise ValueError(f"SbatchSpec.job_name={self.job_name!r}: expected letters, digits, _ . + -")
        for name in ("nodes", "ntasks_per_node", "cpus_per_task"):
            if getattr(self, name) < 1:
                raise ValueError(f"SbatchSpec.{name}={getattr(self, name)}: expected >= 1")
        if self.gpus_per_task < 0 or self.signal_seconds < 0:
            raise ValueError("SbatchSpec.gpus_per_task and signal_seconds: expected >= 0")
        limit = _time_limit_seconds(self.time)
        if limit is None:
            raise ValueError(f"SbatchSpec.time={self.time!r}: expected MM, HH:MM:SS or D-HH:MM:SS")
        if self.signal_seconds >= limit:
            raise ValueError(f"SbatchSpec.signal_seconds={self.signal_seconds}: expected less than "
                             f"the time limit ({limit} s)")
        if self.array is not None and not _ARRAY_RE.match(self.array):
            raise ValueError(f"SbatchSpec.array={self.array!r}: expected e.g. 0-3, 0,2 or 0-3%2")
        if self.launcher not in ("auto", "srun", "direct"):
            raise ValueError(f"SbatchSpec.launcher={self.launcher!r}: expected auto, srun or direct")
        self.run_dir = Path(self.run_dir)
        self.after_ok = tuple(str(i) for i in self.after_ok)

    @property
    def ntasks(self) -> int:
        """Tasks in the whole job."""
        return self.nodes * self.ntasks_per_node

    @property
    def script_path(self) -> Path:
        """Where `write_script` puts the rendered script."""
        return self.run_dir / "slurm" / f"{self.job_name}.sbatch"


def _launch_line(spec: SbatchSpec) -> str:
    command = spec.command if isinstance(spec.command, str) else shlex.join(spec.command)
    use_srun = spec.launcher == "srun" or (spec.launcher == "auto" and spec.ntasks > 1)
    if not use_srun:
        return command
    # --kill-on-bad-exit: one dead rank must not leave the others hanging in a collective.
    srun = ["srun", "--kill-on-bad-exit=1", *spec.srun_args]
    return f"{shlex.join(srun)} {command}"


def _directives(spec: SbatchSpec) -> str:
    lines = []
    if spec.array is not None:
        lines.append(f"--array={spec.array}")
    if spec.gpus_per_task:
        lines.append(f"--gpus-per-task={spec.gpus_per_task}")
    if spec.partition:
        lines.append(f"--partition={spec.partition}")
    if spec.account:
        lines.append(f"--account={spec.account}")
    lines.extend(spec.extra_sbatch)
    return "\n".join(f"#SBATCH {line}" for line in lines)


def _exports(spec: SbatchSpec) -> str:
    env = {}
    if spec.ds_accelerator:
        env["DS_ACCELERATOR"] = spec.ds_accelerator
    if spec.torch_extensions_dir:
        env["TORCH_EXTENSIONS_DIR"] = spec.torch_extensions_dir
    env.update(spec.env)
    for key in env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"SbatchSpec.env: {key!r} is not a shell variable name")
    return "\n".join(f"export {key}={shlex.quote(str(value))}" for key, value in env.items())


def template_path() -> Path:
    """The sbatch template: $PREFVEC_SBATCH_TEMPLATE, else slurm/job.sbatch.tmpl in the checkout."""
    path = Path(os.environ.get("PREFVEC_SBATCH_TEMPLATE", TEMPLATE_PATH))
    if not path.is_file():
        raise SlurmError(f"sbatch template not found at {path}; set PREFVEC_SBATCH_TEMPLATE to "
                         "the path of slurm/job.sbatch.tmpl")
    return path


def render(spec: SbatchSpec, template: str | None = None) -> str:
    """The batch script for `spec` (the template's text from `template_path` unless given)."""
    text = template if template is not None else template_path().read_text(encoding="utf-8")
    log_stem = spec.run_dir.resolve() / "logs" / (
        f"{spec.job_name}-%A_%a" if spec.array is not None else f"{spec.job_name}-%j")
    values = {
        "header": f"prefvec-ds stage {spec.job_name}",
        "job_name": spec.job_name,
        "output": f"{log_stem}.out",
        "error": f"{log_stem}.err",
        "workdir": str(Path(spec.workdir or os.getcwd()).resolve()),
        "nodes": spec.nodes,
        "ntasks_per_node": spec.ntasks_per_node,
        "cpus_per_task": spec.cpus_per_task,
        "time": spec.time,
        "signal_seconds": spec.signal_seconds,
        "extra_directives": _directives(spec),
        "env_exports": _exports(spec),
        "launch": _launch_line(spec),
    }
    # substitute (not safe_substitute): a placeholder without a value is a bug, not a blank.
    return _SbatchTemplate(text).substitute(values)


def write_script(spec: SbatchSpec) -> Path:
    """Render `spec` into `spec.script_path` (and create the logs folder sbatch writes into)."""
    (spec.run_dir / "logs").mkdir(parents=True, exist_ok=True)
    path = spec.script_path
    write_text_atomic(path, render(spec))  # never leave a half-written script behind
    return path


# --------------------------------------------------------------------------------------------
# Talking to the cluster.


@dataclass(frozen=True)
class JobState:
    """One job, or one task of a job array, as SLURM last reported it."""

    job_id: str
    """`123` for a plain job, `123_2` for task 2 of array job 123."""
    state: str
    """SLURM state: PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ... or UNKNOWN
    (known to neither squeue nor sacct yet)."""
    reason: str = ""
    """Why it waits or ended, e.g. `Dependency`, `DependencyNeverSatisfied`, `BeginTime`."""
    exit_code: str = ""
    """`code:signal` once finished, when sacct reports it; empty otherwise."""
    raw_id: str = ""
    """The task's own numeric job id (an array task's SLURM_JOB_ID)."""

    @property
    def done(self) -> bool:
        """True once the job can never run again."""
        return self.state in TERMINAL_STATES


def _slurm_hint() -> str:
    conf = os.environ.get("SLURM_CONF")
    if conf:
        return f"SLURM_CONF={conf}"
    if any(Path(p).exists() for p in ("/etc/slurm/slurm.conf", "/etc/slurm-llnl/slurm.conf",
                                       "/run/slurm/conf")):
        return "using the system slurm.conf"
    return ("SLURM_CONF is not set and there is no /etc/slurm/slurm.conf: for the local cluster "
            "run `slurm/cluster.sh up` and `eval \"$(slurm/cluster.sh env)\"`")


def check_client(program: str = "sbatch") -> None:
    """SlurmError unless `program` is on PATH and SLURM_CONF, when set, names a file."""
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():
        raise SlurmError(f"SLURM_CONF={conf}: no such file (is the cluster up? `slurm/cluster.sh up`)")
    if shutil.which(program) is None:
        raise SlurmError(f"{program} not found on PATH: install SLURM (slurm/install_deps.sh "
                         "installs the Debian packages) or run on a cluster login node")


def _run(argv: Sequence[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a SLURM client; SlurmError (with a hint about the configuration) when it fails."""
    check_client(argv[0])
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise SlurmError(f"{shlex.join(argv)} did not answer in {timeout} s ({_slurm_hint()})") from err
    if check and proc.returncode != 0:
        raise SlurmError(f"{shlex.join(argv)} failed (exit {proc.returncode}): "
                         f"{proc.stderr.strip() or proc.stdout.strip()} ({_slurm_hint()})")
    return proc


def submit(spec: SbatchSpec) -> str:
    """Render `spec` into the run folder, submit it, return the job id (the array's base id)."""
    check_client("sbatch")  # before writing anything into the run folder
    script = write_script(spec)
    argv = ["sbatch", "--parsable"]
    if spec.after_ok:
        # --kill-on-invalid-dep: a failed dependency cancels this job even on clusters without
        # DependencyParameters=kill_invalid_depend, instead of leaving it pending forever.
        argv += [f"--dependency=afterok:{':'.join(spec.after_ok)}", "--kill-on-invalid-dep=yes"]
    out = _run([*argv, str(script)]).stdout.strip()
    job_id = out.split(";")[0]  # --parsable prints `id` or `id;cluster`
    if not job_id.isdigit():
        raise SlurmError(f"sbatch {script}: unexpected answer {out!r}")
    return job_id


def _matches(query: str, job_id: str, raw_id: str) -> bool:
    return query in (job_id, raw_id) or job_id.split("_")[0] == query


def _squeue_states(ids: Sequence[str]) -> list[JobState]:
    # -t all: finished jobs too, while the controller keeps them; -r: one line per array task.
    # `:|` after a field means no padding and `|` as the separator.
    fields = "JobArrayID:|,JobID:|,State:|,Reason:|,exit_code:|"
    proc = _run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(ids), "-O", fields],
                check=False)
    if proc.returncode != 0:  # "Invalid job id": all of them are gone from the controller
        return []
    states = []
    for line in proc.stdout.splitlines():
        job_id, raw_id, state, reason, status = (line.split("|") + [""] * 5)[:5]
        exit_code = ""
        if state in TERMINAL_STATES and status.strip().isdigit():
            # squeue gives the raw wait status; sacct's form is `code:signal`.
            exit_code = f"{int(status) >> 8}:{int(status) & 0x7F}"
        states.append(JobState(job_id.strip(), state.strip(),
                               "" if reason.strip() == "None" else reason.strip(), exit_code,
                               raw_id.strip()))
    return states


def _sacct_states(ids: Sequence[str]) -> list[JobState]:
    if shutil.which("sacct") is None:
        return []
    proc = _run(["sacct", "-n", "-P", "-X", "-j", ",".join(ids),
                 "-o", "JobID,JobIDRaw,State,ExitCode,Reason"], check=False)
    if proc.returncode != 0:  # accounting disabled: squeue is all there is
        return []
    states = []
    for line in proc.stdout.splitlines():
        job_id, raw_id, state, exit_code, reason = (line.split("|") + [""] * 5)[:5]
        # "CANCELLED by 0" -> "CANCELLED"
        states.append(JobState(job_id, state.split(" ")[0], "" if reason == "None" else reason,
                               exit_code, raw_id))
    return states


def job_states(ids: Iterable[str]) -> dict[str, JobState]:
    """State of every job (every array task) in `ids`, keyed by `JobState.job_id`.

    A queried id that neither squeue nor sacct knows yet appears as UNKNOWN under its own id.
    """
    ids = [str(i) for i in ids]
    if not ids:
        return {}
    found = {s.job_id: s for s in _squeue_states(ids)}
    missing = [q for q in ids if not any(_matches(q, s.job_id, s.raw_id) for s in found.values())]
    if missing:
        found.update({s.job_id: s for s in _sacct_states(missing)})
    for query in ids:
        if not any(_matches(query, s.job_id, s.raw_id) for s in found.values()):
            found[query] = JobState(query, "UNKNOWN")
    return found


def cancel(ids: Iterable[str]) -> None:
    """Cancel jobs (a base id cancels every task of an array); finished ones are ignored."""
    ids = [str(i) for i in ids]
    if ids:
        _run(["scancel", *ids], check=False)


def wait(ids: Iterable[str], timeout: float, poll: float = 0.5) -> dict[str, JobState]:
    """Poll until every job in `ids` has finished (see TERMINAL_STATES); return their states.

    Raises TimeoutError, naming the jobs still running, after `timeout` seconds.
    """
    ids = [str(i) for i in ids]
    deadline = time.monotonic() + timeout
    while True:
        states = job_states(ids)
        if all(s.done for s in states.values()):
            return states
        if time.monotonic() > deadline:
            busy = ", ".join(f"{s.job_id}={s.state}" for s in states.values() if not s.done)
            raise TimeoutError(f"SLURM jobs not finished after {timeout} s: {busy}")
        time.sleep(poll)
