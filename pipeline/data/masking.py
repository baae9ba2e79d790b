"""Masked-LM inputs (`pretrain`): words found by jieba, and BERT's masking, seeded per record.

Words: when a cache for pretraining is built, each token is marked 1 where a new word starts and
0 where it continues one (the `word_start` column). Words are jieba's segmentation of the text
(Chinese has no spaces; Chinese RoBERTa-wwm was trained so, Cui et al. 2019); a token belongs to
the word its first character falls in, so a Latin word's ##pieces stay with it.

Masking: of each row's tokens (special tokens never), about `probability` are chosen, whole words
at a time (`whole_words`) or token by token; a chosen token is replaced by [MASK] 80% of the time,
by a random token 10%, and left as it is 10% (BERT, Devlin et al. 2019), and it is the only kind
of token the loss is taken on. As in Hugging Face's whole-word collator, words are taken in a
random order while they fit the budget of round(probability x tokens).

The choice is a pure function of (seed, epoch, row): a row is masked the same whatever batch,
rank or world size it falls in, so a resumed run (or one resumed on another world size) masks
exactly what the uninterrupted run did. Training rows are masked afresh each epoch; held-out rows
the same every evaluation. (transformers 5.24's DataCollatorForLanguageModeling draws from one
generator seeded once, so what a row gets depends on every batch before it, and its whole-word mode
groups tokens by gaps between their offsets: a Chinese sentence, without spaces, is one "word".)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

MASKED, RANDOM = 0.8, 0.1  # of the chosen tokens: [MASK], a random token; the rest stay as they are
IGNORE = -100  # the label of a token not chosen: transformers' cross-entropy skips it
WORD_START = "word_start"  # the cache's column: 1 where a token starts a word
TRAINING, HELD_OUT = 0, 1  # random streams: training rows per epoch, held-out rows once


@lru_cache(maxsize=1)
def segmenter():
    """jieba's tokenizer with its bundled dictionary (nothing is downloaded), built once per process;
    its "Building prefix dict" lines are kept off the console."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    tokenizer = jieba.Tokenizer()
    tokenizer.initialize()
    return tokenizer


def words(text: str) -> list[str]:
    """jieba's words of `text`, in order; together they are the text."""
    return list(segmenter().cut(text))


def word_starts(text: str, offsets: list[tuple[int, int]]) -> list[int]:
    """1 for each token (given by its character offsets in `text`) that starts a jieba word, else 0."""
    word_of = np.zeros(len(text) + 1, dtype=np.int64)
    position = 0
    for index, word in enumerate(words(text)):
        word_of[position : position + len(word)] = index
        position += len(word)
    word_of[len(text)] = -1
    starts, previous = [], None
    for start, _ in offsets:
        word = int(word_of[min(start, len(text))])
        starts.append(int(word != previous))
        previous = word
    return starts


def choose(starts: np.ndarray, probability: float, whole_words: bool, rng) -> np.ndarray:
    """Positions (indices into `starts`) of the tokens to predict: whole words (or single tokens) in
    a random order while they fit round(probability x tokens), at least one token."""
    budget = max(1, round(len(starts) * probability))
    cuts = np.flatnonzero(starts[1:]) + 1 if whole_words else np.arange(1, len(starts))
    groups = np.split(np.arange(len(starts)), cuts)
    chosen, covered = [], 0
    for g in rng.permutation(len(groups)):
        if covered + len(groups[g]) > budget:
            continue
        chosen.append(groups[g])
        covered += len(groups[g])
        if covered == budget:
            break
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class Masking:
    """How a padded batch of rows becomes masked-LM inputs and labels (see the module docstring)."""

    seed: int
    probability: float
    whole_words: bool
    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]

    def row(self, ids: np.ndarray, starts: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        """(masked ids, labels) of one row's real tokens."""
        ids, labels = ids.copy(), np.full(len(ids), IGNORE, dtype=np.int64)
        maskable = np.flatnonzero(~np.isin(ids, self.special_ids))
        if len(maskable) == 0:
            return ids, labels
        at = maskable[choose(starts[maskable], self.probability, self.whole_words, rng)]
        labels[at] = ids[at]
        draw = rng.random(len(at))
        ids[at[draw < MASKED]] = self.mask_id
        replaced = at[(draw >= MASKED) & (draw < MASKED + RANDOM)]
        ids[replaced] = rng.integers(0, self.vocab_size, len(replaced))
        return ids, labels

    def __call__(self, batch: dict, rows, epoch: int | None) -> dict:
        """`batch` (padded tensors with `word_start`) of split rows `rows` masked: training rows by
        (seed, epoch, row), held-out rows (epoch None) by (seed, row) alone."""
        import torch

        ids, starts = batch["input_ids"].numpy(), batch.pop(WORD_START).numpy()
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        masked, labels = ids.copy(), np.full(ids.shape, IGNORE, dtype=np.int64)
        for i, (row, length) in enumerate(zip(rows, lengths)):
            stream = [self.seed, HELD_OUT, int(row)] if epoch is None else [self.seed, TRAINING, epoch, int(row)]
            masked[i, :length], labels[i, :length] = self.row(ids[i, :length], starts[i, :length], np.random.default_rng(stream))
        return {**batch, "input_ids": torch.from_numpy(masked), "labels": torch.from_numpy(labels)}
