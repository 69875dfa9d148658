"""The policy's answers: N per pool prompt (mining), K per rewritten prompt (self-play).

One `Sampler` per shard process keeps the policy loaded (transformers, or one vLLM engine on a
GPU). Each call samples one chunk of prompts with the chunk's own seed, so an answer depends
only on (seed, chunk), never on the shard layout or on what ran before an interruption.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from prefvec_ds.data.pairs import Messages
from prefvec_ds.config.mora import MoraConfig

#: Separate random streams per step of a chunk (mining, self-play, rewriting).
STREAMS = {"mine": 0, "play": 1, "rewrite": 2}


def chunk_seed(run_seed: int, mora: MoraConfig, chunk: int, stream: str) -> int:
    """A seed per (run seed, mora seed, chunk, stream), far apart for distinct chunks."""
    return ((run_seed * 1_000_003 + mora.seed) * 7919 + chunk) * 4 + STREAMS[stream]


class Sampler:
    """Sampled answers of one policy folder, batched per chunk."""

    def __init__(self, model_dir: Path, mora: MoraConfig, local_rank: int = 0):
        """vLLM: mora.vllm sets the engine (ChunkWorker fills max_model_len from data.max_len
        when it is 0). Under srun the shard's GPU is pinned before this runs
        (prefvec_ds.mora.stage.pin_shard_gpu): vLLM has no device argument."""
        from prefvec_ds.eval.generate import use_vllm  # noqa: PLC0415

        self.mora = mora
        self.vllm = use_vllm(self.spec(1, 0))
        self.llm = None
        if self.vllm:
            from vllm import LLM  # noqa: PLC0415

            from prefvec_ds.eval.generate import (free_accelerator_memory,  # noqa: PLC0415
                                                  vllm_engine_args)
            from prefvec_ds.train.stage import load_tokenizer  # noqa: PLC0415

            self.tok = load_tokenizer(Path(model_dir))
            free_accelerator_memory()  # the scorers were built first
            self.llm = LLM(**vllm_engine_args(model_dir, mora.vllm, mora.seed, 512,
                                              mora.max_new_tokens, default_dtype=mora.dtype))
        else:
            import torch  # noqa: PLC0415

            from prefvec_ds.eval.generate import load_policy  # noqa: PLC0415

            if torch.cuda.is_available() and torch.cuda.device_count() > 1:
                # srun shows every GPU of the node to every rank: take ours
                torch.cuda.set_device(local_rank % torch.cuda.device_count())
            if not torch.cuda.is_available() and mora.cpu_threads:
                torch.set_num_threads(mora.cpu_threads)
            self.model, self.tok = load_policy(model_dir, mora.dtype)

    def spec(self, n: int, seed: int):
        """The GenerationSpec of one sampling call."""
        from prefvec_ds.eval.generate import GenerationSpec  # noqa: PLC0415

        m = self.mora
        return GenerationSpec(max_new_tokens=m.max_new_tokens, do_sample=True,
                              temperature=m.temperature, top_p=m.top_p, num_samples=n,
                              batch_size=max(m.prompts_per_batch, 1), seed=seed,
                              backend=m.backend)

    def sample(self, prompts: Sequence[Messages], n: int, seed: int) -> list[list[str]]:
        """n answers per prompt, all prompts in one generate call (one random stream)."""
        if not prompts:
            return []
        spec = self.spec(n, seed)
        spec.batch_size = len(prompts)
        if self.vllm:
            return self._sample_vllm(prompts, spec)
        from prefvec_ds.eval.generate import generate  # noqa: PLC0415

        return generate(self.model, self.tok, prompts, spec)

    def _sample_vllm(self, prompts: Sequence[Messages], spec) -> list[list[str]]:
        from prefvec_ds.eval.generate import sampling_params, vllm_prompts  # noqa: PLC0415

        outputs = self.llm.generate(vllm_prompts(self.tok, prompts), sampling_params(spec),
                                    use_tqdm=False)
        return [[c.text.strip() for c in o.outputs] for o in outputs]

    def close(self) -> None:
        """Shut the vLLM engine down (its engine-core process and GPU memory)."""
        if self.llm is not None:
            from prefvec_ds.eval.generate import (free_accelerator_memory,  # noqa: PLC0415
                                                  shutdown_vllm)

            shutdown_vllm(self.llm)
            self.llm = None
            free_accelerator_memory()
