"""Scoring in one process, and sharded over 2 CPU processes with torchrun."""
import numpy as np
import pytest

from pipeline.eval.scoring import score, shard

from .formats.test_exporters import export


def test_shards_cover_every_row_once():
    for n, world in ((10, 3), (2, 4), (1000, 7)):
        rows = np.concatenate([np.arange(n)[shard(n, r, world)] for r in range(world)])
        assert (rows == np.arange(n)).all()
        sizes = [len(range(n)[shard(n, r, world)]) for r in range(world)]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("fmt", ["onnx"])
def test_two_torchrun_processes_score_what_one_process_does(fmt, trained, tmp_path):
    artifact = export(fmt, "int8", trained, tmp_path).path
    pixels = np.concatenate([trained.check] * 3)[:23]   # not a multiple of the shards or the batch
    np.save(tmp_path / "pixels.npy", pixels)
    one = score(fmt, artifact, trained.meta, tmp_path / "pixels.npy", 4, 1, tmp_path / "job1")
    seen = []
    two = score(fmt, artifact, trained.meta, tmp_path / "pixels.npy", 4, 2, tmp_path / "job2", seen.append)
    assert two.shape == one.shape == (23, len(trained.meta["classes"]))
    assert np.array_equal(one, two) and seen == [23]
    assert sorted(p.name for p in (tmp_path / "job2").glob("scores.*.npy")) == ["scores.0.npy", "scores.1.npy"]
