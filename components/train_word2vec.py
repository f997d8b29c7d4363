"""Train word vectors on the product titles: training titles plus catalog titles of `paths.prepared`.

Writes `word2vec.model`, `vectors.npy` and `vocab.json` to `paths.word2vec`, replacing the previous
output only when complete. Catalog titles widen the vocabulary to SKUs with few or no training images.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from sicot import storage
from sicot.config import Params


def run(params: Params, track: bool = True) -> dict:
    from sicot.data.manifest import load_manifest
    from sicot.text.tokenize import tokenize
    from sicot.text.word2vec import export, train_word2vec

    started = time.perf_counter()
    manifest = load_manifest(params.paths.prepared, verify_images=False)  # titles only
    titles = [r.title for r in manifest.train] + [r.title for r in manifest.catalog]
    token_lists = [tokenize(title) for title in titles]
    model = train_word2vec(token_lists, params.word2vec)
    out = params.paths.word2vec
    if storage.is_s3(out):
        with tempfile.TemporaryDirectory() as tmp:
            export(model, tmp)
            for name in ("word2vec.model", "vectors.npy", "vocab.json"):  # vocab.json last: it marks completion
                storage.write_bytes(storage.join(out, name), Path(tmp, name).read_bytes())
    else:
        with storage.atomic_dir(out) as tmp:
            export(model, tmp)
    outputs = {"word2vec": out, "titles": len(titles), "words": sum(map(len, token_lists)),
               "vocabulary": len(model.wv.index_to_key), "dim": model.wv.vector_size,
               "seconds": round(time.perf_counter() - started, 2)}
    if track:
        from sicot import tracking

        with tracking.step_run("train_word2vec", params, sections=("word2vec",)) as run_:
            tracking.log_metrics({k: outputs[k] for k in ("titles", "words", "vocabulary")})
            outputs["run_id"] = run_.info.run_id
    print(f"train_word2vec: {outputs['vocabulary']} words x {outputs['dim']} from {outputs['titles']} titles "
          f"-> {out}", file=sys.stderr)
    return outputs


def main(argv: list[str] | None = None) -> None:
    from components.cli import main as cli_main

    cli_main(run, __doc__.splitlines()[0], argv, sections=("word2vec", "paths"), extra=lambda p: p.add_argument(
        "--no-track", dest="track", action="store_false", help="do not log to MLflow"))


if __name__ == "__main__":
    main()
