"""The cached stage runner, on toy stages."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from pipeline.core import runner
from pipeline.core.runner import Cache, Stage, run_stages


@dataclass
class Cfg:
    value: int = 1


CALLS: list[str] = []


def make(name):
    def run(cfg, inputs, out_dir, **sections):
        CALLS.append(name)
        upstream = sum(int((d / "out.txt").read_text()) for d in inputs.values())
        (out_dir / "out.txt").write_text(str(upstream + cfg.value))
        return {"value": upstream + cfg.value}
    return run


FP = {"a": "file-v1"}
STAGES = [
    Stage("a", make("a"), fingerprint=lambda cfg: {"file": FP["a"]}),
    Stage("b", make("b"), needs=("a",)),
    Stage("c", make("c"), needs=("b",), sections=("shared",)),
]
BASE = {"a": Cfg(1), "b": Cfg(10), "c": Cfg(100), "shared": Cfg(0)}


def keys(cache, sections=BASE):
    CALLS.clear()
    return {n: r.key for n, r in run_stages(STAGES, sections, cache).items()}


@pytest.mark.parametrize("change,rerun", [
    ("nothing", set()),
    ("config of c", {"c"}),
    ("config of b", {"b", "c"}),
    ("section read by c", {"c"}),
    ("content fingerprint of a", {"a", "b", "c"}),
    ("library version", {"a", "b", "c"}),
])
def test_cache_keys_change_exactly_when_they_should(tmp_path, monkeypatch, change, rerun):
    cache = Cache(tmp_path)
    before = keys(cache)
    assert CALLS == ["a", "b", "c"]
    sections = dict(BASE)
    if change == "config of c":
        sections["c"] = Cfg(101)
    elif change == "config of b":
        sections["b"] = Cfg(11)
    elif change == "section read by c":
        sections["shared"] = Cfg(5)
    elif change == "content fingerprint of a":
        monkeypatch.setitem(FP, "a", "file-v2")
    elif change == "library version":
        real = runner._versions
        monkeypatch.setattr(runner, "_versions", lambda libs: {**real(libs), "python": "9.9"})
    after = keys(cache, sections)
    assert set(CALLS) == rerun
    assert {n for n in before if before[n] != after[n]} == rerun


def test_code_change_changes_the_key():
    stage = Stage("x", make("x"), code=("pipeline.variants",))
    k1, _ = runner.stage_key(stage, Cfg(), {}, {}, {})
    k2, _ = runner.stage_key(replace(stage, code=("pipeline.io.data",)), Cfg(), {}, {}, {})
    assert k1 != k2


def test_outputs_and_manifest(tmp_path):
    records = run_stages(STAGES, BASE, Cache(tmp_path))
    m = json.loads((records["c"].dir / "manifest.json").read_text())
    assert m["facts"] == {"value": 111} and m["inputs"] == {"b": records["b"].key}
    assert m["outputs"][0]["path"] == "out.txt" and len(m["outputs"][0]["sha256"]) == 64
    assert m["config"] == {"value": 100} and "python" in m["versions"]


def test_force_reruns_one_stage(tmp_path):
    cache = Cache(tmp_path)
    keys(cache)
    CALLS.clear()
    run_stages(STAGES, BASE, cache, force={"b"})
    assert CALLS == ["b"]


def test_failed_stage_leaves_no_entry(tmp_path):
    def boom(cfg, inputs, out_dir):
        (out_dir / "half.txt").write_text("partial")
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        run_stages([Stage("x", boom)], {"x": Cfg()}, Cache(tmp_path))
    assert [p.name for p in (tmp_path / "x").iterdir() if not p.name.endswith(".lock")] == []


def test_resumable_stage_keeps_its_scratch_until_it_completes(tmp_path):
    seen = []

    def train(cfg, inputs, out_dir, scratch):
        seen.append(sorted(p.name for p in scratch.iterdir()))
        (scratch / "checkpoint").write_text("step 5")
        if len(seen) == 1:
            raise KeyboardInterrupt   # interrupted after its first checkpoint
        (out_dir / "model").write_text("done")

    stage = Stage("t", train, resumable=True)
    with pytest.raises(KeyboardInterrupt):
        run_stages([stage], {"t": Cfg()}, Cache(tmp_path))
    assert not list((tmp_path / "t").glob("*/manifest.json")), "no entry from the interrupted run"
    run_stages([stage], {"t": Cfg()}, Cache(tmp_path))
    assert seen == [[], ["checkpoint"]], "the second run found the first one's checkpoint"
    assert not list((tmp_path / "t").glob(".*.resume")), "scratch removed once the entry is whole"
    # Optional inputs: a stage that `uses` another gets it only where the recipe ran it.
    got = {}
    reader = Stage("r", lambda cfg, inputs, out_dir: got.update(inputs) or {}, uses=("t",))
    run_stages([reader], {"r": Cfg()}, Cache(tmp_path / "2"))
    assert got == {}
    run_stages([stage, reader], {"t": Cfg(), "r": Cfg()}, Cache(tmp_path))
    assert set(got) == {"t"}


TOY = textwrap.dedent("""
    import sys, time
    from dataclasses import dataclass
    from pathlib import Path
    from pipeline.core.log import configure
    from pipeline.core.runner import Cache, Stage, run_stages

    configure()   # the runner's messages, on stderr (joined to stdout by spawn)

    @dataclass
    class Cfg:
        value: int = 1

    def slow(cfg, inputs, out_dir):
        with open(sys.argv[2], "a") as f:
            f.write("ran\\n")
        (out_dir / "part1.txt").write_text("written before the pause")
        time.sleep(float(sys.argv[3]))
        (out_dir / "part2.txt").write_text("done")
        return {"ok": True}

    run_stages([Stage("slow", slow)], {"slow": Cfg()}, Cache(Path(sys.argv[1])))
    print("FINISHED", flush=True)
""")


def spawn(tmp_path, pause):
    script = tmp_path / "toy.py"
    script.write_text(TOY)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), str(tmp_path / "runs.log"),
                             str(pause)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_for(path, timeout=30):
    end = time.time() + timeout
    while not path.exists():
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.05)


def test_kill_9_mid_stage_then_resume(tmp_path):
    proc = spawn(tmp_path, pause=60)
    wait_for(tmp_path / "runs.log")
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stage_dir = tmp_path / "cache" / "slow"
    assert [p for p in stage_dir.iterdir() if not p.name.startswith(".")] == [], "no partial entry"
    assert any(".tmp-" in p.name for p in stage_dir.iterdir())
    proc = spawn(tmp_path, pause=0)
    out, _ = proc.communicate(timeout=60)
    assert "FINISHED" in out
    entries = [p for p in stage_dir.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "part2.txt").read_text() == "done"
    assert not any(".tmp-" in p.name for p in stage_dir.iterdir()), "stale temp cleaned"


def test_two_concurrent_runs_do_the_work_once(tmp_path):
    procs = [spawn(tmp_path, pause=1.5) for _ in range(2)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all("FINISHED" in o for o in outs)
    assert (tmp_path / "runs.log").read_text().count("ran") == 1
    assert any("concurrent run" in o for o in outs)
    entries = [p for p in (tmp_path / "cache" / "slow").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "manifest.json").exists()


def test_cache_ls_and_clean(tmp_path):
    cache = Cache(tmp_path)
    keys(cache)
    assert {e["stage"] for e in cache.entries()} == {"a", "b", "c"}
    assert cache.clean(older_than_s=3600) == 0
    assert cache.clean() == 3 and cache.entries() == []


@dataclass
class Pair:
    left: int = 1
    right: int = 2


def test_units_of_one_section_are_keyed_by_their_own_part_and_fail_alone(tmp_path):
    """Two isolated units configured by one section, each narrowed to its half: changing
    one half re-runs one unit; a unit that raises is recorded, its dependants are not run,
    the others go on, and --force by section re-runs every unit of it."""
    def unit(side):
        def run(cfg, inputs, out_dir):
            CALLS.append(side)
            if cfg == -1:
                raise RuntimeError(f"{side} broke")
            (out_dir / "out.txt").write_text(str(cfg))
            return {}
        return run

    stages = [Stage("u.left", unit("left"), section="u", narrow=lambda c: c.left, isolated=True),
              Stage("u.right", unit("right"), section="u", narrow=lambda c: c.right, isolated=True),
              Stage("after.left", make("after"), needs=("u.left",), section="b")]
    cache = Cache(tmp_path)

    def run(pair, force=frozenset()):
        CALLS.clear()
        return run_stages(stages, {"u": pair, "b": Cfg(0)}, cache, force=force)

    run(Pair())
    assert CALLS == ["left", "right", "after"]
    run(Pair(right=3))
    assert CALLS == ["right"]
    records = run(Pair(left=-1, right=3))
    assert records["u.left"].error == "RuntimeError: left broke" and records["u.left"].dir is None
    assert records["after.left"].error == "not run: u.left failed" and not records["u.right"].error
    assert CALLS == ["left"]
    run(Pair(right=3), force={"u"})
    assert sorted(CALLS) == ["left", "right"]   # their dependants keep their keys: cached
    with pytest.raises(RuntimeError, match="left broke"):   # a stage not isolated still stops the run
        run_stages([replace(stages[0], isolated=False)], {"u": Pair(left=-1)}, cache)
