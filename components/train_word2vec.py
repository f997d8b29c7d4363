"""Train word vectors on the product titles: training titles plus catalog titles of `paths.prepared`.

Writes `word2vec.model`, `vectors.npy` and `vocab.json` to `paths.word2vec`, replacing the previous
output only when complete. Catalog titles widen the vocabulary to SKUs with few or no training images.
Words in more than `word2vec.max_title_share` of the titles are dropped, words seen fewer than
`word2vec.min_count` times get no vector; the outputs count the words each filter removed.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from sicot import storage
from sicot.config import Params


def run(params: Params, track: bool = True) -> dict:
    from sicot.data.prepared import load_prepared
    from sicot.text.tokenize import tokenize
    from sicot.text.word2vec import export, frequent_words, train_word2vec

    started = time.perf_counter()
    manifest = load_prepared(params.paths.prepared)  # titles only
    titles = [r.title for r in manifest.train] + [r.title for r in manifest.catalog]
    token_lists = [tokenize(title) for title in titles]
    dropped = frequent_words(token_lists, params.word2vec.max_title_share)
    model = train_word2vec(token_lists, params.word2vec, dropped)
    out = params.paths.word2vec
    if storage.is_s3(out):
        with tempfile.TemporaryDirectory() as tmp:
            export(model, tmp, dropped)
            for name in ("word2vec.model", "vectors.npy", "vocab.json"):  # vocab.json last: it marks completion
                storage.write_bytes(storage.join(out, name), Path(tmp, name).read_bytes())
    else:
        with storage.atomic_dir(out) as tmp:
            export(model, tmp, dropped)
    distinct = {word for tokens in token_lists for word in tokens}
    vocabulary = len(model.wv.index_to_key)
    outputs = {"word2vec": out, "titles": len(titles), "words": sum(map(len, token_lists)),
               "vocabulary": vocabulary, "dim": model.wv.vector_size,
               "dropped_frequent": len(dropped), "dropped_rare": len(distinct) - len(dropped) - vocabulary,
               "seconds": round(time.perf_counter() - started, 2)}
    if track:
        from sicot import tracking

        with tracking.step_run("train_word2vec", params, sections=("word2vec",)) as run_:
            tracking.log_metrics({k: outputs[k] for k in ("titles", "words", "vocabulary", "dropped_frequent",
                                                          "dropped_rare")})
            outputs["run_id"] = run_.info.run_id
    print(f"train_word2vec: {vocabulary} words x {outputs['dim']} from {outputs['titles']} titles "
          f"({outputs['dropped_frequent']} dropped as too frequent, {outputs['dropped_rare']} as too rare) "
          f"-> {out}", file=sys.stderr)
    return outputs


def main(argv: list[str] | None = None) -> None:
    from components.cli import main as cli_main

    cli_main(run, __doc__.splitlines()[0], argv, sections=("word2vec", "paths"), extra=lambda p: p.add_argument(
        "--no-track", dest="track", action="store_false", help="do not log to MLflow"))


if __name__ == "__main__":
    main()
