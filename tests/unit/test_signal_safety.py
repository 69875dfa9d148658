"""atomic.signals_raise (issue 14): SIGTERM unwinds like Ctrl-C inside the block, the old
handlers come back after it, and an ignored signal (nohup's SIGHUP) stays ignored."""

from __future__ import annotations

import os
import signal

import pytest

from prefvec_ds.atomic import Interrupted, signals_raise
from prefvec_ds.ckpt.writer import atomic_output_dir

pytestmark = pytest.mark.unit


def test_sigterm_raises_inside_and_cleans_an_output_folder(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as caught:
        with signals_raise(), atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "half.safetensors").write_bytes(b"x" * 100)
            os.kill(os.getpid(), signal.SIGTERM)
    assert caught.value.signum == signal.SIGTERM and str(caught.value) == "SIGTERM"
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is before


def test_an_ignored_signal_stays_ignored():
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with signals_raise():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)  # nohup: nothing happens
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, old)
