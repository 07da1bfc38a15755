"""End to end: `make deploy` on a tiny model, then the cache at work."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.io.data import sample_images
from pipeline.models import create_model, randomize_bn

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [f"class{i}" for i in range(4)]
FAST = "validate.latency_runs=3 validate.latency_warmup=1 validate.fidelity_images=8 export.check_images=4"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    model = randomize_bn(create_model("m0.6", num_classes=4, seed=0))
    torch.save({"model": model.state_dict(), "input_size": 32, "crop_pct": 1.0,
                "interpolation": "bilinear", "classes": CLASSES}, d / "tiny.pth")
    for i, img in enumerate(sample_images(12, seed=3)):
        folder = d / "data" / CLASSES[i % 4]
        folder.mkdir(parents=True, exist_ok=True)
        img.resize((48, 40)).save(folder / f"{i}.jpg")
    return d


def make_deploy(tiny, artifacts, extra_set="", env=None, quant="fp16"):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = ["make", "-s", "deploy", f"PY={sys.executable}", "VARIANT=m0.6", f"QUANT={quant}",
           f"CKPT={tiny / 'tiny.pth'}", f"DATA={tiny / 'data'}", f"ARTIFACTS={artifacts}",
           f"SET={FAST} {extra_set}".strip()]
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out, time.perf_counter() - start


def test_make_deploy_end_to_end(tiny, tmp_path):
    artifacts = tmp_path / "artifacts"
    out, _ = make_deploy(tiny, artifacts)
    folder = artifacts / "m0.6-fp16"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["RepViT-M0.6-fp16.mlpackage", "RepViT-M0.6-fp16.onnx", "RepViT-M0.6-fp16.tflite",
                     "RepViTBench", "labels.txt", "report.json", "report.md"]
    assert (folder / "RepViTBench" / "Sources" / "RepViTBench" / "main.swift").is_file()
    assert (folder / "labels.txt").read_text().split() == CLASSES
    rep = json.loads((folder / "report.json").read_text())
    assert rep["variant"] == "m0.6" and rep["quant"] == "fp16"
    assert rep["weights"]["trained"] is True and len(rep["weights"]["sha256"]) == 64
    assert [s["name"] for s in rep["stages"]] == [
        "load", "reparam", "quantize", "export.coreml", "export.onnx", "export.tflite",
        "images", "reference", "validate.coreml", "validate.onnx", "validate.tflite"]
    assert not any(s["cache_hit"] for s in rep["stages"]) and rep["failed"] == []
    assert {a["format"] for a in rep["artifacts"]} == {"coreml", "onnx", "tflite"}
    ref_top1 = rep["reference"]["accuracy"]["top1"]
    stage_seconds = {s["name"]: s["seconds"] for s in rep["stages"]}
    assert 0 < rep["reference"]["throughput"]["seconds"] <= stage_seconds["reference"]
    assert "Scoring throughput, images/s (measured" in (folder / "report.md").read_text()
    for a in rep["artifacts"]:
        assert a["bytes"] > 0 and len(a["sha256"]) == 64
        acc = a["accuracy"]
        assert acc["n"] == 6   # half of DATA held out for calibration
        assert acc["top1"] * 6 == pytest.approx(round(acc["top1"] * 6))   # a count of the 6 images
        # the paired drop is the difference of the two top-1s on the same images
        assert acc["drop_vs_float"]["points"] == pytest.approx(100 * (ref_top1 - acc["top1"]))
        assert a["fidelity"]["top1_agreement"] >= 0.8 and a["fidelity"]["n"] == 6
        assert -1e-6 <= a["fidelity"]["mean_kl"] < 0.05   # fp16: close to float (rounding can dip below 0)
        t = a["throughput"]   # the scoring loop's own time: within the stage's, over the same images
        assert t["images"] == 6 and t["method"] == "measured" and t["images_per_s"] == pytest.approx(6 / t["seconds"])
        assert 0 < t["seconds"] <= stage_seconds[f"validate.{a['format']}"]
        for l in a["latency"]:   # the host is timed; the iPhone is estimated here (no device on Linux)
            assert l["method"] == ("measured" if l["target"].startswith("host") else "estimated"), l
    by = {a["format"]: a for a in rep["artifacts"]}
    assert by["coreml"]["method"] == "simulated" and by["onnx"]["method"] == "measured"
    assert by["onnx"]["latency"][0]["method"] == "measured"
    iphone = [l for l in by["coreml"]["latency"] if l["target"].startswith("iPhone")]
    assert iphone and iphone[-1]["method"] == "estimated" and iphone[-1]["extrapolated"]
    assert "simulated" in (folder / "report.md").read_text()

    # Unchanged inputs: nothing runs, torch is not even imported, the folder is left alone.
    written = (folder / "report.json").stat().st_mtime_ns
    out, _ = make_deploy(tiny, artifacts, env={"PYTHONPROFILEIMPORTTIME": "1"})
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()
                if line.startswith("import time:")}
    assert "pipeline.app.deploy" in imported and "torch" not in imported
    assert "up to date" in out.stderr and (folder / "report.json").stat().st_mtime_ns == written
    # A published file damaged: published again from the cache, where every stage is cached.
    onnx_file = folder / "RepViT-M0.6-fp16.onnx"
    size = onnx_file.stat().st_size
    onnx_file.write_bytes(b"damaged")
    out, _ = make_deploy(tiny, artifacts)
    rep = json.loads((folder / "report.json").read_text())
    assert all(s["cache_hit"] for s in rep["stages"]), out.stderr
    assert onnx_file.stat().st_size == size
    # One ONNX option changed: only ONNX's export and validation run again.
    make_deploy(tiny, artifacts, "export.onnx.simplify=never")
    rep = json.loads((folder / "report.json").read_text())
    assert {s["name"] for s in rep["stages"] if not s["cache_hit"]} == {"export.onnx", "validate.onnx"}
    assert not list(artifacts.glob(".m0.6-fp16*")), "no temporary folders left"


def test_untrained_weights_say_so_everywhere(tmp_path):
    env = {**os.environ}
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "deploy", "--quant", "fp32", "--variant", "m0.6", "--ckpt",
         "random", "--artifacts", str(tmp_path), "--set", "export.formats=[onnx]",
         "--set", "load.input_size=32", *sum((["--set", s] for s in FAST.split()), []), "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "untrained weights: accuracy figures are meaningless" in out.stderr
    printed = json.loads(out.stdout)   # --json: stdout is the report alone, for scripts
    rep = json.loads((tmp_path / "m0.6-fp32" / "report.json").read_text())
    assert printed == rep
    assert rep["weights"]["trained"] is False and "CKPT=random" in rep["weights"]["reason"]
    assert (tmp_path / "m0.6-fp32" / "report.md").read_text().splitlines()[2].startswith(
        "> **untrained weights: accuracy figures are meaningless.**")


def test_official_without_network_falls_back_loudly(tmp_path, monkeypatch):
    from pipeline.io.download import DownloadUnavailable
    from pipeline.stages import load

    def offline(variant, **kw):
        raise DownloadUnavailable("no network (test)")
    monkeypatch.setattr(load, "fetch_official", offline)
    result = load.load(load.LoadConfig(variant="m0.6", checkpoint="official"), tmp_path)
    assert result.weights.trained is False and "official weights unavailable" in result.weights.reason


def test_qat_int8_deploy_trains_once_and_hands_its_model_to_export(tiny, tmp_path):
    """qat-int8 end to end (ONNX only, a few steps): the qat stage's model is what is
    exported, its facts reach the report, and a QAT knob re-runs QAT and what follows."""
    artifacts = tmp_path / "artifacts"
    qat = ("qat.steps=6 qat.batch_size=4 qat.warmup_steps=1 qat.freeze_observers_step=4 "
           "qat.calibration_batches=1 qat.formats=[onnx] export.formats=[onnx] "
           "quantize.min_calibration_images=4 data.calib_images=6 data.budget_images=16 "
           "quantize.max_float_layers=1 export.onnx.qat_ranges=true")

    def run(extra=""):
        cmd = [sys.executable, "-m", "pipeline", "deploy", "--quant", "qat-int8", "--variant", "m0.6",
               "--ckpt", str(tiny / "tiny.pth"), "--data", str(tiny / "data"), "--artifacts", str(artifacts),
               *sum((["--set", s] for s in f"{FAST} {qat} {extra}".split()), []), "--json"]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout)

    rep = run()
    assert [s["name"] for s in rep["stages"]] == ["load", "reparam", "qat", "quantize", "export.onnx", "images",
                                                  "reference", "validate.onnx"]
    t = rep["qat"]["trained"]["torchao"]
    assert t["formats"] == ["onnx"] and t["steps"] == 6 and t["world_size"] == 1
    (onnx,) = rep["artifacts"]
    assert onnx["path"] == "RepViT-M0.6-qat-int8.onnx"
    assert sorted(p.name for p in (artifacts / "m0.6-qat-int8").glob("*.onnx")) == [onnx["path"]]
    # The fine-tuned artifact and its post-training twin, both measured in onnxruntime on the
    # held-out images; the one closer to float shipped, and the report says which and why.
    v = onnx["export"]["qat_vs_ptq"]
    assert v["images"] == 16 and v["qat_seconds"] > 0 and v["qat"]["mean_kl"] >= 0 <= v["ptq"]["mean_kl"]
    assert v["kl_gain"] == pytest.approx(v["ptq"]["mean_kl"] - v["qat"]["mean_kl"], abs=2e-6)
    assert v["shipped"] == ("qat" if v["kl_gain"] > 2 * v["kl_gain_se"] else "ptq")
    origin = {"qat": "fine-tuned by quantization-aware training", "ptq": "post-training: no training"}
    assert origin[v["shipped"]] in onnx["export"]["precision"]
    md = (artifacts / "m0.6-qat-int8" / "report.md").read_text()
    assert "QAT against post-training int8 on 16 held-out images" in md and v["why"] in md
    # QAT started from the equalized model, and (where QAT's artifact shipped) its learned
    # ranges reached onnxruntime.
    assert rep["qat"]["equalization"]["tensors"] > 0
    if v["shipped"] == "qat":
        assert "tensors' ranges learned by QAT (TensorQuantOverrides)" in onnx["export"]["precision"]
    assert "Quantization-aware training on" in md
    # No spare labelled CALIB: the budget is checked in agreement points on natural photos.
    aa = onnx["export"]["accuracy_aware"]
    assert aa["checked"] and aa["unit"] == "agreement points" and aa["images"] == 16
    assert "natural sample photos" in aa["source"] and len(aa["attempts"]) <= 2
    # The exported model is QAT's: its ONNX twin is the fine-tuned model, not the fused one.
    cache = artifacts / "cache"
    trained = next(cache.glob("quantize/*/model.onnx.pt"))
    fused = next(cache.glob("reparam/*/fused.pt"))
    a = torch.load(trained, weights_only=True)["state_dict"]
    b = torch.load(fused, weights_only=True)["state_dict"]
    assert any(not torch.equal(a[k], b[k]) for k in b)
    assert not list(cache.glob("qat/.*.resume")), "QAT's checkpoints go once it completes"

    rep = run("qat.lr=2e-5")
    assert {s["name"] for s in rep["stages"] if not s["cache_hit"]} == {"qat", "quantize", "export.onnx",
                                                                        "validate.onnx"}


def test_openvino_int8_deploy_end_to_end(tiny, tmp_path):
    """The opt-in OpenVINO format through `make deploy QUANT=int8`: the IR folder beside
    labels and report, quantized by nncf on the deploy's calibration images, scored and timed
    in OpenVINO's runtime, which names the precision that ran, with the execution read back
    from the compiled model."""
    artifacts = tmp_path / "artifacts"
    out, _ = make_deploy(tiny, artifacts, "export.formats=[openvino] quantize.max_drop=null "
                         "quantize.min_calibration_images=6", quant="int8")
    folder = artifacts / "m0.6-int8"
    ir = folder / "RepViT-M0.6-int8_openvino_model"
    assert sorted(p.name for p in ir.iterdir()) == ["RepViT-M0.6-int8.bin", "RepViT-M0.6-int8.xml"]
    rep = json.loads((folder / "report.json").read_text())
    (a,) = rep["artifacts"]
    assert a["format"] == "openvino" and a["method"] == "measured" and rep["failed"] == []
    assert a["runtime"].startswith("OpenVINO ") and "f32 inference precision" in a["runtime"]
    assert a["accuracy"]["n"] == 6 and a["fidelity"]["top1_agreement"] >= 0.5
    n = os.cpu_count()
    assert [l["target"] for l in a["latency"]] == ["host (1 thread)", f"host ({n} thread{'s' * (n > 1)})"]
    assert all(l["method"] == "measured" and l["median_ms"] > 0 for l in a["latency"])
    e = a["export"]["execution"]
    assert sum(e["integer_layers"].values()) > 20 and "Convolution" in e["float_layers"]   # SE convs
    ops = a["export"]["ops"]   # the IR as nncf wrote it: quantize-dequantize around the convolutions
    assert ops["FakeQuantize"] > 20 and ops["Convolution"] + ops["GroupConvolution"] == 70 and ops["Gelu"] > 0
    md = (folder / "report.md").read_text()
    assert "OpenVINO" in md and "integer layers" in md and "FakeQuantize" in md


def _executorch_deploy(tiny, tmp_path, quant):
    artifacts = tmp_path / "artifacts"
    make_deploy(tiny, artifacts, "export.formats=[executorch,executorch_coreml] quantize.max_drop=null "
                "quantize.min_calibration_images=6", quant=quant)
    folder = artifacts / f"m0.6-{quant}"
    assert {f"RepViT-M0.6-{quant}.pte", f"RepViT-M0.6-{quant}.coreml.pte"} <= {p.name for p in folder.iterdir()}
    rep = json.loads((folder / "report.json").read_text())
    assert rep["failed"] == []
    by = {a["format"]: a for a in rep["artifacts"]}
    xnn, cml = by["executorch"], by["executorch_coreml"]
    assert xnn["method"] == "measured" and xnn["runtime"].startswith("ExecuTorch ")
    assert xnn["accuracy"]["n"] == 6 and xnn["fidelity"]["top1_agreement"] >= 0.5
    n = os.cpu_count()
    assert [l["target"] for l in xnn["latency"]] == ["host (1 thread)", f"host ({n} thread{'s' * (n > 1)})"]
    assert all(l["method"] == "measured" and l["median_ms"] > 0 for l in xnn["latency"])
    assert xnn["export"]["execution"]["fast_path"]
    assert cml["method"] == "simulated" and "simulated ExecuTorch Core ML delegate" in cml["runtime"]
    assert cml["latency"] == [] and cml["export"]["execution"]["backend"] == "CoreMLBackend"
    assert cml["fidelity"]["top1_agreement"] >= 0.5
    md = (folder / "report.md").read_text()
    assert "1 XnnpackBackend partition, every op delegated" in md and "CoreMLBackend" in md
    return xnn, cml


def test_executorch_deploy_end_to_end(tiny, tmp_path):
    """The opt-in ExecuTorch formats through `make deploy`: the XNNPACK .pte scored and
    timed in ExecuTorch's runtime, its execution read from the program (one XNNPACK
    partition); the Core ML-delegated .pte read back and simulated on Linux, as the
    .mlpackage is, and never timed here. fp32 here (int8's lowering takes 20-60 s: the slow
    run deploys int8, tests/formats/test_executorch.py checks its numerics)."""
    xnn, cml = _executorch_deploy(tiny, tmp_path, "fp32")
    assert xnn["fidelity"]["top1_agreement"] == 1.0 and cml["fidelity"]["top1_agreement"] == 1.0


@pytest.mark.slow
def test_executorch_int8_deploy_end_to_end(tiny, tmp_path):
    xnn, cml = _executorch_deploy(tiny, tmp_path, "int8")
    assert "XNNPACKQuantizer" in xnn["export"]["precision"] and "CoreMLQuantizer" in cml["export"]["compression"]


def test_compare_puts_schemes_side_by_side(tiny, tmp_path):
    """make compare: each scheme deployed, one table (JSON, Markdown, HTML) and a plot; a
    format that cannot express a scheme is a row saying why."""
    artifacts = tmp_path / "artifacts"
    cmd = ["make", "-s", "compare", f"PY={sys.executable}", "VARIANT=m0.6", "QUANTS=fp16 w8",
           f"CKPT={tiny / 'tiny.pth'}", f"DATA={tiny / 'data'}", f"ARTIFACTS={artifacts}",
           f"SET={FAST} export.formats=[onnx,openvino,executorch]"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    folder = artifacts / "m0.6-compare"
    result = json.loads((folder / "compare.json").read_text())
    rows = {(r["scheme"], r["format"]): r for r in result["rows"]}
    assert set(rows) == {(q, f) for q in ("fp16", "w8") for f in ("onnx", "openvino", "executorch")}
    assert "onnxruntime has no weight-only int8" in rows[("w8", "onnx")]["skipped"]
    assert "slower than fp32" in rows[("fp16", "executorch")]["skipped"]   # a row saying why, no export
    assert "f32 inference precision" in rows[("w8", "openvino")]["host_method"]
    for key in (("fp16", "onnx"), ("fp16", "openvino"), ("w8", "openvino")):
        r = rows[key]
        assert r["n"] == 6 and r["host_ms"] > 0 and r["method"] == "measured"
        assert abs(r["drop"]["points"] - 100 * (result["reference"]["accuracy"]["top1"] - r["top1"])) < 1e-6
    md = (folder / "compare.md").read_text()
    assert "| fp16 | onnx |" in md and "drop, points (± 1 s.e.)" in md
    assert (folder / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in (folder / "compare.html").read_text()


def test_official_weights_offline_online_offline(tmp_path, monkeypatch):
    """The load stage's cache key covers the weights actually used: an untrained fallback
    (no network) is cached under its own key, so the first run that can download the
    weights uses them; offline again, the downloaded file is used from its cache."""
    from pipeline.app.plan import STAGES
    from pipeline.core.runner import Cache, run_stages
    from pipeline.io.download import DownloadUnavailable
    from pipeline.stages import load

    ckpt = tmp_path / "repvit_m0_6_distill_300e.pth"
    torch.save({"model": randomize_bn(create_model("m0.6", seed=5), seed=5).state_dict()}, ckpt)
    network = {"up": False, "fetched": False}

    def fetch(variant, **kw):
        if network["up"] or network["fetched"]:   # downloaded once, then served from the cache
            network["fetched"] = True
            return ckpt, "ab" * 32
        raise DownloadUnavailable("no network (test)")
    monkeypatch.setattr(load, "fetch_official", fetch)
    cache = Cache(tmp_path / "cache")
    sections = {"load": load.LoadConfig(variant="m0.6", checkpoint="official")}

    def run():
        (record,) = run_stages([STAGES["load"]], sections, cache).values()
        return record

    offline = run()
    assert offline.facts["weights"]["trained"] is False and "no network" in offline.facts["weights"]["reason"]
    assert run().cache_hit   # still offline: the fallback is reused, and says so
    network["up"] = True
    online = run()
    assert not online.cache_hit and online.key != offline.key
    assert online.facts["weights"] == {"source": f"official:{load.get_variant('m0.6').weights.url}",
                                       "sha256": "ab" * 32, "trained": True, "reason": ""}
    network["up"] = False
    again = run()
    assert again.cache_hit and again.key == online.key and again.facts["weights"]["trained"] is True


def test_a_failing_converter_costs_only_its_format(tiny, tmp_path, monkeypatch):
    """LiteRT's converter raising: ONNX still ships, the report says what failed and what
    to do, the command exits non-zero, and the next run redoes only the failed format."""
    from click.testing import CliRunner

    from pipeline.app.cli import main
    from pipeline.formats import tflite

    def broken(self, model, ctx, cfg):
        raise RuntimeError("litert-torch regression (test)")
    working = tflite.TFLiteExporter.export
    monkeypatch.setattr(tflite.TFLiteExporter, "export", broken)
    artifacts = tmp_path / "artifacts"
    args = ["deploy", "--quant", "fp32", "--variant", "m0.6", "--ckpt", str(tiny / "tiny.pth"),
            "--data", str(tiny / "data"), "--artifacts", str(artifacts),
            "--set", "export.formats=[onnx,tflite]", *sum((["--set", s] for s in FAST.split()), [])]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    folder = artifacts / "m0.6-fp32"
    assert sorted(p.name for p in folder.iterdir()) == ["RepViT-M0.6-fp32.onnx", "labels.txt", "report.json",
                                                        "report.md"]
    rep = json.loads((folder / "report.json").read_text())
    (failed,) = rep["failed"]
    assert failed["format"] == "tflite" and failed["stage"] == "export.tflite"
    assert "litert-torch regression (test)" in failed["error"] and "retry only this format" in failed["what_to_do"]
    assert [a["format"] for a in rep["artifacts"]] == ["onnx"] and rep["artifacts"][0]["accuracy"]["n"] == 6
    stages = {s["name"]: s for s in rep["stages"]}
    assert stages["validate.tflite"]["error"] == "not run: export.tflite failed"
    assert "**tflite FAILED** in `export.tflite`" in (folder / "report.md").read_text()
    assert "FAILED in export.tflite" in result.output
    assert not list((artifacts / "cache" / "export.tflite").glob("*/manifest.json")), "a failure is not cached"

    monkeypatch.setattr(tflite.TFLiteExporter, "export", working)   # fixed: only the failed format runs
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rep = json.loads((folder / "report.json").read_text())
    assert {s["name"] for s in rep["stages"] if not s["cache_hit"]} == {"export.tflite", "validate.tflite"}
    assert {a["format"] for a in rep["artifacts"]} == {"onnx", "tflite"} and rep["failed"] == []
