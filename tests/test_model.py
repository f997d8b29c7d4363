import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sicot.model import backbone as backbones
from sicot.model import text_encoders
from sicot.model.classifier import ReplicatedClassifier
from sicot.model.recognizer import Recognizer, RecognizerError
from sicot.model.sicot import SICoT
from sicot.model.starting_point import StartingPointError, load_starting_point

VOCAB, WORD_DIM, OUT = 12, 6, 10


def table(seed=0):
    t = np.random.default_rng(seed).normal(size=(VOCAB, WORD_DIM)).astype(np.float32)
    t[0] = 0.0
    return t


TOKENS = torch.tensor([[2, 3, 4, 5], [6, 7, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]])  # full, short, unknown, empty


@pytest.fixture(params=text_encoders.available())
def encoder(request):
    torch.manual_seed(0)
    return text_encoders.create_text_encoder(request.param, table(), OUT).eval()


def test_encoder_shapes_and_attention(encoder):
    s, attention = encoder(TOKENS, TOKENS != 0)
    assert s.shape == (4, OUT) and torch.isfinite(s).all() and (s >= 0).all()
    if attention is not None:
        assert attention.shape == TOKENS.shape
        assert (attention[TOKENS == 0] == 0).all()
        torch.testing.assert_close(attention[:3].sum(1), torch.ones(3))
        assert attention[3].sum() == 0  # no words, no weights


def test_encoder_ignores_padding(encoder):
    s, _ = encoder(TOKENS, TOKENS != 0)
    wider = torch.cat([TOKENS, torch.zeros(4, 5, dtype=torch.long)], dim=1)
    s_wide, attention = encoder(wider, wider != 0)
    torch.testing.assert_close(s_wide, s, atol=1e-6, rtol=1e-5)
    one, _ = encoder(TOKENS[1:2, :2], TOKENS[1:2, :2] != 0)  # the short title on its own, no padding at all
    torch.testing.assert_close(one[0], s[1], atol=1e-6, rtol=1e-5)


def test_encoder_all_padding_row_has_finite_gradients(encoder):
    encoder.train()
    tokens = torch.zeros(2, 3, dtype=torch.long)
    s, _ = encoder(tokens, tokens != 0)
    s.sum().backward()
    assert torch.isfinite(s).all()
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters() if p.grad is not None)


def test_unknown_encoder_is_named():
    with pytest.raises(ValueError, match="unknown text encoder 'gru'.*bilinear"):
        text_encoders.create_text_encoder("gru", table(), OUT)


@pytest.mark.parametrize("name", backbones.available())
def test_backbones_give_features_of_their_width(name):
    model, dim = backbones.create_backbone(name)
    assert dim == {"resnet18": 512, "resnet34": 512, "resnet50": 2048}[name]
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, dim)


def test_backbone_projection_and_unknown_name():
    model, dim = backbones.create_backbone("resnet18", out_dim=128)
    assert dim == 128 and model(torch.randn(2, 3, 32, 32)).min() >= 0
    assert backbones.trunk(model) is model[0]
    with pytest.raises(backbones.BackboneError, match="unknown backbone 'vgg16'.*resnet18"):
        backbones.create_backbone("vgg16")


# --- starting points (train.backbone_weights) -----------------------------------------------------

RESNET18_IMAGENET_FILE = "resnet18-f37072fd.pth"  # the file name in torchvision's URL for IMAGENET1K_V1


def resnet18_state(seed: int) -> dict:
    """A torchvision resnet18 state_dict with its ImageNet head, as torchvision ships its weights."""
    from torchvision.models import resnet18

    torch.manual_seed(seed)
    return resnet18(weights=None).state_dict()


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """torch.hub's cache in tmp_path ($TORCH_HOME), and any download an error."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(url, *args, **kwargs):
        raise OSError(f"no network here (asked for {url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch" / "hub" / "checkpoints"


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", ["IMAGENET1K_V1", "DEFAULT"])
def test_torchvision_weights_come_from_torch_hubs_cache(offline_hub, name):
    """An offline machine pre-seeds $TORCH_HOME/hub/checkpoints/ with the file torchvision names."""
    imagenet = resnet18_state(seed=1)
    offline_hub.mkdir(parents=True)
    torch.save(imagenet, offline_hub / RESNET18_IMAGENET_FILE)
    start = load_starting_point(name, "resnet18", 64)
    backbone, _ = backbones.create_backbone("resnet18", out_dim=64)
    start.load_backbone(backbone)
    assert_same_state(backbones.trunk(backbone).state_dict(),
                      {k: v for k, v in imagenet.items() if not k.startswith("fc.")})


def test_torchvision_weights_errors_name_the_key_and_the_cache(offline_hub):
    with pytest.raises(StartingPointError, match=f"train.backbone_weights=IMAGENET1K_V1: .*not in torch.hub's "
                                                 f"cache.*{RESNET18_IMAGENET_FILE}"):
        load_starting_point("IMAGENET1K_V1", "resnet18", 512)
    with pytest.raises(StartingPointError, match="IMAGENET1K_V9: not a torchvision weights name of resnet18 "
                                                 r"\(known: IMAGENET1K_V1, DEFAULT\)"):
        load_starting_point("IMAGENET1K_V9", "resnet18", 512)


def test_a_state_dict_file_starts_the_resnet(tmp_path):
    state = resnet18_state(seed=2)
    torch.save(state, tmp_path / "r18.pt")
    start = load_starting_point(str(tmp_path / "r18.pt"), "resnet18", 128)
    backbone, _ = backbones.create_backbone("resnet18", out_dim=128)
    projection = backbone[1].weight.clone()
    start.load_backbone(backbone)
    torch.testing.assert_close(backbone[0].conv1.weight, state["conv1.weight"])
    assert torch.equal(backbone[1].weight, projection)  # the projection is not the ResNet's: it stays as built
    with pytest.raises(StartingPointError, match="do not fit the backbone"):
        load_starting_point(str(tmp_path / "r18.pt"), "resnet50", 128).load_backbone(
            backbones.create_backbone("resnet50")[0])


@pytest.mark.parametrize("spec, says", [
    ("missing.pt", "missing.pt: file not found; it accepts a torchvision weights name"),
    ("list.pt", "neither a sicot model nor a state_dict"),
])
def test_starting_point_errors_say_what_is_accepted(tmp_path, monkeypatch, spec, says):
    monkeypatch.chdir(tmp_path)
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(StartingPointError, match="train.backbone_weights") as error:
        load_starting_point(spec, "resnet18", 512)
    assert says in str(error.value) and "models:/<name>@<alias>" in str(error.value)


def test_a_previous_sicot_model_gives_its_visual_stream_and_the_rows_of_shared_skus(tmp_path):
    torch.manual_seed(0)
    backbone, dim = backbones.create_backbone("resnet18", out_dim=8)
    arch = {"backbone": "resnet18", "feature_dim": 8}
    previous = Recognizer(backbone, torch.randn(3, dim), ["A", "B", "C"], 16, arch)
    previous.save(str(tmp_path / "model.pt"))

    start = load_starting_point(str(tmp_path / "model.pt"), "resnet18", 8)
    fresh, _ = backbones.create_backbone("resnet18", out_dim=8)
    start.load_backbone(fresh)
    assert_same_state(fresh.state_dict(), backbone.state_dict())
    classifier = ReplicatedClassifier(8, 4, seed=3)
    untouched = classifier.weight.detach().clone()
    assert start.load_classifier_rows(classifier, ["C", "NEW1", "A", "NEW2"]) == 2
    assert torch.equal(classifier.weight[0], previous.weight[2])
    assert torch.equal(classifier.weight[2], previous.weight[0])
    assert torch.equal(classifier.weight[1], untouched[1]) and torch.equal(classifier.weight[3], untouched[3])
    assert "2 of 4 SKUs" in start.describe(["C", "NEW1", "A", "NEW2"])

    with pytest.raises(StartingPointError, match="a sicot model of resnet18 with feature_dim 8, but this run trains "
                                                 "resnet18 with feature_dim 512; set train.backbone=resnet18 and "
                                                 "train.feature_dim=8"):
        load_starting_point(str(tmp_path / "model.pt"), "resnet18", 512)


def test_logits_dtype_holds_inside_autocast():
    clf = ReplicatedClassifier(4, 3)
    features = torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert clf.logits(features).dtype == torch.bfloat16  # follows the autocast
        clf.logits_dtype = torch.float32
        assert clf.logits(features).dtype == torch.float32
    torch.testing.assert_close(clf.logits(features), features @ clf.weight.t())


# --- losses against hand computation --------------------------------------------------------------

W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # 3 classes, d = 2


def ce(logits, label):
    return -logits[label] + math.log(sum(math.exp(z) for z in logits))


def classifier():
    clf = ReplicatedClassifier(2, 3)
    with torch.no_grad():
        clf.weight.copy_(W)
    return clf


def test_classifier_loss_mask_and_logit_adjustment_by_hand():
    clf = classifier()
    v = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0]])
    labels = torch.tensor([0, 2, 1])
    rows = [[2.0, 0.0, 2.0], [0.0, 1.0, 1.0], [1.0, 3.0, 4.0]]  # W v by hand
    expected = [ce(r, y) for r, y in zip(rows, labels.tolist())]
    assert clf.loss(v, labels).item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    mask = torch.tensor([True, False, True])
    assert clf.loss(v, labels, mask).item() == pytest.approx((expected[0] + expected[2]) / 2, rel=1e-6)
    assert clf.loss(v, labels, torch.zeros(3, dtype=torch.bool)).item() == 0.0
    log_prior = torch.tensor([0.5, 0.3, 0.2]).log()
    adjusted = [[z + 2.0 * p for z, p in zip(r, log_prior.tolist())] for r in rows]
    expected_la = sum(ce(r, y) for r, y in zip(adjusted, labels.tolist())) / 3
    assert clf.loss(v, labels, log_prior=log_prior, tau=2.0).item() == pytest.approx(expected_la, rel=1e-6)
    scores, idx = clf.topk(v, 2)  # prediction is never adjusted
    assert idx.tolist() == [[0, 2], [1, 2], [2, 1]]
    torch.testing.assert_close(scores[:, 0], torch.softmax(torch.tensor(rows), 1).max(1).values)


class FixedTitles(nn.Module):
    """A text encoder whose output is given: s for each row."""

    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, tokens, mask):
        return self.s, None


def test_sicot_loss_by_hand_with_an_empty_title():
    v = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0]])
    s = torch.tensor([[0.0, 3.0], [1.0, 0.5], [5.0, 0.0]])
    labels = torch.tensor([0, 2, 1])
    tokens = torch.tensor([[4, 5], [0, 0], [3, 0]])  # the second product has an empty title
    baseline = SICoT(nn.Identity(), 2, classifier())
    loss, parts = baseline.training_loss(v, labels, tokens)
    visual = sum(ce(r, y) for r, y in zip((W @ v.T).T.tolist(), labels.tolist())) / 3
    assert loss.item() == pytest.approx(visual, rel=1e-6) and "cotrain" not in parts

    model = SICoT(nn.Identity(), 2, classifier(), FixedTitles(s), cotrain_weight=0.5)
    loss, parts = model.training_loss(v, labels, tokens)
    mixed = torch.maximum(v, s)  # [[2, 3], [1, 1], [5, 3]]
    mixed_ce = [ce(r, y) for r, y in zip((W @ mixed.T).T.tolist(), labels.tolist())]
    cotrain = (mixed_ce[0] + mixed_ce[2]) / 2  # the empty title is left out of the mixed term
    assert parts["cotrain"].item() == pytest.approx(cotrain, rel=1e-6)
    assert loss.item() == pytest.approx(visual + 0.5 * cotrain, rel=1e-6)

    la, _ = model.training_loss(v, labels, tokens, log_prior=torch.tensor([0.6, 0.3, 0.1]).log(), tau=1.0)
    assert la.item() != pytest.approx(loss.item())


# --- the deployable recognizer ----------------------------------------------------------------------

def png(mode, size=(20, 14)):
    rng = np.random.default_rng(1)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    else:
        channels = {"L": 1, "RGBA": 4, "RGB": 3}[mode]
        shape = (*size[::-1], channels) if channels > 1 else size[::-1]
        img = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def recognizer():
    torch.manual_seed(0)
    backbone, dim = backbones.create_backbone("resnet18")
    return Recognizer(backbone, torch.randn(3, dim), ["a", "b", "c"], 16,
                      {"backbone": "resnet18", "feature_dim": dim}).eval()


def test_recognizer_takes_grayscale_rgba_and_16_bit_uploads(recognizer):
    batch = recognizer.prepare([png("L"), png("RGBA"), png("I;16"), png("RGB")])
    assert batch.shape == (4, 3, 16, 16)
    with torch.no_grad():
        logits, features = recognizer(batch), recognizer.embed(batch)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    torch.testing.assert_close(features.norm(dim=1), torch.ones(4))
    scores, idx = recognizer.topk(batch, 5)  # k larger than the class count is capped
    assert idx.shape == (4, 3)


def test_recognizer_round_trip(recognizer, tmp_path):
    recognizer.save(str(tmp_path / "model.pt"))
    loaded = Recognizer.load(str(tmp_path / "model.pt"))
    batch = recognizer.prepare([png("RGB")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), recognizer(batch))
    assert loaded.classes == ["a", "b", "c"] and loaded.image_size == 16


def test_recognizer_refuses_other_files(recognizer, tmp_path):
    path = tmp_path / "model.pt"
    recognizer.save(str(path))
    blob = torch.load(path, weights_only=True)
    blob["arch"] = {"backbone": "resnet34", "feature_dim": 512}  # the weights are a resnet18's
    torch.save(blob, path)
    with pytest.raises(RecognizerError, match="do not fit the architecture.*resnet34"):
        Recognizer.load(str(path))
    torch.save({"format": "sicot.checkpoint/1", "model": {}}, tmp_path / "checkpoint.pt")
    with pytest.raises(RecognizerError, match="not a sicot recognizer"):
        Recognizer.load(str(tmp_path / "checkpoint.pt"))
    with pytest.raises(RecognizerError, match="not found"):
        Recognizer.load(str(tmp_path / "none.pt"))


def test_cotrain_weight_ramps_up_from_zero():
    from sicot.model.sicot import CoTraining

    ramp = CoTraining(weight=2.0, rampup=4)
    assert [ramp.weight_at(e) for e in range(6)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert [CoTraining(weight=1.0, rampup=0).weight_at(e) for e in range(3)] == [1.0, 1.0, 1.0]


def test_mixed_loss_has_no_weight_before_the_ramp_starts():
    from sicot.model.sicot import CoTraining

    torch.manual_seed(0)
    model = SICoT(nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.ReLU()), 4, ReplicatedClassifier(4, 3),
                  text_encoders.create_text_encoder("mean", np.random.rand(6, 5).astype("float32"), 4),
                  cotraining=CoTraining(weight=1.0, rampup=2))
    images, labels = torch.randn(2, 3, 2, 2), torch.tensor([0, 2])
    tokens = torch.tensor([[2, 3], [4, 0]])
    model.start_epoch(0)
    loss, parts = model.training_loss(images, labels, tokens)
    assert torch.allclose(loss, parts["visual"])
    model.start_epoch(1)
    loss, parts = model.training_loss(images, labels, tokens)
    assert torch.allclose(loss, parts["visual"] + 0.5 * parts["cotrain"])
