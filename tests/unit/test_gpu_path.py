"""The GPU-path findings that a CPU can show (review: ../shared/notes/gpu-path-review.md).

C1 collective buffers on the group's device, C2 SFT batch placement, R1/R2 GPU ids through a
preset CUDA_VISIBLE_DEVICES, R3/R4 rank discovery and device index, R5 timeout, R7 nnodes,
R8 DS_ACCELERATOR, R12 pruning, R13 srun CPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as tdist

from prefvec_ds import PrefvecError
from prefvec_ds.config.loader import load_config
from prefvec_ds.distributed import checkpoints, collectives
from prefvec_ds.distributed.env import cuda_device_index, discover, srun_task
from prefvec_ds.distributed.launch import (RankJob, launcher_command, physical_gpus, stage_env,
                                           visible_gpu_ids)
from prefvec_ds.pipeline.local import check_single_node, device_slots
from prefvec_ds.pipeline.submit import check_accelerator_env
from tests.conftest import REPO

RECIPE = REPO / "recipes" / "quickstart.yaml"


def cfg_for(tmp_path, *overrides):
    return load_config(RECIPE, [f"run_dir={tmp_path}", *overrides])


@pytest.fixture
def one_rank_group(tmp_path):
    """A real one-rank process group with the given backend string, destroyed afterwards."""
    def start(backend: str):
        tdist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}",
                                 rank=0, world_size=1)
    yield start
    if tdist.is_initialized():
        tdist.destroy_process_group()


# --- C1: collectives ---------------------------------------------------------------------

@pytest.mark.parametrize("backend, served", [
    ("gloo", ["cpu", "cuda"]), ("nccl", ["cuda"]), ("cuda:gloo", ["cuda"]),
    ("cpu:gloo,cuda:nccl", ["cpu", "cuda"])])
def test_served_device_types(backend, served):
    assert collectives.served_device_types(backend) == served


def test_metric_all_reduce_on_a_cuda_only_group_does_not_use_a_cpu_buffer(one_rank_group):
    # "cuda:gloo" is a group that, like nccl, serves only CUDA tensors (the review's repro)
    one_rank_group("cuda:gloo")
    with pytest.raises(RuntimeError, match="device type cpu"):
        tdist.all_reduce(torch.zeros(1, dtype=torch.float64))  # what the old helper did
    assert collectives.served_device_types(tdist.get_backend()) == ["cuda"]
    # the helper now asks for a CUDA buffer: on this CPU-only torch that fails for lack of
    # CUDA, not with the group's "no backend for device type cpu"
    with pytest.raises((AssertionError, RuntimeError)) as err:
        collectives.all_reduce_sum({"loss": 1.0})
    assert "device type cpu" not in str(err.value)


def test_metric_all_reduce_on_gloo_stays_on_cpu(one_rank_group):
    one_rank_group("gloo")
    assert collectives.collective_device() == torch.device("cpu")
    assert collectives.all_reduce_sum({"b": 2.0, "a": 1.5}) == {"a": 1.5, "b": 2.0}
    assert collectives.from_rank0({"tag": "global_step3"}) == {"tag": "global_step3"}


# --- C2: SFT batch placement --------------------------------------------------------------

class RecordingEngine:
    """Stands in for the engine's placement contract only: it has a `device` (meta, i.e. not
    the CPU the collate makes its tensors on) and records where its inputs are."""

    def __init__(self, device: str, vocab: int = 11):
        self.device, self.vocab, self.seen = torch.device(device), vocab, {}

    def __call__(self, input_ids, attention_mask):
        self.seen = {"input_ids": input_ids.device, "attention_mask": attention_mask.device}
        b, t = input_ids.shape
        return SimpleNamespace(logits=torch.zeros(b, t, self.vocab, device=input_ids.device))


def test_sft_moves_its_batch_to_the_engine_device():
    from prefvec_ds.data.tokenize import IGNORE_INDEX  # noqa: F401 - labels use it
    from prefvec_ds.train.sft import sft_loss

    batch = {"input_ids": torch.tensor([[1, 4, 5, 2]]), "attention_mask": torch.ones(1, 4),
             "labels": torch.tensor([[-100, 4, 5, 2]])}
    engine = RecordingEngine("meta")
    loss, ntok = sft_loss(engine, batch)
    assert engine.seen == {"input_ids": torch.device("meta"),
                           "attention_mask": torch.device("meta")}
    assert loss.device == torch.device("meta") and ntok.device == torch.device("meta")
    # and on a CPU engine the numbers are the usual mean NLL: uniform logits -> log(vocab)
    loss, ntok = sft_loss(RecordingEngine("cpu"), batch)
    assert int(ntok) == 3 and float(loss) == pytest.approx(float(torch.log(torch.tensor(11.))))


# --- R1/R2: GPU ids through CUDA_VISIBLE_DEVICES ------------------------------------------

def test_slots_are_physical_gpu_ids_under_a_preset_cuda_visible_devices(tmp_path):
    cfg = cfg_for(tmp_path, "distributed.nproc_per_node=2")
    env = {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert device_slots(cfg, 4, env) == [[4, 5], [6, 7]]
    assert device_slots(cfg, 4, {}) == [[0, 1], [2, 3]]
    assert physical_gpus([1], {"CUDA_VISIBLE_DEVICES": "3,1"}) == [1]
    assert physical_gpus([0], {"CUDA_VISIBLE_DEVICES": "3,1"}) == [3]
    with pytest.raises(PrefvecError, match="shows only 2"):
        physical_gpus([2], {"CUDA_VISIBLE_DEVICES": "3,1"})
    with pytest.raises(PrefvecError, match="UUIDs"):
        visible_gpu_ids({"CUDA_VISIBLE_DEVICES": "GPU-8f1c,GPU-22aa"})


def test_the_mapped_slot_reaches_the_rank_commands(tmp_path):
    from prefvec_ds.pipeline.dag import build_dag
    from prefvec_ds.pipeline.job import rank_command

    cfg = cfg_for(tmp_path, "distributed.nproc_per_node=2", "pipeline.eval.diagnostic_seeds=[]")
    slot = device_slots(cfg, 4, {"CUDA_VISIBLE_DEVICES": "4,5,6,7"})[1]
    dpo = next(s for s in build_dag(cfg) if s.name == "dpo/helpful+")
    assert rank_command(cfg, dpo, "deepspeed", 29500, slot)[:3] == [
        "deepspeed", "--include", "localhost:6,7"]
    assert stage_env({}, slot)["CUDA_VISIBLE_DEVICES"] == "6,7"  # torchrun, MORA shards


def test_prefvec_train_deepspeed_command_keeps_a_preset_cuda_visible_devices():
    # `deepspeed --num_gpus 2` would start on GPUs 0,1 whatever CUDA_VISIBLE_DEVICES says
    job = RankJob("sft", "x.yaml")
    cmd = launcher_command("deepspeed", 2, job, 29500, env={"CUDA_VISIBLE_DEVICES": "2,3,5"})
    assert cmd[:3] == ["deepspeed", "--include", "localhost:2,3"] and "--num_gpus" not in cmd
    assert launcher_command("deepspeed", 2, job, 29500, env={})[1:3] == ["--num_gpus", "2"]
    cpu = {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    assert launcher_command("deepspeed", 2, job, 29500, env=cpu)[1:3] == ["--num_gpus", "2"]
    with pytest.raises(PrefvecError, match="4 ranks requested"):
        launcher_command("deepspeed", 4, job, 29500, env={"CUDA_VISIBLE_DEVICES": "2,3"})


# --- R3/R4: rank discovery and device index -----------------------------------------------

SRUN = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3",
        "SLURM_JOB_ID": "1234", "MASTER_ADDR": "node1"}


@pytest.mark.parametrize("extra", [{}, {"PMIX_RANK": "3"}, {"PMI_RANK": "3", "PMI_SIZE": "8"},
                                   {"PMIX_RANK": "3", "PMI_RANK": "3"}])
def test_srun_tasks_use_slurm_ids_whatever_pmi_variables_the_site_adds(extra):
    # no mpi4py is needed (nor imported): the MPI path would import it on every rank
    info = discover({**SRUN, **extra})
    assert (info.rank, info.world_size, info.local_rank, info.source) == (3, 8, 3, "slurm")
    assert info.master_port == 20000 + 1234


def test_mpi_launchers_inside_slurm_keep_the_mpi_path():
    ompi = discover({**SRUN, "SLURM_PROCID": "0", "OMPI_COMM_WORLD_RANK": "5",
                     "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "5"})
    assert (ompi.rank, ompi.world_size, ompi.source) == (5, 16, "mpi")
    # MPICH's mpirun: one srun proxy per node, the ranks' PMI ids differ from SLURM's
    assert not srun_task({**SRUN, "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "PMI_RANK": "5",
                          "PMI_SIZE": "16"})
    assert not srun_task({"PMIX_RANK": "1"})  # no srun step at all


def test_device_index_wraps_when_each_task_sees_one_gpu():
    assert [cuda_device_index(r, 8) for r in (0, 7)] == [0, 7]
    assert [cuda_device_index(r, 1) for r in range(4)] == [0, 0, 0, 0]
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cuda_device_index(0, 0)


# --- R5: collective timeout ----------------------------------------------------------------

def test_deepspeed_reads_the_configured_timeout(tmp_path):
    cfg = cfg_for(tmp_path, "distributed.timeout_minutes=90")
    assert cfg_for(tmp_path).distributed.timeout_minutes == 60
    base = {k: v for k, v in os.environ.items() if k != "DEEPSPEED_TIMEOUT"}
    env = stage_env(base, timeout_minutes=cfg.distributed.timeout_minutes)
    out = subprocess.run([sys.executable, "-c", "from deepspeed.constants import "
                          "default_pg_timeout as t; print(int(t.total_seconds()))"],
                         env=env, capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split()[-1] == str(90 * 60)
    with pytest.raises(PrefvecError, match="distributed.timeout_minutes"):
        cfg_for(tmp_path, "distributed.timeout_minutes=0")


# --- R7 / R8: refusals ----------------------------------------------------------------------

def test_local_run_refuses_more_than_one_node(tmp_path):
    check_single_node(cfg_for(tmp_path))
    with pytest.raises(PrefvecError, match="distributed.nnodes=2.*prefvec submit"):
        check_single_node(cfg_for(tmp_path, "distributed.nnodes=2"))


def test_cli_run_with_two_nodes_is_one_line_and_exit_2(tmp_path, capsys):
    from prefvec_ds.cli import main

    assert main(["run", str(RECIPE), f"run_dir={tmp_path / 'r'}", "distributed.nnodes=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "distributed.nnodes=2" in err[0]


def test_submit_refuses_gpu_jobs_with_a_cpu_accelerator_in_the_shell(tmp_path):
    gpu = cfg_for(tmp_path, "pipeline.slurm.gpus_per_node=8")
    with pytest.raises(PrefvecError, match="DS_ACCELERATOR=cpu"):
        check_accelerator_env(gpu, {"DS_ACCELERATOR": "cpu"})
    check_accelerator_env(gpu, {})
    check_accelerator_env(cfg_for(tmp_path), {"DS_ACCELERATOR": "cpu"})  # CPU jobs: fine


# --- R13: srun CPUs -------------------------------------------------------------------------

def test_sbatch_script_passes_cpus_per_task_to_srun_steps(tmp_path):
    from prefvec_ds.pipeline import slurm

    script = slurm.render(slurm.SbatchSpec(job_name="x", run_dir=tmp_path, command=["true"],
                                           cpus_per_task=8))
    head = script.split("{{", 1)[0].split("# Rendezvous", 1)[0]
    line = next(x for x in head.splitlines() if "SRUN_CPUS_PER_TASK" in x and "export" in x)
    out = subprocess.run(["bash", "-c", f'SLURM_CPUS_PER_TASK=8\n{line}\necho "$SRUN_CPUS_PER_TASK"'],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "8"


# --- R12: checkpoint pruning ----------------------------------------------------------------

def _tag(ckpt, step, complete=True):
    folder = ckpt / f"global_step{step}"
    folder.mkdir(parents=True)
    (folder / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (folder / checkpoints.COMPLETE_MARKER).write_text(json.dumps({"step": step}))
    return folder


def test_pruning_keeps_the_newest_complete_tags_and_the_protected_ones(tmp_path):
    ckpt = tmp_path / "ckpt"
    for step in (100, 200, 300, 400, 500):
        _tag(ckpt, step)
    _tag(ckpt, 600, complete=False)  # being written, or a crashed save
    (ckpt / "latest").write_text("global_step500")
    assert [p.name for p in checkpoints.tags_to_prune(ckpt, 2, {"global_step200"})] == [
        "global_step100", "global_step300"]
    assert checkpoints.tags_to_prune(ckpt, 0) == []
    (ckpt / "latest").write_text("global_step100")  # `latest` is never deleted
    assert [p.name for p in checkpoints.tags_to_prune(ckpt, 2)] == [
        "global_step200", "global_step300"]
    gone = checkpoints.prune_checkpoints(ckpt, 2)
    assert gone == ["global_step200", "global_step300"]
    left = sorted(p.name for p in ckpt.iterdir())
    assert left == ["global_step100", "global_step400", "global_step500", "global_step600",
                    "latest"]
    assert checkpoints.latest_complete_tag(ckpt) == "global_step500"


def test_keep_checkpoints_is_a_validated_field(tmp_path):
    assert cfg_for(tmp_path).dpo.keep_checkpoints == 2
    with pytest.raises(PrefvecError, match="dpo.keep_checkpoints"):
        cfg_for(tmp_path, "dpo.keep_checkpoints=-1")
