"""prefvec-ds: multi-preference alignment with Preference Vectors on DeepSpeed ZeRO-3.

The package reads as the pipeline:
config -> data -> train (sft, ref_logps, dpo) -> ckpt (vectors, merge) -> eval / mora,
orchestrated by pipeline; only prefvec_ds.distributed touches deepspeed or torch.distributed.

Import layers, bottom to top (a module imports its own layer and those below, never above;
tests/unit/test_import_layers.py checks every import, function-local ones included):
prefvec_ds/atomic < ckpt < config < data < models < distributed < train/entry < eval < mora <
pipeline < cli.
- prefvec_ds (PrefvecError) and atomic (atomic writes) import nothing of ours.
- ckpt is checkpoint arithmetic: torch-free, it runs without a run config (`prefvec vector`).
- config validates the names it accepts against prefvec_ds.config.choices and imports no code
  that implements them; each implementation table is keyed by the same names.
- data reads config sections; models builds networks from data's tokenizer and writes with ckpt;
  distributed wraps them in engines.
- train holds the stages that update weights (sft, ref_logps, dpo, rm); entry.py, the rank
  process `prefvec train` starts, belongs to it (at the root so launchers say -m prefvec_ds.entry).
- eval reads trained folders; mora generates and scores with eval; pipeline runs every stage;
  cli parses the command line of them all.
"""

__version__ = "0.1.0"


class PrefvecError(Exception):
    """Bad user input: a message that names the file, the parameter and what was expected.

    The CLI turns it into one line on stderr and exit code 2, never a traceback.
    """
