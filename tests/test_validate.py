"""Validation numbers and how reports state them: paired drops with their standard error."""
import math

import numpy as np
import pytest

from pipeline.app.report import budget_of, margin_table
from pipeline.eval.metrics import agreement_by_float_margin, fidelity, paired_drop


def one_hot(pred, classes=3):
    return np.eye(classes)[pred]


def test_paired_drop_counts_only_images_where_one_model_is_right():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    ref = one_hot([0, 1, 2, 0, 1, 2, 1, 1])     # 7 right
    art = one_hot([0, 1, 2, 1, 2, 2, 2, 1])     # 5 right; image 6 wrong in both (differently)
    d = np.array([0, 0, 0, 1, 1, 0, 0, 0], float)
    out = paired_drop(ref, art, labels)
    assert out["points"] == pytest.approx(25.0)
    assert out["standard_error"] == pytest.approx(100 * d.std(ddof=1) / math.sqrt(8))


class Record:
    def __init__(self, facts):
        self.facts = facts


def test_agreement_by_float_margin_puts_each_flip_in_its_bin():
    # float's top-1 / top-2 margins: 0.02, 0.02, 0.08, 0.3, 0.9 (classes 0 and 1 lead)
    tops = [(0.51, 0.49), (0.49, 0.51), (0.54, 0.46), (0.65, 0.35), (0.95, 0.05)]
    float_probs = np.array([[a, b, 0.0] for a, b in tops])
    probs = float_probs.copy()
    probs[[0, 2]] = probs[[0, 2]][:, [1, 0, 2]]   # flips the first image (margin 0.02) and the 0.08 one
    probs[4] = [0.6, 0.3, 0.1]                   # moves, does not flip
    bins = agreement_by_float_margin(float_probs, probs)
    assert [b["float_margin"] for b in bins] == [[0.0, 0.05], [0.05, 0.1], [0.1, 0.2], [0.2, 0.5], [0.5, None]]
    assert [b["images"] for b in bins] == [2, 1, 0, 1, 1]
    assert [b["disagreements"] for b in bins] == [1, 1, 0, 0, 0]
    assert [b["agreement"] for b in bins] == [0.5, 0.0, None, 1.0, 1.0]
    fid = fidelity(np.log(float_probs + 1e-9), np.log(probs + 1e-9), float_probs, probs)
    assert fid["top1_agreement"] == 0.6 and fid["agreement_by_float_margin"] == bins
    table = margin_table([{"format": "onnx", "fidelity": fid}])
    assert "| images | 2 | 1 | 0 | 1 | 1 |" in table
    assert "| onnx | 50.00 (1) | 0.00 (1) | - | 100.00 (0) | 100.00 (0) |" in table


def test_budget_states_unit_and_standard_error():
    records = {"quantize": Record({"max_drop": 0.3})}
    labelled = {"accuracy": {"top1": 0.66, "drop_vs_float": {"points": 1.0, "standard_error": 0.4}},
                "fidelity": {"top1_agreement": 0.95, "n": 1000}}
    unlabelled = {"accuracy": None, "fidelity": {"top1_agreement": 0.96, "n": 101}}
    budget_of([labelled, unlabelled], records, {"accuracy": {"top1": 0.67}})
    assert labelled["budget"] == {"max_drop": 0.3, "drop": pytest.approx(1.0), "unit": "top-1 points",
                                  "standard_error": 0.4, "met": False}
    b = unlabelled["budget"]
    assert b["unit"] == "agreement points" and b["drop"] == pytest.approx(4.0) and not b["met"]
    assert b["standard_error"] == pytest.approx(100 * math.sqrt(0.04 * 0.96 / 100), abs=1e-3)


@pytest.mark.slow   # about 20 s (inductor compiles m0.6); tests/test_compiled.py covers the mechanism
def test_reference_compiled_for_large_sets_matches_eager(trained, tmp_path):
    """``validate.compile``: the float reference's logits from the inductor-compiled model
    are eager's (within the ONNX parity gate), the last batch padded, and the facts say so."""
    import json

    import torch

    from pipeline.core.runner import MANIFEST
    from pipeline.io.checkpoints import save_pipeline_checkpoint
    from pipeline.io.data import normalized
    from pipeline.stages import reference

    reparam, images = tmp_path / "reparam", tmp_path / "images"
    reparam.mkdir(), images.mkdir()
    save_pipeline_checkpoint(reparam / "fused.pt", trained.fused, trained.meta)
    pixels = trained.check[:100]   # batch 196 at 64 px: one padded batch
    np.save(images / "pixels.npy", pixels)
    (images / MANIFEST).write_text(json.dumps({"facts": {"dataset": None}}))
    inputs = {"reparam": reparam, "images": images}
    with torch.no_grad():
        want = trained.fused(torch.from_numpy(normalized(pixels, trained.meta))).numpy()
    for setting in ("never", "always"):
        out = tmp_path / setting
        out.mkdir()
        facts = reference.run(reference.ReferenceConfig(16, setting), inputs, out)
        got = np.load(out / "logits.npy")
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
        assert ("inductor-compiled" in facts["runtime"]) == (setting == "always"), facts
    assert facts["compiled"]["compiled"] and facts["compiled"]["max_rel_diff_vs_eager"] <= 1e-4


def test_qat_ships_only_when_closer_to_float_beyond_the_noise():
    """qat_gate.compare: QAT's artifact wins on a paired KL gain above 2 standard errors; a
    gain of the same mean inside the noise, or a loss, ships post-training int8."""
    from pipeline.search.qat_gate import compare

    rng = np.random.default_rng(0)
    ptq = rng.gamma(2.0, 0.001, 2000)
    wins, gain, se = compare(ptq * 0.8, ptq)          # 20% lower KL on every image
    assert wins and gain == pytest.approx(0.2 * ptq.mean()) and se < gain / 10
    noisy = ptq * 0.8 + rng.normal(0, 0.05, ptq.size)   # same mean gain, buried in per-image noise
    wins, gain, se = compare(noisy, ptq)
    assert not wins and abs(gain) < 2 * se
    assert not compare(ptq * 1.2, ptq)[0] and not compare(ptq, ptq)[0]
