"""PNG figures that any thread may draw. Prefect runs a flow's steps as threads of one process (the pretraining
world is prepared beside the demo world), and matplotlib is not thread-safe: pyplot keeps global state, and the
parser that lays out log-axis tick labels ($10^{2}$) fails when two threads use it at once. So figures are
built without pyplot and drawn one at a time (they take well under a second)."""
from __future__ import annotations

import io
import threading
from collections.abc import Callable

_DRAWING = threading.Lock()


def png(draw: Callable, figsize: tuple[float, float], dpi: int = 100) -> bytes:
    """The PNG of one figure: `draw(ax)` fills its single axes."""
    from matplotlib.figure import Figure

    with _DRAWING:
        fig = Figure(figsize=figsize, dpi=dpi)
        draw(fig.subplots())
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    return buffer.getvalue()
