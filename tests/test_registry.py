"""The pack as the Comfy Registry sees it: the archive's file list (git-tracked files minus .comfyignore, plus
[tool.comfy] includes, as comfy-cli builds it), pyproject's required fields and icon, and no call in the shipped
code that the registry's scan forbids or flags (its ruff rules S102/S307/E702, process spawning, dynamic imports,
eval in the web extension)."""

from __future__ import annotations

import ast
import io
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pathspec
import pytest
from PIL import Image

from helpers_comfy import NODE_IDS
from saemnesia_tools.toy import assets

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
REGISTRY_RULES = "S102,S307,E702"          # what `comfy node validate` runs ruff with
SPAWN_RULES = "S602,S603,S604,S605,S606,S607"  # subprocess, os.system, os.popen and kin
DYNAMIC = {("importlib", "import_module"), ("builtins", "__import__")}
BARE = {"eval", "exec", "compile", "__import__"}


def archive_files() -> list[Path]:
    """What `comfy node pack` puts in the archive from a git checkout."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = {f for f in tracked.decode().split("\0") if f and (ROOT / f).is_file()}
    ignore = pathspec.GitIgnoreSpec.from_lines((ROOT / ".comfyignore").read_text().splitlines())
    files = {f for f in files if not ignore.match_file(f)}
    for include in PYPROJECT["tool"]["comfy"]["includes"]:
        files |= {str(p.relative_to(ROOT)) for p in (ROOT / include).rglob("*") if p.is_file()}
    return sorted(ROOT / f for f in files)


def flagged_calls(source: str) -> list[str]:
    """Dynamic imports and eval/exec/compile by name or through importlib/builtins, as 'line: call'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in BARE:
            found.append(f"{node.lineno}: {f.id}")
        elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and (f.value.id, f.attr) in DYNAMIC:
            found.append(f"{node.lineno}: {f.value.id}.{f.attr}")
    return found


def ruff(rules: str, files: list[Path]) -> str:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "-q", "--no-cache", "--isolated", "--select", rules,
                           "--output-format", "concise", "--exit-zero", *map(str, files)],
                          cwd=ROOT, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def shipped_python():
    return [f for f in archive_files() if f.suffix == ".py"]


ARCHIVE_TOP = {"__init__.py", "saemnesia_comfy", "saemnesia_core", "web", "example_workflows", "models",
               "pyproject.toml", "README.md", "LICENSE"}
"""What the archive may hold at its top: the entry, the runtime and its library, the web extension, the templates,
the toy models, and the project's metadata."""


def test_the_archive_holds_the_runtime_the_web_extension_the_templates_and_the_toy_assets_and_nothing_else():
    files = {str(f.relative_to(ROOT)) for f in archive_files()}
    assert {f.split("/")[0] for f in files} == ARCHIVE_TOP
    for needed in ("__init__.py", "saemnesia_comfy/nodes/__init__.py", "saemnesia_comfy/erase.py",
                   "saemnesia_core/eraser.py", "web/concept_checklist.js", "pyproject.toml", "LICENSE", "web/icon.png"):
        assert needed in files
    assert any(f.startswith("models/saemnesia/") for f in files) and any(f.startswith("models/toy/") for f in files)
    assert any(f.startswith("example_workflows/") for f in files)


def test_the_runtime_loads_into_comfyui_from_the_archives_files_alone(tmp_path, comfy):
    """The archive's files copied into a custom_nodes folder load into ComfyUI in a fresh interpreter in which this
    checkout is unreachable (no editable install, no repository on sys.path): every node registers, the SAE
    library lists the shipped SAEs from the copy's own models folder, and nothing outside the copy, nothing of the
    tools, is imported."""
    pack = tmp_path / "custom_nodes" / "saemnesia"
    for f in archive_files():
        target = pack / f.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
    code = f"""
import asyncio, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__name__.lower()]
sys.path[:] = [p for p in sys.path if p and p.rstrip("/") != {str(ROOT)!r}]
sys.path.insert(0, {str(comfy)!r})
import comfy.cli_args
comfy.cli_args.args.cpu = True
import nodes
assert asyncio.run(nodes.load_custom_node({str(pack)!r}))
from saemnesia_comfy import sae_library
ours = sorted(m for m, module in sys.modules.items() if m.startswith("saemnesia"))
outside = [m for m in ours if not (getattr(sys.modules[m], "__file__", None) or "").startswith({str(pack)!r})]
assert not outside, outside
assert not [m for m in ours if m.startswith("saemnesia_tools")], ours
print(sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("SAEmnesia")))
print(sae_library.list_sae_entries())
"""
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    registered, entries = done.stdout.strip().splitlines()[-2:]
    assert eval_list(registered) == sorted(NODE_IDS)
    assert assets.SITES["object"].saemnesia in eval_list(entries)


def eval_list(line: str) -> list[str]:
    import ast as _ast

    return _ast.literal_eval(line)


def test_the_shipped_python_has_nothing_the_registry_forbids_or_flags(shipped_python):
    assert len(shipped_python) > 20
    assert ruff(f"{REGISTRY_RULES},{SPAWN_RULES}", shipped_python) == ""
    found = {str(f.relative_to(ROOT)): flagged_calls(f.read_text()) for f in shipped_python}
    assert {f: calls for f, calls in found.items() if calls} == {}
    for f in shipped_python:
        assert "pip install" not in f.read_text(), f  # no installs at run time


def test_the_checks_see_what_they_look_for():
    """The same checks find the dev tools' process spawning and every kind of flagged call written in a file."""
    assert "S603" in ruff(SPAWN_RULES, [ROOT / "saemnesia_tools" / "comfyui" / "server.py"])
    source = ("import importlib, builtins\nimportlib.import_module('os')\n__import__('os')\nbuiltins.__import__('os')\n"
              "eval('1')\nexec('x = 1')\ncompile('1', 'f', 'eval')\nprint(model.eval())\n")
    assert flagged_calls(source) == ["2: importlib.import_module", "3: __import__", "4: builtins.__import__",
                                     "5: eval", "6: exec", "7: compile"]


def test_the_web_extension_evaluates_no_strings():
    for js in (ROOT / "web").glob("*.js"):
        text = js.read_text()
        assert "eval(" not in text and "new Function(" not in text, js


def test_pyproject_has_the_registry_fields_and_a_real_icon():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    for field in ("name", "version", "description", "license"):
        assert project[field], field
    for field in ("PublisherId", "DisplayName", "Icon", "requires-comfyui", "includes"):
        assert comfy[field], field
    repository = urlparse(project["urls"]["Repository"])
    icon = urlparse(comfy["Icon"])
    owner_repo = repository.path.strip("/")
    assert icon.netloc == "raw.githubusercontent.com" and icon.path.startswith(f"/{owner_repo}/main/")
    path = ROOT / icon.path.removeprefix(f"/{owner_repo}/main/")
    image = Image.open(io.BytesIO(path.read_bytes()))
    assert image.format == "PNG" and image.size[0] == image.size[1] <= 400
    assert str(path.relative_to(ROOT)) in {str(f.relative_to(ROOT)) for f in archive_files()}


def test_the_readme_and_requires_comfyui_name_the_hosts_the_suite_runs_on():
    """The host this run of the suite uses is one the README names, and requires-comfyui starts at the oldest."""
    import re

    from saemnesia_tools.comfyui.host import comfyui_path

    readme = " ".join((ROOT / "README.md").read_text().split())
    named = re.search(r"The suite runs on ComfyUI ([\d.]+) and ([\d.]+)", readme)
    assert named, "the README's compatibility line"
    version = re.search(r'__version__ = "([\d.]+)"', (comfyui_path() / "comfyui_version.py").read_text()).group(1)
    assert version in named.groups()
    oldest = min(named.groups(), key=lambda v: tuple(map(int, v.split("."))))
    assert PYPROJECT["tool"]["comfy"]["requires-comfyui"] == f">={oldest}"
    assert f"`requires-comfyui` declares `>={oldest}`" in readme
