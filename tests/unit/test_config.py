import json

import pytest

from prefvec_ds import PrefvecError
from prefvec_ds.config.loader import load_config, resolve_ds_config, save_resolved
from tests.conftest import REPO

QUICKSTART = REPO / "recipes" / "quickstart.yaml"


def test_dotted_overrides_are_typed_and_validated():
    cfg = load_config(QUICKSTART, ["dpo.beta=0.05", "data.preferences.helpful.eval_fraction=0.2"])
    assert cfg.dpo.beta == 0.05
    assert load_config(QUICKSTART, ["dpo.lr=5e-5"]).dpo.lr == 5e-5  # YAML 1.1 gives a string
    assert cfg.data.preferences["helpful"].eval_fraction == 0.2
    assert cfg.directions() == ["helpful+", "helpful-", "harmless+", "harmless-"]
    with pytest.raises(PrefvecError, match=r"dpo.beta: expected > 0"):
        load_config(QUICKSTART, ["dpo.beta=0"])


@pytest.mark.parametrize("override, message", [
    ("dpo.loss_type=kto", r"dpo.loss_type: expected sigmoid\|ipo\|hinge\|bfpo, got 'kto'"),
    ("dpo.bta=0.1", r"quickstart.yaml.dpo: unknown parameter\(s\) bta"),
    ("sft.lr=fast", r"sft.lr: expected float"),
    ("data.max_prompt_len=500", r"data.max_prompt_len: expected in \(0, data.max_len=64\)"),
    ("dpo.beta", r"expected KEY=VALUE"),
])
def test_bad_config_errors_name_the_parameter(override, message):
    with pytest.raises(PrefvecError, match=message):
        load_config(QUICKSTART, [override])


def test_unknown_direction_and_missing_file(tmp_path):
    cfg = load_config(QUICKSTART)
    assert cfg.parse_direction("harmless-") == ("harmless", -1)
    with pytest.raises(PrefvecError, match="unknown direction 'honest\\+'.*helpful\\+"):
        cfg.parse_direction("honest+")
    with pytest.raises(PrefvecError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_ds_config_batch_fields_filled_and_contradictions_refused(tmp_path):
    cfg = load_config(QUICKSTART)
    ds = resolve_ds_config(cfg, cfg.dpo, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == cfg.dpo.micro_batch_size
    assert ds["train_batch_size"] == cfg.dpo.micro_batch_size * cfg.dpo.grad_accum * 2
    assert ds["optimizer"]["params"]["lr"] == cfg.dpo.lr
    bad = json.loads((REPO / "ds_configs" / "zero3_cpu_fp32.json").read_text())
    bad["train_micro_batch_size_per_gpu"] = 3
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    cfg = load_config(QUICKSTART, [f"distributed.ds_config={tmp_path / 'bad.json'}"])
    with pytest.raises(PrefvecError, match="train_micro_batch_size_per_gpu=3 contradicts"):
        resolve_ds_config(cfg, cfg.dpo, world_size=2)
    bad["train_micro_batch_size_per_gpu"] = "auto"
    bad["zero_optimization"]["stage"] = 2
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert resolve_ds_config(cfg, cfg.dpo, world_size=2)["zero_optimization"]["stage"] == 2
    bad["zero_optimization"]["stage"] = 0
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(PrefvecError, match="stage must be one of 1, 2, 3, got 0"):
        resolve_ds_config(cfg, cfg.dpo, world_size=2)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(QUICKSTART, ["dpo.beta=0.2"])
    save_resolved(cfg, tmp_path, {"zero_optimization": {"stage": 3}})
    again = load_config(tmp_path / "config.yaml")
    assert again.dpo.beta == 0.2 and again.data == cfg.data
    assert json.loads((tmp_path / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3


def test_all_recipes_load():
    for recipe in sorted((REPO / "recipes").glob("*.yaml")):
        cfg = load_config(recipe)
        assert cfg.directions()[:2] == ["helpful+", "helpful-"], recipe
