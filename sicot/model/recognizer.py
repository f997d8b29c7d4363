"""The deployable model: images in, SKU scores out. Titles are a training-time aid only.

model.pt holds everything needed to rebuild it: the architecture (backbone name, feature size), the
input size, the class list (index -> SKU) and the weights. The classifier W [C, d] sits in model.pt
(FORMAT, written by one process), or, for a model trained with a class-sharded classifier, in one file
per rank beside it (SHARDED_FORMAT; `save_sharded`, `sicot.model.classifier_rows`), so no process ever
gathers W. Loading checks the file is a recognizer and that the weights fit the architecture it names,
and says which of the two failed.

`max_classifier_mb` bounds the memory W takes in a process: a W that fits is loaded whole and scored
as one matrix; a larger one stays in its files and is scored a block of rows at a time
(`sicot.model.block_topk`), with the same top-k. `python -m sicot.model.consolidate` turns a sharded
model into one file.
"""
from __future__ import annotations

import io
import uuid
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sicot import storage
from sicot.data.images import decode_image, to_tensor
from sicot.model.backbone import create_backbone
from sicot.model.block_topk import block_rows, blockwise_topk
from sicot.model.classifier_rows import (
    ClassifierRows,
    RowFile,
    local_path,
    save_shard,
    sharded_rows,
    sibling,
)
from sicot.torchfile import TorchFileError, load_mapped

FORMAT = "sicot.recognizer/1"  # W inside model.pt
SHARDED_FORMAT = "sicot.recognizer-sharded/1"  # W in classifier shard files beside model.pt
MB = 2**20


class RecognizerError(ValueError):
    pass


class Recognizer(nn.Module):
    """`arch` = {"backbone": name, "feature_dim": d}: how `load` rebuilds the backbone module.

    `weight`: W [C, d] in memory, or `ClassifierRows` read block by block, `max_classifier_mb` at a time.
    """

    def __init__(self, backbone: nn.Module, weight: torch.Tensor | ClassifierRows, classes: Sequence[str],
                 image_size: int, arch: dict, max_classifier_mb: float | None = None):
        super().__init__()
        stored = weight if isinstance(weight, ClassifierRows) else None
        rows = stored.num_classes if stored is not None else weight.shape[0]
        if rows != len(classes):
            raise RecognizerError(f"classifier has {rows} rows but {len(classes)} classes")
        self.backbone = backbone
        self.register_buffer("weight", None if stored is not None else weight.detach().float().clone())
        self.stored_weight = stored
        self.max_classifier_bytes = None if max_classifier_mb is None else int(max_classifier_mb * MB)
        self.classes = list(classes)
        self.image_size = int(image_size)
        self.arch = {"backbone": arch["backbone"], "feature_dim": int(arch["feature_dim"])}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] for normalised images [B, 3, S, S]; W must be in memory (`topk` works either way)."""
        if self.weight is None:
            raise RecognizerError("the classifier is read block by block (over max_classifier_mb): "
                                  "ask for topk, or load the model without a limit")
        return self.backbone(images) @ self.weight.t()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised visual features [B, d], for similarity search."""
        return F.normalize(self.backbone(images), dim=-1)

    def prepare(self, images: Sequence[bytes], max_pixels: int | None = None) -> torch.Tensor:
        """Encoded uploads (any mode: grayscale, palette, RGBA, 16-bit...) to the model's input batch,
        decoded and normalised exactly as in training."""
        return torch.stack([to_tensor(decode_image(data, max_pixels=max_pixels), self.image_size)
                            for data in images])

    @torch.no_grad()
    def topk(self, images: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, class indices) [B, k], best first."""
        return self.topk_of_features(self.backbone(images), k)

    @torch.no_grad()
    def topk_and_embed(self, images: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`topk` and `embed` from one backbone pass: (probabilities, class indices, features)."""
        features = self.backbone(images)
        scores, classes = self.topk_of_features(features, k)
        return scores, classes, F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def topk_of_features(self, features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, class indices) [B, k] of the softmax over all classes for backbone features."""
        if self.weight is not None:
            probs = torch.softmax((features @ self.weight.t()).float(), dim=-1)
            return probs.topk(min(k, len(self.classes)), dim=-1)
        rows = block_rows(self.max_classifier_bytes, features.shape[1], features.shape[0])
        return blockwise_topk(features, self.stored_weight.blocks(rows), k, len(self.classes))

    def save(self, uri: str) -> None:
        """One file (FORMAT) holding W: only for a W in memory."""
        if self.weight is None:
            raise RecognizerError(f"{uri}: the classifier is read block by block; load the model without "
                                  "max_classifier_mb to write it as one file")
        buffer = io.BytesIO()
        torch.save({"format": FORMAT, "arch": self.arch, "image_size": self.image_size,
                    "classes": self.classes, "state_dict": self.state_dict()}, buffer)
        storage.write_bytes(uri, buffer.getvalue())

    @classmethod
    def load(cls, uri: str, map_location: str | torch.device = "cpu",
             max_classifier_mb: float | None = None) -> Recognizer:
        """The model at `uri`; W loaded whole unless it is larger than `max_classifier_mb` (None: no limit)."""
        if not storage.exists(uri):
            raise RecognizerError(f"{uri}: model file not found")
        try:
            path, downloads = local_path(uri, None)
            blob = load_mapped(path, "model file", uri)  # W's pages are read only if W is loaded whole
            if not is_saved_recognizer(blob):
                found = blob.get("format", "no format tag") if isinstance(blob, dict) else type(blob).__name__
                raise RecognizerError(f"{uri}: not a sicot recognizer (expected format {FORMAT!r} or "
                                      f"{SHARDED_FORMAT!r}, found {found!r})")
            return cls.from_saved(blob, uri, max_classifier_mb, path, downloads).to(map_location)
        except TorchFileError as exc:
            raise RecognizerError(str(exc)) from None

    @classmethod
    def from_saved(cls, blob: dict, uri: str, max_classifier_mb: float | None = None, mapped: str | None = None,
                   downloads=None) -> Recognizer:
        """The model in `save`'s or `save_sharded`'s contents, already read from `uri` (named in errors;
        shards are found beside it). `mapped`: the local copy of a one-file model, from which its W is
        re-read block by block when over `max_classifier_mb` (without it such a W is loaded whole);
        `downloads`: the temporary directory that copy lives in."""
        arch, state = blob["arch"], blob["state_dict"]
        backbone, dim = create_backbone(arch["backbone"], out_dim=arch["feature_dim"])
        limit = None if max_classifier_mb is None else max_classifier_mb * MB
        if blob["format"] == SHARDED_FORMAT:
            try:
                weight = sharded_rows(uri, blob["classifier"], len(blob["classes"]), dim)
                if limit is None or weight.nbytes <= limit:
                    weight = weight.load()
                    state = state | {"weight": weight}
            except TorchFileError as exc:
                raise RecognizerError(str(exc)) from None
        else:
            weight = state.get("weight")
            if weight is None or weight.ndim != 2 or weight.shape[1] != dim:
                shape = None if weight is None else tuple(weight.shape)
                raise RecognizerError(f"{uri}: classifier weight {shape} does not fit {arch['backbone']} "
                                      f"features of size {dim}")
            if limit is not None and weight.numel() * 4 > limit and mapped is not None:
                weight = ClassifierRows([RowFile(mapped, 0, weight.shape[0], ("state_dict", "weight"))], dim,
                                        downloads)
                state = {k: v for k, v in state.items() if k != "weight"}
        model = cls(backbone, weight, blob["classes"], blob["image_size"], arch, max_classifier_mb)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).splitlines()[1:4]
            raise RecognizerError(f"{uri}: weights do not fit the architecture the file names "
                                  f"({arch['backbone']}, feature_dim {arch['feature_dim']}): "
                                  + " ".join(line.strip() for line in first)) from None
        return model.eval()


def is_saved_recognizer(blob) -> bool:
    """Whether the contents of a torch file are a `Recognizer.save` or `save_sharded`."""
    return isinstance(blob, dict) and blob.get("format") in (FORMAT, SHARDED_FORMAT)


def save_sharded(uri: str, backbone: nn.Module, rows: torch.Tensor, start: int, classes: Sequence[str],
                 image_size: int, arch: dict, group=None) -> list[str]:
    """Collective over `group`: every rank writes its rows [start, start + len(rows)) of W beside `uri`
    (`model-classifier-<rank>-of-<N>.pt`), then rank 0 writes model.pt naming them, as the last write.
    Returns the files written: on rank 0 model.pt and every shard, on the others their own shard."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    export = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(export, src=dist.get_global_rank(group or dist.group.WORLD, 0), group=group)
    entry = save_shard(uri, rows, start, rank, world, export[0])
    entries = [None] * world if rank == 0 else None
    dist.gather_object(entry, entries, dst=dist.get_global_rank(group or dist.group.WORLD, 0), group=group)
    if rank != 0:
        return [sibling(uri, entry["file"])]
    arch = {"backbone": arch["backbone"], "feature_dim": int(arch["feature_dim"])}
    buffer = io.BytesIO()
    torch.save({"format": SHARDED_FORMAT, "arch": arch, "image_size": int(image_size), "classes": list(classes),
                "state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                "classifier": {"export": export[0], "world_size": world, "shards": entries}}, buffer)
    storage.write_bytes(uri, buffer.getvalue())
    return [uri] + [sibling(uri, e["file"]) for e in entries]


def classifier_files(uri: str) -> list[str]:
    """The classifier shard files a model at `uri` is made of besides itself (none for one file)."""
    path, downloads = local_path(uri, None)  # a copy of an S3 model.pt, deleted with `downloads`
    blob = load_mapped(path, "model file", uri)
    shards = blob["classifier"]["shards"] if is_saved_recognizer(blob) and blob["format"] == SHARDED_FORMAT else []
    return [sibling(uri, e["file"]) for e in shards]
