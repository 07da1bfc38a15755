import textwrap

import pytest

from pipeline.app.deploy import RunOptions, resolve_recipe
from pipeline.app.plan import SECTIONS
from pipeline.core.config import RecipeError, load_recipe


def write(tmp_path, text, name="my.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_shipped_recipes_all_validate():
    for quant in ["fp32", "fp16", "int8", "w8", "pal4", "pal6", "pal8", "qat-int8"]:
        r = resolve_recipe(RunOptions(quant=quant))
        assert r.quant == quant and r.sections["quantize"].scheme == quant
        qat = ["qat"] if quant == "qat-int8" else []
        assert r.stages == ["load", "reparam", *qat, "quantize", "export", "validate"]


def test_user_recipe_extends_and_overrides_single_keys(tmp_path):
    p = write(tmp_path, """\
        extends: int8
        data:
          calib_images: 64
        export:
          onnx:
            opset: 21
        """)
    r = load_recipe(p, SECTIONS)
    assert r.sections["data"].calib_images == 64 and r.sections["export"].onnx.opset == 21
    assert r.sections["quantize"].scheme == "int8"          # from int8.yaml
    assert r.sections["export"].formats == ["coreml", "onnx", "tflite"]   # from base.yaml


def test_set_overrides_win(tmp_path):
    r = load_recipe("fp16", SECTIONS, ["export.formats=[onnx]", "load.variant=m1.1"])
    assert r.sections["export"].formats == ["onnx"] and r.variant == "m1.1"


def test_scientific_numbers_without_a_dot_are_numbers():
    # YAML 1.1 reads 1e-5 as a string; a learning rate written so must still work.
    r = load_recipe("qat-int8", SECTIONS, ["qat.lr=1e-5", "reparam.tolerance=2E-4"])
    assert r.sections["qat"].lr == 1e-5 and r.sections["reparam"].tolerance == 2e-4
    with pytest.raises(RecipeError, match="expected a number"):
        load_recipe("qat-int8", SECTIONS, ["qat.lr=fast"])


def test_unknown_key_names_file_line_and_fix(tmp_path):
    p = write(tmp_path, """\
        extends: base.yaml
        quantize:
          scheme: int8
          max_drp: 0.3
        """)
    with pytest.raises(RecipeError) as e:
        load_recipe(p, SECTIONS)
    assert str(e.value) == (f"unknown key 'max_drp' in quantize ({p} line 4); did you mean 'max_drop'?")


def test_wrong_type_names_line_and_expected(tmp_path):
    p = write(tmp_path, """\
        extends: base.yaml
        data:
          calib_images: many
        """)
    with pytest.raises(RecipeError, match=rf"data\.calib_images = 'many' \({p} line 3\): expected an integer"):
        load_recipe(p, SECTIONS)


def test_bad_choice_lists_allowed_values(tmp_path):
    p = write(tmp_path, """\
        extends: base.yaml
        export:
          coreml:
            deployment_target: iOS15
        """)
    with pytest.raises(RecipeError, match=r"line 4\): allowed values are 'iOS16', 'iOS17', 'iOS18'"):
        load_recipe(p, SECTIONS)


def test_bad_set_value_is_attributed_to_set():
    with pytest.raises(RecipeError, match=r"--set export.onnx.opset=x\): expected an integer"):
        load_recipe("fp32", SECTIONS, ["export.onnx.opset=x"])


def test_out_of_range_percentile_is_refused():
    with pytest.raises(RecipeError, match=r"export.onnx .*percentile 80.0 is outside 90-100"):
        load_recipe("int8", SECTIONS, ["export.onnx.percentile=80"])


def test_unknown_section_and_stage(tmp_path):
    p = write(tmp_path, "extends: base.yaml\nquantise:\n  scheme: int8\n")
    with pytest.raises(RecipeError, match=r"unknown section 'quantise'.*did you mean 'quantize'"):
        load_recipe(p, SECTIONS)
    p = write(tmp_path, "extends: base.yaml\nstages: [load, reparm]\n", "s.yaml")
    with pytest.raises(RecipeError, match=r"unknown stage 'reparm'.*did you mean 'reparam'"):
        load_recipe(p, SECTIONS)


def test_recipe_contents_are_never_executed(tmp_path):
    p = write(tmp_path, "extends: base.yaml\nload: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p, SECTIONS)
    assert not (tmp_path / "pwned").exists()


def test_unknown_variant_and_quant_list_valid_ones():
    with pytest.raises(ValueError, match=r"valid variants: m0\.6, m0\.9, m1\.0"):
        resolve_recipe(RunOptions(variant="m3.0"))
    with pytest.raises(RecipeError, match=r"unknown QUANT 'int4'; valid: fp16, fp32, int8"):
        resolve_recipe(RunOptions(quant="int4"))


def test_missing_data_folder(tmp_path):
    with pytest.raises(RecipeError, match="data folder not found"):
        resolve_recipe(RunOptions(quant="fp32", data=str(tmp_path / "nope")))


def _fields(cls, prefix=""):
    import dataclasses

    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _fields(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", default


def _keys(data, prefix=""):
    for k, v in data.items():
        if isinstance(v, dict):
            yield from _keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_base_recipe_spells_out_every_config_key_at_its_default():
    """recipes/base.yaml is the reference of the keys: each typed config field appears there,
    at the value the config class defaults to, and nothing else does."""
    import yaml

    from pipeline.core.config import resolve_recipe_path

    base = yaml.safe_load(resolve_recipe_path("base").read_text())
    want = {f"{s}.{k}": v for s, cls in SECTIONS.items() for k, v in _fields(cls)}
    have = dict(_keys({s: base[s] for s in SECTIONS}))
    assert sorted(set(want) - set(have)) == [] and sorted(set(have) - set(want)) == []
    differ = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
    assert not differ, differ
