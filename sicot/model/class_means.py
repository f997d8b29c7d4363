"""Class means as the classifier (`train.classifier_rows: class_means`): each class's row of the exported
W is the mean of its training photos' L2-normalised features, scaled to the trained rows' mean norm.

A trained W's tail rows are biased toward the head (the softmax sees a head class's photos thousands of
times, a tail class's a few); a class mean is one vote per photo, whatever the class size, so every
class counts the same. Ranking by `f · mean_c` is the nearest class mean by cosine (a feature's norm is
the same for every class), so the export stays an ordinary linear classifier; the scale only keeps the
softmax's temperature that of the trained rows. Measured in docs/method.md ("Class prototypes").

Collective over the training group: each rank reads a disjoint part of the training photos, the batches
are gathered, and each rank sums the features of the classes whose rows it holds, so a class-sharded W
stays sharded. A class without training photos (a catalogue-only SKU) keeps its trained row. The same pass
takes the sums of title-word rows (`train.classifier_rows: title_words`, sicot.model.title_words).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sicot.model.title_words import TitleWordSums
from sicot.parallel.dist import all_gather_rows, gather_sizes


@torch.no_grad()
def class_feature_sums(features_of: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[tuple],
                       class_range: tuple[int, int], dim: int, device: torch.device, group=None,
                       words: TitleWordSums | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums [hi - lo, dim] of L2-normalised features, photo counts [hi - lo]) for this rank's classes
    [lo, hi), over the (images, labels) batches of every rank; ranks may hold different numbers of batches.
    With `words`, batches are (images, labels, title token ids [n, <= words.title_len]) and `words` takes
    its sums too."""
    lo, hi = class_range
    sums = torch.zeros(hi - lo, dim, device=device)  # float32: as large as this rank's rows of W, no more
    counts = torch.zeros(hi - lo, dtype=torch.int64, device=device)
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    batches = iter(batches)
    while True:
        batch = next(batches, None)
        if batch is None:
            features, labels = torch.zeros(0, dim, device=device), torch.zeros(0, dtype=torch.int64, device=device)
            tokens = torch.zeros(0, words.title_len, dtype=torch.int64, device=device) if words else None
        else:
            features = F.normalize(features_of(batch[0]).float(), dim=-1)
            labels = batch[1].to(device)
            tokens = F.pad(batch[2].to(device), (0, words.title_len - batch[2].shape[1])) if words else None
            if words:
                words.add_photos(features, labels, tokens)
        if world > 1:  # every rank steps until the last one has no batch left
            sizes = gather_sizes(labels.shape[0], device, group)
            if not any(sizes):
                break
            features, labels = all_gather_rows(features, sizes, group), all_gather_rows(labels, sizes, group)
            tokens = all_gather_rows(tokens, sizes, group) if words else None
        elif batch is None:
            break
        if words:
            words.add_titles(labels, tokens)
        mine = (labels >= lo) & (labels < hi)
        rows = labels[mine] - lo
        sums.index_add_(0, rows, features[mine])
        counts += torch.bincount(rows, minlength=hi - lo)
    return sums, counts


def class_mean_rows(trained: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, group=None,
                    attributes: torch.Tensor | None = None, weight: float = 0.0) -> torch.Tensor:
    """This rank's exported rows: each class's normalised mean (plus `weight` x its title words' `attributes`,
    sicot.model.title_words) at the mean norm of all trained rows (over every rank's), or its trained row
    where it has no photos."""
    norms = torch.stack([trained.norm(dim=1).double().sum(), trained.new_tensor(trained.shape[0]).double()])
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(norms, group=group)
    scale = norms[0] / norms[1].clamp_min(1)
    means = F.normalize(sums, dim=1)
    if attributes is not None:
        means = means + weight * attributes
    means = means * scale.float()
    return torch.where((counts > 0)[:, None], means.to(trained.dtype), trained)
