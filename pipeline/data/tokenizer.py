"""The tokenizer: the model directory's own, or one built from the training texts.

Without tokenizer files in the model directory, a vocabulary is learned from the training texts
(offline): by default one token per character (`--vocabulary char`), or a BERT WordPiece
vocabulary (`wordpiece`: each CJK character a token, as in Chinese BERT vocabularies, plus frequent
numbers and Latin words). In both, a character seen fewer than `--min-char-count` times in training has no token of its
own and reads as [UNK]: an embedding trained on one record is noise at test time, while [UNK] is
trained on every record that has a rare character (real notes have a long tail of them).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from ..core.base import ConfigError, build_once, load_json
from ..core.model_dir import has_tokenizer, has_weights
from ..core.options import DEFAULT_MIN_CHAR_COUNT, DEFAULT_VOCABULARY

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDPIECE_VOCAB_SIZE = 8000
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


def frequent_chars(counts: Counter, min_count: int) -> list[str]:
    """The characters of the counted pieces seen at least `min_count` times in all, in code-point
    order (the same ids every run)."""
    chars = Counter()
    for piece, n in counts.items():
        for c in piece:
            chars[c] += n
    return sorted(c for c, n in chars.items() if n >= min_count)


def char_vocabulary(counts: Counter, min_count: int) -> list[str]:
    """One token per character seen at least `min_count` times."""
    return SPECIAL_TOKENS + frequent_chars(counts, min_count)


def wordpiece_vocabulary(counts: Counter, min_count: int) -> list[str]:
    """A BERT vocabulary from the training words' counts, the same list on every run.

    Every character seen at least `min_count` times (alone and as a ##continuation, so any word
    of them can be spelled; a word with a rarer character is [UNK], as in BERT) plus the most
    frequent longer words (numbers, Latin terms), ties broken alphabetically. (The `tokenizers`
    WordPiece trainer was not used: its vocabulary changes from run to run.)
    """
    chars = frequent_chars(counts, min_count)
    budget = WORDPIECE_VOCAB_SIZE - len(SPECIAL_TOKENS) - 2 * len(chars)
    words = sorted((w for w, n in counts.items() if len(w) > 1 and n >= 2), key=lambda w: (-counts[w], w))[: max(budget, 0)]
    return SPECIAL_TOKENS + chars + ["##" + c for c in chars] + words


VOCABULARIES = {"char": char_vocabulary, "wordpiece": wordpiece_vocabulary}  # --vocabulary (names in core.options)


def build_tokenizer(
    texts: Iterable[str],
    texts_key: str,
    cache_dir: str,
    vocabulary: str = DEFAULT_VOCABULARY,
    min_char_count: int = DEFAULT_MIN_CHAR_COUNT,
) -> Path:
    """Build (or reuse, keyed by `texts_key`, e.g. the training Split's fingerprint, the vocabulary
    kind and `min_char_count`) a tokenizer whose vocabulary is learned from `texts`; returns its directory.

    `texts` is read once, as it comes (a generator over a large file will do). Saved as
    `tokenizer.json` and loaded with `from_pretrained(dir)` (in transformers 5,
    `BertTokenizerFast(vocab_file=...)` ignores the file and maps every character to [UNK]).
    """
    limits = {"char": min_char_count, "wordpiece": (WORDPIECE_VOCAB_SIZE, min_char_count)}[vocabulary]
    key = hashlib.sha256(f"{texts_key}:{vocabulary}:{limits}".encode()).hexdigest()[:20]
    target = Path(cache_dir) / f"tokenizer-{vocabulary}-{key}"
    if not (target / "tokenizer_config.json").is_file():
        build_once(target, "tokenizer_config.json", lambda tmp: write_tokenizer(tmp, texts, vocabulary, min_char_count))
    return target


def tokenizer_source(cfg, cache_dir: str):
    """`tokenizer_for(train_split) -> (tokenizer, directory)` for data.prepare_splits: the model
    directory's own tokenizer, or one whose vocabulary (cfg.vocabulary) is learned from the training
    texts, built once into `cache_dir`."""

    def tokenizer_for(train_split):
        check_model_tokenizer(cfg.model)
        if has_tokenizer(cfg.model):
            return load_tokenizer(cfg.model, cfg.max_length), cfg.model
        directory = build_tokenizer(train_split.texts(), train_split.key, cache_dir, cfg.vocabulary, cfg.min_char_count)
        return load_tokenizer(str(directory), cfg.max_length), directory

    return tokenizer_for


def write_tokenizer(directory: Path, texts: Iterable[str], vocabulary: str, min_char_count: int) -> None:
    """Count the pre-tokenized pieces of `texts` in one pass, and save the tokenizer they give."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    normalizer, pre_tokenizer = _normalizer(), _pre_tokenizer(vocabulary)
    counts = Counter()
    for text in texts:
        counts.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    ids = {token: i for i, token in enumerate(VOCABULARIES[vocabulary](counts, min_char_count))}
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
