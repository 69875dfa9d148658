"""The only place that imports deepspeed or torch.distributed.

Trainers receive engines and call their methods (forward, backward, step, save); collective
operations and checkpoint I/O of live engines are functions here.
"""
