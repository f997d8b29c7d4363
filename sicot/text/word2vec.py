"""Word vectors for titles: train with gensim, export a plain table, and map titles to ids.

An exported directory holds
- `word2vec.model`: the gensim model (to continue training or inspect neighbours),
- `vectors.npy`: float32 [V, D], the table the text encoders start from,
- `vocab.json`: `{"tokens": [...], "dim": D}`, row i of `vectors.npy` is `tokens[i]`.
Rows 0 and 1 are reserved: 0 = padding (zeros, so a padded position adds nothing), 1 = unknown word
(the mean word vector: a neutral "some word" rather than a hole).
"""
from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from sicot import storage
from sicot.config import Word2Vec
from sicot.text.tokenize import tokenize

PAD, UNK = 0, 1
PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"


class VocabularyError(ValueError):
    """An exported word-vector directory that is missing or inconsistent."""


def train_word2vec(token_lists: Iterable[Sequence[str]], cfg: Word2Vec):
    """A gensim Word2Vec trained on tokenised titles; one worker thread so a seed gives one result."""
    from gensim.models import Word2Vec as GensimWord2Vec  # lazy: gensim costs ~3 s of import

    sentences = [list(tokens) for tokens in token_lists if tokens]
    if not sentences:
        raise VocabularyError("no words to train word2vec on: every title is empty")
    return GensimWord2Vec(sentences, vector_size=cfg.size, window=cfg.window, min_count=cfg.min_count,
                          epochs=cfg.epochs, seed=cfg.seed, workers=1)


def export(model, out_dir: str | Path) -> Path:
    """Write `word2vec.model`, `vectors.npy` and `vocab.json` into an existing local directory."""
    out = Path(out_dir)
    words = list(model.wv.index_to_key)
    vectors = np.asarray(model.wv.vectors, dtype=np.float32)
    table = np.zeros((len(words) + 2, vectors.shape[1]), dtype=np.float32)
    table[UNK] = vectors.mean(axis=0) if len(words) else 0.0
    table[2:] = vectors
    model.save(str(out / "word2vec.model"), separately=[])  # one file, however large the vocabulary
    np.save(out / "vectors.npy", table)
    (out / "vocab.json").write_text(
        json.dumps({"tokens": [PAD_TOKEN, UNK_TOKEN, *words], "dim": int(table.shape[1])}, ensure_ascii=False),
        encoding="utf-8")
    return out


class Vocabulary:
    """Token ids and their starting vectors; `encode` turns a title into ids for a text encoder."""

    def __init__(self, tokens: Sequence[str], embeddings: np.ndarray):
        if len(tokens) != len(embeddings):
            raise VocabularyError(f"{len(tokens)} tokens but {len(embeddings)} vectors")
        if list(tokens[:2]) != [PAD_TOKEN, UNK_TOKEN]:
            raise VocabularyError(f"tokens must start with {PAD_TOKEN!r}, {UNK_TOKEN!r}")
        self.tokens = list(tokens)
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
        try:
            return cls(meta["tokens"], table)
        except VocabularyError as exc:
            raise VocabularyError(f"{directory}: {exc}") from None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def ids(self, tokens: Iterable[str]) -> list[int]:
        return [self._ids.get(token, UNK) for token in tokens]

    def encode(self, title: str, max_len: int) -> list[int]:
        """Ids of the title's first `max_len` words; unknown words map to UNK, an empty title to []."""
        return self.ids(tokenize(title)[:max_len])
