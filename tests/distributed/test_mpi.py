"""A real stage under mpirun (rank discovery from OMPI_COMM_WORLD_*), checked against a
single-process transformers computation of the same reference log-probs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from prefvec_ds.distributed.env import free_port
from tests.conftest import REPO


def test_ref_logps_under_mpirun_match_a_plain_forward(sft_run):
    if shutil.which("mpirun") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("mpirun missing in CI (.ci/run installs openmpi-bin)")
        pytest.skip("mpirun not installed")
    config, run = sft_run
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2",
           "-x", f"MASTER_PORT={free_port()}", "-x", "DS_ACCELERATOR", "-x", "TORCH_EXTENSIONS_DIR",
           sys.executable, "-m", "prefvec_ds.entry", "ref-logps", str(config),
           "--preference", "helpful"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    from transformers import AutoModelForCausalLM

    from prefvec_ds.config.loader import load_config
    from prefvec_ds.data.tokenize import collate_pairs
    from prefvec_ds.train.logps import sequence_logps
    from prefvec_ds.train.ref_logps import tokenized_preference
    from prefvec_ds.train.stage import load_tokenizer

    table = torch.load(run / "ref_logps" / "helpful.pt", weights_only=True)
    cfg = load_config(config)
    tok = load_tokenizer(run / "sft" / "model")
    pairs = tokenized_preference(cfg, "helpful", tok)
    assert table["keys"] == [p.key for p in pairs]  # every pair, in order, from both ranks
    model = AutoModelForCausalLM.from_pretrained(run / "sft" / "model").eval()
    sample = [0, 1, len(pairs) // 2, len(pairs) - 1]  # rows computed by both ranks
    batch = collate_pairs([pairs[i] for i in sample], tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps, _ = sequence_logps(logits, batch["labels"])
    expected = torch.stack([logps[: len(sample)], logps[len(sample):]], dim=1).double()
    assert torch.allclose(table["logps"][sample], expected, atol=1e-4)
