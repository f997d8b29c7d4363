import json

import numpy as np
import pytest
import torch
from torch import nn

from sicot.attention import (
    NoiseAttention,
    attention_html,
    load_noise_words,
    measure_noise_attention,
    noise_attention,
    noise_tokens,
    word_attention,
)
from sicot.text.word2vec import PAD_TOKEN, UNK_TOKEN, Vocabulary

NOISE = frozenset({"包邮", "折扣"})


def weights(*pairs):
    return [(word, weight, True) for word, weight in pairs]


def test_noise_ratio_by_hand():
    titles = [
        weights(("精华液", 0.4), ("包邮", 0.1), ("雅诗兰黛", 0.4), ("折扣", 0.1)),  # noise: 0.2 of the mass, 2/4 words
        weights(("面霜", 0.9), ("包邮", 0.1)),  # 0.1 of the mass, 1 of 2 words
        weights(("面霜", 1.0)),  # no noise: attention has no choice to make
        weights(("包邮", 0.5), ("折扣", 0.5)),  # nothing but noise: neither
        [],
    ]
    found = noise_attention(titles, NOISE)
    assert found.titles == 2
    assert found.mass == pytest.approx((0.2 + 0.1) / 2) and found.tokens == pytest.approx((2 / 4 + 1 / 2) / 2)
    assert found.ratio == pytest.approx(0.15 / 0.5)
    assert found.metrics() == {"attention_noise_ratio": found.ratio, "attention_noise_mass": found.mass,
                               "attention_noise_tokens": found.tokens, "attention_noise_titles": 2}
    assert noise_attention(titles[2:], NOISE) is None


def test_uniform_attention_gives_exactly_one():
    rng = np.random.default_rng(0)
    words = ["精华液", "面霜", "雅诗兰黛", "50ml", "包邮", "折扣"]
    titles = []
    for _ in range(50):  # titles of different lengths and noise shares
        title = list(rng.choice(words, size=int(rng.integers(1, 9))))
        titles.append(weights(*[(w, 1 / len(title)) for w in title]))
    assert noise_attention(titles, NOISE).ratio == pytest.approx(1.0, abs=1e-12)


def test_noise_tokens_cover_glued_and_multi_token_noise_words():
    from sicot.text.tokenize import tokenize

    noise = noise_tokens(["折扣", "2024新款", "Free Shipping", "包邮"])
    assert {"折扣", "2024", "新款", "free", "shipping", "包邮"} <= noise
    # glued to a product word, a noise word is still its own token; the product word is not noise
    assert [(t, t in noise) for t in tokenize("洗发水折扣 精华液包邮 FREE shipping")] == [
        ("洗发水", False), ("折扣", True), ("精华液", False), ("包邮", True), ("free", True), ("shipping", True)]


class AvoidsIds(nn.Module):
    """A title encoder whose attention gives the `avoided` word ids a score 3 lower than the others."""

    def __init__(self, avoided):
        super().__init__()
        self.avoided = torch.tensor(sorted(avoided))
        self.unused = nn.Parameter(torch.zeros(1))  # where the encoder lives

    def forward(self, tokens, mask):
        scores = -3.0 * torch.isin(tokens, self.avoided).float()
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        return None, torch.softmax(scores, dim=-1) * mask


VOCAB = Vocabulary([PAD_TOKEN, UNK_TOKEN, "精华液", "面霜", "包邮", "折扣"], np.eye(6, 4, dtype=np.float32))
TITLES = ["精华液包邮", "面霜 折扣 包邮 精华液", "", "面霜", "华为 包邮"]  # 华为: not in the vocabulary


def test_attention_that_avoids_noise_scores_below_one():
    avoids = AvoidsIds({VOCAB.ids(["包邮"])[0], VOCAB.ids(["折扣"])[0]})
    found = measure_noise_attention(avoids, VOCAB, 8, TITLES, ["包邮", "折扣"])
    assert found.titles == 3 and found.ratio < 0.2
    attention = word_attention(avoids, VOCAB, 8, TITLES, batch_size=2)  # batches of unequal widths
    assert [[w for w, _, _ in words] for words in attention] == [
        ["精华液", "包邮"], ["面霜", "折扣", "包邮", "精华液"], [], ["面霜"], ["华为", "包邮"]]
    assert [known for _, _, known in attention[4]] == [False, True]
    assert all(sum(a for _, a, _ in words) == pytest.approx(1.0) for words in attention if words)
    blind = measure_noise_attention(AvoidsIds(set()), VOCAB, 8, TITLES, ["包邮", "折扣"])
    assert blind.ratio == pytest.approx(1.0)


def test_fresh_bilinear_encoder_attends_about_uniformly():
    from sicot.model.text_encoders import create_text_encoder

    torch.manual_seed(0)
    table = np.random.default_rng(0).normal(scale=0.25, size=(6, 16)).astype(np.float32)  # word2vec's scale
    table[0] = 0
    encoder = create_text_encoder("bilinear", table, 8).eval()
    found = measure_noise_attention(encoder, VOCAB, 8, TITLES, ["包邮", "折扣"])
    assert found.ratio == pytest.approx(1.0, abs=0.1)


def test_noise_words_come_from_world_json(tmp_path):
    assert load_noise_words(str(tmp_path)) is None  # not the demo world
    (tmp_path / "world.json").write_text(json.dumps({"params": {}, "stats": {}}))
    assert load_noise_words(str(tmp_path)) is None  # generated before noise words were recorded
    (tmp_path / "world.json").write_text(json.dumps({"noise_words": ["包邮", "折扣"]}, ensure_ascii=False))
    assert load_noise_words(str(tmp_path)) == ["包邮", "折扣"]
    (tmp_path / "world.json").write_text(json.dumps({"noise_words": "包邮"}, ensure_ascii=False))
    with pytest.raises(ValueError, match=r"world\.json: noise_words must be a list"):
        load_noise_words(str(tmp_path))


def test_attention_view_marks_top_and_bottom_words():
    words = [("雅诗兰黛", 0.4), ("包邮", 0.01), ("精华液", 0.3), ("正品", 0.02), ("50ml", 0.2),
             ("新款", 0.03), ("<b>", 0.04)]
    page = attention_html([("SKU1", "雅诗兰黛 精华液 <b>", [(w, a, w != "新款") for w, a in words])])
    row = page[page.index("<td>SKU1"):]
    order = [w for w in ("雅诗兰黛", "精华液", "50ml", "&lt;b&gt;", "新款", "正品", "包邮")]
    positions = [row.index(f"{w} <small>") for w in order]
    assert positions == sorted(positions)  # words ordered by attention, title HTML-escaped
    assert row.count('class="w top"') == 3 and row.count('class="w bottom') == 3
    assert 'class="w bottom unk">新款' in row
    assert "noise" not in row and "Noise ratio" not in page  # no noise words known: nothing said about them


def test_attention_view_marks_noise_words_and_states_the_ratio():
    words = weights(("雅诗兰黛", 0.35), ("包邮", 0.03), ("精华液", 0.3), ("折扣", 0.02), ("50ml", 0.2), ("面霜", 0.1))
    summary = NoiseAttention(ratio=0.4, mass=0.2, tokens=0.5, titles=7)
    page = attention_html([("SKU1", "雅诗兰黛 精华液包邮 折扣 50ml 面霜", words)], NOISE, summary)
    row = page[page.index("<td>SKU1"):]
    assert 'class="w bottom noise">包邮' in row and 'class="w bottom noise">折扣' in row
    assert row.count("noise") == 2  # product words are not marked
    ratio = page.index("Noise ratio 0.40")
    assert ratio < page.index("<table>") and "20.0% of the attention" in page and "7 test titles" in page
    assert "no test title holds both" in attention_html([("SKU1", "精华液", weights(("精华液", 1.0)))], NOISE, None)


def test_training_pushes_noise_words_down():
    """Titles = the class's one product word among three noise words drawn at random: the encoder trained
    to name the class moves its attention onto the product word (uniform would put 0.75 on noise)."""
    from sicot.model.text_encoders import create_text_encoder

    torch.manual_seed(0)
    classes, noise, length = 8, 6, 4
    table = np.random.default_rng(0).normal(scale=0.5, size=(1 + classes + noise, 16)).astype(np.float32)
    table[0] = 0
    encoder, head = create_text_encoder("bilinear", table, 16), torch.nn.Linear(16, classes)
    optimizer = torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=0.1, momentum=0.9)

    def titles(n):
        labels = torch.randint(0, classes, (n,))
        tokens = torch.randint(1 + classes, 1 + classes + noise, (n, length))
        tokens[torch.arange(n), torch.randint(0, length, (n,))] = 1 + labels
        return tokens, labels

    for _ in range(150):
        tokens, labels = titles(32)
        loss = torch.nn.functional.cross_entropy(head(encoder(tokens, tokens > 0)[0]), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tokens, _ = titles(256)
    with torch.no_grad():
        attention = encoder.eval()(tokens, tokens > 0)[1]
    noise_mass = (attention * (tokens > classes)).sum(1).mean().item()
    assert noise_mass / 0.75 < 0.3
