"""A second trained RepViT, made here, to check that int8 choices made on the shared
reference generalize (the project's acceptance also uses a held-back trained RepViT of
another variant and input size, which is not shared).

It is trained the way ../shared/data/reference/README.md says the shared one was, with
another variant and input size (default RepViT-M1.0 at 48 x 48): CIFAR-10's 50,000
training photos upsampled (bilinear, the pipeline's own preprocessing), random crops with
reflect padding of 1/8 of the side and horizontal flips, AdamW, one-cycle schedule, label
smoothing 0.1, both heads trained on labels, on the CPU. It writes a release-format
checkpoint (``{"model", "epoch", "test_top1", "variant", "input_size", "mean", "std",
"crop_pct", "interpolation", "classes"}``) under artifacts/data/, which the benches take
with ``--checkpoint``. Deterministic for a given seed and thread count."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shared import UNPACKED, require_shared, unpacked  # noqa: E402
from pipeline.io.data import Preprocess, image_folder, load_pixels, normalize_pixels  # noqa: E402
from pipeline.models.repvit import create_model  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def pixels_of(root: Path, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    images = image_folder(root)
    pre = Preprocess(size=size, crop_pct=1.0, interpolation="bilinear", mean=MEAN, std=STD)
    return load_pixels(images, pre), np.asarray(images.labels), list(images.classes)


def augment(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Random crop of the reflect-padded batch (one offset per image) and random flips."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out


@torch.no_grad()
def top1(model, pixels: np.ndarray, labels: np.ndarray, batch: int = 500) -> float:
    model.eval()
    right = 0
    for i in range(0, len(pixels), batch):
        out = model(torch.from_numpy(normalize_pixels(pixels[i:i + batch], MEAN, STD)))
        right += int((out.argmax(1).numpy() == labels[i:i + batch]).sum())
    return right / len(pixels)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variant", default="m1.0")
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="training images used (0: all; for a quick look)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    require_shared()
    cifar = unpacked("cifar10-jpg.tar.gz", "cifar10")
    out = args.out or UNPACKED / f"repvit_{args.variant.replace('.', '_')}_cifar10_{args.size}px.pth"
    torch.manual_seed(args.seed)
    t0 = time.time()
    train_px, train_y, classes = pixels_of(cifar / "train", args.size)
    test_px, test_y, _ = pixels_of(cifar / "test", args.size)
    if args.limit:
        keep = np.sort(np.random.default_rng(args.seed).permutation(len(train_px))[:args.limit])
        train_px, train_y = train_px[keep], train_y[keep]
    print(f"decoded {len(train_px)} training and {len(test_px)} test images at {args.size} px "
          f"in {time.time() - t0:.0f} s", file=sys.stderr)

    model = create_model(args.variant, num_classes=len(classes), seed=args.seed)
    steps = args.epochs * (len(train_px) // args.batch)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.025)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(args.seed)
    pad = max(1, args.size // 8)
    step, t0 = 0, time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_px), generator=gen).numpy()
        for i in range(0, len(order) - args.batch + 1, args.batch):
            idx = np.sort(order[i:i + args.batch])
            x = augment(torch.from_numpy(normalize_pixels(train_px[idx], MEAN, STD)), pad, gen)
            y = torch.from_numpy(train_y[idx]).long()
            # Each head on the labels, as the shared reference was trained (the model's own
            # forward returns their average).
            feats = x
            for f in model.features:
                feats = f(feats)
            feats = feats.mean((2, 3))
            head, dist = model.classifier.classifier(feats), model.classifier.classifier_dist(feats)
            loss = 0.5 * (F.cross_entropy(head, y, label_smoothing=0.1)
                          + F.cross_entropy(dist, y, label_smoothing=0.1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0 or step == steps:
                rate = step / (time.time() - t0)
                print(f"epoch {epoch + 1}/{args.epochs} step {step}/{steps} loss {loss.item():.3f} "
                      f"({rate:.2f} steps/s, {(steps - step) / rate / 60:.0f} min left)", file=sys.stderr)
    acc = top1(model, test_px, test_y)
    print(f"float top-1 on the {len(test_px)} test images: {100 * acc:.2f}% (measured)", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    torch.save({"model": model.state_dict(), "epoch": args.epochs - 1, "test_top1": acc,
                "variant": args.variant, "input_size": args.size, "mean": list(MEAN), "std": list(STD),
                "crop_pct": 1.0, "interpolation": "bilinear", "classes": classes}, tmp)
    tmp.replace(out)
    print(out)


if __name__ == "__main__":
    main()
