"""The public calibration set: downloaded from 127.0.0.1, verified, extracted whole or not at
all, used as CALIB by official-weights deploys, fingerprinted by the inputs stamp."""
import dataclasses
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.app import stamp
from pipeline.app.deploy import RunOptions, resolve_recipe, use_public_calibration
from pipeline.core.config import RECIPES_DIR
from pipeline.io import public_sets
from pipeline.io.data import DataConfig, Preprocess, budget_set, imagenet_classes, resolve_sets
from pipeline.io.download import DownloadCorrupt, DownloadUnavailable, Pins
from pipeline.io.listing import forget_listings

WNIDS = ("n01440764", "n03888257")   # tench (0), parachute (701)


def archive(per_class: int = 3, extra: dict | None = None) -> bytes:
    """A small imagenette2-320.tgz: train/ and val/ class folders of JPEGs."""
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for split in ("train", "val"):
            for wnid in WNIDS:
                for i in range(per_class):
                    img = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (40, 56, 3), np.uint8)).save(img, "JPEG")
                    add(f"imagenette2-320/{split}/{wnid}/{split}_{i}.JPEG", img.getvalue())
        for name, data in (extra or {}).items():
            add(name, data)
    return buf.getvalue()


@pytest.fixture
def served(loopback, monkeypatch):
    """imagenette-320 pointed at the loopback server, pinned to the served archive."""
    s = public_sets.PUBLIC_SETS["imagenette-320"]
    monkeypatch.setitem(public_sets.PUBLIC_SETS, "imagenette-320",
                        dataclasses.replace(s, url=loopback["base"] + "/imagenette2-320.tgz"))
    pin_to(monkeypatch, loopback, archive())
    return loopback


def test_fetch_extracts_the_training_split_once(served):
    folder = public_sets.fetch_public_set("imagenette-320")
    assert folder == public_sets.sets_dir() / "imagenette-320"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.JPEG")) == [
        f"{w}/train_{i}.JPEG" for w in WNIDS for i in range(3)], "train only, with its class folders"
    body = served["files"]["/imagenette2-320.tgz"]
    assert public_sets.archive_sha256("imagenette-320") == hashlib.sha256(body).hexdigest()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["imagenette-320", "imagenette-320.sha256"], \
        "the archive is deleted once extracted; no temporary folder is left"
    assert public_sets.fetch_public_set("imagenette-320") == folder and served["requests"] == 1


def test_md5_and_size_pins_leave_nothing(served, monkeypatch):
    s = public_sets.PUBLIC_SETS["imagenette-320"]
    monkeypatch.setitem(public_sets.PUBLIC_SETS, "imagenette-320",
                        dataclasses.replace(s, pins=dataclasses.replace(s.pins, md5="0" * 32)))
    with pytest.raises(DownloadCorrupt, match="md5"):
        public_sets.fetch_public_set("imagenette-320")
    monkeypatch.setitem(public_sets.PUBLIC_SETS, "imagenette-320",
                        dataclasses.replace(s, pins=dataclasses.replace(s.pins, size=s.pins.size + 1)))
    with pytest.raises(DownloadCorrupt, match="truncated or wrong file"):
        public_sets.fetch_public_set("imagenette-320")
    assert not public_sets.sets_dir().exists() or not any(public_sets.sets_dir().iterdir())


def test_interrupted_extraction_resumes_without_downloading(served, monkeypatch):
    def interrupted(self, *a, **k):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(tarfile.TarFile, "extractall", interrupted)
        with pytest.raises(KeyboardInterrupt):
            public_sets.fetch_public_set("imagenette-320")
    assert public_sets.extracted("imagenette-320") is None
    assert sorted(p.name for p in public_sets.sets_dir().iterdir()) == [
        "imagenette2-320.tgz", "imagenette2-320.tgz.sha256"], "the verified archive is kept, no partial folder"
    served["files"].clear()   # the next run must not need the network
    folder = public_sets.fetch_public_set("imagenette-320")
    assert len(list(folder.rglob("*.JPEG"))) == 6 and served["requests"] == 1


def pin_to(monkeypatch, served, data: bytes) -> None:
    served["files"]["/imagenette2-320.tgz"] = data
    s = public_sets.PUBLIC_SETS["imagenette-320"]
    monkeypatch.setitem(public_sets.PUBLIC_SETS, "imagenette-320", dataclasses.replace(
        s, pins=Pins(size=len(data), md5=hashlib.md5(data).hexdigest())))


def test_wrong_or_unreadable_archive_is_refused_and_fetched_afresh(served, monkeypatch):
    other = io.BytesIO()
    with tarfile.open(fileobj=other, mode="w:gz") as tar:
        info = tarfile.TarInfo("something-else/a.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    for data, match in ((other.getvalue(), "has no imagenette2-320/train/ folder"),
                        (b"not a tar at all", "not a readable tar.gz")):
        pin_to(monkeypatch, served, data)
        with pytest.raises(DownloadCorrupt, match=match):
            public_sets.fetch_public_set("imagenette-320")
        assert public_sets.extracted("imagenette-320") is None
        assert not any(public_sets.sets_dir().iterdir()), "the refused archive is not kept"
    # Members outside the images folder (here one climbing out of it) are never extracted.
    pin_to(monkeypatch, served, archive(extra={"../../escape.txt": b"x"}))
    folder = public_sets.fetch_public_set("imagenette-320")
    assert not (folder.parent.parent / "escape.txt").exists() and not list(folder.rglob("*.txt"))


def recipe_for(checkpoint: str, **data):
    return resolve_recipe(RunOptions(quant="int8", checkpoint=checkpoint,
                                     sets=tuple(f"data.{k}={v}" for k, v in data.items())))


def test_official_weights_without_data_calibrate_on_the_public_set(served):
    recipe = recipe_for("official")
    use_public_calibration(recipe)
    data = recipe.sections["data"]
    assert Path(data.calib) == public_sets.sets_dir() / "imagenette-320"
    # The wnid folders map onto ImageNet's class indices: the held-out images are labelled,
    # so the int8 budget is checked in top-1 points, and the report names the set.
    classes = imagenet_classes()[0]
    cfg = DataConfig(calib=data.calib, calib_images=2, budget_images=4)
    sets = resolve_sets(cfg, classes)
    assert sets.calib.labels and set(sets.calib.labels) == {0, 701}
    assert sets.calib_description.startswith("Imagenette (fast.ai)")
    budget = budget_set(sets, cfg, Preprocess(size=32, crop_pct=1.0))
    assert budget.labels is not None and len(budget.labels) == 4


def test_named_as_calib_it_is_used_for_any_checkpoint(served):
    recipe = recipe_for("random", calib="imagenette-320")
    use_public_calibration(recipe)
    assert Path(recipe.sections["data"].calib) == public_sets.sets_dir() / "imagenette-320"


@pytest.mark.parametrize("checkpoint,data", [("random", {}), ("official", {"public_calib": "null"})])
def test_not_used_for_random_weights_or_when_turned_off(served, checkpoint, data):
    recipe = recipe_for(checkpoint, **data)
    use_public_calibration(recipe)
    assert recipe.sections["data"].calib is None and served["requests"] == 0


@pytest.mark.parametrize("calib,eval_,checkpoint,expected", [
    (None, None, "official", "imagenette-320"),
    (None, None, "hf-hub:timm/repvit_m0_9.dist_300e_in1k", "imagenette-320"),
    (None, None, "/models/mine.pth", None),      # a user's own checkpoint: their data, or sample photos
    (None, "/data/val", "official", None),        # images held out of DATA come first
    ("/data/train", None, "official", None),
    ("imagenette-160", None, "/models/mine.pth", "imagenette-160"),
])
def test_which_set_a_deploy_wants(calib, eval_, checkpoint, expected):
    assert public_sets.wanted(calib, eval_, "imagenette-320", checkpoint) == expected


def test_unavailable_default_falls_back_loudly_but_named_set_is_an_error(served, monkeypatch, caplog):
    s = public_sets.PUBLIC_SETS["imagenette-320"]
    monkeypatch.setitem(public_sets.PUBLIC_SETS, "imagenette-320",
                        dataclasses.replace(s, url=served["base"] + "/missing.tgz"))
    recipe = recipe_for("official")
    with caplog.at_level("WARNING", logger="pipeline"):
        use_public_calibration(recipe)
    logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert recipe.sections["data"].calib is None
    assert "could not download the public calibration set imagenette-320" in logged[0]
    assert "natural sample photos" in logged[0]
    with pytest.raises(DownloadUnavailable, match=r"CALIB=<folder of training images>"):
        use_public_calibration(recipe_for("random", calib="imagenette-320"))


def test_unknown_public_calib_is_a_recipe_error():
    with pytest.raises(Exception, match="imagenette-320"):
        recipe_for("official", public_calib="imagenet-tiny")


def test_stamp_waits_for_the_set_then_covers_it(served, monkeypatch):
    weights = public_sets.cache_root() / "weights" / "repvit_m0_9_distill_300e.pth"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"stand-in")   # the stamp only stats the cached weights
    recipe = RECIPES_DIR / "int8.yaml"
    assert stamp.inputs_stamp(recipe, []) is None, "not yet downloaded: the run must try"
    assert stamp.inputs_stamp(recipe, ["data.public_calib=null"]) is not None
    folder = public_sets.fetch_public_set("imagenette-320")
    first = stamp.inputs_stamp(recipe, [])
    assert first is not None
    (folder / WNIDS[0] / "train_0.JPEG").unlink()
    forget_listings()
    assert stamp.inputs_stamp(recipe, [])["digest"] != first["digest"]
