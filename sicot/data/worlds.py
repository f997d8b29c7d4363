"""The generated worlds by `data.world` name: the one place that picks a world's generator."""
from __future__ import annotations

from pathlib import Path

from sicot.data import apparel, synthetic

GENERATORS = {"packaged": synthetic.generate, "apparel": apparel.generate}


def generate(out_dir: str | Path, cfg) -> dict:
    """Write the world `cfg.world` names (a `sicot.config.Data`) to the local directory `out_dir`."""
    if cfg.world not in GENERATORS:
        raise ValueError(f"data.world: {cfg.world!r} is not one of {', '.join(GENERATORS)}")
    return GENERATORS[cfg.world](out_dir, cfg)
