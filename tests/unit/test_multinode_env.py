"""Multi-node pieces that need no cluster: the rendezvous host from a SLURM node list, ranks per
node (threads per rank), srun's task errors in a log (tests/slurm/test_multinode.py runs them
for real on two nodes)."""

from prefvec_ds.distributed.env import RankInfo, discover, first_host_of, local_world_size
from prefvec_ds.pipeline.status import srun_task_errors


def test_first_host_of_a_compressed_node_list():
    assert first_host_of("node[1-2]") == "node1"
    assert first_host_of("cn[007-008,010],gpu1") == "cn007"
    assert first_host_of("a01,a02") == "a01"
    assert first_host_of("localhost") == "localhost"


def test_rendezvous_without_scontrol_is_the_first_node_not_a_prefix(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the node list is parsed here
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2"}
    assert discover(env).master_addr == "node1"


def test_ranks_per_node_from_slurm_not_the_world_size():
    srun = RankInfo(1, 2, 0, "node1", 1, "slurm")
    two_nodes = {"SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_NODEID": "1"}
    assert local_world_size(srun, two_nodes) == 1  # was 2: half the node's cores per rank
    uneven = {"SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3"}
    assert local_world_size(RankInfo(6, 7, 0, "n", 1, "slurm"), uneven) == 1
    assert local_world_size(RankInfo(4, 7, 0, "n", 1, "slurm"), {**uneven, "SLURM_NODEID": "2"}) == 2
    # a launcher's ranks inside a batch shell: SLURM's counts are the shell's, not theirs
    launched = RankInfo(1, 4, 1, "127.0.0.1", 1, "torchrun")
    assert local_world_size(launched, {"SLURM_STEP_TASKS_PER_NODE": "1", "SLURM_NODEID": "0"}) == 4
    assert local_world_size(launched, {"LOCAL_SIZE": "2"}) == 2


def test_srun_task_errors_of_the_last_attempt_cause_first(tmp_path):
    log = tmp_path / "job.err"
    log.write_text("\n".join([
        "[prefvec] job=5 restart=0 host=node1", "srun: error: node1: task 0: Killed",
        "[prefvec] job=5 restart=1 host=node1", "lots of traceback",
        "srun: error: node2: task 1: Killed",
        "srun: launch/slurm: _step_signal: Terminating StepId=5.0",
        "srun: error: node1: tasks 0,2-3: Exited with exit code 1", "more"]))
    assert srun_task_errors([log, tmp_path / "missing.out"]) == [
        "node2 rank 1: Killed", "node1 rank 0,2-3: Exited with exit code 1"]
