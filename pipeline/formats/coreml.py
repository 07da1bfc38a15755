"""Core ML: an ML program classifier that takes an RGB image and returns labels with
probabilities, with the metadata Xcode shows.

Normalization is inside the model: the image input scales by 1/255 and adds -mean
(``ct.ImageType`` allows only one scale), and the per-channel 1/std is folded into the
stem convolution's input channels. That is exact: the mean is removed before the
convolution's zero padding, so padding sees the same zeros as in PyTorch, unlike the
single averaged std that common examples pass as the image scale.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from torch import nn

from pipeline.core.quiet import quiet
from pipeline.formats.base import (ExportContext, ExportError, ExportResult, SchemeSupport, check_parity,
                                   torch_logits, weights_license)
from pipeline.io.data import normalized
from pipeline.models.wrap import StdFoldedClassifier
from pipeline.quant.ranges import input_ranges, ranged_per_tensor

TARGETS = ("iOS16", "iOS17", "iOS18")
PREVIEW_KEY = "com.apple.coreml.model.preview.type"


@dataclass
class CoreMLConfig:
    deployment_target: Literal["iOS16", "iOS17", "iOS18"] = "iOS17"
    # None: fp16 (Core ML's default and what the Neural Engine runs), fp32 for scheme fp32.
    precision: Optional[Literal["fp16", "fp32"]] = None
    author: str = "repvit-pipeline"
    license: Optional[str] = None        # default: the weights' license
    version: str = "1.0"
    palette_group_size: int = 16   # pal*: channels per palette on iOS18
    # int8 (W8A8) activations: coremltools' LinearQuantizer scheme and observer.
    quantization_scheme: Literal["symmetric", "affine"] = "symmetric"
    activation_observer: Literal["moving_average_min_max", "min_max", "ema_min_max"] = "moving_average_min_max"
    # A number: each activation's range becomes that percentile of the calibration images'
    # own minima / maxima (the observer's statistics replaced before conversion), as the
    # TFLite export calibrates. null: the observer's ranges.
    activation_percentile: Optional[float] = None
    # A number: each activation's range clips that percentile's share of all its values over
    # the calibration images (two-tailed, exact: quant.ranges.ValueTails);
    # wins over ``activation_percentile``. null: as above.
    activation_value_percentile: Optional[float] = None
    # Simulated parity gate for the fp32 program (interpreter vs PyTorch probabilities).
    tolerance: float = 1e-4
    # How a W8A8 program is simulated where Core ML cannot run (Linux; the budget check and
    # validation): "int8", its convolutions as int8 x int8 sums (the A17 Pro / M4 Neural
    # Engine's int8-int8 path, where W8A8 pays; the float path where oneDNN cannot sum
    # exactly), or "fp16", the program's literal arithmetic (dequantize to fp16, then
    # convolve: older chips, GPU, CPU).
    simulation: Literal["int8", "fp16"] = "int8"

    def validate(self):
        if self.activation_percentile is not None and not 50.0 <= self.activation_percentile <= 100.0:
            raise ValueError(f"activation_percentile {self.activation_percentile} is outside 50-100")
        if self.activation_value_percentile is not None and not 90.0 <= self.activation_value_percentile <= 100.0:
            raise ValueError(f"activation_value_percentile {self.activation_value_percentile} is outside "
                             "90-100 (99.999 keeps all but the most extreme 0.001% of each activation's values)")


def precision_of(ctx: ExportContext, cfg: CoreMLConfig) -> str:
    return cfg.precision or ("fp32" if ctx.scheme == "fp32" else "fp16")


def image_probabilities(path: Path, pixels: np.ndarray, simulation: str = "int8") -> np.ndarray:
    """Class probabilities for uint8 NHWC ``pixels`` from the MIL interpreter (simulated)."""
    from pipeline.runtimes.coreml import MilRuntime

    return MilRuntime(path, {}, simulation=simulation).predict(pixels)


def _set_metadata(ml, ctx: ExportContext, cfg: CoreMLConfig, precision: str) -> None:
    m = ctx.meta
    weights = m.get("weights", {})
    ml.short_description = (f"RepViT-{ctx.variant.upper()} image classifier ({len(m['classes'])} "
                            f"classes), {ctx.scheme}, {precision} compute. Input: RGB "
                            f"{m['input_size']}x{m['input_size']} centre crop.")
    ml.author = cfg.author
    ml.license = cfg.license or weights_license(ctx)
    ml.version = cfg.version
    ml.input_description["image"] = (f"RGB image, {m['input_size']}x{m['input_size']}: resize the "
                                     f"shorter side to {int(m['input_size'] / m['crop_pct'])} "
                                     f"({m['interpolation']}) and centre-crop")
    ml.output_description["classLabel"] = "Most likely class"
    ml.output_description["classLabel_probs"] = "Probability of each class (softmax)"
    ud = ml.user_defined_metadata
    ud[PREVIEW_KEY] = "imageClassifier"
    ud.update({"variant": ctx.variant, "scheme": ctx.scheme, "mean": str(m["mean"]), "std": str(m["std"]),
               "crop_pct": str(m["crop_pct"]), "weights_sha256": str(weights.get("sha256")),
               "weights_trained": str(weights.get("trained"))})


class CoreMLExporter(SchemeSupport):
    name, suffix = "coreml", ".mlpackage"

    def export(self, model: nn.Module, ctx: ExportContext, cfg: CoreMLConfig) -> ExportResult:
        with quiet():
            import coremltools as ct

        m = ctx.meta
        size = m["input_size"]
        precision = precision_of(ctx, cfg)
        wrapped = StdFoldedClassifier(model, m["std"]).eval()
        if ctx.int8:
            if cfg.deployment_target == "iOS16":
                raise ExportError("Core ML W8A8 (int8 activations) needs iOS17 or later: set "
                                  "export.coreml.deployment_target=iOS17")
            wrapped = quantize_w8a8(wrapped, ctx.calibration, m["mean"], cfg, ctx.float_layers)
        with quiet():
            traced = torch.jit.trace(wrapped, torch.zeros(1, 3, size, size))
            try:
                ml = ct.convert(
                    traced, convert_to="mlprogram",
                    inputs=[ct.ImageType(name="image", shape=(1, 3, size, size), scale=1 / 255.0,
                                         bias=[-v for v in m["mean"]], color_layout=ct.colorlayout.RGB)],
                    classifier_config=ct.ClassifierConfig(list(m["classes"])),
                    minimum_deployment_target=getattr(ct.target, cfg.deployment_target),
                    compute_precision=(ct.precision.FLOAT16 if precision == "fp16"
                                       else ct.precision.FLOAT32),
                    skip_model_load=True)
            except Exception as e:
                raise ExportError(f"Core ML conversion failed: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}") from e
        compression = None
        if ctx.scheme in ("w8", "pal4", "pal6", "pal8"):
            ml, compression = compress_weights(ml, ctx.scheme, cfg)
        elif ctx.int8:
            ranges = (f"percentile {cfg.activation_value_percentile:g} of all values"
                      if cfg.activation_value_percentile is not None else
                      f"percentile {cfg.activation_percentile:g} of each image's min / max"
                      if cfg.activation_percentile is not None else f"ranges by {cfg.activation_observer}")
            compression = (f"W8A8: weights int8 per channel, activations 8-bit per tensor "
                           f"({cfg.quantization_scheme}), {ranges} over "
                           f"{len(ctx.calibration)} calibration images in batches of {CALIBRATION_BATCH} "
                           f"(coremltools LinearQuantizer; {ctx.weights_origin})")
        _set_metadata(ml, ctx, cfg, precision)
        ml.save(str(ctx.out_path))
        facts = {"deployment_target": cfg.deployment_target, "compute_precision": precision,
                 "input": f"image RGB {size}x{size}", "outputs": ["classLabel", "classLabel_probs"],
                 "compression": compression, "simulation": cfg.simulation}
        facts.update(check_package(ctx.out_path, model, ctx, precision,
                                   weights_exact=ctx.scheme in ("fp32", "fp16")))
        if ctx.check_inputs is not None:
            ref = torch_logits(model, normalized(ctx.check_inputs, m))
            ref = torch.softmax(torch.from_numpy(ref), 1).numpy()
            facts["parity"] = check_parity(
                "Core ML (simulated)", ref, image_probabilities(ctx.out_path, ctx.check_inputs, cfg.simulation),
                "simulated: MIL program read back and interpreted in PyTorch at its declared "
                f"precision ({precision}), vs PyTorch float32 probabilities",
                cfg.tolerance if precision == "fp32" and ctx.scheme == "fp32" else None)
        if ctx.int8:
            facts["execution"] = execution(ctx.out_path)
        facts["host"] = platform.system()
        return ExportResult(ctx.out_path, facts)


CALIBRATION_BATCH = 32


def quantize_w8a8(wrapped: nn.Module, calibration: np.ndarray, mean: list[float], cfg: CoreMLConfig,
                  float_layers: tuple[str, ...] = ()) -> nn.Module:
    """Fake-quantized twin of ``wrapped`` whose observers saw the calibration images; its
    conversion is a W8A8 ML program. No training: fake quantization stays off while the
    observers run, and BatchNorm is already folded."""
    from coremltools.optimize.torch.quantization import (LinearQuantizer, LinearQuantizerConfig,
                                                         ModuleLinearQuantizerConfig)
    from torch.ao.quantization.observer import ObserverBase

    x = torch.from_numpy(calibration.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
                         - np.asarray(mean, np.float32).reshape(1, 3, 1, 1))
    config = LinearQuantizerConfig(
        global_config=ModuleLinearQuantizerConfig(
            quantization_scheme=cfg.quantization_scheme, weight_per_channel=True,
            activation_observer=cfg.activation_observer,
            milestones=[0, 1 << 30, 1 << 30, 0]),
        # None: the module stays float (the wrapper holds the fused model as "model").
        module_name_configs={f"model.{layer}": None for layer in float_layers})
    with quiet():
        quantizer = LinearQuantizer(wrapped, config)
        prepared = quantizer.prepare(example_inputs=(x[:1],), inplace=False)
        prepared.train()  # observers record only in train mode; there is no BatchNorm left
        observers = [m for m in prepared.modules() if isinstance(m, ObserverBase) and ranged_per_tensor(m)]
        by_values = cfg.activation_value_percentile is not None
        percentile = cfg.activation_value_percentile if by_values else cfg.activation_percentile
        with torch.no_grad(), input_ranges(observers if percentile is not None else [], percentile,
                                           by_values, len(x)) as ranges:
            for i in range(0, len(x), CALIBRATION_BATCH):
                quantizer.step()
                prepared(x[i:i + CALIBRATION_BATCH])
        for observer, (lo, hi) in ranges.items():
            observer.min_val.fill_(lo)
            observer.max_val.fill_(hi)
        return quantizer.finalize(inplace=False).eval()


def compress_weights(ml, scheme: str, cfg: CoreMLConfig):
    """Weight-only compression of a converted program (coremltools.optimize.coreml)."""
    import coremltools.optimize.coreml as cto

    with quiet():
        if scheme == "w8":
            config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
                mode="linear_symmetric", dtype="int8", granularity="per_channel"))
            out = cto.linear_quantize_weights(ml, config)
            return out, "weights int8 per channel (symmetric), float16 compute"
        nbits = int(scheme[3:])
        if cfg.deployment_target == "iOS18":
            op = cto.OpPalettizerConfig(mode="kmeans", nbits=nbits, granularity="per_grouped_channel",
                                        group_size=cfg.palette_group_size)
            how = f"per-grouped-channel palettes (group size {cfg.palette_group_size})"
        else:
            op = cto.OpPalettizerConfig(mode="kmeans", nbits=nbits, granularity="per_tensor")
            how = "one palette per tensor (iOS17; iOS18 allows grouped palettes)"
        out = cto.palettize_weights(ml, cto.OptimizationConfig(global_config=op))
        return out, f"{nbits}-bit k-means palettized weights, {how}"


# Ops that move or relabel data, or only exist in the converter's bookkeeping.
_NOT_COMPUTE = ("const", "quantize", "dequantize", "cast", "classify")


def execution(path: Path) -> dict:
    """Which compute ops of a W8A8 program take int8 inputs (a ``dequantize`` feeds them,
    so the Neural Engine can run them on int8 data) and which stay fp16, read from the MIL
    program. coremltools' post-training W8A8 puts no quantize/dequantize around GELU,
    ReLU or sigmoid. The image input's own scale and bias are left out of the count."""
    from pipeline.runtimes.mil import MilInterpreter

    interp = MilInterpreter(path)
    producer = {v.name: op for op in interp.ops for v in op.outputs}
    image = {interp.input_name}   # the input and what its scale / bias compute from it
    int8_fed, fp16 = {}, {}
    for op in interp.ops:
        if op.op_type in _NOT_COMPUTE or op.op_type.startswith("constexpr_"):
            continue
        names = [v.name for v in op.inputs.values() if hasattr(v, "name")]
        sources = [producer.get(n) for n in names]
        if any(n in image for n in names) and all(n in image or n in interp.consts for n in names):
            image.update(v.name for v in op.outputs)
            continue
        into = int8_fed if any(p is not None and p.op_type == "dequantize" for p in sources) else fp16
        into[op.op_type] = into.get(op.op_type, 0) + 1
    return {"runtime": "Core ML ML program (read back; Neural Engine speed cannot be measured here)",
            "int8_input_ops": int8_fed, "fp16_ops": fp16,
            "how": "read from the saved MIL program (not executed)"}


def check_package(path: Path, fused: nn.Module, ctx: ExportContext, precision: str,
                  weights_exact: bool = True) -> dict:
    """Read the saved package back and check what an app relies on; raises on mismatch."""
    from pipeline.runtimes.mil import MilInterpreter

    interp = MilInterpreter(path)
    desc = interp.spec.description
    problems = []
    if [i.name for i in desc.input] != ["image"] or desc.input[0].type.WhichOneof("Type") != "imageType":
        problems.append("input is not the image 'image'")
    if {o.name for o in desc.output} != {"classLabel", "classLabel_probs"}:
        problems.append(f"outputs are {[o.name for o in desc.output]}")
    classify = [op for op in interp.ops if op.op_type == "classify"]
    got_labels = list(classify[0].inputs["classes"].val) if classify else []
    if [str(c) for c in got_labels] != [str(c) for c in ctx.meta["classes"]]:
        problems.append("class labels differ from the model's classes")
    counts = interp.op_counts()
    n_convs = sum(isinstance(mod, nn.Conv2d) for mod in fused.modules())
    if counts.get("batch_norm"):
        problems.append(f"{counts['batch_norm']} batch_norm op(s) left")
    if counts.get("conv", 0) != n_convs:
        problems.append(f"{counts.get('conv', 0)} conv ops for {n_convs} fused convolutions")
    # Weights read back vs the fused PyTorch weights (stem after the 1/std folding).
    expected = StdFoldedClassifier(fused, ctx.meta["std"]).model
    torch_convs = [mod for mod in expected.modules() if isinstance(mod, nn.Conv2d)]
    mil_convs = [op for op in interp.ops if op.op_type == "conv"]
    worst = 0.0
    for op, conv in zip(mil_convs, torch_convs if weights_exact else []):
        w = interp.consts[op.inputs["weight"].name].numpy()
        ref = conv.weight.detach().numpy()
        if w.shape != ref.shape:
            problems.append(f"conv {op.name}: weight shape {w.shape} vs {ref.shape}")
            continue
        # fp16 rounding: relative 2^-11 of the value, plus fp16's subnormal floor.
        tol = (np.abs(ref) * 2.0 ** -10 + 6e-8) if precision == "fp16" else 1e-7 + 1e-6 * np.abs(ref)
        worst = max(worst, float((np.abs(w - ref) / (tol + 1e-30)).max()))
    if not weights_exact:
        pass  # compressed weights are checked by the fidelity measurements instead
    elif worst > 1.0:
        problems.append(f"conv weights read back differ from the fused weights by {worst:.2f}x "
                        "the rounding tolerance")
    stored = {"fp16" if any(op.outputs[0].dtype.__name__ == "fp16" for op in mil_convs) else "fp32"}
    if stored != {precision}:
        problems.append(f"conv ops compute in {stored.pop()}, expected {precision}")
    if interp.spec.description.metadata.userDefined.get(PREVIEW_KEY) != "imageClassifier":
        problems.append("the Xcode image-classifier preview key is missing")
    if problems:
        raise ExportError("Core ML package check failed: " + "; ".join(problems))
    return {"ops": {k: v for k, v in counts.items() if k != "const"},
            "weights_vs_fused": (f"within {'fp16' if precision == 'fp16' else 'fp32'} rounding "
                                 f"({worst:.2f} of tolerance)") if weights_exact else
                                "compressed: see fidelity", "labels": len(got_labels)}
