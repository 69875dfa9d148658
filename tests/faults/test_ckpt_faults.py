"""Fault injection against the real `prefvec merge|vector|vector-stats` (issue 14): signals at
random points of a merge, kill -9, a full disk, read-only mounts, symlinks. Whatever happens:
the inputs are intact, the output is either complete or absent, no temporary is left behind
(or the next run removes it), and errors are one line with exit code 2."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest

from prefvec_ds.ckpt.safetensors_io import SafetensorsFolder
from tests.faults.conftest import (big_inputs, leftovers, merge_args, mount,  # noqa: F401
                                   prefvec, remount_read_only, start)


def _complete(out) -> bool:
    folder = SafetensorsFolder(out)
    return {"layers.0.w", "norm.weight"} <= set(folder.names()) and (out / "config.json").is_file()


def _one_line_error(proc, *expected) -> str:
    err = proc.stderr
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("prefvec: error: ") and "Traceback" not in err
    for text in expected:
        assert text in err, err
    return err


@pytest.fixture(scope="module")
def merge_seconds(big_inputs, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("timing") / "m"
    started = time.perf_counter()
    proc = prefvec(*merge_args(big_inputs, out))
    assert proc.returncode == 0, proc.stderr
    assert _complete(out)
    return time.perf_counter() - started


def _wait_for_temporary(folder, proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    mark = f".{proc.pid}."  # temporary_beside names: .NAME.HOST.PID.TOKEN.tmp
    while not any(n.startswith(".") and mark in n for n in leftovers(folder)):
        assert proc.poll() is None and time.monotonic() < deadline, "no temporary appeared"
        time.sleep(0.005)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_at_random_points_of_a_merge(big_inputs, merge_seconds, tmp_path,  # noqa: F811
                                             signum):
    rng = random.Random(signum)
    outcomes = []
    for i in range(5):
        out = tmp_path / f"m{i}"
        proc = start(*merge_args(big_inputs, out))
        _wait_for_temporary(tmp_path, proc)  # past start-up: the merge is writing
        time.sleep(rng.uniform(0, merge_seconds))
        proc.send_signal(signum)
        _stdout, err = proc.communicate(timeout=60)
        outcomes.append(proc.returncode)
        if proc.returncode == 0:  # finished before the signal: complete
            assert _complete(out)
        else:
            assert proc.returncode == 128 + signum, err
            assert err == (f"prefvec: interrupted by {signal.Signals(signum).name}; no partial "
                           "output was left\n")
            assert not out.exists() or _complete(out)  # renamed just before the signal
        assert [n for n in leftovers(tmp_path) if n.startswith(".")] == []
    assert 128 + signum in outcomes  # at least one signal landed mid-merge


def test_kill_9_leftovers_are_removed_by_the_next_run(big_inputs, merge_seconds,  # noqa: F811
                                                      tmp_path):
    out = tmp_path / "m"
    pids = []
    for _ in range(2):
        proc = start(*merge_args(big_inputs, out))
        _wait_for_temporary(tmp_path, proc)
        time.sleep(merge_seconds / 10)
        proc.kill()
        proc.wait(timeout=30)
        pids.append(proc.pid)
        junk = leftovers(tmp_path)
        # what kill -9 leaves: this run's hidden temporary; the one before was removed by it
        assert len(junk) == 1 and f".{proc.pid}." in junk[0] and not out.exists()
    proc = prefvec(*merge_args(big_inputs, out))
    assert proc.returncode == 0, proc.stderr
    assert leftovers(tmp_path) == ["m"] and _complete(out)


def test_disk_full_while_writing_shards_and_while_copying_configs(big_inputs, mount,  # noqa: F811
                                                                  tmp_path):
    small = mount(8)  # the merge writes ~75 MB
    proc = prefvec(*merge_args(big_inputs, small / "m"))
    _one_line_error(proc, "No space left on device")
    assert leftovers(small) == []
    # shards fit, the tokenizer does not: the failure comes while copying config files
    base = tmp_path / "base"
    base.mkdir()
    for f in big_inputs["base"].iterdir():  # hard links: symlinks out of a base are refused
        if f.name != "tokenizer.json":
            os.link(f, base / f.name)
    (base / "tokenizer.json").write_bytes(b"x" * (24 << 20))
    inputs = {**big_inputs, "base": base}
    shard = (big_inputs["base"] / "model.safetensors").stat().st_size
    roomy = mount(shard // (1 << 20) + 8)
    proc = prefvec(*merge_args(inputs, roomy / "m"))
    _one_line_error(proc, "copying config files", "No space left on device")
    assert leftovers(roomy) == []


def test_read_only_places(big_inputs, mount, tmp_path):  # noqa: F811
    ro = mount(4)
    (ro / "old").mkdir()
    remount_read_only(ro)
    _one_line_error(prefvec(*merge_args(big_inputs, ro / "m")), "cannot write in")
    _one_line_error(prefvec(*merge_args(big_inputs, ro / "new" / "m")), "cannot write in")
    vec = f"{big_inputs['plus']},{big_inputs['minus']}"
    _one_line_error(prefvec("vector-stats", vec, "--json", ro / "s.json"), "--json", "cannot write")
    _one_line_error(prefvec("vector-stats", vec, "--json", tmp_path / "no" / "s.json"),
                    "--json", "does not exist")
    proc = prefvec("vector-stats", vec, "--json", tmp_path / "s.json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "s.json").read_text())["tensors"] == 7


def test_symlinked_outputs_and_inputs(big_inputs, tmp_path):  # noqa: F811
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "to_dir").symlink_to(big_inputs["root"])
    for name in ("dangling", "to_dir"):
        _one_line_error(prefvec(*merge_args(big_inputs, tmp_path / name, "--overwrite")),
                        "symbolic link")
    assert sorted(leftovers(tmp_path)) == ["dangling", "to_dir"]
    # a link to the plus checkpoint as --out, with --overwrite: refused, plus intact
    _one_line_error(prefvec("vector", "--plus", big_inputs["plus"], "--minus",
                            big_inputs["minus"], "--out", big_inputs["plus"] / "global_step1",
                            "--overwrite"), "the input --plus")
    assert (big_inputs["plus"] / "latest").is_file()


def test_a_real_zero2_checkpoint_is_read_and_a_bad_partition_is_named(tmp_path):
    """A real ZeRO-2 checkpoint (DeepSpeed, W=1) is read, from its folder or its tag folder;
    a partition cut short or one that does not match param_shapes is one clear error line
    naming the file, and no output is left behind."""
    import shutil

    import torch

    from tests.faults.zero2_build import build

    z2 = build(tmp_path / "z2")
    tag = z2 / "global_step1"
    assert (tag / "mp_rank_00_model_states.pt").is_file()
    for folder in (z2, tag):
        proc = prefvec("vector", "--plus", folder, "--minus", z2, "--out", tmp_path / "v",
                       "--overwrite")
        assert proc.returncode == 0, proc.stderr
        manifest = json.loads((tmp_path / "v" / "prefvec_vector.json").read_text())
        assert manifest["norm"] == 0.0 and manifest["fast_flat_path"]
        assert manifest["num_tensors"] == 12  # 1-layer pico Llama: every weight, none lost

    bad = tmp_path / "bad"
    shutil.copytree(z2, bad)
    optim = bad / "global_step1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    states = torch.load(optim, weights_only=False)
    flat = states["optimizer_state_dict"]["single_partition_of_fp32_groups"]
    flat[0] = flat[0][:-40].clone()  # 40 elements short: a partition of another model
    torch.save(states, optim)
    _one_line_error(prefvec("vector", "--plus", bad, "--minus", z2, "--out", tmp_path / "w"),
                    str(optim), "single_partition_of_fp32_groups[0]", "param_shapes")
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])
    _one_line_error(prefvec("vector", "--plus", z2, "--minus", bad, "--out", tmp_path / "w"),
                    str(optim), "truncated")
    assert not (tmp_path / "w").exists() and leftovers(tmp_path) == ["bad", "v", "z2"]
