"""Checkpoint arithmetic and I/O: ZeRO-1/2/3 readers, vector ops, streaming safetensors writer.

Modules: safe_load (allow-listed, torch-free unpickling of checkpoint pickles), zero3 (ZeRO-3
layout and per-parameter byte ranges), zero12 (the same for ZeRO-1/2), safetensors_io (HF
folders), sources (common interface, the table of DeepSpeed readers, phi = plus - minus),
segments (byte ranges and the arithmetic kernel), dtypes (fp32/bf16/fp16 in numpy), stream
(the chunked, threaded pipeline), crc (CRC-32 of every zip record read),
paths (what a checkpoint's metadata names stays inside it), directio (O_DIRECT reads and writes),
writer (streaming sharded safetensors; the output folder rules), vector / merge / stats (the
`prefvec vector|merge|vector-stats` commands), apply (in-place apply/remove on a loaded torch
model). The safety rules are in docs/ckpt.md.
None of them imports deepspeed or torch.distributed; only apply (and read() helpers that return
torch tensors) import torch, so the commands run without it.
"""

from prefvec_ds.ckpt.apply import apply_vectors, remove_vectors

__all__ = ["apply_vectors", "remove_vectors"]
