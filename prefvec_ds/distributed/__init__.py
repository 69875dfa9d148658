"""The only place that imports deepspeed or torch.distributed.

Trainers receive engines and call their methods (forward, backward, step, save); everything
else about processes and engines is a function here, one concern per module:

    env           rank discovery (launchers, SLURM, MPI), rendezvous port, timeouts (stdlib)
    process       requeue exit code, signal forwarding, the main() error wrapper (stdlib)
    launch        RankJob (the rank's job contract) and the launcher command (deepspeed,
                  torchrun, srun), the stage environment
    group         start / leave the process group, rank, world size, barrier, exit
    collectives   sums, gathers, broadcast from rank 0, per-rank peak memory
    zero_sizing   "auto" ZeRO bucket sizes from the hidden size
    model_build   ZeRO-3 engines over HF folders without a full state dict on any rank
    checkpoints   save / resume / prune tags of live engines, export to a HF folder
"""
