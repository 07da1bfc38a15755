"""The fault matrix of a deploy, end to end: each fault gives a clear message and leaves
nothing half-written, and the next run resumes. (Checkpoint, recipe and QUANT faults are
in test_checkpoints / test_config; a converter raising is in test_deploy.)"""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from pipeline.app.cli import main

from .test_deploy import FAST, ROOT, tiny  # noqa: F401  (tiny: the module fixture)


def deploy_args(tiny, artifacts, *sets, data=None):
    return ["deploy", "--quant", "fp32", "--variant", "m0.6", "--ckpt", str(tiny / "tiny.pth"),
            "--data", str(data or tiny / "data"), "--artifacts", str(artifacts), "--set", "export.formats=[onnx]",
            *sum((["--set", s] for s in FAST.split() + list(sets)), [])]


def no_temporaries(root):
    return [p for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("bad", ["empty folder", "foreign classes", "only class folders, no images"])
def test_bad_data_is_an_error_before_any_export(tiny, tmp_path, bad):
    """DATA is listed and matched against the model's classes right after load: nothing
    after it runs (before 2026-12 an empty DATA failed at stage 7, after every export)."""
    data = tmp_path / "data"
    data.mkdir()
    if bad == "foreign classes":
        (data / "zebra").mkdir()
        (tiny / "data" / "class0" / "0.jpg").link_to(data / "zebra" / "0.jpg")
    elif bad == "only class folders, no images":
        (data / "class0").mkdir()
    artifacts = tmp_path / "artifacts"
    result = CliRunner().invoke(main, deploy_args(tiny, artifacts, "export.formats=[coreml,onnx,tflite]", data=data))
    assert result.exit_code == 2, result.output
    expected = {"empty folder": "no images under", "foreign classes": "are not classes of this model",
                "only class folders, no images": "no images under"}[bad]
    assert expected in result.output and str(data) in result.output
    assert sorted(p.name for p in (artifacts / "cache").iterdir() if p.is_dir()) == ["load"]
    assert not (artifacts / "m0.6-fp32").exists()


def test_quiet_shows_the_error_and_not_the_progress(tiny, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    args = deploy_args(tiny, tmp_path / "artifacts", data=data)
    loud, quiet = CliRunner().invoke(main, args), CliRunner().invoke(main, ["-q", *args])
    assert loud.exit_code == quiet.exit_code == 2
    assert "load      " in loud.output and "load      " not in quiet.output
    assert "error: no images under" in quiet.output


@pytest.mark.parametrize("bad", ["empty", "corrupt"])
def test_a_bad_image_in_data_names_the_file(tiny, tmp_path, bad):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tiny / "data", data)
    (data / "class1" / "broken.jpg").write_bytes(b"" if bad == "empty" else b"\xff\xd8 not a jpeg")
    result = CliRunner().invoke(main, deploy_args(tiny, tmp_path / "artifacts", data=data))
    assert result.exit_code == 2, result.output
    assert "cannot read image" in result.output and "broken.jpg" in result.output
    assert "Remove or replace the file" in result.output
    assert not (tmp_path / "artifacts" / "m0.6-fp32").exists() and not no_temporaries(tmp_path / "artifacts")


def test_disk_full_while_publishing_keeps_the_last_deploy_whole(tiny, tmp_path, monkeypatch):
    import pipeline.app.deploy as deploy_mod

    artifacts = tmp_path / "artifacts"
    assert CliRunner().invoke(main, deploy_args(tiny, artifacts)).exit_code == 0
    folder = artifacts / "m0.6-fp32"
    before = (folder / "report.json").read_text()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(deploy_mod.shutil, "copy2", full)
    result = CliRunner().invoke(main, deploy_args(tiny, artifacts, "validate.latency_runs=4"))
    assert result.exit_code == 2, result.output
    assert "disk is full" in result.output and "Nothing was half-written" in result.output
    assert (folder / "report.json").read_text() == before, "the published deploy is untouched"
    assert not no_temporaries(artifacts)


def test_disk_full_in_one_format_says_to_free_space():
    from pipeline.app.report import failures
    from pipeline.core.runner import StageRecord

    records = {"export.tflite": StageRecord("export.tflite", "", False, 0.0, None,
                                            error="OSError: [Errno 28] No space left on device")}
    (f,) = failures(records)
    assert f["format"] == "tflite" and "free disk space" in f["what_to_do"]


def spawn_deploy(tiny, artifacts):
    cmd = [sys.executable, "-m", "pipeline", *deploy_args(tiny, artifacts)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


STAGES = ["load", "reparam", "quantize", "export.onnx", "images", "reference", "validate.onnx"]


@pytest.mark.parametrize("stage", [pytest.param(s, marks=[] if s == "export.onnx" else pytest.mark.slow)
                                   for s in STAGES])
def test_kill_9_in_a_stage_then_resume(tiny, tmp_path, stage):
    """SIGKILL as soon as ``stage`` starts: no entry of it is left half-made, no deploy
    folder appears, and the same command then finishes, reusing what was complete."""
    artifacts = tmp_path / "artifacts"
    proc = spawn_deploy(tiny, artifacts)
    end = time.time() + 300
    for line in proc.stderr:
        if f"{stage:<9} running" in line:
            os.kill(proc.pid, signal.SIGKILL)
            break
        assert time.time() < end
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (artifacts / "m0.6-fp32").exists()
    assert not (artifacts / "cache" / stage).exists() or not list((artifacts / "cache" / stage).glob("*/manifest.json"))
    result = CliRunner().invoke(main, deploy_args(tiny, artifacts))
    assert result.exit_code == 0, result.output
    rep = json.loads((artifacts / "m0.6-fp32" / "report.json").read_text())
    ran = {s["name"] for s in rep["stages"] if not s["cache_hit"]}
    assert stage in ran and set(STAGES[:STAGES.index(stage)]).isdisjoint(ran)
    assert not no_temporaries(artifacts)


@pytest.mark.slow   # the runner's own concurrency test is in the default run
def test_two_concurrent_deploys_share_one_cache(tiny, tmp_path):
    artifacts = tmp_path / "artifacts"
    procs = [spawn_deploy(tiny, artifacts) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    for stage in STAGES:   # every stage made once
        assert len(list((artifacts / "cache" / stage).glob("*/manifest.json"))) == 1, stage
    rep = json.loads((artifacts / "m0.6-fp32" / "report.json").read_text())
    assert [a["format"] for a in rep["artifacts"]] == ["onnx"]
    assert not no_temporaries(artifacts)
