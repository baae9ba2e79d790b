"""How a record's text becomes what the model reads, when it is longer than `--max-length` tokens.

Training, evaluation and `predict` all go through `encode`, so an export reads records exactly as
its training did (the settings travel in the export's config.json as `record_reading`).

- `--truncation head` (the default) keeps the first tokens; `tail` the last; `head+tail` the
  first quarter of the token budget from the start and the rest from the end. (Sun et al. 2019,
  "How to Fine-Tune BERT for Text Classification?", found head 128 + tail 382 best at 512 tokens;
  a quarter of the 510 content tokens is 127 + 383, and the same proportion serves any max length.)
- `--long-records chunks --stride N`: every record becomes overlapping windows of max_length
  tokens; consecutive windows share N tokens (the meaning of `stride` in Hugging Face's
  `return_overflowing_tokens`, whose windows these are).
  Training: each window is one training sample with its record's label, so a record of k windows
  weighs k times a one-window record. Evaluation and predict: the windows' logits are pooled per
  record (`--pool mean|max`) and the record is counted once.

The cuts are made on the token ids of the whole text; each piece then gets the special tokens that
the tokenizer's own post-processor puts around a sequence ([CLS] ... [SEP] for BERT; `Template`),
so the budget for text is max_length minus `tokenizer.num_special_tokens_to_add()`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..core.base import ConfigError
from . import masking

HEAD_SHARE = 4  # head+tail keeps budget // HEAD_SHARE tokens from the start, the rest from the end


@dataclass(frozen=True)
class Reading:
    """The settings that decide which tokens of a record the model reads (see the module docstring)."""

    max_length: int
    truncation: str = "head"
    long_records: str = "truncate"
    stride: int = 0
    pool: str = "mean"

    @classmethod
    def from_config(cls, cfg) -> Reading:
        """The reading of a (checked) TrainConfig; its empty `pool` means mean."""
        return cls(cfg.max_length, cfg.truncation, cfg.long_records, cfg.stride, cfg.pool or "mean")

    @classmethod
    def saved(cls, values: dict | None, max_length: int) -> Reading:
        """The reading stored with an export; an export made before it was stored read the head."""
        return cls(**values) if values else cls(max_length)

    def as_dict(self) -> dict:
        return asdict(self)

    def data_key(self) -> list:
        """What changes the tokenized data (pooling does not: it only combines logits)."""
        return [self.max_length, self.truncation, self.long_records, self.stride]

    def text_budget(self, tokenizer) -> int:
        """Content tokens per sequence: max_length less the tokenizer's special tokens."""
        budget = self.max_length - tokenizer.num_special_tokens_to_add()
        if self.long_records == "chunks" and self.stride >= budget:
            raise ConfigError(
                f"stride {self.stride} must be less than the {budget} text tokens of a window "
                f"(max_length {self.max_length} minus {tokenizer.num_special_tokens_to_add()} special tokens)"
            )
        return budget


def pieces(ids: list[int], reading: Reading, budget: int) -> list[list[int]]:
    """The token pieces (no special tokens) the model reads of one record's tokens `ids`."""
    if len(ids) <= budget:
        return [ids]
    if reading.long_records == "chunks":
        # Windows start every (budget - stride) tokens until one reaches the end, as Hugging Face's
        # overflowing tokens do; only the last window may be shorter.
        return [ids[start : start + budget] for start in range(0, len(ids) - reading.stride, budget - reading.stride)]
    head = {"head": budget, "tail": 0, "head+tail": budget // HEAD_SHARE}[reading.truncation]
    return [ids[:head] + ids[len(ids) - (budget - head) :]]


@dataclass(frozen=True)
class Template:
    """How the tokenizer's post-processor wraps one sequence: special tokens before and after, and
    the segment (token type) ids of each part."""

    prefix: list[int]
    suffix: list[int]
    prefix_types: list[int]
    text_type: int
    suffix_types: list[int]

    @classmethod
    def of(cls, tokenizer) -> Template:
        """Asked of the tokenizer itself: post-process a one-token sequence and see what surrounds it."""
        backend = tokenizer.backend_tokenizer
        full = backend.post_process(backend.encode(tokenizer.unk_token, add_special_tokens=False))
        at = full.special_tokens_mask.index(0)
        return cls(full.ids[:at], full.ids[at + 1 :], full.type_ids[:at], full.type_ids[at], full.type_ids[at + 1 :])

    def wrap(self, piece: list[int]) -> dict:
        ids = self.prefix + piece + self.suffix
        types = self.prefix_types + [self.text_type] * len(piece) + self.suffix_types
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": [1] * len(ids)}


def encode(tokenizer, texts: list[str], reading: Reading, words: bool = False) -> tuple[dict, list[int]]:
    """Model inputs for `texts`: ({input name: one list per window}, the text index of each window).

    With truncation every text gives one window; with chunks one or more, in order. `words` adds
    masking.WORD_START (1 where a token starts a jieba word; special tokens and a window's first
    token start one), cut into windows as the tokens are: what whole-word masking masks together.
    """
    budget = reading.text_budget(tokenizer)
    template = Template.of(tokenizer)
    names = [name for name in ("input_ids", "token_type_ids", "attention_mask") if name in tokenizer.model_input_names]
    columns = {name: [] for name in names + ([masking.WORD_START] if words else [])}
    record = []
    # verbose=False: the whole text is tokenized on purpose; no "longer than max length" warning.
    encoded = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False, return_offsets_mapping=words)
    for index, ids in enumerate(encoded["input_ids"]):
        starts = pieces(masking.word_starts(texts[index], encoded["offset_mapping"][index]), reading, budget) if words else []
        for number, piece in enumerate(pieces(ids, reading, budget)):
            inputs = template.wrap(piece)
            for name in names:
                columns[name].append(inputs[name])
            if words:  # the same cuts (pieces() depends on the length alone); a window starts a word
                window = [1] * min(1, len(piece)) + starts[number][1:]
                columns[masking.WORD_START].append([1] * len(template.prefix) + window + [1] * len(template.suffix))
            record.append(index)
    return columns, record


def pool(logits: np.ndarray, record: np.ndarray, how: str) -> np.ndarray:
    """One row of logits per record: the mean or max over its windows' rows.

    `record` gives each row's record id; a record's windows are consecutive rows.
    """
    record = np.asarray(record)
    starts = np.flatnonzero(np.r_[True, record[1:] != record[:-1]])
    if how == "max":
        return np.maximum.reduceat(logits, starts, axis=0)
    sizes = np.diff(np.r_[starts, len(record)])
    return np.add.reduceat(logits, starts, axis=0) / sizes[:, None]
