"""The `saemnesia` console script: inspect and convert, on files the tests produce."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers_core import synthetic_statistics, write_pickle, write_sparsify_folder
from saemnesia_tools.testing import make_random_sae_file, random_sae
from saemnesia_tools import cli
from saemnesia_core.sae_file import load_sae_file

HOOK = "unet.up_blocks.1.attentions.1"
SCRIPT = Path(sys.executable).parent / "saemnesia"


def test_installed_console_script_inspects_a_file(tmp_path):
    make_random_sae_file(path=tmp_path / "f.safetensors")
    done = subprocess.run([str(SCRIPT), "inspect", str(tmp_path / "f.safetensors")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "saemnesia SAE file v1" in done.stdout and HOOK in done.stdout and "16 / 64 / 4" in done.stdout
    for concept in make_random_sae_file().concepts:
        assert f"latent {concept.latent}" in done.stdout and concept.label in done.stdout


def test_inspect_json_lists_dimensions_and_concepts_with_latents(tmp_path, capsys):
    original = make_random_sae_file(supervised=False, path=tmp_path / "f.safetensors")
    assert cli.main(["inspect", str(tmp_path / "f.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["d_in"], info["num_latents"], info["k"], info["hookpoint"], info["model_family"]) == \
        (16, 64, 4, HOOK, "toy")
    assert [c["label"] for c in info["concepts"]] == [c.label for c in original.concepts]
    selected = original.tables.latents[0]
    assert info["concepts"][0]["selected_latents"] == sorted(set(selected[selected >= 0].tolist()))


def test_inspect_reads_a_checkpoint_folder(tmp_path, capsys):
    write_sparsify_folder(tmp_path / HOOK, random_sae())
    assert cli.main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sparsify checkpoint" in out and HOOK in out


def test_convert_writes_a_file_with_imported_concepts_and_overrides(tmp_path, capsys):
    folder = write_sparsify_folder(tmp_path / "ckpt", random_sae())
    write_pickle(tmp_path / "cls.pkl", synthetic_statistics(steps=10))
    torch.save({"Cats": {"percentile": 90.0, "multiplier": -5.0}}, tmp_path / "class_params.pth")
    out = tmp_path / "out.safetensors"
    assert cli.main(["convert", str(folder), str(out), "--concept-stats", str(tmp_path / "cls.pkl"),
                     "--class-params", str(tmp_path / "class_params.pth"), "--hookpoint", HOOK, "--family", "sd15",
                     "--group", "object"]) == 0
    converted = load_sae_file(out)
    assert (converted.hookpoint, converted.model_family, converted.num_buckets) == (HOOK, "sd15", 10)
    assert [(c.label, c.default_strength) for c in converted.concepts] == \
        [("Cats", -5.0), ("Dogs", -1.0), ("Birds", -1.0)]


def test_errors_are_one_line_with_exit_code_one(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "missing.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("saemnesia inspect: error:") and "no such file" in err and "Traceback" not in err


def test_class_params_need_concept_statistics(tmp_path, capsys):
    make_random_sae_file(path=tmp_path / "f.safetensors")
    assert cli.main(["convert", str(tmp_path / "f.safetensors"), str(tmp_path / "o.safetensors"),
                     "--class-params", "x.pth"]) == 1
    assert "--class-params needs --concept-stats" in capsys.readouterr().err


def test_registrars_add_subcommands(monkeypatch, capsys):
    def register_hello(subparsers):
        subparsers.add_parser("hello").set_defaults(func=lambda args: print("hi"))

    monkeypatch.setattr(cli, "COMMAND_REGISTRARS", [*cli.COMMAND_REGISTRARS, register_hello])
    assert cli.main(["hello"]) == 0 and capsys.readouterr().out == "hi\n"
    with pytest.raises(SystemExit):
        cli.main([])


def test_calibrate_stores_kappa_for_the_chosen_concepts_and_clear_removes_it(tmp_path, capsys):
    path = tmp_path / "f.safetensors"
    original = make_random_sae_file(path=path)
    assert cli.main(["calibrate", str(path), "--kappa", "0.25", "--concepts", "Cats,Van_Gogh"]) == 0
    calibrated = load_sae_file(path)
    assert [c.calibration for c in calibrated.concepts] == [0.25, None, 0.25]
    assert torch.equal(calibrated.tables.mean_acts, original.tables.mean_acts)  # only the header changed
    assert cli.main(["inspect", str(path)]) == 0 and "calibrated κ 0.25" in capsys.readouterr().out
    assert cli.main(["calibrate", str(path), "--clear", "--out", str(tmp_path / "g.safetensors")]) == 0
    assert [c.calibration for c in load_sae_file(tmp_path / "g.safetensors").concepts] == [None] * 3


@pytest.mark.parametrize("argv, message", [(["--kappa", "0"], "calibration 0.0 is not a number in (0, 100]"),
                                           (["--kappa", "nan"], "calibration nan"),
                                           (["--kappa", "0.5", "--concepts", "Cat"], "unknown concept(s) 'Cat'")])
def test_calibrate_refuses_a_bad_kappa_or_label_and_leaves_the_file_as_it_was(tmp_path, capsys, argv, message):
    path = tmp_path / "f.safetensors"
    make_random_sae_file(path=path)
    before = path.read_bytes()
    assert cli.main(["calibrate", str(path), *argv]) == 1
    assert message in capsys.readouterr().err and path.read_bytes() == before
