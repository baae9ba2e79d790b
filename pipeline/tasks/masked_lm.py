"""masked_lm: domain pretraining (`pretrain`): a masked language model trained on unlabelled text.

No labels: each batch is masked as BERT was (data/masking.py: 15% of the tokens, whole jieba words
or single tokens, 80/10/10), the loss is the model's own cross-entropy over the masked tokens, and a
held-out part of the records is scored by that loss per masked token and its perplexity (lower is
better). The export is a masked LM with its tokenizer: `train --model EXPORT` fine-tunes its
encoder under a new classifier head.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..core.base import ConfigError, load_json
from ..core.model_dir import check_model_dir, has_weights
from ..core.options import TrainConfig
from ..data.cache import text_file_paths
from ..data.masking import Masking
from ..data.readers import iter_records, require_columns
from .base import Metric, Task, option_error, register

PROBLEM_TYPE = "masked_lm"  # not one of transformers' classifier problem types: marks a pretrain export
PROBE_VOCABULARY = 32  # probe: the first logits of each token (a masked LM's full rows are too many to store)


def masked_lm():
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM


METRICS = (
    Metric("mlm_loss", "MLM loss", lambda loss_sum, tokens, present=None: loss_sum / tokens, higher_is_better=False),
    Metric(
        "perplexity", "perplexity", lambda loss_sum, tokens, present=None: math.exp(loss_sum / tokens), higher_is_better=False
    ),
)


def metrics(loss_sum: float, tokens: int, names=None, thresholds=None) -> dict:
    """Masked-LM loss per masked token of the held-out part (summed over every rank), and its perplexity."""
    if not tokens:
        raise ConfigError("pretrain: the held-out records have no token to mask; raise --heldout-fraction")
    return {"num_masked_tokens": int(tokens), **{m.name: m.compute(loss_sum, tokens) for m in METRICS}}


def weight_names(model_dir: str) -> set[str]:
    """The tensor names a model directory's weight files hold (read from headers and indexes, not loaded)."""
    directory = Path(model_dir)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index).is_file():
            return set(load_json(directory / index).get("weight_map", {}))
    if (directory / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
            return set(f.keys())
    import torch

    return set(torch.load(directory / "pytorch_model.bin", map_location="meta", weights_only=True))


def check_head(model_dir: str) -> None:
    """A model directory with weights must hold a masked-LM head to pretrain on (a fine-tuned
    classifier has none); one with config.json only is pretrained from scratch."""
    if not has_weights(model_dir):
        return
    import torch
    from transformers import AutoConfig

    with torch.device("meta"):
        model = masked_lm().from_config(AutoConfig.from_pretrained(model_dir))
    head = {name for name in model.state_dict() if not name.startswith(model.base_model_prefix + ".")}
    if not head & weight_names(model_dir):
        raise ConfigError(
            f"model: {model_dir} has weights but no masked-LM head (none of {', '.join(sorted(head)[:3])} ...); "
            "pretrain needs a masked LM (e.g. chinese-roberta-wwm-ext, or a pretrain export), or a directory "
            "with config.json alone to pretrain from scratch"
        )


def check_text_files(cfg: TrainConfig) -> None:
    """Every --text-file exists and its first record has the text column (before any rank starts)."""
    for path in text_file_paths(cfg.text_file):
        first = next(iter_records(path, encoding=cfg.encoding), None)
        require_columns(path, [first], [cfg.text_column])


def check_options(cfg: TrainConfig) -> None:
    """Pretraining reads --text-file (the labelled files are train's), windows every long record,
    and starts from a masked LM or a config."""
    if not cfg.text_file:
        raise option_error("text_file", cfg.text_file, "one or more text files (comma-separated) with task masked_lm")
    defaults = TrainConfig()
    for key in ("train_file", "dev_file", "val_size", "test_file"):
        if getattr(cfg, key) != getattr(defaults, key):
            raise option_error(
                key, getattr(cfg, key), "unset with pretrain (it reads --text-file and holds out --heldout-fraction)"
            )
    for key in ("label_separator", "threshold"):
        if getattr(cfg, key):
            raise option_error(key, getattr(cfg, key), "empty with pretrain (there are no labels)")
    if cfg.class_weights != "none":
        raise option_error("class_weights", cfg.class_weights, "none with pretrain (there are no classes)")
    if cfg.long_records != "chunks":
        raise option_error("long_records", cfg.long_records, "chunks with pretrain (every token of a long record is read)")
    check_model_dir(cfg.model, cfg.max_length)
    check_head(cfg.model)
    check_text_files(cfg)


def masking(cfg: TrainConfig, tokenizer) -> Masking:
    if tokenizer.mask_token_id is None:
        raise ConfigError(f"tokenizer of {cfg.model}: no mask token ([MASK]); a masked LM needs one")
    return Masking(
        seed=cfg.seed,
        probability=cfg.mask_probability,
        whole_words=cfg.masking == "whole-word",
        mask_id=tokenizer.mask_token_id,
        vocab_size=len(tokenizer),
        special_ids=tuple(tokenizer.all_special_ids),
    )


def no_predictions(*args):
    raise ConfigError("this is a pretrain export (a masked LM): it predicts no labels; fine-tune it first with train --model DIR")


MASKED_LM = register(
    Task(
        name="masked_lm",
        problem_type=PROBLEM_TYPE,
        metric_table=METRICS,
        output_key="",
        parse=lambda value, separator="": None,  # no label column is read
        label_names=lambda train, train_path, others: [],
        encode=lambda labels, names: None,  # labels come from the masking, batch by batch
        scores=no_predictions,
        predict=no_predictions,
        metrics=metrics,
        describe=no_predictions,
        check_options=check_options,
        model_class=masked_lm,
        model_config=lambda names: {},
        config_label_names=lambda config: [],
        classes_of=lambda label: (),
        details=lambda metrics: "",
        export_files=lambda names, thresholds: {},
        export_thresholds=no_predictions,  # predict asks this first
        scores_in_output=False,
        pretraining=True,
        masking=masking,
        probe_view=lambda logits: logits[..., :PROBE_VOCABULARY],
    )
)
