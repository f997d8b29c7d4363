"""Word vectors for titles: train with gensim, export a plain table, and map titles to ids.

An exported directory holds
- `word2vec.model`: the gensim model (to continue training or inspect neighbours),
- `vectors.npy`: float32 [V, D], the table the text encoders start from,
- `vocab.json`: `{"tokens": [...], "dim": D, "dropped": [...]}`, row i of `vectors.npy` is `tokens[i]`.
Rows 0 and 1 are reserved: 0 = padding (zeros, so a padded position adds nothing), 1 = unknown word
(the mean word vector: a neutral "some word" rather than a hole).

Two filters shape the vocabulary (the paper drops very frequent and very rare words before word2vec):
- `dropped`: words in more than `word2vec.max_title_share` of the titles. They tell no product from
  another, so they are removed from every title, in training and whenever a title is encoded.
- words seen fewer than `word2vec.min_count` times get no vector; a title reads them as the unknown
  word, like any word unseen in training: a rare word may still be a product's name.
"""
from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path

import numpy as np

from sicot import storage
from sicot.config import Word2Vec
from sicot.text.tokenize import tokenize

PAD, UNK = 0, 1
PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"


class VocabularyError(ValueError):
    """An exported word-vector directory that is missing or inconsistent."""


def frequent_words(token_lists: Sequence[Sequence[str]], max_title_share: float) -> set[str]:
    """Words in more than `max_title_share` of the titles that have words (document frequency, so a word
    repeated within one title counts once); none when the share is 1.0."""
    titles = [set(tokens) for tokens in token_lists if tokens]
    in_titles = Counter(word for words in titles for word in words)
    return {word for word, n in in_titles.items() if n > max_title_share * len(titles)}


def train_word2vec(token_lists: Iterable[Sequence[str]], cfg: Word2Vec, dropped: Collection[str] = ()):
    """A gensim Word2Vec trained on tokenised titles with the `dropped` words removed; one worker thread
    so a seed gives one result."""
    from gensim.models import Word2Vec as GensimWord2Vec  # lazy: gensim costs ~3 s of import

    sentences = [kept for tokens in token_lists if (kept := [t for t in tokens if t not in dropped])]
    if not sentences:
        raise VocabularyError("no words to train word2vec on: every title is empty"
                              + (" or holds only words dropped by word2vec.max_title_share" if dropped else ""))
    return GensimWord2Vec(sentences, vector_size=cfg.size, window=cfg.window, min_count=cfg.min_count,
                          epochs=cfg.epochs, seed=cfg.seed, workers=1)


def export(model, out_dir: str | Path, dropped: Collection[str] = ()) -> Path:
    """Write `word2vec.model`, `vectors.npy` and `vocab.json` (with the `dropped` words that titles lose)
    into an existing local directory."""
    out = Path(out_dir)
    words = list(model.wv.index_to_key)
    vectors = np.asarray(model.wv.vectors, dtype=np.float32)
    table = np.zeros((len(words) + 2, vectors.shape[1]), dtype=np.float32)
    table[UNK] = vectors.mean(axis=0) if len(words) else 0.0
    table[2:] = vectors
    model.save(str(out / "word2vec.model"), separately=[])  # one file, however large the vocabulary
    np.save(out / "vectors.npy", table)
    (out / "vocab.json").write_text(
        json.dumps({"tokens": [PAD_TOKEN, UNK_TOKEN, *words], "dim": int(table.shape[1]), "dropped": sorted(dropped)},
                   ensure_ascii=False),
        encoding="utf-8")
    return out


class Vocabulary:
    """Token ids and their starting vectors; `encode` turns a title into ids for a text encoder, without
    the `dropped` words."""

    def __init__(self, tokens: Sequence[str], embeddings: np.ndarray, dropped: Iterable[str] = ()):
        if len(tokens) != len(embeddings):
            raise VocabularyError(f"{len(tokens)} tokens but {len(embeddings)} vectors")
        if list(tokens[:2]) != [PAD_TOKEN, UNK_TOKEN]:
            raise VocabularyError(f"tokens must start with {PAD_TOKEN!r}, {UNK_TOKEN!r}")
        self.tokens = list(tokens)
        self.dropped = frozenset(dropped)
        self.embeddings = np.asarray(embeddings, dtype=np.float32)
        self._ids = {token: i for i, token in enumerate(self.tokens)}

    @classmethod
    def load(cls, directory: str | Path) -> Vocabulary:
        """Read an exported directory (local path or s3:// prefix)."""
        directory = str(directory)
        try:
            meta = json.loads(storage.read_text(storage.join(directory, "vocab.json")))
            table = np.load(io.BytesIO(storage.read_bytes(storage.join(directory, "vectors.npy"))))
        except FileNotFoundError as exc:
            raise VocabularyError(f"{directory}: no word vectors here ({exc}); run train_word2vec first") from None
        except (ValueError, OSError) as exc:
            raise VocabularyError(f"{directory}: unreadable word vectors: {exc}") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("tokens"), list):
            raise VocabularyError(f"{directory}/vocab.json: expected an object with a list 'tokens'")
        if table.ndim != 2 or table.shape[1] != meta.get("dim"):
            raise VocabularyError(f"{directory}/vectors.npy: shape {table.shape} does not match dim {meta.get('dim')}")
        dropped = meta.get("dropped", [])  # absent in directories written before the filter existed
        if not isinstance(dropped, list) or not all(isinstance(w, str) for w in dropped):
            raise VocabularyError(f"{directory}/vocab.json: 'dropped' must be a list of words")
        try:
            return cls(meta["tokens"], table, dropped)
        except VocabularyError as exc:
            raise VocabularyError(f"{directory}: {exc}") from None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def ids(self, tokens: Iterable[str]) -> list[int]:
        return [self._ids.get(token, UNK) for token in tokens]

    def words(self, title: str, max_len: int) -> list[str]:
        """The title's first `max_len` words that are not dropped: what a text encoder reads."""
        return [w for w in tokenize(title) if w not in self.dropped][:max_len]

    def encode(self, title: str, max_len: int) -> list[int]:
        """Ids of `words(title, max_len)`; unknown words map to UNK, an empty title to []."""
        return self.ids(self.words(title, max_len))
