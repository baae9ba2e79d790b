"""A model directory, checked from its files alone (no weights loaded): its config, its position
limit, whether it has weights and a tokenizer. Used by training, the launcher and `plan`.

A model directory is anything `AutoModelForSequenceClassification` and `AutoTokenizer` load. With
weight files it is fine-tuned; with only `config.json` (like the shipped `models/tiny-bert`) it is
randomly initialised.
"""

from __future__ import annotations

from pathlib import Path

from .base import ConfigError, load_json

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


# Model types whose position ids start after the padding index (transformers'
# create_position_ids_from_input_ids): pad_token_id + 1 positions are never a token's.
PADDING_OFFSET_MODELS = frozenset(
    {
        "roberta",
        "roberta-prelayernorm",
        "xlm-roberta",
        "xlm-roberta-xl",
        "camembert",
        "data2vec-text",
        "ibert",
        "longformer",
        "luke",
        "mpnet",
        "xmod",
        "markuplm",
        "lilt",
        "layoutlmv3",
        "esm",
    }
)


def max_positions(config: dict) -> int | None:
    """Longest input the model's position embeddings take; None where they set no limit."""
    if "max_position_embeddings" not in config or config.get("position_biased_input") is False:  # DeBERTa-v2/v3: relative only
        return None
    offset = config.get("pad_token_id", 1) + 1 if config.get("model_type") in PADDING_OFFSET_MODELS else 0
    return config["max_position_embeddings"] - offset


def check_model_dir(model_dir: str, max_length: int) -> None:
    """config.json exists and parses, and `max_length` fits the position embeddings.

    Checked before any rank tokenizes: a longer input would only fail at the first forward pass
    with a tensor-size error (a device-side assert on a GPU).
    """
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"model: {model_dir} is not a model directory (no config.json); give a local directory "
            "that AutoModelForSequenceClassification loads, e.g. a downloaded chinese-roberta-wwm-ext-large"
        )
    config = load_json(path)
    limit = max_positions(config)
    if limit is not None and max_length > limit:
        reserved = config["max_position_embeddings"] - limit
        why = f", of which {config.get('model_type')} reserves {reserved}" if reserved else ""
        raise ConfigError(
            f"--max-length {max_length} is more than model {model_dir} takes: {limit} tokens "
            f"(max_position_embeddings {config['max_position_embeddings']}{why} in {path}); "
            f"use --max-length {limit} or less"
        )


def has_weights(model_dir: str) -> bool:
    return any((Path(model_dir) / name).is_file() for name in WEIGHT_FILES)


def has_tokenizer(model_dir: str) -> bool:
    return any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES)
