import json

import numpy as np
import pytest

from sicot.config import Word2Vec
from sicot.text.tokenize import tokenize
from sicot.text.word2vec import (
    PAD_TOKEN,
    UNK,
    UNK_TOKEN,
    Vocabulary,
    VocabularyError,
    export,
    frequent_words,
    train_word2vec,
)


@pytest.mark.parametrize("title, expected", [
    ("2024新款 雅诗兰黛 小棕瓶 精华液 包邮", ["2024", "新款", "雅诗兰黛", "小棕瓶", "精华液", "包邮"]),
    ("Apple iPhone15 Pro 256GB【官方正品】", ["apple", "iphone15", "pro", "256gb", "官方", "正品"]),
    ("可口可乐500ml 整箱", ["可口可乐", "500ml", "整箱"]),
    ("１.５Ｌ  农夫山泉!!", ["1.5l", "农夫山泉"]),  # full-width forms read as ASCII
    ("L'ORÉAL, v2.0 / t-shirt", ["l", "oréal", "v2.0", "t-shirt"]),
    ("家颜 EV-910 面霜 15g.", ["家颜", "ev-910", "面霜", "15g"]),  # model numbers stay whole
    ("", []),
    ("  ，。！…  ", []),
])
def test_tokenize_mixed_scripts(title, expected):
    assert tokenize(title) == expected


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    titles = ["雅诗兰黛 精华液 50ml", "雅诗兰黛 面霜 50g 包邮", "兰蔻 精华液 30ml 包邮", "兰蔻 面霜 正品"] * 5
    model = train_word2vec([tokenize(t) for t in titles], Word2Vec(size=8, window=3, min_count=1, epochs=5, seed=3))
    out = tmp_path_factory.mktemp("w2v")
    export(model, out)
    return out


def test_export_layout_and_reserved_rows(vocab_dir):
    meta = json.loads((vocab_dir / "vocab.json").read_text(encoding="utf-8"))
    table = np.load(vocab_dir / "vectors.npy")
    assert meta["tokens"][:2] == [PAD_TOKEN, UNK_TOKEN] and meta["dim"] == 8
    assert table.shape == (len(meta["tokens"]), 8) and table.dtype == np.float32
    assert not table[0].any()  # padding adds nothing
    np.testing.assert_allclose(table[1], table[2:].mean(axis=0), rtol=1e-5)  # unknown = the mean word
    assert (vocab_dir / "word2vec.model").is_file()


def test_vocabulary_encode_known_unknown_empty_and_long(vocab_dir):
    vocab = Vocabulary.load(vocab_dir)
    ids = vocab.encode("雅诗兰黛 精华液", max_len=8)
    assert [vocab.tokens[i] for i in ids] == ["雅诗兰黛", "精华液"]
    assert vocab.encode("iphone 华为", max_len=8) == [UNK, UNK]
    assert vocab.encode("", max_len=8) == [] and vocab.encode("！！", max_len=8) == []
    long_title = " ".join(["兰蔻 面霜"] * 50)
    assert len(vocab.encode(long_title, max_len=5)) == 5  # truncated, never an error
    assert vocab.embeddings.shape == (len(vocab), vocab.dim)


def test_word2vec_is_deterministic(vocab_dir, tmp_path):
    titles = ["雅诗兰黛 精华液 50ml", "雅诗兰黛 面霜 50g 包邮", "兰蔻 精华液 30ml 包邮", "兰蔻 面霜 正品"] * 5
    model = train_word2vec([tokenize(t) for t in titles], Word2Vec(size=8, window=3, min_count=1, epochs=5, seed=3))
    export(model, tmp_path)
    np.testing.assert_array_equal(np.load(tmp_path / "vectors.npy"), np.load(vocab_dir / "vectors.npy"))


def test_word2vec_refuses_titles_without_words():
    with pytest.raises(VocabularyError, match="every title is empty"):
        train_word2vec([[], []], Word2Vec())


def test_vocabulary_load_names_the_problem(vocab_dir, tmp_path):
    with pytest.raises(VocabularyError, match="train_word2vec first"):
        Vocabulary.load(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"tokens": [PAD_TOKEN, UNK_TOKEN, "a"], "dim": 8}))
    np.save(tmp_path / "vectors.npy", np.zeros((2, 8), np.float32))
    with pytest.raises(VocabularyError, match="3 tokens but 2 vectors"):
        Vocabulary.load(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"tokens": [PAD_TOKEN, UNK_TOKEN], "dim": 8, "dropped": "a"}))
    with pytest.raises(VocabularyError, match="vocab.json: 'dropped' must be a list of words"):
        Vocabulary.load(tmp_path)


def test_train_word2vec_component_replaces_output_atomically(tiny_world, tmp_path):
    from components import train_word2vec

    params = tiny_world.params(tmp_path)
    stale = tmp_path / "w2v" / "stale.txt"
    stale.parent.mkdir()
    stale.write_text("from an earlier run")
    params.paths.word2vec = str(tmp_path / "w2v")
    out = train_word2vec.run(params, track=False)
    vocab = Vocabulary.load(out["word2vec"])
    assert out["vocabulary"] == len(vocab) - 2 > 10
    assert out["dropped_frequent"] == out["dropped_rare"] == 0 and vocab.dropped == frozenset()  # the defaults
    assert not stale.exists()  # the directory was replaced as a whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".w2v")]  # no temporary left behind


# Every title holds 包邮 (share 1.0), 精华液 and 面霜 half of them each, 兰蔻 one title in four.
FILTER_TITLES = ["雅诗兰黛 精华液 包邮", "雅诗兰黛 面霜 包邮 包邮", "兰蔻 精华液 包邮", "正品 面霜 包邮"] * 5


def test_max_title_share_drops_a_word_in_every_title_and_keeps_the_rest(tmp_path):
    token_lists = [tokenize(t) for t in FILTER_TITLES] + [[]]
    assert frequent_words(token_lists, 0.5) == {"包邮"}  # in exactly half of the titles: kept
    # 10 of the 20 titles with words (the empty one does not count) are more than 49%
    assert frequent_words(token_lists, 0.49) == {"包邮", "雅诗兰黛", "精华液", "面霜"}
    cfg = Word2Vec(size=8, window=3, epochs=2, max_title_share=0.6)
    export(train_word2vec(token_lists, cfg, {"包邮"}), tmp_path, {"包邮"})
    vocab = Vocabulary.load(tmp_path)
    assert sorted(vocab.tokens[2:]) == sorted({"雅诗兰黛", "精华液", "面霜", "兰蔻", "正品"})
    assert vocab.dropped == {"包邮"}
    # a dropped word is removed from the title before the length cut; an unseen word stays as <unk>
    assert vocab.words("包邮 包邮 雅诗兰黛 华为 面霜", max_len=2) == ["雅诗兰黛", "华为"]
    assert [vocab.tokens[i] for i in vocab.encode("包邮 雅诗兰黛 华为", max_len=8)] == ["雅诗兰黛", UNK_TOKEN]


def test_default_settings_drop_no_word(vocab_dir):
    token_lists = [tokenize(t) for t in FILTER_TITLES]
    assert frequent_words(token_lists, Word2Vec().max_title_share) == set()  # in every title is not "more than"
    vocab = Vocabulary.load(vocab_dir)
    assert vocab.dropped == frozenset() and vocab.words("兰蔻 面霜 包邮", max_len=8) == ["兰蔻", "面霜", "包邮"]


def test_word2vec_refuses_titles_left_without_words():
    with pytest.raises(VocabularyError, match="word2vec.max_title_share"):
        train_word2vec([["包邮"], ["包邮"]], Word2Vec(), {"包邮"})


@pytest.mark.parametrize("value", ["0", "0.0", "1.5", "-0.1"])
def test_max_title_share_out_of_range_names_the_key(value):
    from sicot.config import ConfigError, load_params

    with pytest.raises(ConfigError, match=r"word2vec\.max_title_share: .* out of range"):
        load_params(None, [f"word2vec.max_title_share={value}"])


def test_train_word2vec_component_counts_what_each_filter_removed(tiny_world, tmp_path):
    from components import train_word2vec

    token_lists = [tokenize(r["title"]) for name in ("train", "catalog")
                   for r in map(json.loads, (tiny_world.root / "prepared" / f"{name}.jsonl").open(encoding="utf-8"))]
    distinct = {w for tokens in token_lists for w in tokens}
    out = train_word2vec.run(tiny_world.params(tmp_path, f"paths.word2vec={tmp_path / 'w2v'}",
                                               "word2vec.max_title_share=0.05", "word2vec.min_count=3"), track=False)
    vocab = Vocabulary.load(out["word2vec"])
    assert vocab.dropped == frequent_words(token_lists, 0.05) and out["dropped_frequent"] == len(vocab.dropped) > 0
    counts = {w: sum(tokens.count(w) for tokens in token_lists) for w in distinct - vocab.dropped}
    assert out["dropped_rare"] == sum(n < 3 for n in counts.values()) > 0
    assert out["vocabulary"] == len(vocab) - 2 == len(distinct) - out["dropped_frequent"] - out["dropped_rare"]
    assert not vocab.dropped & set(vocab.tokens)
