"""Model construction: the embedded tiny Llama, HF-folder loading helpers, GGUF conversion, and
the reward/cost preference models (an encoder with a scalar head, or an HF sequence classifier)."""
