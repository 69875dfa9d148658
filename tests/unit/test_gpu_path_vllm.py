"""The vLLM path's pure parts (vLLM itself is not installed here; review findings C4, C5, R10,
R11): engine arguments from the config, token-id prompts from our own tokenization, the
shard's GPU under srun."""

from __future__ import annotations

import pytest

from prefvec_ds import PrefvecError
from prefvec_ds.config.evaluation import GenerationSpec, VllmOptions
from prefvec_ds.config.loader import load_config
from prefvec_ds.eval.generate import vllm_engine_args, vllm_prompts
from prefvec_ds.mora.stage import pin_shard_gpu
from tests.conftest import REPO


def test_engine_args_come_from_the_config_not_vllms_defaults():
    opts = VllmOptions(gpu_memory_utilization=0.45, enforce_eager=True, dtype="bf16")
    args = vllm_engine_args("/m", opts, seed=7, longest_prompt=300, max_new_tokens=64)
    assert args == {"model": "/m", "seed": 7, "gpu_memory_utilization": 0.45,
                    "max_model_len": 364, "enforce_eager": True, "dtype": "bfloat16"}
    fixed = vllm_engine_args("/m", VllmOptions(max_model_len=4096), 0, 300, 64)
    assert fixed["max_model_len"] == 4096 and fixed["dtype"] == "auto"
    # MORA: auto follows pipeline.mora.dtype
    assert vllm_engine_args("/m", VllmOptions(), 0, 10, 5, default_dtype="fp16")["dtype"] == \
        "float16"


def test_vllm_options_are_validated_and_loaded_from_yaml():
    recipe = REPO / "recipes" / "quickstart-mora.yaml"
    cfg = load_config(recipe, ["pipeline.eval.generation.vllm.gpu_memory_utilization=0.5",
                               "pipeline.mora.vllm.dtype=bf16"])
    assert cfg.pipeline.eval.generation.vllm.gpu_memory_utilization == 0.5
    assert cfg.pipeline.mora.vllm.dtype == "bf16"
    assert GenerationSpec().vllm == VllmOptions()
    for bad, where in (("gpu_memory_utilization=1.5", "vllm.gpu_memory_utilization"),
                       ("dtype=int8", "vllm.dtype"), ("max_model_len=-1", "vllm.max_model_len")):
        with pytest.raises(PrefvecError, match=where):
            load_config(recipe, [f"pipeline.mora.vllm.{bad}"])


def test_vllm_gets_the_token_ids_training_and_transformers_use():
    from prefvec_ds.data.tokenize import render_prompt
    from prefvec_ds.models.embedded import build_tokenizer

    tok = build_tokenizer()
    prompts = [[("user", "how do I bake bread")], [("user", "hi"), ("assistant", "hello"),
                                                   ("user", "tell me a joke")]]
    got = vllm_prompts(tok, prompts)
    for p, item in zip(prompts, got):
        # what generate() feeds transformers: the rendered prompt, no added special tokens
        assert item == {"prompt_token_ids": tok(render_prompt(tok, p),
                                                add_special_tokens=False)["input_ids"]}
    if tok.bos_token_id is not None:
        assert all(x["prompt_token_ids"][:1] != [tok.bos_token_id] for x in got)


SRUN = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "5"}


def test_mora_shards_under_srun_keep_the_gpu_of_their_local_id():
    env = dict(SRUN)
    assert pin_shard_gpu(env) == "5" and env["CUDA_VISIBLE_DEVICES"] == "5"
    env = {**SRUN, "CUDA_VISIBLE_DEVICES": "8,9,10,11,12,13,14,15"}  # the node's second half
    assert pin_shard_gpu(env) == "13" and env["CUDA_VISIBLE_DEVICES"] == "13"
    env = {**SRUN, "CUDA_VISIBLE_DEVICES": "2"}  # the site binds one GPU per task already
    assert pin_shard_gpu(env) == "2"
    for untouched in ({"CUDA_VISIBLE_DEVICES": "0,1"},  # local shards: launch_local pins them
                      {**SRUN, "DS_ACCELERATOR": "cpu"}, {**SRUN, "CUDA_VISIBLE_DEVICES": ""}):
        before = dict(untouched)
        assert pin_shard_gpu(untouched) is None and untouched == before


def test_mora_engine_context_defaults_to_the_data_budget():
    from types import SimpleNamespace

    from prefvec_ds.mora.stage import ChunkWorker

    cfg = load_config(REPO / "recipes" / "quickstart-mora.yaml",
                      ["pipeline.mora.max_new_tokens=40"])
    got = ChunkWorker._sampler_config(SimpleNamespace(mora=cfg.pipeline.mora, cfg=cfg))
    assert got.vllm.max_model_len == cfg.data.max_len + 40
    assert cfg.pipeline.mora.vllm.max_model_len == 0  # the config itself is left alone
    fixed = load_config(REPO / "recipes" / "quickstart-mora.yaml",
                        ["pipeline.mora.vllm.max_model_len=999"])
    assert ChunkWorker._sampler_config(
        SimpleNamespace(mora=fixed.pipeline.mora, cfg=fixed)).vllm.max_model_len == 999


class _RecordingVllm:
    """vLLM is not installed here: a module with its API surface (LLM, SamplingParams, the
    parallel-state teardown) that records the order of calls. It checks the contract of our
    engine handling (C4), not vLLM."""

    def __init__(self, events: list):
        import types

        rec = self

        class Core:
            def shutdown(self):
                events.append("engine_core.shutdown")

        class LLM:
            def __init__(self, **kwargs):
                events.append("LLM")
                rec.kwargs = kwargs
                self.llm_engine = types.SimpleNamespace(engine_core=Core())

            def generate(self, prompts, params, use_tqdm=True):
                events.append("generate")
                rec.prompts = prompts
                out = types.SimpleNamespace(text=" ok ")
                return [types.SimpleNamespace(outputs=[out] * params["n"]) for _ in prompts]

        self.vllm = types.ModuleType("vllm")
        self.vllm.LLM, self.vllm.SamplingParams = LLM, lambda **kw: kw
        self.state = types.ModuleType("vllm.distributed.parallel_state")
        self.state.destroy_model_parallel = lambda: events.append("destroy_model_parallel")
        self.state.destroy_distributed_environment = lambda: events.append("destroy_distributed")


def test_vllm_engine_starts_on_freed_memory_and_is_shut_down(tmp_path, monkeypatch):
    import sys
    import types

    from prefvec_ds.eval import generate as gen
    from prefvec_ds.models.embedded import materialize_embedded_model

    folder = materialize_embedded_model("tiny-llama", tmp_path / "m", seed=0)
    events: list = []
    fake = _RecordingVllm(events)
    monkeypatch.setitem(sys.modules, "vllm", fake.vllm)
    monkeypatch.setitem(sys.modules, "vllm.distributed", types.ModuleType("vllm.distributed"))
    monkeypatch.setitem(sys.modules, "vllm.distributed.parallel_state", fake.state)
    monkeypatch.setattr(gen, "free_accelerator_memory", lambda: events.append("free"))
    spec = GenerationSpec(max_new_tokens=8, vllm=VllmOptions(gpu_memory_utilization=0.5))
    prompts = [[("user", "how do I bake bread")]]
    assert gen.generate_vllm(folder, prompts, spec) == [["ok"]]
    assert events == ["free", "LLM", "generate", "engine_core.shutdown",
                      "destroy_model_parallel", "destroy_distributed", "free"]
    assert fake.kwargs["gpu_memory_utilization"] == 0.5
    n_prompt = len(fake.prompts[0]["prompt_token_ids"])
    assert fake.kwargs["max_model_len"] == n_prompt + 8
    # an error inside the engine still shuts it down
    events.clear()
    monkeypatch.setattr(fake.vllm.LLM, "generate", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        gen.generate_vllm(folder, prompts, spec)
    assert events[-4:] == ["engine_core.shutdown", "destroy_model_parallel",
                           "destroy_distributed", "free"]
