import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.io.data import (DataConfig, DataError, Preprocess, budget_set, calibration_pixels,
                              class_index_for, image_folder, imagenet_classes, load_pixels, normalize_pixels,
                              normalized_tensor, open_image, resolve_sets, training_pixels, workers_for)


def make_folder(root, classes, per_class=3, size=(40, 30)):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((size[1], size[0], 3), (40 * i) % 256, np.uint8)).save(root / c / f"{i}.jpg")
    return root


def test_preprocess_resizes_shorter_side_then_centre_crops():
    pre = Preprocess(size=224, crop_pct=0.95, interpolation="bicubic")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 500, 3), np.uint8))
    assert pre.pixels(img).shape == (224, 224, 3)
    assert pre(img).shape == (3, 224, 224) and pre(img).dtype == np.float32
    # 224 / 0.95 = 235 (floor, as timm): the crop is the centre of a 235-px-high image
    assert pre.crop(img).size == (224, 224)


def test_normalization_is_numpys_float32_formula_bit_for_bit():
    # Every value in every channel, at odd sizes (vectorized bodies and scalar tails), in
    # a read-only memory-map-like array, as scoring passes them.
    rng = np.random.default_rng(0)
    pixels = np.concatenate([np.stack([np.arange(256, dtype=np.uint8)] * 3, -1).reshape(1, 16, 16, 3),
                             rng.integers(0, 256, (1, 16, 16, 3), np.uint8)])
    pixels = np.concatenate([pixels, pixels[:, ::-1]])
    pixels.setflags(write=False)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = ((pixels.astype(np.float32) / np.float32(255) - np.asarray(mean, np.float32))
                / np.asarray(std, np.float32)).transpose(0, 3, 1, 2)
    got = normalize_pixels(pixels, mean, std)
    assert got.dtype == np.float32 and got.flags.c_contiguous and np.array_equal(got, expected)
    odd = pixels[:, :13, :11]
    assert np.array_equal(normalize_pixels(odd, mean, std), expected[:, :, :13, :11])
    import torch
    cl = normalized_tensor(pixels, mean, std)
    assert cl.is_contiguous(memory_format=torch.channels_last) and np.array_equal(cl.numpy(), expected)
    assert np.array_equal(normalized_tensor(odd, mean, std).numpy(), expected[:, :, :13, :11])


def test_image_folder_orders_classes_like_imagefolder(tmp_path):
    s = image_folder(make_folder(tmp_path / "d", ["b", "a", "c"]))
    assert s.classes == ("a", "b", "c") and len(s) == 9 and s.labels[:3] == (0, 0, 0)


def test_folders_map_through_the_models_classes(tmp_path):
    root = make_folder(tmp_path / "d", ["cat", "dog"])
    s = image_folder(root, class_index_for(["dog", "cat", "bird"]))
    assert set(s.labels) == {0, 1} and s.labels[0] == 1   # "cat" is output 1
    with pytest.raises(DataError, match="not classes of this model"):
        image_folder(root, class_index_for(["bird", "fish"]))


def test_calibration_is_held_out_of_scoring(tmp_path):
    root = make_folder(tmp_path / "d", ["a", "b"], per_class=10)
    sets = resolve_sets(DataConfig(eval=str(root), calib_images=6), ["a", "b"])
    assert len(sets.calib) == 6 and len(sets.eval) == 14
    assert not set(sets.calib.paths) & set(sets.eval.paths)
    again = resolve_sets(DataConfig(eval=str(root), calib_images=6), ["a", "b"])
    assert again.calib.paths == sets.calib.paths, "deterministic"


def test_qat_trains_on_calib_and_holds_out_the_budget_images(tmp_path):
    # Every image a distinct colour, so pixels identify images.
    root = tmp_path / "calib"
    for i in range(40):
        (root / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), (i * 6, 255 - i * 6, i % 7 * 30), np.uint8)).save(root / "ab"[i % 2] / f"{i}.png")
    cfg = DataConfig(calib=str(root), calib_images=10, budget_images=8)
    sets = resolve_sets(cfg, ["a", "b"])
    pre = Preprocess(size=8, crop_pct=1.0, interpolation="bilinear")
    train, labels, held, description = training_pixels(sets, cfg, pre, n=100)
    budget = budget_set(sets, cfg, pre)
    key = lambda px: {tuple(p[0, 0]) for p in px}
    assert key(held) == key(budget.pixels), "QAT's readout images are the int8 budget images"
    calibrated = calibration_pixels(sets, cfg, pre)
    assert len(budget.labels) == 8 and not key(calibrated) & key(budget.pixels)
    assert len(train) == 32 and not key(train) & key(held) and len(labels) == 32
    assert "32 CALIB images (labelled), 8 more held out" in description
    assert len(training_pixels(sets, cfg, pre, n=12)[0]) == 12
    # Without any data: natural photos, distillation only.
    nothing = resolve_sets(DataConfig(calib_images=4), ["a", "b"])
    train, labels, held, _ = training_pixels(nothing, DataConfig(), pre, n=20)
    assert len(train) == 20 and labels is None and len(held) > 0


def test_budget_set_without_labels(tmp_path):
    """Unlabelled CALIB: its spare images, without labels; no spare CALIB images (or no
    CALIB): natural photos cropped unlike the calibration ones, without labels."""
    root = tmp_path / "calib"
    root.mkdir()
    for i in range(30):
        Image.fromarray(np.full((8, 8, 3), (i * 8, 0, 0), np.uint8)).save(root / f"{i}.png")
    pre = Preprocess(size=8, crop_pct=1.0, interpolation="bilinear")
    cfg = DataConfig(calib=str(root), calib_images=10, budget_images=50)
    budget = budget_set(resolve_sets(cfg, ["a", "b"]), cfg, pre)
    assert budget.labels is None and len(budget.pixels) == 20
    assert "20 unlabelled CALIB images held out" in budget.description
    for cfg in (DataConfig(calib=str(root), calib_images=30, budget_images=12), DataConfig(budget_images=12)):
        sets = resolve_sets(cfg, ["a", "b"])
        budget = budget_set(sets, cfg, pre)
        assert budget.labels is None and len(budget.pixels) == 12 and "natural sample photos" in budget.description
    pre = Preprocess(size=32, crop_pct=1.0, interpolation="bilinear")
    cfg = DataConfig(calib_images=20, budget_images=12)
    calibrated = {p.tobytes() for p in calibration_pixels(resolve_sets(cfg, ["a"]), cfg, pre)}
    assert not calibrated & {p.tobytes() for p in budget_set(resolve_sets(cfg, ["a"]), cfg, pre).pixels}


def test_corrupt_image_and_missing_folder(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"cannot read image .*bad\.jpg"):
        open_image(tmp_path / "bad.jpg")
    with pytest.raises(DataError, match="data folder not found"):
        image_folder(tmp_path / "nope")


def test_large_sets_decode_in_threads_to_the_same_pixels_in_order(tmp_path, monkeypatch):
    """Sets of 512 images or more are decoded by a thread pool (no process is forked: a fork
    after JAX or torch's thread pools are loaded can deadlock): the same crops, in the
    listing's order, as decoding one by one; a corrupt image still names itself."""
    import os
    import threading

    from pipeline.io import data as data_mod
    root = tmp_path / "d" / "a"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(520):
        Image.fromarray(rng.integers(0, 255, (10, 12, 3), np.uint8)).save(root / f"{i:04d}.png")
    images = image_folder(tmp_path / "d")
    pre = Preprocess(size=8, crop_pct=0.9, interpolation="bicubic")
    assert workers_for(len(images), 0) > 0
    seen = set()
    real_open = data_mod.open_image
    monkeypatch.setattr(data_mod, "open_image", lambda p: seen.add((os.getpid(), threading.current_thread().name))
                        or real_open(p))
    pixels = load_pixels(images, pre)
    assert {pid for pid, _ in seen} == {os.getpid()} and all(name.startswith("decode") for _, name in seen)
    assert np.array_equal(pixels, np.stack([pre.pixels(open_image(p)) for p in images.paths]))
    (root / "0300.png").write_bytes(b"truncated")
    with pytest.raises(DataError, match=r"cannot read image .*0300\.png"):
        load_pixels(images, pre)


@pytest.fixture(scope="module")
def imagenet_sample(tmp_path_factory):
    from .conftest import SHARED
    archive = SHARED / "imagenet-sample.tar.gz"
    if not archive.exists():
        pytest.skip("../shared/data/imagenet-sample.tar.gz is not present")
    d = tmp_path_factory.mktemp("imagenet")
    with tarfile.open(archive) as t:
        t.extractall(d, filter="data")
    return d / "imagenet-sample" / "val"


def test_imagenet_val_tree_maps_wnids_to_model_outputs(imagenet_sample):
    names, wnid_index = imagenet_classes()
    s = image_folder(imagenet_sample, class_index_for(names), names)
    assert len(s) == 1000 and sorted(s.labels) == list(range(1000))
    for path, label in zip(s.paths[:20], s.labels[:20]):
        assert wnid_index[path.parent.name] == label


def test_folder_fingerprint_follows_names_sizes_and_mtimes(tmp_path):
    from pipeline.io.listing import fingerprint_folder, forget_listings

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / cls / f"{i}.png")
    first = fingerprint_folder(str(tmp_path))
    assert fingerprint_folder(str(tmp_path)) == first                 # unchanged: same key
    img = tmp_path / "a" / "0.png"
    Image.new("RGB", (8, 8), (0, 0, 255)).save(img)                   # rewritten in place
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    assert fingerprint_folder(str(tmp_path)) == first                 # within one run: listed once
    forget_listings()                                                 # the next run (deploy) lists again
    second = fingerprint_folder(str(tmp_path))
    assert second != first
    (tmp_path / "b" / "2.png").rename(tmp_path / "a" / "9.png")       # moved to another class
    third = fingerprint_folder(str(tmp_path))                         # folder mtimes changed: listed again
    assert third not in (first, second)
    (tmp_path / "b" / "notes.txt").write_text("not an image")         # not an image: ignored
    os.utime(tmp_path / "b", ns=(1, 1))
    assert fingerprint_folder(str(tmp_path)) == third
