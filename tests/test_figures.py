"""The reports' figures can be drawn from several threads at once, as a flow's concurrent steps draw them
(matplotlib's tick-label parser fails under concurrent use: sicot/figures.py)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from sicot.data.longtail import plot_long_tail
from sicot.evaluate import per_class_png

PNG = b"\x89PNG\r\n\x1a\n"


def draw_both(folder) -> tuple[bytes, bytes]:
    path = folder / "long_tail.png"
    plot_long_tail({f"sku{j}": 1 + (j * 37) % 500 for j in range(200)}, 20, str(path))  # log y: 10^k tick labels
    rows = [{"group": "head" if j % 2 else "tail", "train_images": 1 + j, "top1": j / 50} for j in range(50)]
    return path.read_bytes(), per_class_png(rows, "baseline", 20)  # log x


def test_figures_drawn_by_concurrent_steps_are_all_whole(tmp_path):
    folders = [tmp_path / str(i) for i in range(6)]
    for folder in folders:
        folder.mkdir()
    with ThreadPoolExecutor(len(folders)) as pool:
        drawn = list(pool.map(draw_both, folders))  # re-raises a thread's error
    assert all(png.startswith(PNG) and len(png) > 10_000 for pair in drawn for png in pair)
