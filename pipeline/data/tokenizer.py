"""The tokenizer: the model directory's own, or one built from the training texts.

Without tokenizer files in the model directory, a vocabulary is learned from the training texts
(offline): by default a BERT WordPiece vocabulary (each CJK character a token, as in Chinese BERT
vocabularies, plus frequent numbers and Latin words), or every character seen at least twice, one
token per character (`--vocabulary char`).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from ..core.base import ConfigError, build_once, load_json
from ..core.model_dir import has_tokenizer, has_weights
from ..core.options import DEFAULT_VOCABULARY

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDPIECE_VOCAB_SIZE = 8000
CHAR_MIN_COUNT = 2  # a character vocabulary keeps the characters seen at least this often
# config.json key of a model trained here: its tokenizer's fingerprint (data.cache.tokenizer_fingerprint),
# so that its weights are never read with another vocabulary (a pretrain export given to `train`).
TOKENIZER_KEY = "tokenizer_fingerprint"


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


VOCABULARIES = {"char": char_vocabulary, "wordpiece": wordpiece_vocabulary}  # --vocabulary (names in core.options)


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
        check_model_tokenizer(cfg.model)
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


def check_model_tokenizer(model_dir: str) -> None:
    """A model directory with weights trained here (its config.json names the tokenizer's fingerprint)
    must come with that tokenizer: with none, a vocabulary built from the data, and with another one,
    every id would reach an embedding trained for another token. Checked before any rank starts."""
    from .cache import tokenizer_fingerprint

    config = Path(model_dir) / "config.json"
    saved = load_json(config).get(TOKENIZER_KEY) if config.is_file() else None
    if not saved or not has_weights(model_dir):
        return
    if not has_tokenizer(model_dir):
        raise ConfigError(
            f"model: {model_dir} was trained with its own tokenizer (fingerprint {saved} in {config}) but holds no "
            "tokenizer files; a vocabulary built from this run's data would give its embeddings other tokens. "
            "Copy the tokenizer files of its export (tokenizer.json, tokenizer_config.json) back into it"
        )
    found = tokenizer_fingerprint(load_tokenizer(model_dir, 8))
    if found != saved:
        raise ConfigError(
            f"model: {model_dir}'s tokenizer files (fingerprint {found}) are not the tokenizer its weights were "
            f"trained with ({saved} in {config}); every token would reach another token's embedding. Use the "
            "tokenizer files its export came with"
        )
