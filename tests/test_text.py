import json

import numpy as np
import pytest

from sicot.config import Word2Vec
from sicot.text.tokenize import tokenize
from sicot.text.word2vec import PAD_TOKEN, UNK, UNK_TOKEN, Vocabulary, VocabularyError, export, train_word2vec


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
    assert not stale.exists()  # the directory was replaced as a whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".w2v")]  # no temporary left behind
