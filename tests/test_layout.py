"""The package's layout, read from its imports: no import cycle, no stage importing
another, packages that depend one way, and cache keys that follow the imports."""
import shutil
from pathlib import Path

from pipeline.core import codegraph
from pipeline.core.runner import code_modules, stage_key

# Lower layers never import higher ones (same-layer packages never import each other).
LAYERS = [
    {"pipeline", "pipeline.variants", "pipeline.schemes", "pipeline.resources", "pipeline.core"},
    {"pipeline.models"},
    {"pipeline.io"},
    {"pipeline.quant", "pipeline.runtimes"},
    {"pipeline.eval"},
    {"pipeline.formats"},
    {"pipeline.search"},
    {"pipeline.stages"},
    {"pipeline.app"},
    {"pipeline.__main__"},
]


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def layer_of(module: str) -> int:
    (rank,) = [i for i, layer in enumerate(LAYERS) if package_of(module) in layer]
    return rank


def test_the_graph_is_the_whole_package():
    graph = codegraph.project_graph()
    assert len(graph) > 60 and sum(map(len, graph.values())) > 150
    # Function-level imports count: the registry imports its exporters inside get_exporter.
    assert {"pipeline.formats.onnx", "pipeline.formats.coreml"} <= graph["pipeline.formats"]


def test_no_import_cycle_anywhere():
    assert codegraph.cycles(codegraph.project_graph()) == []


def test_the_cycle_finder_finds_cycles():
    assert codegraph.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert codegraph.cycles({"a": {"a"}}) == [["a"]]
    assert codegraph.cycles({"a": {"b"}, "b": set()}) == []


def test_no_stage_imports_another_stage():
    graph = codegraph.project_graph()
    stages = [m for m in graph if m.startswith("pipeline.stages.")]
    assert len(stages) == 8
    for m in stages:
        others = {d for d in graph[m] if d.startswith("pipeline.stages.") and d != m}
        assert not others, f"{m} imports {others}: move what they share below the stages"


def test_packages_depend_one_way():
    wrong = []
    for module, deps in codegraph.project_graph().items():
        for d in deps:
            if package_of(d) != package_of(module) and layer_of(d) >= layer_of(module):
                wrong.append(f"{module} -> {d}")
    assert not wrong, wrong


def test_runtimes_never_import_formats():
    graph = codegraph.project_graph()
    assert graph["pipeline.runtimes.coreml"]   # it imports something (the check reads real edges)
    for m, deps in graph.items():
        if m.startswith("pipeline.runtimes"):
            assert not [d for d in deps if d.startswith("pipeline.formats")], m


def test_a_module_reached_only_indirectly_changes_the_stage_key(tmp_path):
    from pipeline.app.plan import export_unit, validate_unit

    root = tmp_path / "copy"
    shutil.copytree(Path(codegraph.ROOT) / "pipeline", root / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    export = code_modules(export_unit("tflite"))
    assert export == ("pipeline.stages.export",)
    reached = codegraph.closure(export, root)
    # stages.export -> formats (registry) -> formats.tflite -> formats.tflite_metadata
    assert "pipeline.formats.tflite_metadata" in reached and "pipeline.app.compare" not in reached
    before = codegraph.digest(export, root)
    other = codegraph.digest(code_modules(validate_unit("tflite")), root)

    meta = root / "pipeline" / "formats" / "tflite_metadata.py"
    meta.write_text(meta.read_text() + "\nINPUT_NAME = 'pixels'\n")
    after = codegraph.digest(export, root)
    assert after != before

    compare = root / "pipeline" / "app" / "compare.py"     # not run by the export unit
    compare.write_text(compare.read_text() + "\n# edited\n")
    assert codegraph.digest(export, root) == after
    # validation never runs the exporter's metadata writer
    assert codegraph.digest(code_modules(validate_unit("tflite")), root) == other


def test_a_package_init_counts_with_its_module_level_imports_only(tmp_path):
    pkg = tmp_path / "pipeline"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pipeline.sub import eager\n\n\ndef f():\n"
                                             "    from pipeline.sub import lazy\n\n\n"
                                             "try:\n    def g():\n        from pipeline.sub import lazier\n"
                                             "except ImportError:\n    from pipeline.sub import guarded\n")
    for name in ("eager", "lazy", "lazier", "guarded", "leaf"):
        (pkg / "sub" / f"{name}.py").write_text("")
    (pkg / "user.py").write_text("from pipeline.sub.leaf import x\n")
    (pkg / "caller.py").write_text("from pipeline.sub import f\n")
    assert codegraph.closure(["pipeline.user"], tmp_path) == [
        "pipeline", "pipeline.sub", "pipeline.sub.eager", "pipeline.sub.guarded", "pipeline.sub.leaf",
        "pipeline.user"]
    assert "pipeline.sub.lazy" in codegraph.closure(["pipeline.caller"], tmp_path)


def test_the_runner_keys_on_the_derived_code():
    from pipeline.app.plan import STAGES

    stage = STAGES["quantize"]
    _, payload = stage_key(stage, None, {}, {}, {})
    assert payload["code"] == codegraph.digest(code_modules(stage))
    reached = codegraph.closure(code_modules(stage))
    assert {"pipeline.quant.sensitivity", "pipeline.models.equalize", "pipeline.io.data"} <= set(reached)
