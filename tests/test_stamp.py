"""The inputs stamp: unchanged inputs give the same digest; each input it covers changes it."""
import os

import pytest

from pipeline.app.stamp import inputs_stamp
from pipeline.core.config import RECIPES_DIR
from pipeline.io.listing import forget_listings

INT8 = RECIPES_DIR / "int8.yaml"


@pytest.fixture
def inputs(tmp_path):
    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes(b"weights")
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "data" / cls / f"{i}.jpg").write_bytes(b"jpeg" * (i + 1))
    return tmp_path


def stamp(inputs, *sets):
    forget_listings()   # each deploy lists its folders again
    base = [f"load.checkpoint={inputs / 'model.pth'}", f"data.eval={inputs / 'data'}"]
    return inputs_stamp(INT8, base + list(sets))


def test_same_inputs_same_stamp_and_its_folder(inputs):
    first = stamp(inputs)
    assert first == stamp(inputs)
    assert first["variant"] == "m0.9" and first["quant"] == "int8" and len(first["digest"]) == 64
    assert stamp(inputs, "load.variant=M1.0")["variant"] == "m1.0"


def test_each_input_changes_the_stamp(inputs):
    seen = {stamp(inputs)["digest"]}

    def changed(*sets):
        digest = stamp(inputs, *sets)["digest"]
        assert digest not in seen
        seen.add(digest)

    changed("export.onnx.percentile=99.99")             # a recipe knob
    image = inputs / "data" / "a" / "0.jpg"
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed()                                            # an image edited in place (its mtime)
    (inputs / "data" / "b" / "9.png").write_bytes(b"png")
    changed()                                            # an image added
    (inputs / "model.pth").write_bytes(b"retrained")
    changed()                                            # the checkpoint rewritten
    (inputs / "labels.txt").write_text("a\nb\n")
    changed(f"load.labels={inputs / 'labels.txt'}")      # a labels file


def test_no_stamp_where_the_run_must_look(inputs, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(inputs / "cache"))
    # Official weights not downloaded yet: the run tries to download them.
    assert inputs_stamp(INT8, ["load.checkpoint=official"]) is None
    # A hub branch may have moved: the run asks the hub.
    assert inputs_stamp(INT8, ["load.checkpoint=hf-hub:timm/repvit_m0_9.dist_450e_in1k"]) is None
    # Seeded random weights are fully described by the recipe.
    assert inputs_stamp(INT8, ["load.checkpoint=random"]) is not None
