import pytest

from prefvec_ds.config.schema import DPOConfig
from prefvec_ds.distributed.env import discover
from prefvec_ds.train.schedule import WarmupDecay, rank_micro_batches, shard_for_eval


def test_every_example_once_per_epoch_across_ranks():
    stage = DPOConfig(micro_batch_size=3, grad_accum=2)
    n, world = 40, 2  # 12 per step -> 3 steps per epoch, 4 examples dropped
    seen = []
    for step in range(3):
        for rank in range(world):
            for mb in rank_micro_batches(step, n, stage, world, rank, seed=7):
                assert len(mb) == 3
                seen += mb
    assert len(seen) == len(set(seen)) == 36
    # a pure function of (step, seed): resume replays the same batches; epochs reshuffle
    assert rank_micro_batches(5, n, stage, world, 1, 7) == rank_micro_batches(5, n, stage, world, 1, 7)
    assert rank_micro_batches(0, n, stage, world, 0, 7) != rank_micro_batches(3, n, stage, world, 0, 7)


def test_warmup_then_cosine():
    s = WarmupDecay(total_steps=100, warmup_steps=10)
    assert s(0) == pytest.approx(1 / 11) and s(9) == pytest.approx(10 / 11)
    assert s(10) == pytest.approx(1.0) and s(55) == pytest.approx(0.5) and s(100) == pytest.approx(0)


def test_eval_shards_have_equal_batch_counts():
    shards = [shard_for_eval(7, 2, r, 2) for r in range(2)]
    assert len(shards[0]) == len(shards[1])
    kept = sorted(i for s in shards for idx, keep in s if keep for i in idx)
    assert kept == list(range(7))


def test_rank_discovery_precedence():
    torchrun = discover({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                         "MASTER_ADDR": "n1", "MASTER_PORT": "1234", "SLURM_PROCID": "0"})
    assert (torchrun.rank, torchrun.world_size, torchrun.source) == (1, 4, "torchrun")
    # under mpirun inside sbatch every rank sees SLURM_PROCID=0: MPI variables win
    mpi = discover({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                    "OMPI_COMM_WORLD_LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
                    "SLURM_JOB_ID": "77"})
    assert (mpi.rank, mpi.world_size, mpi.master_port, mpi.source) == (1, 2, 20077, "mpi")
    slurm = discover({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
                      "SLURM_JOB_ID": "41", "MASTER_ADDR": "nodeA"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_addr,
            slurm.master_port) == (3, 4, 1, "nodeA", 20041)
    single = discover({})
    assert (single.rank, single.world_size, single.source) == (0, 1, "single")


def test_slurm_job_port_stays_below_the_ephemeral_range_and_matches_the_template():
    import re
    import subprocess

    from prefvec_ds.distributed.env import slurm_job_port
    from tests.conftest import REPO

    ids = [1, 17, 1234, 12767, 12768, 32767, 99999, 1_000_003]
    assert all(20000 <= slurm_job_port(str(i)) < 32768 for i in range(0, 200_000, 7))
    assert len({slurm_job_port(str(i)) for i in range(5000, 5004)}) == 4  # an array on one node
    line = re.search(r"^export MASTER_PORT=.*$", (REPO / "slurm" / "job.sbatch.tmpl").read_text(),
                     re.M).group(0)
    for job in ids:  # the sbatch template computes the same port in bash
        out = subprocess.run(["bash", "-c", f"SLURM_JOB_ID={job}; {line}; echo $MASTER_PORT"],
                             capture_output=True, text=True, check=True).stdout
        assert int(out) == slurm_job_port(str(job))
