"""Bad input to ``bminf convert`` and the lazy modules' public names (issue 9)."""
import json

import pytest
import torch

import bminf
from bminf import cli
from bminf.checkpoint import FORMATS, bminf_format, load_model, save_pretrained
from bminf.checkpoint.common import PRESET_ALIASES, PRESET_NAMES
from helpers import TINY_GPT, TINY_T5
from test_checkpoint import assert_same_state, int8_model


def tree_bytes(path):
    """Every file under ``path`` with its bytes (a file or a directory)."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_cli_choices_match_the_library():
    assert cli.CONVERT_FORMATS == FORMATS
    assert set(cli.CONVERT_PRESETS) == set(PRESET_NAMES) | set(PRESET_ALIASES)


@pytest.mark.parametrize("dst_name, to", [("ours", "safetensors"), ("x.pt", "bminf"), ("hf", "hf"),
                                          ("dir-of-pt", "bminf")])
def test_convert_refuses_an_existing_destination_unless_forced(tmp_path, capsys, dst_name, to):
    save_pretrained(int8_model("gpt"), tmp_path / "src")
    dst = tmp_path / dst_name
    assert cli.main(["convert", str(tmp_path / "src"), str(dst), "--to", to]) == 0
    capsys.readouterr()
    before = tree_bytes(dst)
    assert cli.main(["convert", str(tmp_path / "src"), str(dst), "--to", to]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err
    assert tree_bytes(dst) == before
    assert cli.main(["convert", str(tmp_path / "src"), str(dst), "--to", to, "--force"]) == 0


def test_convert_refuses_to_write_over_its_source(tmp_path, capsys):
    save_pretrained(int8_model("gpt"), tmp_path / "src")
    before = tree_bytes(tmp_path / "src")
    assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "src"), "--force"]) == 1
    assert "is the source" in capsys.readouterr().err
    assert tree_bytes(tmp_path / "src") == before


def test_convert_takes_a_config_json_for_other_sizes(tmp_path, capsys):
    model = int8_model("gpt")
    bminf_format.save(model, tmp_path / "tiny.pt")
    # a BMInf file of a size no preset has: the error asks for config=, which --config supplies
    assert cli.main(["convert", str(tmp_path / "tiny.pt"), str(tmp_path / "out")]) == 1
    assert "config=" in capsys.readouterr().err
    (tmp_path / "gpt.json").write_text(json.dumps({**TINY_GPT, "eps": 1e-5}))
    assert cli.main(["convert", str(tmp_path / "tiny.pt"), str(tmp_path / "out"), "--config",
                     str(tmp_path / "gpt.json")]) == 0
    assert_same_state(load_model(tmp_path / "out"), model)


def test_convert_config_for_t5_and_its_errors(tmp_path, capsys):
    model = int8_model("t5")
    bminf_format.save(model, tmp_path / "t5.pt")
    (tmp_path / "t5.json").write_text(json.dumps(TINY_T5))
    assert cli.main(["convert", str(tmp_path / "t5.pt"), str(tmp_path / "out"), "--config",
                     str(tmp_path / "t5.json")]) == 0
    assert_same_state(load_model(tmp_path / "out"), model)
    (tmp_path / "bad.json").write_text(json.dumps({**TINY_T5, "n_layer": 3}))
    assert cli.main(["convert", str(tmp_path / "t5.pt"), str(tmp_path / "o2"), "--config",
                     str(tmp_path / "bad.json")]) == 1
    assert "unknown field 'n_layer'" in capsys.readouterr().err
    (tmp_path / "list.json").write_text("[1, 2]")
    assert cli.main(["convert", str(tmp_path / "t5.pt"), str(tmp_path / "o3"), "--config",
                     str(tmp_path / "list.json")]) == 1
    assert "must hold a JSON object" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{")
    assert cli.main(["convert", str(tmp_path / "t5.pt"), str(tmp_path / "o4"), "--config",
                     str(tmp_path / "broken.json")]) == 1
    assert "broken.json is not valid JSON" in capsys.readouterr().err
    assert cli.main(["convert", str(tmp_path / "t5.pt"), str(tmp_path / "o5"), "--config",
                     str(tmp_path / "missing.json")]) == 1
    assert "missing.json" in capsys.readouterr().err
    assert not any((tmp_path / f"o{i}").exists() for i in range(2, 6))


def test_convert_no_quantize_float32_equals_load_model(tmp_path):
    save_pretrained(int8_model("gpt"), tmp_path / "src")
    want = load_model(tmp_path / "src", quantize=False, dtype=torch.float32)
    assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "f32"), "--no-quantize",
                     "--dtype", "float32"]) == 0
    assert_same_state(load_model(tmp_path / "f32"), want)
    # HF output of the int8 model: float32 by default, dequantized exactly
    assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "hf"), "--to", "hf", "--no-quantize"]) == 0
    got = load_model(tmp_path / "hf", quantize=False)
    assert {k: v for k, v in got.state_dict().items()}.keys() == want.state_dict().keys()
    assert all(torch.equal(got.state_dict()[k], v) for k, v in want.state_dict().items())


# ---------------------------------------------------------------- dir() of the lazy modules


def test_dir_of_lazy_modules_lists_their_public_names():
    import bminf.hub
    import bminf.models
    models = dir(bminf.models)
    assert {"GPT", "GPTConfig", "GPT_PRESETS", "T5", "T5Config", "T5_PRESETS"} <= set(models)
    assert "_LAZY" not in models and "importlib" not in models
    top = dir(bminf)
    assert {"wrapper", "QuantizedLinear", "TransformerBlockList", "models", "hub", "data", "__version__"} <= set(top)
    assert not {"importlib", "_LAZY", "_SUBMODULES"} & set(top)
    hub = dir(bminf.hub)
    assert {"ensure_file", "ensure_version", "set_source", "download", "list_cached"} <= set(hub)
    assert not {"os", "logging", "dataclass", "logger", "_settings", "Dict"} & set(hub)
    for module, names in ((bminf, top), (bminf.models, models), (bminf.hub, hub)):
        for name in names:
            if not name.startswith("__"):
                getattr(module, name)  # everything listed exists
