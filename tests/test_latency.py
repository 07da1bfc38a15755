import json

import numpy as np
import pytest

from pipeline.eval import latency
from pipeline.formats.base import ExportContext
from pipeline.formats.coreml import CoreMLConfig, CoreMLExporter
from pipeline.models import create_model, reparameterize
from pipeline.variants import VARIANTS


def test_fit_uses_the_published_latencies_and_reports_its_error():
    data = json.loads(latency.FIT_DATA.read_text())
    assert {r["variant"]: r["published_ms"] for r in data["variants"]} == {
        n: v.published.iphone12_ms for n, v in VARIANTS.items() if not v.legacy}   # today's six
    model = latency.fitted()
    assert 0 < model.loo_mean_abs_ms <= model.loo_max_abs_ms < 0.3
    for r in data["variants"]:   # in-sample predictions are close to what was published
        assert abs(model.predict(r["features"]) - r["published_ms"]) < 0.15


def test_leave_one_out_is_honest():
    """The reported error is the error on each variant held out of the fit, recomputed here
    independently (normal equations, not the module's lstsq) for the chosen features; an
    in-sample error, or a fit that saw the held-out point, would not match it."""
    data = json.loads(latency.FIT_DATA.read_text())
    rows = [{**r["features"], "ms": r["published_ms"]} for r in data["variants"]]
    model = latency.fitted()
    errors = []
    for i, held in enumerate(rows):
        rest = rows[:i] + rows[i + 1:]
        x = np.array([[1.0] + [r[f] for f in model.features] for r in rest])
        y = np.array([r["ms"] for r in rest])
        coef = np.linalg.solve(x.T @ x, x.T @ y)
        errors.append(abs(coef[0] + sum(c * held[f] for c, f in zip(coef[1:], model.features)) - held["ms"]))
    assert model.loo_mean_abs_ms == pytest.approx(np.mean(errors), rel=1e-9)
    assert model.loo_max_abs_ms == pytest.approx(np.max(errors), rel=1e-9)
    in_sample = np.mean([abs(model.predict(r) - r["ms"]) for r in rows])
    assert model.loo_mean_abs_ms != pytest.approx(in_sample, rel=1e-3)


@pytest.fixture(scope="module")
def m06_package(tmp_path_factory):
    v = VARIANTS["m0.6"]
    meta = {"input_size": 224, "crop_pct": 0.95, "interpolation": "bicubic", "mean": list(v.mean),
            "std": list(v.std), "classes": [str(i) for i in range(1000)], "weights": {}}
    path = tmp_path_factory.mktemp("pkg") / "m.mlpackage"
    CoreMLExporter().export(reparameterize(create_model(v, seed=0)), ExportContext("fp16", meta, "m0.6", path),
                            CoreMLConfig())
    return path


def test_features_read_from_a_program_match_the_fit_table(m06_package):
    stored = next(r for r in json.loads(latency.FIT_DATA.read_text())["variants"] if r["variant"] == "m0.6")
    assert latency.program_features(m06_package) == pytest.approx(stored["features"], rel=1e-6)


def test_estimate_is_labelled_with_method_error_and_caveat(m06_package):
    e = latency.estimate(m06_package)
    assert e["method"] == "estimated" and e["target"].startswith("iPhone 12")
    assert abs(e["median_ms"] - 0.6) < 0.15 and not e["extrapolated"]
    assert "leave-one-out error" in e["details"] and "no speed-up is assumed" in e["details"]


def test_import_a_user_measurement(tmp_path):
    report = {"artifacts": [{"format": "coreml", "path": "RepViT-M0.9-int8.mlpackage", "latency": [
        {"target": "iPhone 12 (A14)", "method": "estimated", "median_ms": 0.9}]}]}
    (tmp_path / "report.json").write_text(json.dumps(report))
    m = {"device": "iPhone15,2", "os": "iOS 18.1", "compute_units": "all", "runs": 100,
         "model": "RepViT-M0.9-int8.mlpackage", "median_ms": 0.71, "p90_ms": 0.8, "load_ms": 50}
    (tmp_path / "m.json").write_text(json.dumps(m))
    out = latency.import_measurement(tmp_path / "report.json", tmp_path / "m.json")
    lat = out["artifacts"][0]["latency"]
    assert [l["method"] for l in lat] == ["estimated", "measured"]
    assert lat[1]["median_ms"] == 0.71 and "measured by the user" in lat[1]["details"]
    (tmp_path / "bad.json").write_text(json.dumps({"median_ms": 1}))
    with pytest.raises(ValueError, match="not a RepViTBench result"):
        latency.import_measurement(tmp_path / "report.json", tmp_path / "bad.json")


def test_no_device_measurement_off_macos(m06_package):
    import platform
    if platform.system() == "Darwin":
        pytest.skip("on macOS this would look for an attached iPhone")
    assert latency.measure_on_device(m06_package) is None
