"""Checkpoint arithmetic and I/O: ZeRO-3 readers, vector ops, streaming safetensors writer.

Modules: safe_load (allow-listed mmap unpickling), zero3 (ZeRO-3 layout and per-parameter
reads), safetensors_io (HF folders, preadv), sources (common interface, phi = plus - minus),
vector / merge / stats (the `prefvec vector|merge|vector-stats` commands), apply (in-place
apply/remove on a loaded model), writer (streaming sharded safetensors), stream (threads).
None of them imports deepspeed or torch.distributed.
"""

from prefvec_ds.ckpt.apply import apply_vectors, remove_vectors

__all__ = ["apply_vectors", "remove_vectors"]
