"""The class-sharded classifier on 1, 2 and 3 CPU ranks (gloo) against a single-process reference.

Each world size is launched once (spawning ranks costs seconds); the ranks run every scenario in
tests/parallel_workers.py and each test here reports one scenario. The 2-rank run saves the checkpoint
that the 1- and 3-rank runs load, so it goes first.
"""
import math

import pytest
import torch

from tests.parallel_workers import SCENARIOS, launch

WORLDS = (2, 3, 1)
CASES = [(name, world) for world in WORLDS for name, (_, worlds) in SCENARIOS.items() if world in worlds]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    done: dict[int, dict] = {}

    def get(world):
        if world != 2:
            get(2)  # the re-sharding scenarios load what the 2-rank run saved
        if world not in done:
            done[world] = launch(world, root)
        return done[world]

    return get


@pytest.mark.parametrize("scenario,world", CASES, ids=[f"{n}-N{w}" for n, w in CASES])
def test_scenario(runs, scenario, world):
    results = runs(world)
    assert scenario in results, f"{scenario} did not run on {world} ranks"
    assert results[scenario] is None, results[scenario]


def test_shard_layout_matches_torch_chunk():
    from sicot.parallel import shard_range

    for classes in (1, 2, 4, 7, 11, 100):
        for world in (1, 2, 3, 4, 8):
            chunks = torch.arange(classes).chunk(world)
            ranges = [shard_range(classes, world, r) for r in range(world)]
            for r, (lo, hi) in enumerate(ranges):
                expected = chunks[r].tolist() if r < len(chunks) else []
                assert list(range(lo, hi)) == expected, (classes, world, r)


def test_init_rows_is_slice_of_full_init():
    from sicot.parallel import init_rows

    full = init_rows(0, 9000, 4, seed=3)
    assert torch.equal(init_rows(4000, 8200, 4, seed=3), full[4000:8200])
    assert full.abs().max() <= 1 / math.sqrt(4)
    assert not torch.equal(init_rows(0, 10, 4, seed=4), full[:10])


def test_classifier_needs_a_process_group():
    from sicot.parallel import ShardedClassifier

    with pytest.raises(RuntimeError, match="init_from_env"):
        ShardedClassifier(4, 10)


def test_incomplete_torchrun_environment_is_named(monkeypatch):
    from sicot.parallel import dist

    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match="WORLD_SIZE"):
        dist.init_from_env()
