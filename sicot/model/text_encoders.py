"""Title encoders: word ids [B, L] and a mask [B, L] (True = a real word) in, a title feature out.

Every encoder answers `forward(tokens, mask) -> (s [B, out_dim], attention [B, L] or None)`. Word
embeddings start from the word2vec table (row 0 = padding, kept at zero) and are trained further. The
output passes Linear + ReLU, so `s` is non-negative like the pooled ResNet feature `v` it is fused with
by an element-wise max. Padding never changes the output, and a title with no words at all (an
all-padding row) gives a finite feature (the projection of zeros), never NaN.

`bilinear` is the paper's word attention (§3.2). With word vectors e_1..e_n of one title:

    g   = mean_i e_i                               global context of the title (padding masked)
    z_i = (U g + b) ⊙ (V e_i + c)                  low-rank bilinear interaction, U, V ∈ R^{r×D}
    a_i = √r · mean_k z_ik                         average-pooled over the r interaction dims, rescaled
    α   = softmax over the title's words of a_i    exp is the non-linearity; padding gets weight 0
    s   = ReLU(P Σ_i α_i e_i + p)

Why this form: mean_k (U g)_k (V e_i)_k = g^T (U^T V / r) e_i is a bilinear score between the title's
context and each word, with rank at most r, so it costs O(r·D) per word instead of O(D²). The biases add
terms linear in g and in e_i, so a word can be salient on its own (a brand, a model number) as well as
through its fit with the rest of the title. Pooling over the interaction dims yields one score per word;
the exponential of the softmax makes every weight positive and lets training sharpen or flatten the
attention freely through the scale of U and V (a tanh before the softmax would cap how peaked it can
get). At initialisation the scores are small, so attention starts near uniform: the encoder begins as a
mean of word vectors and learns which words matter.

Why √r: the r products are roughly independent, so their mean shrinks like 1/√r and so does its gradient
with respect to U and V. With the plain mean (r = 64) the scores of a trained demo model still spanned a
few hundredths: attention stayed uniform (share of attention on the generator's noise words over their
share of tokens: 0.99). Rescaled as in scaled dot-product attention, the same 6 epochs push noise words
down to 0.45 of their token share (docs/method.md, "What the attention learns").

The others serve the ablation: `mean` (masked average), `bilstm` (last states of both directions) and
`bilstm_attention` (additive attention over the bi-LSTM states).
"""
from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from sicot import storage, torchfile
from sicot.text.word2vec import Vocabulary

_REGISTRY: dict[str, Callable[..., TextEncoder]] = {}


def register(name: str):
    def wrap(cls):
        _REGISTRY[name] = cls
        return cls
    return wrap


def available() -> list[str]:
    return sorted(_REGISTRY)


def create_text_encoder(name: str, embeddings, out_dim: int, **kwargs) -> TextEncoder:
    """`embeddings`: the [V, D] starting table (numpy or tensor), row 0 = padding."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown text encoder {name!r} (known: {', '.join(available())})")
    return _REGISTRY[name](embeddings, out_dim, **kwargs)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over positions where `mask` is True; zeros elsewhere and on rows with no True at all.

    Masked scores are set to the dtype's minimum rather than -inf, so an all-padding row stays finite
    in the forward pass and in the gradient.
    """
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) * mask.to(scores.dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, L, D] over positions where mask [B, L] is True; zeros for an empty row."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class TextEncoder(nn.Module):
    """Shared parts: the trainable word table and the output projection."""

    def __init__(self, embeddings, out_dim: int, in_dim: int | None = None):
        super().__init__()
        table = torch.tensor(np.asarray(embeddings, dtype=np.float32))  # a copy: training must not edit the caller's
        self.embedding = nn.Embedding.from_pretrained(table, freeze=False, padding_idx=0)
        self.out_dim = out_dim
        self.project = nn.Sequential(nn.Linear(in_dim or table.shape[1], out_dim), nn.ReLU())


@register("mean")
class MeanEncoder(TextEncoder):
    def forward(self, tokens, mask):
        return self.project(masked_mean(self.embedding(tokens), mask)), None


@register("bilinear")
class BilinearAttentionEncoder(TextEncoder):
    def __init__(self, embeddings, out_dim: int, rank: int = 64):
        super().__init__(embeddings, out_dim)
        dim = self.embedding.embedding_dim
        self.context = nn.Linear(dim, rank)  # U, b
        self.word = nn.Linear(dim, rank)  # V, c

    def forward(self, tokens, mask):
        e = self.embedding(tokens)  # [B, L, D]
        g = masked_mean(e, mask)  # [B, D]
        z = self.context(g).unsqueeze(1) * self.word(e)  # [B, L, r]
        attention = masked_softmax(z.mean(-1) * z.shape[-1] ** 0.5, mask)  # [B, L]
        return self.project((attention.unsqueeze(-1) * e).sum(1)), attention


class _BiLSTM(TextEncoder):
    """A bi-LSTM over packed sequences, so padding never enters either direction."""

    def __init__(self, embeddings, out_dim: int, hidden: int = 128):
        super().__init__(embeddings, out_dim, in_dim=2 * hidden)
        self.lstm = nn.LSTM(self.embedding.embedding_dim, hidden, batch_first=True, bidirectional=True)

    def run(self, tokens, mask):
        """(states [B, L, 2H], last states [B, 2H]); an empty row runs one padding step (packing needs
        length >= 1): its last states are zeroed, its states are never attended to."""
        lengths = mask.sum(1)
        has_words = (lengths > 0).unsqueeze(-1)
        packed = pack_padded_sequence(self.embedding(tokens), lengths.clamp_min(1).cpu(),
                                      batch_first=True, enforce_sorted=False)
        out, (h_n, _) = self.lstm(packed)
        states, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        last = torch.cat([h_n[0], h_n[1]], dim=-1)  # forward's last word, backward's first word
        return states, last * has_words


@register("bilstm")
class BiLSTMEncoder(_BiLSTM):
    def forward(self, tokens, mask):
        _, last = self.run(tokens, mask)
        return self.project(last), None


@register("bilstm_attention")
class BiLSTMAttentionEncoder(_BiLSTM):
    def __init__(self, embeddings, out_dim: int, hidden: int = 128):
        super().__init__(embeddings, out_dim, hidden)
        self.score = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, tokens, mask):
        states, _ = self.run(tokens, mask)
        attention = masked_softmax(self.score(states).squeeze(-1), mask)
        return self.project((attention.unsqueeze(-1) * states).sum(1)), attention


ENCODER_FORMAT = "sicot.text_encoder/1"


def save_text_encoder(encoder: TextEncoder, name: str, vocab: Vocabulary, max_len: int, uri: str) -> None:
    """One file with the trained title encoder and the words its rows stand for (for inspection, e.g.
    the attention view; the deployable model never needs it)."""
    buffer = io.BytesIO()
    torch.save({"format": ENCODER_FORMAT, "name": name, "out_dim": encoder.out_dim, "max_len": max_len,
                "tokens": list(vocab.tokens), "dropped": sorted(vocab.dropped), "state_dict": encoder.state_dict()},
               buffer)
    storage.write_bytes(uri, buffer.getvalue())


def load_text_encoder(uri: str):
    """(encoder in eval mode, Vocabulary, max_len) from `save_text_encoder`'s file."""
    blob = torchfile.load(uri, "text encoder file")
    if not isinstance(blob, dict) or blob.get("format") != ENCODER_FORMAT:
        raise ValueError(f"{uri}: not a sicot text encoder file (expected format {ENCODER_FORMAT!r})")
    table = blob["state_dict"]["embedding.weight"].numpy()
    encoder = create_text_encoder(blob["name"], table, blob["out_dim"])
    encoder.load_state_dict(blob["state_dict"])
    return encoder.eval(), Vocabulary(blob["tokens"], table, blob.get("dropped", ())), blob["max_len"]
