"""`prefvec vector|merge|vector-stats` never lose a user's data (issue 14): outputs that are,
contain or sit inside an input are refused before writing, --overwrite replaces only prefvec
outputs, odd --out values and unwritable places are one-line errors, dead runs' temporaries go,
eta and fp16/bf16 overflow are refused, vector-stats writes valid JSON."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from prefvec_ds import PrefvecError
from prefvec_ds.atomic import dead_temporaries, remove_dead_temporaries, temporary_beside
from prefvec_ds.ckpt.dtypes import narrow_into
from prefvec_ds.ckpt.segments import check_finite_narrow
from prefvec_ds.ckpt.writer import OUTPUT_MARKER, atomic_output_dir
from prefvec_ds.cli import main
from tests.ckpt_fixtures import pico_state_dict, write_hf_folder, write_synthetic_zero3

pytestmark = pytest.mark.unit
CONFIG = {"architectures": ["Pico"], "torch_dtype": "float32"}


@pytest.fixture
def ckpts(tmp_path):
    plus = write_synthetic_zero3(tmp_path / "plus", pico_state_dict(1), 2)
    minus = write_synthetic_zero3(tmp_path / "minus", pico_state_dict(2), 2)
    base = write_hf_folder(tmp_path / "base", pico_state_dict(0), CONFIG)
    return plus, minus, base


def _tree(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*")
                  if p.is_file())


def _vector(ckpts, out, *extra):
    plus, minus, _ = ckpts
    return main(["vector", "--plus", str(plus), "--minus", str(minus), "--out", str(out), *extra])


@pytest.mark.parametrize("where", ["plus", "plus/sub", "."])
def test_out_equal_inside_or_containing_an_input_is_refused(ckpts, tmp_path, capsys, where):
    before = _tree(tmp_path)
    out = tmp_path / where if where != "." else tmp_path
    assert _vector(ckpts, out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err and "--plus" in err
    assert _tree(tmp_path) == before  # the inputs are all there, nothing was added


def test_merge_out_containing_the_base_or_a_vector_is_refused(ckpts, tmp_path, capsys):
    plus, minus, base = ckpts
    before = _tree(tmp_path)
    for out in (base, tmp_path / "minus" / "global_step1"):
        rc = main(["merge", "--base", str(base), "--vector", f"{plus},{minus}=0.5",
                   "--out", str(out), "--overwrite"])
        assert rc == 2
    err = capsys.readouterr().err
    assert "is the input --base" in err and "is inside the input --vector" in err
    assert _tree(tmp_path) == before


def test_overwrite_replaces_only_prefvec_outputs(ckpts, tmp_path, capsys):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    assert _vector(ckpts, thesis, "--overwrite") == 2
    assert "not written by prefvec" in capsys.readouterr().err
    assert (thesis / "chapter1.tex").read_text() == "years of work"
    out = tmp_path / "vec"
    assert _vector(ckpts, out) == 0 and (out / OUTPUT_MARKER).is_file()
    assert _vector(ckpts, out) == 2  # exists, no --overwrite
    assert _vector(ckpts, out, "--overwrite") == 0  # our own output: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "minus", "plus", "thesis", "vec"]


@pytest.mark.parametrize("out", [".", "..", "sub/..", "dangling"])
def test_odd_out_values_are_one_line_errors_and_leave_nothing(ckpts, tmp_path, monkeypatch,
                                                              capsys, out):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "dangling").symlink_to(tmp_path / "nowhere")
    monkeypatch.chdir(work)
    before = _tree(tmp_path)
    assert _vector(ckpts, out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert err.startswith("prefvec: error: --out") and err.count("\n") == 1
    assert _tree(tmp_path) == before
    assert sorted(os.listdir(work)) == ["dangling", "sub"] and not os.listdir(tmp_path / "work/sub")


def test_parent_is_a_file_and_read_only_place(ckpts, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert _vector(ckpts, tmp_path / "afile" / "vec") == 2
    assert "is a file, expected a folder" in capsys.readouterr().err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root ignores permission bits: the faults tier mounts ro
            pytest.skip("running as root: see tests/faults for a read-only mount")
        assert _vector(ckpts, ro / "vec") == 2
        assert "cannot write in" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)


def test_dead_runs_temporaries_are_removed_by_the_next_run(ckpts, tmp_path):
    out = tmp_path / "vec"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)  # a process that has exited
    host = socket.gethostname()
    mine = temporary_beside(out)  # a live process's (ours): kept
    junk = [tmp_path / f".vec.{host}.{pid}.0123abcd.tmp", tmp_path / f".vec.tmp-{pid}"]
    foreign = tmp_path / f".vec.other-host.{pid}.0123abcd.tmp"  # cannot be checked: kept
    for folder in [*junk, foreign, mine]:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    assert sorted(dead_temporaries(out)) == sorted(junk)
    assert _vector(ckpts, out) == 0
    assert not any(p.exists() for p in junk) and foreign.exists() and mine.exists()
    assert remove_dead_temporaries(out) == []


def test_failure_and_keyboard_interrupt_leave_nothing(tmp_path):
    for exc in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(exc):
            with atomic_output_dir(tmp_path / "out") as tmp:
                (tmp / "half").write_text("x")
                raise exc()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("eta", ["nan", "inf", "-inf", "1e400"])
def test_non_finite_eta_refused_at_parse_time(ckpts, tmp_path, capsys, eta):
    plus, minus, base = ckpts
    rc = main(["merge", "--base", str(base), "--vector", f"{plus},{minus}={eta}",
               "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert rc == 2 and f"--vector {plus},{minus}={eta}" in err and "finite" in err
    assert not (tmp_path / "m").exists()


def test_fp16_overflow_after_the_output_cast_is_refused(ckpts, tmp_path, capsys):
    plus, minus, base = ckpts
    rc = main(["merge", "--base", str(base), "--vector", f"{plus},{minus}=1e5",
               "--dtype", "fp16", "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert rc == 2 and "overflow fp16" in err and "parameter" in err
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.*"))


def test_bf16_rounding_to_inf_is_caught_after_the_cast():
    # 3.4e38 is finite in fp32 but above bf16's largest value (3.3895e38): the cast gives Inf
    src = np.array([1.0, 3.4e38, -3.4e38], dtype=np.float32)
    assert np.isfinite(src).all()
    data = np.empty(src.size * 2, dtype=np.uint8)
    narrow_into(src.copy(), "BF16", data)
    with pytest.raises(PrefvecError, match="2 values overflow bf16"):
        check_finite_narrow(data, "BF16", "parameter w")
    narrow_into(np.array([1.0, 3.3e38, -2.0], dtype=np.float32), "BF16", data)
    check_finite_narrow(data, "BF16", "parameter w")  # in range: no error


def test_fp16_merge_within_range_still_works(ckpts, tmp_path):
    plus, minus, base = ckpts
    assert main(["merge", "--base", str(base), "--vector", f"{plus},{minus}=0.5",
                 "--dtype", "fp16", "--out", str(tmp_path / "m")]) == 0


def test_vector_stats_json_is_valid_and_a_zero_vector_has_no_cosine(ckpts, tmp_path, capsys):
    plus, minus, _ = ckpts
    out = tmp_path / "stats.json"
    assert main(["vector-stats", f"{plus},{minus}", f"{plus},{plus}", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "nan" not in printed.lower() and "n/a" in printed
    stats = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert stats["cosine"][0][1] is None and stats["total"][1] == 0.0


def test_vector_stats_refuses_nan_values_and_missing_json_folder(ckpts, tmp_path, capsys):
    plus, minus, _ = ckpts
    sd = pico_state_dict(3)
    sd["head.weight"][0, 0] = float("nan")
    bad = write_hf_folder(tmp_path / "bad", sd)
    (bad / "prefvec_vector.json").write_text(json.dumps({"format": "prefvec-vector"}))
    assert main(["vector-stats", str(bad)]) == 2
    assert "parameter head.weight: holds NaN/Inf" in capsys.readouterr().err
    assert main(["vector-stats", f"{plus},{minus}", "--json", str(tmp_path / "no/s.json")]) == 2
    err = capsys.readouterr().err
    assert "--json" in err and "does not exist" in err and "Traceback" not in err


def test_config_copy_failure_is_one_line_and_leaves_nothing(ckpts, tmp_path, capsys):
    plus, minus, base = ckpts
    # an unreadable file fails the copy with an OSError, as a full disk does (tests/faults
    # fills a real tmpfs); as root it is readable, so a broken config.json is the failure
    (base / "special_tokens_map.json").write_text("{}")
    os.chmod(base / "special_tokens_map.json", 0)
    try:
        if os.access(base / "special_tokens_map.json", os.R_OK):
            os.chmod(base / "special_tokens_map.json", 0o644)
            (base / "config.json").write_text("{not json")
            expect = "not valid JSON"
        else:
            expect = "copying config files"
        rc = main(["merge", "--base", str(base), "--vector", f"{plus},{minus}",
                   "--out", str(tmp_path / "m")])
        err = capsys.readouterr().err
        assert rc == 2 and expect in err and err.count("\n") == 1
        assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.*"))
    finally:
        os.chmod(base / "special_tokens_map.json", 0o644)
