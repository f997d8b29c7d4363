"""What SICoT's title stream attends to: each word's attention weight, how much of it lands on noise
words, and the Fig. 7-style HTML view.

Noise words are the promotional or irrelevant words a seller may add to a title (the demo world lists
the ones it inserts as `noise_words` in world.json). Titles are read as the encoder reads them
(`Vocabulary.words`). A token is noise when its text is a noise word or one of the tokens the tokenizer
makes of a noise word alone: "2024新款" gives "2024" and "新款", "free shipping" gives "free" and
"shipping". A noise word glued to a product word ("洗发水折扣") is found wherever jieba cuts the run at
the boundary; a token that straddles it counts as a product word. The rule goes by text alone, so a noise
word that also names products (经典 in "经典洗发水") counts as noise there too.

The noise ratio covers the titles that hold both noise and other tokens, the only ones where attention
has a choice:
    mass   = mean over those titles of the attention weight on noise tokens
    tokens = mean over those titles of the share of their tokens that are noise
    ratio  = mass / tokens
Uniform attention puts `tokens` of each title's mass on noise, so the ratio is exactly 1.0; below 1,
attention pushes noise down. (Titles without noise would add zero to both sums and all-noise titles one
to both, pulling the ratio toward 1 whatever the attention does.)
"""
from __future__ import annotations

import html
import json
import unicodedata
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sicot import storage
from sicot.text.word2vec import UNK

# (word, attention weight, known to the vocabulary) for each word the encoder reads in a title
WordWeights = list[tuple[str, float, bool]]
NOISE_METRICS = ("attention_noise_ratio", "attention_noise_mass", "attention_noise_tokens", "attention_noise_titles")


@dataclass(frozen=True)
class NoiseAttention:
    ratio: float  # mass / tokens: 1.0 = attention blind to noise, lower = noise pushed down
    mass: float  # mean attention weight on noise tokens per title
    tokens: float  # mean share of noise tokens per title
    titles: int  # titles holding both noise and other tokens

    def metrics(self) -> dict:
        return dict(zip(NOISE_METRICS, (self.ratio, self.mass, self.tokens, self.titles), strict=True))


def load_noise_words(raw_dir: str) -> list[str] | None:
    """`noise_words` of the demo world generated into `raw_dir` (world.json); None when there is none."""
    uri = storage.join(raw_dir, "world.json")
    if not storage.exists(uri):
        return None
    try:
        world = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{uri}: not valid JSON: {exc}") from None
    words = world.get("noise_words") if isinstance(world, dict) else None
    if words is not None and not (isinstance(words, list) and all(isinstance(w, str) and w.strip() for w in words)):
        raise ValueError(f"{uri}: noise_words must be a list of non-empty strings")
    return words


def noise_tokens(noise_words: Iterable[str]) -> frozenset[str]:
    """The token texts that count as noise: each noise word as a token would read (NFKC, lower case)
    and the tokens it splits into."""
    from sicot.text.tokenize import tokenize

    return frozenset(token for word in noise_words
                     for token in (unicodedata.normalize("NFKC", word).lower(), *tokenize(word)))


def noise_attention(titles: Iterable[WordWeights], noise: Collection[str]) -> NoiseAttention | None:
    """The noise ratio (module docstring) of titles' word weights, `noise` from `noise_tokens`; None when
    no title holds both noise and other tokens."""
    masses, shares = [], []
    for words in titles:
        is_noise = [word in noise for word, _, _ in words]
        if any(is_noise) and not all(is_noise):
            masses.append(sum(weight for (_, weight, _), n in zip(words, is_noise, strict=True) if n))
            shares.append(sum(is_noise) / len(is_noise))
    if not masses:
        return None
    mass, share = float(np.mean(masses)), float(np.mean(shares))
    return NoiseAttention(ratio=mass / share, mass=mass, tokens=share, titles=len(masses))


@torch.no_grad()
def word_attention(encoder, vocab, max_len: int, titles: Sequence[str], batch_size: int = 256) -> list[WordWeights]:
    """Per title, its words with their attention weights, in title order; [] for a title without words
    or an encoder without word attention (e.g. `mean`)."""
    device = next(encoder.parameters()).device
    words = [vocab.words(title, max_len) for title in titles]
    out: list[WordWeights] = []
    for start in range(0, len(words), batch_size):
        chunk = words[start:start + batch_size]
        lengths = torch.tensor([len(w) for w in chunk])
        ids = torch.zeros((len(chunk), max(1, int(lengths.max()))), dtype=torch.long)
        for row, title_words in enumerate(chunk):
            ids[row, :len(title_words)] = torch.tensor(vocab.ids(title_words), dtype=torch.long)
        mask = torch.arange(ids.shape[1]) < lengths[:, None]
        _, attention = encoder(ids.to(device), mask.to(device))
        if attention is None:
            return [[] for _ in titles]
        known = (ids != UNK).tolist()
        out += [list(zip(w, a[:len(w)], k[:len(w)], strict=True))
                for w, a, k in zip(chunk, attention.float().cpu().tolist(), known, strict=True)]
    return out


def measure_noise_attention(encoder, vocab, max_len: int, titles: Sequence[str],
                            noise_words: Iterable[str]) -> NoiseAttention | None:
    """The noise ratio of a title encoder with word attention over `titles` (e.g. the test split's)."""
    return noise_attention(word_attention(encoder, vocab, max_len, titles), noise_tokens(noise_words))


def attention_html(samples: list[tuple[str, str, WordWeights]], noise: Collection[str] = frozenset(),
                   summary: NoiseAttention | None = None) -> str:
    """Fig. 7-style view: each title's words ordered by attention, top-3 and bottom-3 marked, noise words
    (tokens in `noise`) underlined, and the noise ratio stated first when `noise` is given."""
    css = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{padding:.4em .6em;"
           "border-bottom:1px solid #ddd;vertical-align:top}.w{display:inline-block;margin:.1em .2em;"
           "padding:.1em .4em;border-radius:.3em;background:#eee}.top{background:#9be39b;font-weight:bold}"
           ".bottom{background:#f4b6b6}.unk{font-style:italic}.noise{text-decoration:underline dotted #a00 2px;"
           "text-underline-offset:.25em}small{color:#555}")
    rows = []
    for sku, title, words in samples:
        ranked = sorted(words, key=lambda w: -w[1])
        cells = []
        for rank, (word, weight, known) in enumerate(ranked):
            kind = "top" if rank < 3 else "bottom" if rank >= max(3, len(ranked) - 3) else ""
            kind += "" if known else " unk"
            kind += " noise" if word in noise else ""
            cells.append(f'<span class="w {kind.strip()}">{html.escape(word)} <small>{weight:.2f}</small></span>')
        rows.append(f"<tr><td>{html.escape(sku)}</td><td>{html.escape(title)}</td><td>{''.join(cells)}</td></tr>")
    legend = ("<p>Words of each test title ordered by attention weight: <span class=\"w top\">top 3</span> "
              "<span class=\"w bottom\">bottom 3</span> <span class=\"w unk\">not in the vocabulary</span>"
              + (" <span class=\"w noise\">noise word</span>" if noise else "") + "</p>")
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>SICoT word attention</title>"
            f"<style>{css}</style></head><body><h1>Word attention of the title stream</h1>"
            + (_noise_summary(summary) if noise else "") + legend
            + "<table><tr><th>SKU</th><th>title</th><th>words by attention</th></tr>"
            + "\n".join(rows) + "</table></body></html>\n")


def _noise_summary(summary: NoiseAttention | None) -> str:
    if summary is None:
        return "<p class=\"noise-ratio\">Noise ratio: no test title holds both noise and other words.</p>"
    return (f"<p class=\"noise-ratio\"><b>Noise ratio {summary.ratio:.2f}</b>: noise words hold "
            f"{summary.mass:.1%} of the attention and make up {summary.tokens:.1%} of the words, averaged over "
            f"the {summary.titles} test titles that mix noise and other words (1.00 = attention blind to "
            "noise; lower = noise pushed down).</p>")


def attention_report(encoder_uri: str, records, samples: int,
                     noise_words: Iterable[str] | None = None) -> tuple[str | None, NoiseAttention | None]:
    """(the attention view of `samples` titles spread evenly over `records`, the noise ratio over all of
    them when `noise_words` are given); the view is None for an encoder without word attention."""
    from sicot.model.text_encoders import load_text_encoder

    encoder, vocab, max_len = load_text_encoder(encoder_uri)
    titled = [r for r in records if r.title.strip()]
    attention = word_attention(encoder, vocab, max_len, [r.title for r in titled])
    noise = noise_tokens(noise_words) if noise_words is not None else frozenset()
    summary = noise_attention(attention, noise) if noise_words is not None else None
    spread = np.linspace(0, len(titled) - 1, min(samples, len(titled))).astype(int) if titled else []
    views = [(titled[i].sku, titled[i].title, attention[i]) for i in spread if attention[i]]
    return (attention_html(views, noise, summary) if views else None), summary
