"""prefvec-ds: multi-preference alignment with Preference Vectors on DeepSpeed ZeRO-3.

The package reads as the pipeline:
config -> data -> train (sft, ref_logps, dpo) -> ckpt (vectors, merge) -> eval / mora,
orchestrated by pipeline; only prefvec_ds.distributed touches deepspeed or torch.distributed.
"""

__version__ = "0.1.0"


class PrefvecError(Exception):
    """Bad user input: a message that names the file, the parameter and what was expected.

    The CLI turns it into one line on stderr and exit code 2, never a traceback.
    """
