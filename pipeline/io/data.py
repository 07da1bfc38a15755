"""Images in, tensors out: the deployment's own preprocessing (Pillow + numpy), image
folders, and natural sample photos for label-free calibration and checks."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.io.listing import IMAGE_SUFFIXES, fingerprint_folder, walk_images
from pipeline.io.public_sets import PUBLIC_SETS
from pipeline.io.public_sets import name_of as public_set_name
from pipeline.resources import RESOURCES

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
            "nearest": Image.Resampling.NEAREST}


class DataError(ValueError):
    pass


def normalize_pixels(pixels: np.ndarray, mean, std) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW, (pixel/255 - mean) / std. Transposed while still uint8
    and normalized plane by plane: 0.12 against 1.2 ms per 224 px image for the same
    float32 operations on NHWC (numpy's inner loops over 3 channels are slow), a fifth of
    onnxruntime's int8 scoring time. numpy, not torch: torch's OpenMP threads spin after
    each op and slowed the onnxruntime sessions that run next by a tenth."""
    x = np.divide(np.ascontiguousarray(np.asarray(pixels, np.uint8).transpose(0, 3, 1, 2)), np.float32(255),
                  dtype=np.float32)
    x -= np.asarray(mean, np.float32)[:, None, None]
    x /= np.asarray(std, np.float32)[:, None, None]
    return x


def normalized_tensor(pixels: np.ndarray, mean, std):
    """``normalize_pixels`` as a channels-last torch tensor (what oneDNN's convolutions take
    without a reorder): the same float32 operations in the same order, bit-identical
    (tests/test_data.py), in torch's vectorized kernels for the PyTorch scorers (0.2
    against 0.7 ms per 224 px image in the float reference's loop, numpy then a
    channels-last copy)."""
    import torch

    # A copy: the pixels are often a read-only memory map, which torch will not wrap.
    x = torch.from_numpy(np.array(pixels, np.uint8)).permute(0, 3, 1, 2)
    x = x.to(torch.float32, memory_format=torch.channels_last)
    channel = (1, -1, 1, 1)
    return (x.div_(255.0).sub_(torch.tensor(mean, dtype=torch.float32).view(channel))
            .div_(torch.tensor(std, dtype=torch.float32).view(channel)))


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``size / crop_pct``, centre-crop ``size``, then
    (for float inputs) scale to 0..1 and normalize with mean/std."""
    size: int = 224
    crop_pct: float = 0.95
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def crop(self, img: Image.Image) -> Image.Image:
        """The ``size`` x ``size`` RGB crop (what a Core ML image input receives)."""
        img = img.convert("RGB")
        scale = int(self.size / self.crop_pct)  # timm: floor(size / crop_pct)
        w, h = img.size
        if w <= h:
            nw, nh = scale, max(1, round(h * scale / w))
        else:
            nw, nh = max(1, round(w * scale / h)), scale
        img = img.resize((nw, nh), RESAMPLE[self.interpolation])
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        return img.crop((left, top, left + self.size, top + self.size))

    def pixels(self, img: Image.Image) -> np.ndarray:
        """uint8 HWC RGB crop."""
        return np.asarray(self.crop(img), dtype=np.uint8)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """float32 CHW, from uint8 HWC."""
        return normalize_pixels(pixels[None], self.mean, self.std)[0]

    def __call__(self, img: Image.Image) -> np.ndarray:
        return self.normalize(self.pixels(img))


def open_image(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
        return img
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e}. Remove or replace the file.") from None


@dataclass(frozen=True)
class ImageSet:
    """A list of images with optional integer labels; ``classes`` names the labels."""
    paths: tuple[Path, ...]
    labels: Optional[tuple[int, ...]]
    classes: Optional[tuple[str, ...]]
    name: str

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int], name: str) -> "ImageSet":
        return ImageSet(tuple(self.paths[i] for i in indices),
                        tuple(self.labels[i] for i in indices) if self.labels else None,
                        self.classes, name)

    def split(self, n_first: int, seed: int = 0, names: tuple[str, str] = ("calib", "eval")
              ) -> tuple["ImageSet", "ImageSet"]:
        """A deterministic (``n_first`` images spread over the set, the rest) split."""
        order = np.random.default_rng(seed).permutation(len(self))
        held, rest = sorted(order[:n_first].tolist()), sorted(order[n_first:].tolist())
        return (self.subset(held, f"{self.name}[{names[0]}]"),
                self.subset(rest, f"{self.name}[{names[1]}]"))


FOLDER_HINT = ("DATA and CALIB take an ImageFolder (one sub-folder of images per class, named as the "
               "model's classes) or a folder of images")


def _images_under(d: Path) -> list[Path]:
    return sorted(Path(e.path) for e in walk_images(str(d)))


def image_folder(root: str | Path, class_index: Optional[dict[str, int]] = None,
                 classes: Optional[Sequence[str]] = None) -> ImageSet:
    """``root/<class>/*.jpg`` (an ImageFolder) or an ImageNet ``val/<wnid>/`` tree.

    With ``class_index`` (wnid -> model output index) folder names map through it;
    otherwise classes are the sorted folder names, as torchvision's ImageFolder orders them.
    A folder of images with no class folders is an unlabelled set.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}. Pass DATA=<folder of class folders>.")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    if not subdirs:
        paths = _images_under(root)
        if not paths:
            raise DataError(f"no images under {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}): {FOLDER_HINT}")
        return ImageSet(tuple(paths), None, None, root.name)
    paths, labels = [], []
    names = [d.name for d in subdirs]
    if class_index is None:
        class_index = {n: i for i, n in enumerate(names)}
        classes = names
    unknown = [n for n in names if n not in class_index]
    if unknown:
        raise DataError(f"{root}: folder(s) {', '.join(unknown[:5])} are not classes of this "
                        f"model; expected names such as {', '.join(list(class_index)[:3])}")
    for d in subdirs:
        for p in _images_under(d):
            paths.append(p)
            labels.append(class_index[d.name])
    if not paths:
        raise DataError(f"no images under {root} or its class folders: {FOLDER_HINT}")
    return ImageSet(tuple(paths), tuple(labels), tuple(classes) if classes else None, root.name)


# ---------------------------------------------------------------- natural sample photos

SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field",
                 "immunohistochemistry", "retina", "colorwheel")


def sample_images(n: int, seed: int = 0) -> list[Image.Image]:
    """``n`` natural photos from scikit-image's bundled set, varied by random crops and
    flips (deterministic for ``seed``): real image statistics without any download."""
    import skimage.data

    base = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in SAMPLE_PHOTOS]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = base[i % len(base)]
        if i >= len(base):
            w, h = img.size
            frac = rng.uniform(0.4, 1.0)
            cw, ch = max(16, int(w * frac)), max(16, int(h * frac))
            x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            img = img.crop((x0, y0, x0 + cw, y0 + ch))
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(img)
    return out


def batch(images: Sequence[Image.Image], pre: Preprocess) -> np.ndarray:
    return np.stack([pre(img) for img in images])


def imagenet_classes() -> tuple[list[str], dict[str, int]]:
    """ImageNet-1k class names and wnid -> index, from the table shipped with the package."""
    rows = json.loads((RESOURCES / "imagenet_classes.json").read_text())
    return [r[2] for r in rows], {r[1]: r[0] for r in rows}


# ---------------------------------------------------------------- the recipe's data section

@dataclass
class DataConfig:
    """``eval`` (DATA) is scored, never calibrated on; ``calib`` (CALIB) is where
    calibration and QAT images come from. Without ``calib``, a deterministic part of
    ``eval`` is held out for calibration; without either, natural sample photos are used."""
    eval: Optional[str] = None
    calib: Optional[str] = None
    calib_images: int = 256
    # CALIB images, disjoint from the calibration ones (natural photos where CALIB has none
    # to spare), on which the accuracy-aware pass checks max_drop before validation (the
    # scored DATA is never used for it).
    budget_images: int = 500
    eval_images: Optional[int] = None   # score N images, a deterministic spread over the set
    seed: int = 0
    # Official or hub weights with neither CALIB nor DATA calibrate on this public set
    # (pipeline/io/public_sets.py; downloaded once); null: natural sample photos.
    public_calib: Optional[str] = "imagenette-320"

    def validate(self):
        if self.calib_images < 1:
            raise ValueError("calib_images must be at least 1")
        if self.public_calib is not None and self.public_calib not in PUBLIC_SETS:
            raise ValueError(f"public_calib {self.public_calib!r} is not a public calibration set; "
                             f"valid: {', '.join(PUBLIC_SETS)}, or null")


def class_index_for(classes: Sequence[str]) -> dict[str, int]:
    """Folder name -> output index: the model's class names, and ImageNet wnids for
    1000-class models."""
    index = {name: i for i, name in enumerate(classes)}
    if len(classes) == 1000:
        index.update(imagenet_classes()[1])
    return index


def fingerprint_data(cfg: DataConfig) -> dict:
    """The cache key part of the data section's folders (CALIB too wherever DATA is read:
    without CALIB, calibration images are held out of DATA, which changes both sets)."""
    try:
        return {"calib": fingerprint_folder(cfg.calib), "eval": fingerprint_folder(cfg.eval)}
    except FileNotFoundError as e:   # listing's own message, as the pipeline's data error
        raise DataError(str(e)) from None


@dataclass(frozen=True)
class Sets:
    calib: Optional[ImageSet]      # None: natural sample photos
    eval: Optional[ImageSet]
    calib_description: str
    eval_description: str


def resolve_sets(cfg: DataConfig, classes: Sequence[str]) -> Sets:
    index = class_index_for(classes)
    eval_set = image_folder(cfg.eval, index, classes) if cfg.eval else None
    if cfg.calib:
        calib = image_folder(cfg.calib, index if _labelled(cfg.calib, index) else None, classes)
        public = public_set_name(cfg.calib)
        calib_desc = (f"{PUBLIC_SETS[public].about} ({len(calib)} images, deterministic selection)"
                      if public else f"CALIB={cfg.calib} ({len(calib)} images, deterministic selection)")
    elif eval_set is not None:
        n = min(cfg.calib_images, len(eval_set) // 2)
        if n < 1:
            raise DataError(f"DATA={cfg.eval} has {len(eval_set)} image(s): too few to hold some out "
                            "for calibration; pass CALIB=<training images>")
        calib, eval_set = eval_set.split(n, cfg.seed)
        calib_desc = f"{n} images held out of DATA={cfg.eval} (not scored)"
    else:
        calib = None
        calib_desc = (f"{cfg.calib_images} natural sample photos (scikit-image's bundled images, "
                      "random crops and flips; int8 is less faithful than calibrated on images of the "
                      "model's own kind: pass CALIB, docs/calibration.md)")
    if eval_set is not None and cfg.eval_images and cfg.eval_images < len(eval_set):
        eval_set = eval_set.split(cfg.eval_images, cfg.seed + 1, (f"{cfg.eval_images} of", "rest"))[0]
    eval_desc = f"{len(eval_set)} labelled images from DATA={cfg.eval}" if eval_set else "none (no DATA)"
    return Sets(calib, eval_set, calib_desc, eval_desc)


def _labelled(root: str, index: dict[str, int]) -> bool:
    subdirs = [d.name for d in Path(root).iterdir() if d.is_dir()]
    return bool(subdirs) and all(d in index for d in subdirs)


def calibration_pixels(sets: Sets, cfg: DataConfig, pre: Preprocess, progress=None) -> np.ndarray:
    """uint8 NHWC crops of the calibration images (deterministic selection)."""
    if sets.calib is None:
        images = sample_images(cfg.calib_images, cfg.seed)
        return np.stack([pre.pixels(im) for im in images])
    calib = sets.calib
    if len(calib) > cfg.calib_images:
        calib = calib.split(cfg.calib_images, cfg.seed)[0]
    return load_pixels(calib, pre, progress)


def workers_for(n: int, asked: int) -> int:
    """0 (decode in the calling thread) for small sets, where a pool costs more."""
    if n < 512:
        return 0
    return asked if asked > 0 else max(1, min(8, (os.cpu_count() or 1)))


def decode_into(out: np.ndarray, paths: tuple[Path, ...], pre: Preprocess, workers: int, progress=None,
                batch: int = 64) -> None:
    """``out[i] = pre.pixels(paths[i])``, by ``workers`` threads (0: this one), in order.
    Threads, not processes: Pillow lets go of the GIL while it decodes and resizes, so they
    run side by side, and no process is forked from one that has loaded JAX or torch's
    thread pools (forked DataLoader workers could deadlock there: ai-edge-quantizer loads
    JAX during export). At most ``4 * workers`` batches are decoded ahead of the writes."""
    def decode(start: int) -> tuple[int, np.ndarray]:
        return start, np.stack([pre.pixels(open_image(p)) for p in paths[start:start + batch]])

    starts = range(0, len(paths), batch)
    if not workers:
        done = map(decode, starts)
    else:
        done = _bounded_in_order(decode, starts, workers, ahead=4 * workers)
    for start, pixels in done:
        out[start:start + len(pixels)] = pixels
        if progress:
            progress(len(pixels))


def _bounded_in_order(fn, items, workers: int, ahead: int):
    """``map(fn, items)`` on a thread pool, in order, with at most ``ahead`` results pending."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def load_pixels(images: ImageSet, pre: Preprocess, progress=None) -> np.ndarray:
    """uint8 NHWC crops of ``images``, in order (decoded by a thread pool for large sets:
    QAT's 50,000 training images took minutes in one thread)."""
    out = np.empty((len(images), pre.size, pre.size, 3), np.uint8)
    decode_into(out, images.paths, pre, workers_for(len(images), 0), progress)
    return out


@dataclass(frozen=True)
class BudgetSet:
    """Images the int8 budget is checked on, never calibrated on nor scored: with labels
    the drop is in top-1 points, without them in top-1 agreement points (100 - agreement
    with the float model), an upper bound on the top-1 drop."""
    pixels: np.ndarray              # uint8 NHWC
    labels: Optional[np.ndarray]
    description: str


def _held_out(calib: Optional[ImageSet], cfg: DataConfig) -> Optional[ImageSet]:
    """The CALIB images after the calibration ones, up to ``budget_images`` of them."""
    if calib is None or len(calib) <= cfg.calib_images:
        return None
    rest = calib.split(cfg.calib_images, cfg.seed)[1]
    return rest.split(min(cfg.budget_images, len(rest)), cfg.seed + 2, ("budget", "rest"))[0]


def _held_out_photos(n: int, seed: int) -> list[Image.Image]:
    """Natural sample photos cropped differently from the calibration ones (whose
    uncropped originals they share, so those are left out)."""
    return sample_images(n + len(SAMPLE_PHOTOS), seed)[len(SAMPLE_PHOTOS):]


def budget_set(sets: Sets, cfg: DataConfig, pre: Preprocess, progress=None) -> BudgetSet:
    """CALIB images not used for calibration (labelled or not); where CALIB has none to
    spare, natural sample photos cropped differently from the calibration ones."""
    held = _held_out(sets.calib, cfg)
    if held is None:
        photos = _held_out_photos(cfg.budget_images, cfg.seed + 2)
        return BudgetSet(np.stack([pre.pixels(im) for im in photos]), None,
                         f"{len(photos)} natural sample photos (no held-out CALIB images: pass a CALIB "
                         f"with more than data.calib_images={cfg.calib_images} images)")
    labels = np.asarray(held.labels) if held.labels else None
    return BudgetSet(load_pixels(held, pre, progress), labels,
                     f"{len(held)} {'labelled' if labels is not None else 'unlabelled'} CALIB images "
                     "held out of calibration")


def training_pixels(sets: Sets, cfg: DataConfig, pre: Preprocess, n: int, progress=None
                    ) -> tuple[np.ndarray, Optional[np.ndarray], np.ndarray, str]:
    """QAT images: (uint8 NHWC, labels or None, held-out uint8 NHWC, description). The
    held-out images are the int8 budget set where CALIB has images to spare (so QAT's
    readout and the accuracy-aware pass use the same images), else a tenth of CALIB; never
    trained on."""
    if sets.calib is None:
        train = sample_images(n, cfg.seed)
        holdout = _held_out_photos(64 - len(SAMPLE_PHOTOS), cfg.seed + 1)
        return (np.stack([pre.pixels(im) for im in train]), None,
                np.stack([pre.pixels(im) for im in holdout]),
                f"{n} natural sample photos (random crops and flips; no labels: distillation only)")
    calib = sets.calib
    held = _held_out(calib, cfg)
    if held is None:
        held = calib.split(max(1, min(cfg.budget_images, len(calib) // 10)), cfg.seed + 2,
                           ("holdout", "rest"))[0]
    held_paths = set(held.paths)
    pool = calib.subset([i for i, p in enumerate(calib.paths) if p not in held_paths], f"{calib.name}[qat]")
    if len(pool) > n:
        pool = pool.split(n, cfg.seed + 3, ("qat", "rest"))[0]
    labels = np.asarray(pool.labels) if pool.labels else None
    return (load_pixels(pool, pre, progress), labels, load_pixels(held, pre, progress),
            f"{len(pool)} CALIB images ({'labelled' if labels is not None else 'unlabelled'}), "
            f"{len(held)} more held out for the readout")


def normalized(pixels: np.ndarray, meta: dict) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW, normalized as the model expects."""
    return normalize_pixels(pixels, meta["mean"], meta["std"])


def preprocess_of(meta: dict) -> Preprocess:
    return Preprocess(meta["input_size"], meta["crop_pct"], meta["interpolation"],
                      tuple(meta["mean"]), tuple(meta["std"]))
