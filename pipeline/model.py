"""Model and tokenizer builders.

A model directory is anything `AutoModelForSequenceClassification` and `AutoTokenizer` load. With
weight files it is fine-tuned; with only `config.json` (like the shipped `models/tiny-bert`) it is
randomly initialised. Without tokenizer files, a vocabulary is learned from the training texts
(offline): by default a BERT WordPiece vocabulary (each CJK character a token, as in Chinese BERT
vocabularies, plus frequent numbers and Latin words), or every character seen at least twice, one
token per character (`--vocabulary char`).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from . import task
from .base import ConfigError, build_once, load_json

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDPIECE_VOCAB_SIZE = 8000
CHAR_MIN_COUNT = 2  # a character vocabulary keeps the characters seen at least this often


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


def load_tokenizer(tokenizer_dir: str, max_length: int):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not tokenizer.is_fast:
        raise ConfigError(f"tokenizer {tokenizer_dir}: only fast (Rust) tokenizers are supported; add a tokenizer.json")
    tokenizer.model_max_length = max_length
    return tokenizer


def _normalizer():
    from tokenizers import normalizers

    # BERT's own: drops control characters, lowercases, puts spaces around CJK characters.
    return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)


def _pre_tokenizer(vocabulary: str):
    """How text is cut before vocabulary lookup: BERT's words and punctuation (each CJK character
    a word) for WordPiece; every non-space character on its own for the character vocabulary."""
    from tokenizers import Regex, pre_tokenizers

    if vocabulary == "wordpiece":
        return pre_tokenizers.BertPreTokenizer()
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), "isolated")])


def char_vocabulary(counts: Counter) -> list[str]:
    """Every character seen at least CHAR_MIN_COUNT times, in code-point order (the same ids every
    run); a character seen once gets no embedding of its own, which training could hardly learn."""
    return SPECIAL_TOKENS + sorted(c for c, n in counts.items() if n >= CHAR_MIN_COUNT)


def wordpiece_vocabulary(counts: Counter) -> list[str]:
    """A BERT vocabulary from the training words' counts, the same list on every run.

    Every character seen (alone and as a ##continuation, so any word of the data can be spelled)
    plus the most frequent longer words (numbers, Latin terms), ties broken alphabetically. (The
    `tokenizers` WordPiece trainer was not used: its vocabulary changes from run to run.)
    """
    chars = sorted({c for word in counts for c in word})
    budget = WORDPIECE_VOCAB_SIZE - len(SPECIAL_TOKENS) - 2 * len(chars)
    words = sorted((w for w, n in counts.items() if len(w) > 1 and n >= 2), key=lambda w: (-counts[w], w))[: max(budget, 0)]
    return SPECIAL_TOKENS + chars + ["##" + c for c in chars] + words


VOCABULARIES = {"char": char_vocabulary, "wordpiece": wordpiece_vocabulary}
# The default: higher mean dev and test macro-F1 on the bundled sample (docs/data-and-models.md, 3 seeds).
DEFAULT_VOCABULARY = "wordpiece"


def build_tokenizer(texts: Iterable[str], texts_key: str, cache_dir: str, vocabulary: str = DEFAULT_VOCABULARY) -> Path:
    """Build (or reuse, keyed by `texts_key`, e.g. the training Split's fingerprint, and the
    vocabulary kind) a tokenizer whose vocabulary is learned from `texts`; returns its directory.

    `texts` is read once, as it comes (a generator over a large file will do). Saved as
    `tokenizer.json` and loaded with `from_pretrained(dir)` (in transformers 5,
    `BertTokenizerFast(vocab_file=...)` ignores the file and maps every character to [UNK]).
    """
    limits = {"char": CHAR_MIN_COUNT, "wordpiece": WORDPIECE_VOCAB_SIZE}[vocabulary]
    key = hashlib.sha256(f"{texts_key}:{vocabulary}:{limits}".encode()).hexdigest()[:20]
    target = Path(cache_dir) / f"tokenizer-{vocabulary}-{key}"
    if not (target / "tokenizer_config.json").is_file():
        build_once(target, "tokenizer_config.json", lambda tmp: write_tokenizer(tmp, texts, vocabulary))
    return target


def tokenizer_source(cfg, cache_dir: str):
    """`tokenizer_for(train_split) -> (tokenizer, directory)` for data.prepare_splits: the model
    directory's own tokenizer, or one whose vocabulary (cfg.vocabulary) is learned from the training
    texts, built once into `cache_dir`."""

    def tokenizer_for(train_split):
        if has_tokenizer(cfg.model):
            return load_tokenizer(cfg.model, cfg.max_length), cfg.model
        directory = build_tokenizer(train_split.texts(), train_split.key, cache_dir, cfg.vocabulary)
        return load_tokenizer(str(directory), cfg.max_length), directory

    return tokenizer_for


def write_tokenizer(directory: Path, texts: Iterable[str], vocabulary: str) -> None:
    """Count the pre-tokenized pieces of `texts` in one pass, and save the tokenizer they give."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    normalizer, pre_tokenizer = _normalizer(), _pre_tokenizer(vocabulary)
    counts = Counter()
    for text in texts:
        counts.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    ids = {token: i for i, token in enumerate(VOCABULARIES[vocabulary](counts))}
    if vocabulary == "wordpiece":
        backend = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
        backend.decoder = decoders.WordPiece()
    else:
        backend = Tokenizer(models.WordLevel(ids, unk_token="[UNK]"))
    backend.normalizer, backend.pre_tokenizer = normalizer, pre_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    named = dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), SPECIAL_TOKENS))
    PreTrainedTokenizerFast(tokenizer_object=backend, **named).save_pretrained(str(directory))


def build_model(
    model_dir: str,
    label_names: list[str],
    vocab_size: int,
    ds_config: dict,
    seed: int,
    gradient_checkpointing: bool = False,
    problem_type: str = task.PROBLEM_TYPE,
):
    """The classifier, partitioned while it is built under ZeRO-3, optionally recomputing activations.

    Under stage 3, transformers' DeepSpeed integration (an `HfDeepSpeedConfig` alive during the
    call) builds or loads the model inside `deepspeed.zero.Init`, so no rank ever holds the whole
    model. The integration is switched off again afterwards, so later plain loads (export
    verification) are not partitioned by accident.
    """
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    config = AutoConfig.from_pretrained(
        model_dir,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
        problem_type=problem_type,  # the loss the task decides (task.Task.problem_type), saved with the export
    )
    zero3 = ds_config["zero_optimization"]["stage"] == 3
    hf_ds_config = HfDeepSpeedConfig(ds_config) if zero3 else None
    torch.manual_seed(seed)
    try:
        if has_weights(model_dir):
            model = AutoModelForSequenceClassification.from_pretrained(model_dir, config=config)
        else:
            config.vocab_size = vocab_size
            model = AutoModelForSequenceClassification.from_config(config)
    finally:
        del hf_ds_config
        unset_hf_deepspeed_config()
    if gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise ConfigError(f"model: {model_dir} ({config.model_type}) does not support gradient checkpointing")
        # Non-reentrant checkpointing: the one PyTorch recommends, and it works with ZeRO-3's
        # parameter hooks (the reentrant one re-gathers inside a nested autograd call).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # a decoder cache means nothing to a classifier; transformers warns otherwise
    return model
