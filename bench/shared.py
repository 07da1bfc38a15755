"""Locating and unpacking ../shared/data once (into the git-ignored artifacts/data)."""
from __future__ import annotations

import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.core.log import configure  # noqa: E402

configure()   # the benches show the pipeline's progress messages, as the CLI does
SHARED = ROOT.parent / "shared" / "data"
UNPACKED = ROOT / "artifacts" / "data"
REFERENCE = SHARED / "reference" / "repvit_m0_9_cifar10_64px.pth"


def require_shared() -> Path:
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} is not present on this machine", file=sys.stderr)
        sys.exit(0)
    return SHARED


def unpacked(archive: str, inner: str) -> Path:
    """``archive`` from shared/data, unpacked once; returns UNPACKED / inner."""
    target = UNPACKED / inner
    if not target.is_dir():
        UNPACKED.mkdir(parents=True, exist_ok=True)
        print(f"unpacking {archive} (once) ...", file=sys.stderr)
        with tarfile.open(require_shared() / archive) as tar:
            tar.extractall(UNPACKED, filter="data")
    return target


def add_checkpoint_option(ap) -> None:
    """``--checkpoint``: the trained CIFAR-10 RepViT a bench measures (default: the shared
    reference; bench/make_second_reference.py makes another variant and input size)."""
    ap.add_argument("--checkpoint", type=Path, default=REFERENCE,
                    help="trained CIFAR-10 RepViT (release format; default: the shared reference)")


def reference_run(quant: str, sets: list[str], artifacts: str, eval_images: int = 0,
                  checkpoint: Path = REFERENCE):
    """RunOptions for a deploy of a trained CIFAR-10 RepViT (the shared reference unless
    ``checkpoint``, as the variant the file names): CIFAR-10 train calibrates, test is
    scored (all 10,000, or ``eval_images`` of them)."""
    from pipeline.app.deploy import RunOptions

    cifar = unpacked("cifar10-jpg.tar.gz", "cifar10")
    sets = list(sets) + ([f"data.eval_images={eval_images}"] if eval_images else [])
    return RunOptions(quant=quant, variant=variant_of(checkpoint), checkpoint=str(checkpoint), data=str(cifar / "test"),
                      calib=str(cifar / "train"), artifacts=ROOT / "artifacts" / artifacts, sets=tuple(sets))


def variant_of(checkpoint: Path) -> str:
    """The variant a release-format checkpoint names (``"variant"``)."""
    from pipeline.io.checkpoints import parse, read_file

    hint = parse(read_file(checkpoint), str(checkpoint)).variant_hint
    if not hint:
        raise SystemExit(f"{checkpoint}: the file does not name its variant ('variant' key)")
    return hint


def model_title(rep: dict) -> str:
    """What a report measured, for a bench's heading: variant, input size, checkpoint file."""
    return (f"RepViT-{rep['variant'].upper()} at {rep['preprocess']['input_size']} px "
            f"({Path(rep['weights']['source']).name})")


def disagreements_by_margin(fid: dict) -> str:
    """The fidelity's disagreements per bin of float's top-1 - top-2 margin, on one line."""
    from pipeline.app.report import margin_label

    return ", ".join(f"{margin_label(b['float_margin'])}: {b['disagreements']} of {b['images']}"
                     for b in fid.get("agreement_by_float_margin", []))


def latency_artifacts(variant: str, schemes: tuple[str, ...], formats: tuple[str, ...] = ("onnx", "tflite"),
                      sets: tuple[str, ...] = (), folder: str = "bench-latency"):
    """The artifacts the latency benches time: ``CKPT=random`` (untrained, BatchNorm
    randomized: speed as trained, accuracy meaningless), ``formats``, one deploy per scheme
    under artifacts/``folder`` (cached), ``sets`` added to each. Returns the reports, a
    ``path_of(scheme, fmt)`` lookup, the preprocessing meta and one preprocessed photo (NHWC
    uint8, batch 1)."""
    from pipeline.app.deploy import RunOptions, deploy
    from pipeline.io.data import preprocess_of, sample_images

    base = dict(variant=variant, checkpoint="random", artifacts=ROOT / "artifacts" / folder,
                sets=(f"export.formats=[{','.join(formats)}]", "validate.latency_runs=5", *sets))
    reports = {q: deploy(RunOptions(quant=q, **base)) for q in schemes}
    meta = reports[schemes[0]][0]["preprocess"] | {"classes": []}

    def path_of(scheme: str, fmt: str) -> Path:
        rep, folder = reports[scheme]
        return folder / next(a for a in rep["artifacts"] if a["format"] == fmt)["path"]

    return reports, path_of, meta, preprocess_of(meta).pixels(sample_images(1)[0])[None]
