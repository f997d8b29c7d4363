"""Title words read as visual attributes (`train.classifier_rows: title_words`): each class's row is its
class mean plus what its title's words look like.

Every title word gets a linear detector on the L2-normalised visual features: the class-balanced ridge
regression of "this photo's title holds the word" on the photo's feature (each class weighs the same, as in
its class mean). A word on thousands of head photos ("柠檬", "red") gets a detector those photos taught, and a
tail product whose titles hold it inherits it. A class's row is its normalised mean plus `weight` times the
idf-weighted sum of its title words' detectors, scaled so that `weight` is that sum's norm against the unit
mean's. The export stays an ordinary linear classifier: serving and the index do not change. Measured in
docs/method.md ("Where the tail's errors go, and title words as visual attributes").

One pass, streamed, sharded like W. Sums over photos (the weighted Gram matrix G [d, d], each word's weighted
feature sum A [V, d], its weight ȳ [V] and the mean feature μ) are taken over each rank's own photos and
all-reduced; the words of each class's titles stay with the rank that holds its row. The detectors are the
closed form U = (A - ȳμᵀ)(G - μμᵀ + λI)⁻¹, and only T·U, the classes' rows, is ever formed (T: the classes'
idf-weighted words). A is the largest buffer: V x d floats on each rank, 0.8 GB at 10⁵ words and d = 2048.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from sicot.text.word2vec import UNK

# λ as a share of the features' mean variance tr(G) / d (docs/method.md: 0.01 to 1 measured).
RIDGE = 0.1
# Pending (class, word) pairs merged into the running counts at this many, bounding memory between merges.
MERGE_PAIRS = 1 << 20


def held_words(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(photo, word) for each distinct word of each photo's title in `tokens` [n, L] (padding and unknown
    words are no words)."""
    ids = tokens.sort(dim=1).values
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    photo, column = torch.nonzero(first & (ids > UNK), as_tuple=True)
    return photo, ids[photo, column]


class TitleWordSums:
    """The running sums of one rank. `photo_counts` [C]: every class's training photos (the same on every
    rank); `class_range`: the classes whose rows this rank holds."""

    def __init__(self, photo_counts: torch.Tensor, class_range: tuple[int, int], vocab_size: int, title_len: int,
                 dim: int, device: torch.device, ridge: float = RIDGE):
        self.counts = photo_counts.to(device, torch.float64)
        self.classes = int((self.counts > 0).sum())
        self.photo_weight = torch.where(self.counts > 0, 1 / (self.classes * self.counts), 0).float()
        self.lo, self.hi = class_range
        self.ridge = ridge
        self.vocab_size, self.title_len = vocab_size, title_len  # token ids per title, padded (ranks gather them)
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.word_sums = torch.zeros(vocab_size, dim, device=device)
        self.word_weights = torch.zeros(vocab_size, dtype=torch.float64, device=device)
        self.keys = torch.zeros(0, dtype=torch.int64, device=device)  # (class - lo) * V + word
        self.holding = torch.zeros(0, dtype=torch.float64, device=device)  # titles of the class holding the word
        self.pending: list[torch.Tensor] = []

    def add_photos(self, unit: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor) -> None:
        """This rank's own photos: normalised features [n, d], labels [n], title token ids [n, L]."""
        weight = self.photo_weight[labels]
        weighted = unit * weight[:, None]
        self.gram += (weighted.t() @ unit).double()
        self.mean += weighted.sum(0).double()
        photo, word = held_words(tokens)
        self.word_sums.index_add_(0, word, weighted[photo])
        self.word_weights.index_add_(0, word, weight[photo].double())

    def add_titles(self, labels: torch.Tensor, tokens: torch.Tensor) -> None:
        """Every rank's photos (gathered): the words of the titles of this rank's classes."""
        mine = (labels >= self.lo) & (labels < self.hi)
        photo, word = held_words(tokens[mine])
        self.pending.append((labels[mine][photo] - self.lo) * self.vocab_size + word)
        if sum(len(k) for k in self.pending) >= MERGE_PAIRS:
            self._merge()

    def _merge(self) -> None:
        keys = torch.cat([self.keys, *self.pending])
        counts = torch.cat([self.holding, *(k.new_ones(len(k), dtype=torch.float64) for k in self.pending)])
        self.keys, inverse = torch.unique(keys, return_inverse=True)
        self.holding = counts.new_zeros(len(self.keys)).index_add_(0, inverse, counts)
        self.pending = []

    @torch.no_grad()
    def attribute_rows(self, group=None) -> torch.Tensor:
        """[hi - lo, d]: each of this rank's classes' idf-weighted sum of its title words' detectors, scaled to
        a mean norm of 1 over the classes that have words (rows of classes without words are 0); collective.
        Once: it centres the word sums in place rather than hold a second V x d buffer."""
        self._merge()
        reduce = dist.is_initialized() and dist.get_world_size(group) > 1
        rows, words = self.keys // self.vocab_size, self.keys % self.vocab_size
        classes_holding = torch.bincount(words, minlength=self.vocab_size).double()
        if reduce:
            for total in (self.gram, self.mean, self.word_sums, self.word_weights, classes_holding):
                dist.all_reduce(total, group=group)
        # T: the share of the class's titles holding the word times its idf over classes (a word every
        # product has weighs nothing), each class's weights summing to 1.
        idf = torch.log(self.classes / classes_holding.clamp_min(1))
        values = self.holding / self.counts[self.lo:self.hi][rows] * idf[words]
        totals = values.new_zeros(self.hi - self.lo).index_add_(0, rows, values)
        values = values / totals[rows].clamp_min(1e-12)
        looks = torch.sparse_coo_tensor(torch.stack([rows, words]), values.float(),
                                        (self.hi - self.lo, self.vocab_size), check_invariants=True).coalesce()
        self.word_sums -= self.word_weights[:, None].float() * self.mean[None].float()  # centred, in place
        covariance = self.gram - torch.outer(self.mean, self.mean)
        ridge = self.ridge * covariance.diagonal().sum() / covariance.shape[0]
        covariance += ridge * torch.eye(covariance.shape[0], dtype=covariance.dtype, device=covariance.device)
        attributes = torch.linalg.solve(covariance, torch.sparse.mm(looks, self.word_sums).t().double()).t().float()
        norms = attributes.norm(dim=1)
        scale = torch.stack([norms.double().sum(), (norms > 0).sum().double()])
        if reduce:
            dist.all_reduce(scale, group=group)
        return attributes / (scale[0] / scale[1].clamp_min(1)).clamp_min(1e-12).float()
