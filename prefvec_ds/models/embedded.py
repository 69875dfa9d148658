"""The embedded tiny Llama and its word-level tokenizer: no download, deterministic.

`materialize_embedded_model(folder, seed)` writes a complete Hugging Face folder (config.json,
tokenizer files with a chat template, model.safetensors with seeded random init) that every
stage then treats like any other model folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefvec_ds.atomic import temporary_beside
from prefvec_ds.data import embedded

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {
    # ~0.6M parameters: 2 layers, hidden 128; tied embeddings exercise shared params in ZeRO-3.
    "tiny-llama": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=256, tie_word_embeddings=True),
}
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "<|end|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} <|end|> "
    "{% elif m['role'] == 'assistant' %}<|assistant|> {{ m['content'] }} <|end|> "
    "{% else %}{{ m['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_tokenizer():
    """A word-level PreTrainedTokenizerFast over the embedded vocabulary (whitespace split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + embedded.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def materialize_embedded_model(name: str, folder: Path, seed: int) -> Path:
    """Write the embedded model `name` as a HF folder (idempotent: kept if complete)."""
    import torch  # noqa: PLC0415
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}: expected one of "
                         f"{', '.join(EMBEDDED_MODELS)}")
    folder = Path(folder)
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    tokenizer = build_tokenizer()
    vocab_size = -(-len(tokenizer) // 8) * 8  # pad to a multiple of 8 for aligned matmuls
    config = LlamaConfig(vocab_size=vocab_size, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         **EMBEDDED_MODELS[name])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # a temporary of this process's own: concurrent stages may materialise the same folder;
    # the first rename wins and the others, having written the same seeded bytes, drop theirs
    tmp = temporary_beside(folder)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "prefvec_embedded.json").write_text(json.dumps({"name": name, "seed": seed}))
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
