"""A checkpoint's metadata never leads outside it (issue 14): index entries, `latest`, links;
and the honest messages for ZeRO-2 checkpoints and folders without `latest`."""

from __future__ import annotations

import json
import shutil

import pytest

from prefvec_ds import PrefvecError
from prefvec_ds.ckpt.sources import open_source
from prefvec_ds.cli import main
from tests.ckpt_fixtures import pico_state_dict, write_hf_folder, write_synthetic_zero3

pytestmark = pytest.mark.unit


@pytest.fixture
def pair(tmp_path):
    plus = write_synthetic_zero3(tmp_path / "plus", pico_state_dict(1), 2)
    minus = write_synthetic_zero3(tmp_path / "minus", pico_state_dict(2), 2)
    return plus, minus


def _sharded_base(tmp_path, name="base"):
    """A base whose index names its one shard (as a sharded HF folder does)."""
    base = write_hf_folder(tmp_path / name, pico_state_dict(0), {"architectures": ["Pico"]})
    names = json.loads((base / "model.safetensors").read_bytes()[8:][
        :int.from_bytes((base / "model.safetensors").read_bytes()[:8], "little")])
    weight_map = {k: "model.safetensors" for k in names if k != "__metadata__"}
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return base, weight_map


@pytest.mark.parametrize("entry", ["../../outside/model.safetensors", "/etc/passwd",
                                   "sub/../../x.safetensors"])
def test_index_entries_outside_the_folder_are_refused(tmp_path, pair, capsys, entry):
    base, weight_map = _sharded_base(tmp_path)
    weight_map["head.weight"] = entry
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    plus, minus = pair
    rc = main(["merge", "--base", str(base), "--vector", f"{plus},{minus}",
               "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert rc == 2 and "model.safetensors.index.json" in err and "entry head.weight" in err
    assert repr(entry) in err and "leads outside" in err and not (tmp_path / "m").exists()


def test_latest_naming_another_folder_is_refused(tmp_path, pair, capsys):
    plus, minus = pair
    other = write_synthetic_zero3(tmp_path / "other", pico_state_dict(5), 2)
    (plus / "latest").write_text("../other/global_step1")
    assert main(["vector", "--plus", str(plus), "--minus", str(minus),
                 "--out", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err
    assert f"file {plus / 'latest'}" in err and "'../other/global_step1'" in err
    assert "leads outside" in err and other.exists()


def test_linked_files_outside_the_folder_are_refused(tmp_path, pair, capsys):
    plus, minus = pair
    base, _ = _sharded_base(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(base / "model.safetensors", elsewhere / "model.safetensors")
    (base / "model.safetensors").symlink_to(elsewhere / "model.safetensors")
    with pytest.raises(PrefvecError, match="a link to .*elsewhere.*outside"):
        open_source(base, "base")
    # a config file linked to a secret would be copied into the output: refused, up front
    base2, _ = _sharded_base(tmp_path, "base2")
    (base2 / "tokenizer_config.json").symlink_to("/etc/passwd")
    rc = main(["merge", "--base", str(base2), "--vector", f"{plus},{minus}",
               "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert rc == 2 and "tokenizer_config.json" in err and "/etc/passwd" in err
    assert not (tmp_path / "m").exists()
    # a rank file linked out of its checkpoint
    rank = plus / "global_step1" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shutil.move(rank, elsewhere / rank.name)
    rank.symlink_to(elsewhere / rank.name)
    with pytest.raises(PrefvecError, match="zero_pp_rank_1.*a link to"):
        open_source(plus, "plus")


def test_links_inside_the_folder_and_hub_cache_blobs_are_fine(tmp_path):
    base, _ = _sharded_base(tmp_path)
    (base / "model.safetensors").rename(base / "real.bin")
    (base / "model.safetensors").symlink_to("real.bin")
    assert "head.weight" in open_source(base, "base").names()
    repo = tmp_path / "hub" / "models--x--pico"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    shutil.move(base / "real.bin", repo / "blobs" / "0f00")
    (snap / "model.safetensors").symlink_to("../../blobs/0f00")
    assert "head.weight" in open_source(snap, "base").names()


def test_broken_zero12_model_file_is_named(tmp_path, capsys, pair):
    """A tag folder with mp_rank_00_model_states.pt is read as ZeRO-1/2; a bad one is named."""
    plus, minus = pair
    tag = plus / "global_step1"
    for f in tag.glob("zero_pp_rank_*_model_states.pt"):
        f.unlink()
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
    assert main(["vector", "--plus", str(plus), "--minus", str(minus),
                 "--out", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err
    assert "mp_rank_00_model_states.pt" in err and "ZeRO-1/2 model states expected" in err


def test_missing_latest_lists_the_tag_folders(tmp_path, pair, capsys):
    plus, minus = pair
    (plus / "latest").unlink()
    shutil.copytree(plus / "global_step1", plus / "global_step2")
    assert main(["vector", "--plus", str(plus), "--minus", str(minus),
                 "--out", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err
    assert "without a `latest` file" in err and "global_step1, global_step2" in err
