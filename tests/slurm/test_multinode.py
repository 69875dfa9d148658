"""Two real SLURM nodes on one machine (slurm/cluster.sh up --nodes 2): node1 and node2 are
network namespaces with their own address and hostname, joined by a private bridge.

The DPO stages of the shrunken quickstart run with `distributed.nnodes=2` (one rank per node,
gloo across the namespaces) and must end where the one-node run (`local_run`) ended; one of
them is requeued mid-run and resumes. A rank killed on node2 fails its job at once, and
`prefvec status` names the node and the rank.

Same data per optimizer step on both sides: local_run takes 16 pairs per step on 1 rank
(micro-batch 16); here 2 ranks take 8 each (dpo.micro_batch_size=8), the same 16 pairs
(train/schedule.rank_micro_batches), so the runs differ only by float summation order.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline_fixtures import RECIPE, local_run, prefvec, run_args  # noqa: E402,F401
from slurm_fixtures import CLUSTER_SH, cluster_env, cluster_up, free_subnet  # noqa: E402

from prefvec_ds.config.loader import load_config  # noqa: E402
from prefvec_ds.distributed.checkpoints import COMPLETE_MARKER  # noqa: E402
from prefvec_ds.pipeline import manifest, slurm  # noqa: E402
from prefvec_ds.pipeline.dag import build_dag  # noqa: E402

pytestmark = pytest.mark.slurm

TWO_NODES = ["distributed.nnodes=2", "distributed.nproc_per_node=1", "dpo.micro_batch_size=8"]
# |two-node - one-node| / |one-node move|, for weights and vectors: measured ~1e-6 (fp32 sums
# in another order over 16 steps of Adam); a resume that lost its optimizer state, a rank that
# trained on other pairs or a checkpoint read with a partition missing is off by > 1e-2.
TOLERANCE = 1e-4
REQUEUED = 3  # array index of dpo/harmless- (helpful+/- are copied from local_run)


@pytest.fixture(scope="module", autouse=True)
def on_two_nodes(two_node_cluster):
    """Talk to the two-node cluster in this module (the session's SLURM_CONF is the one-node
    cluster's)."""
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(two_node_cluster.conf)
    yield
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved


def copy_run(src: Path, dst: Path, stages: list[str], current: list[str], *extra: str) -> None:
    """Copy the outputs and manifests of `stages` from a finished run into `dst`, and declare
    `current` up to date for the two-node config: their fingerprints count the world size, so
    the copied SFT (and helpful+/-) would otherwise be redone, and the two-node DPO would not
    start from local_run's theta_base. `extra`: more overrides of the run to be submitted."""
    outputs = {"init_model"} | {s if s.startswith("dpo/") else s.split("/")[0] for s in stages}
    for rel in sorted(outputs):
        shutil.copytree(src / rel, dst / rel)
    (dst / "pipeline" / "manifests").mkdir(parents=True)
    for stage in stages:
        name = f"{stage.replace('/', '_')}.json"
        shutil.copy2(src / "pipeline" / "manifests" / name, dst / "pipeline" / "manifests")
    cfg = load_config(RECIPE, run_args(dst, *TWO_NODES, *extra)[1:])
    for stage in build_dag(cfg):  # upstream first: a fingerprint hashes its inputs' output ids
        if stage.name in current:
            manifest.update(dst, stage, fingerprint=manifest.input_fingerprint(dst, stage))


def submit(run: Path, cancel: tuple[str, ...] = ("merge", "eval"), *extra: str) -> dict[str, dict]:
    """`prefvec submit` on two nodes; the merge and eval jobs are cancelled at once (minutes of
    generation that prove nothing about nodes). Both nodes share this machine's 2 cores: one
    thread per rank (sbatch passes the variable on), not 2 x 2; only for these jobs, so that
    local_run (maybe run later in this session) keeps its threads."""
    prefvec("submit", *run_args(run, *TWO_NODES, *extra), env={"OMP_NUM_THREADS": "1"})
    record = json.loads((run / "pipeline" / "jobs.json").read_text())["submissions"][-1]
    jobs = {job["kind"]: job for job in record["jobs"]}
    slurm.cancel([jobs[k]["job_id"] for k in cancel if k in jobs])
    return jobs


def wait_for(path: Path, job_ids: list[str], timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        states = slurm.job_states(job_ids)
        if any(s.state in ("FAILED", "CANCELLED") for s in states.values()):
            pytest.fail(f"a job ended before {path} appeared: {states}")
        assert time.time() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.2)


def requeue(task: str, timeout: float = 60) -> None:
    """`scontrol requeue`, and wait until the job is pending again. It then starts after
    Slurm's own BeginTime hold (requeue + cred_expire + 1: 11 s on the test cluster). Never
    released early with `StartTime=now`: slurmd refuses to launch a job whose credential is not
    newer than the revoke of its previous run, with one-second resolution (`ctime <= revoked`
    in slurm_cred_revoked), so a rerun started in the same second as the requeue fails
    ("already killed, do not launch batch job") and the job ends FAILED."""
    subprocess.run(["scontrol", "requeue", task], check=True)
    deadline = time.time() + timeout
    while slurm.job_states([task])[task].state != "PENDING":
        assert time.time() < deadline, f"{task} not pending {timeout} s after the requeue"
        time.sleep(0.2)


def relative_distance(a: dict, b: dict) -> float:
    """|a - b| / |b| over every tensor of two state dicts with the same names."""
    assert sorted(a) == sorted(b) and a
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b) ** 0.5
    return diff / sum(float(b[k].double().pow(2).sum()) for k in b) ** 0.5


def tensors(folder: Path) -> dict:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


@pytest.fixture(scope="module")
def two_node_run(local_run, tmp_path_factory) -> dict:
    """dpo/harmless+ and dpo/harmless- on two nodes (harmless- requeued after its step-4
    checkpoint), then vectors/harmless; everything upstream copied from local_run."""
    run = tmp_path_factory.mktemp("multinode") / "two"
    kept = ["sft", "ref_logps/helpful", "ref_logps/harmless", "dpo/helpful+", "dpo/helpful-"]
    copy_run(local_run, run, kept, current=["sft", "dpo/helpful+", "dpo/helpful-"])
    jobs = submit(run)
    assert jobs["dpo"]["stages"] == {"2": "dpo/harmless+", "3": "dpo/harmless-"}, jobs
    ids = [jobs["dpo"]["job_id"], jobs["vectors"]["job_id"]]
    ckpt = run / "dpo" / "harmless-" / "ckpt"
    wait_for(ckpt / "global_step4" / COMPLETE_MARKER, ids)
    requeue(f"{jobs['dpo']['job_id']}_{REQUEUED}")
    assert not (ckpt / "global_step16" / COMPLETE_MARKER).exists(), "finished before the requeue"
    states = slurm.wait(ids, timeout=600, poll=1)
    return {"run": run, "jobs": jobs, "states": states}


def dpo_log(info: dict, index: int) -> str:
    dpo = info["jobs"]["dpo"]
    return (info["run"] / "logs" / f"{dpo['job_name']}-{dpo['job_id']}_{index}.out").read_text()


def test_up_down_two_nodes_idle_and_nothing_left(tmp_path):
    """Its own small cluster: both nodes idle in sinfo, each task on its own hostname, and
    `down` (twice) leaves no namespace, link or daemon behind."""
    subnet, prefix = free_subnet()
    env = cluster_env(tmp_path / "c", ports=40, PREFVEC_SLURM_ACCOUNTING="0",
                      PREFVEC_SLURM_SUBNET=subnet, PREFVEC_SLURM_NET_PREFIX=prefix)
    cluster_up(tmp_path / "c", env, "--nodes", "2")
    conf = {**env, "SLURM_CONF": str(tmp_path / "c" / "etc" / "slurm.conf")}
    try:
        sinfo = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=conf, text=True,
                               capture_output=True, check=True).stdout.split("\n")
        assert sorted(filter(None, sinfo)) == ["node1 idle", "node2 idle"], sinfo
        out = subprocess.run(["srun", "-N2", "-n2", "sh", "-c",
                              'echo "$SLURM_PROCID $(hostname) $(getent hosts node1)"'],
                             env=conf, text=True, capture_output=True, timeout=60).stdout
        assert sorted(" ".join(line.split()) for line in out.splitlines()) == [
            f"0 node1 {subnet}.11 node1", f"1 node2 {subnet}.11 node1"], out
    finally:
        for _ in range(2):  # idempotent
            down = subprocess.run([str(CLUSTER_SH), "down", "--purge"], env=env,
                                  capture_output=True, text=True, timeout=120)
            assert down.returncode == 0, down.stderr
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert prefix not in links and prefix not in subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert str(tmp_path / "c") not in subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                                     text=True).stdout


def test_dpo_stage_across_two_nodes_gives_the_one_node_vector(two_node_run, local_run):
    run, jobs, states = two_node_run["run"], two_node_run["jobs"], two_node_run["states"]
    assert all(s.state == "COMPLETED" for s in states.values()), states
    script = Path(jobs["dpo"]["script"]).read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script
    # the batch shell runs on the allocation's first node, which is the rendezvous
    assert re.search(r"host=node1 start=\S+ master=node1:\d+", dpo_log(two_node_run, 2))
    nodes = subprocess.run(["squeue", "-h", "-t", "all", "-j", f"{jobs['dpo']['job_id']}_2",
                            "-O", "NodeList"], capture_output=True, text=True).stdout.strip()
    assert nodes == "node[1-2]", nodes
    # the extractor read the ZeRO-3 checkpoints two nodes wrote (one partition per rank)
    assert len(list((run / "dpo" / "harmless+" / "ckpt" / "global_step16").glob(
        "*optim_states.pt"))) == 2
    two, one = tensors(run / "vectors" / "harmless"), tensors(local_run / "vectors" / "harmless")
    assert relative_distance(two, one) < TOLERANCE


def test_requeued_two_node_job_resumes_to_the_same_weights(two_node_run, local_run, tmp_path):
    log = dpo_log(two_node_run, REQUEUED)
    assert re.search(r"restart=1 host=node1", log), log[-3000:]
    stop = re.search(r"stop requested: checkpoint at step (\d+) saved", log)
    assert stop and 4 <= int(stop[1]) < 16, log[-3000:]
    rerun = log[log.index("restart=1"):]
    # the rerun went on from that checkpoint: its first logged training step comes after it
    steps = [int(s) for s in re.findall(r"\bstep (\d+) ", rerun)]
    assert steps and min(steps) > int(stop[1]), rerun[-3000:]
    # theta_harmless- of two nodes + requeue vs one uninterrupted node, as read by `prefvec
    # vector` from both ZeRO-3 checkpoints: their difference is float noise
    diff = tmp_path / "diff"
    prefvec("vector", "--plus", str(two_node_run["run"] / "dpo" / "harmless-" / "ckpt"),
            "--minus", str(local_run / "dpo" / "harmless-" / "ckpt"), "--out", str(diff))
    move = json.loads((local_run / "vectors" / "harmless" / "prefvec_vector.json").read_text())
    gap = json.loads((diff / "prefvec_vector.json").read_text())
    assert gap["norm"] < TOLERANCE * move["norm"], (gap["norm"], move["norm"])


def rank_pids(raw_job_id: str, rank: int) -> list[int]:
    """Processes of one rank of a job: srun's tasks carry SLURM_JOB_ID and SLURM_PROCID (all
    nodes share this machine's PID space, so node2's ranks are visible here)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if (f"SLURM_JOB_ID={raw_job_id}".encode() in env and b"prefvec_ds.entry" in cmd
                and f"SLURM_PROCID={rank}".encode() in env and b"SLURM_STEP_ID=0" in env):
            pids.append(int(proc.name))
    return pids


def test_rank_killed_on_node2_fails_the_job_and_status_names_it(two_node_run, tmp_path):
    run = tmp_path / "kill"
    # 1000 steps: still training whenever the kill comes (16 take ~3 s here); never finished.
    # Only dpo/harmless- is submitted: the other directions are declared current.
    longer = "dpo.max_steps=1000"
    copy_run(two_node_run["run"], run, ["sft", "ref_logps/helpful", "ref_logps/harmless",
                                        "dpo/helpful+", "dpo/helpful-", "dpo/harmless+"],
             ["dpo/helpful+", "dpo/helpful-", "dpo/harmless+"], longer)
    jobs = submit(run, ("vectors", "merge", "eval"), longer)
    assert jobs["dpo"]["stages"] == {str(REQUEUED): "dpo/harmless-"}, jobs
    task = f"{jobs['dpo']['job_id']}_{REQUEUED}"
    wait_for(run / "dpo" / "harmless-" / "ckpt" / "global_step4" / COMPLETE_MARKER, [task])
    raw = slurm.job_states([task])[task].raw_id
    victims = rank_pids(raw, 1)
    assert victims, f"no rank 1 of job {raw} found"
    killed_at = time.time()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    state = slurm.wait([task], timeout=120, poll=0.5)[task]
    assert state.state == "FAILED", state
    assert time.time() - killed_at < 60, "a rank hung after its peer died"
    assert not rank_pids(raw, 0), "rank 0 outlived the job"

    row = {r["stage"]: r for r in json.loads(prefvec("status", str(run), "--json").stdout)}
    failed = row["dpo/harmless-"]
    assert failed["state"] == "failed"
    assert failed["failed_tasks"][0] == "node2 rank 1: Killed", failed
    assert "first failed task: node2 rank 1: Killed" in prefvec("status", str(run)).stdout
