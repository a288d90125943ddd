"""The house rules that keep the repository readable (docs/DESIGN.md §2, docs/ARCHITECTURE.md): the runtime imports only
the library of ours, the library and the ComfyUI-free tools never import ComfyUI, importing the runtime does nothing,
the design citations in the code lead somewhere, the toy world's files are named in one module, shared helpers are
imported from packages, and no module grows past a readable size."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from saemnesia_tools.toy import assets

ROOT = assets.REPO_ROOT
COMFY_SIDE = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server", "execution",
              "saemnesia_comfy", "saemnesia_tools.comfyui")
"""ComfyUI, the runtime, and the tools that need a host: what the ComfyUI-free packages never import."""


def tracked(*suffixes: str) -> list[Path]:
    """The repository's files (tracked, or new and not ignored) with these suffixes."""
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    return sorted(ROOT / n for n in set(names) if Path(n).suffix in suffixes and (ROOT / n).is_file())


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def comfyui_free_files() -> list[Path]:
    """The core and the tools that need no host."""
    paths = [*(ROOT / "saemnesia_core").rglob("*.py"), *(ROOT / "saemnesia_tools").rglob("*.py")]
    return sorted(p for p in paths if not module_name(p).startswith("saemnesia_tools.comfyui"))


def comfyui_free_modules() -> list[str]:
    return [module_name(p) for p in comfyui_free_files()]


def imported_names(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in a file, inside functions too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found += [(node.lineno, node.module or "")]
    return found


def is_under(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_every_comfyui_free_module_imports_in_a_fresh_interpreter_that_cannot_import_comfyui():
    # -I: no PYTHONPATH, no current folder on sys.path; the finder refuses everything of the ComfyUI side
    code = f"""
import importlib, sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if any(name == p or name.startswith(p + ".") for p in {COMFY_SIDE!r}):
            raise ImportError("a ComfyUI-free module must not import " + name)
sys.meta_path.insert(0, Refuse())
for name in {comfyui_free_modules()!r}:
    importlib.import_module(name)
print(len({comfyui_free_modules()!r}))
"""
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.strip()) == len(comfyui_free_modules()) >= 35


def test_no_comfyui_free_module_imports_the_comfyui_side_even_inside_a_function():
    offenders = [f"{p.relative_to(ROOT)}:{line} {name}" for p in comfyui_free_files()
                 for line, name in imported_names(p) if is_under(name, COMFY_SIDE)]
    assert offenders == []


def test_the_runtime_imports_only_the_core_of_ours_and_the_core_none_of_the_rest():
    """The arrows of docs/ARCHITECTURE.md: runtime -> core, tools -> runtime and core, never back."""
    ours = ("saemnesia_core", "saemnesia_comfy", "saemnesia_tools")
    allowed = {"saemnesia_comfy": ("saemnesia_core", "saemnesia_comfy"), "saemnesia_core": ("saemnesia_core",)}
    offenders = [f"{p.relative_to(ROOT)}:{line} {name}" for package, may in allowed.items()
                 for p in (ROOT / package).rglob("*.py") for line, name in imported_names(p)
                 if is_under(name, ours) and not is_under(name, may)]
    assert offenders == []


def test_importing_the_runtime_package_has_no_side_effects():
    """`import saemnesia_comfy` loads nothing else and changes no path: what ComfyUI runs is what the pack's entry
    and `comfy_entrypoint` do, not what an import does."""
    code = """
import sys
before, path = set(sys.modules), list(sys.path)
import saemnesia_comfy
assert set(sys.modules) - before == {"saemnesia_comfy"}, sorted(set(sys.modules) - before)
assert sys.path == path
"""
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]


def test_design_citations_in_the_code_name_sections_of_docs_design():
    headings = re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", (ROOT / "docs" / "DESIGN.md").read_text(), re.MULTILINE)
    cited, dangling = set(), []
    for path in tracked(".py", ".sh", ".js"):
        if path == Path(__file__).resolve():
            continue
        text = path.read_text()
        if "notes/" in text or "notes §" in text:
            dangling.append(f"{path.relative_to(ROOT)} cites notes that are not in the repository")
        for first, last in re.findall(r"DESIGN §(\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))?", text):
            for section in filter(None, (first, last)):
                cited.add(section)
                if section not in headings:
                    dangling.append(f"{path.relative_to(ROOT)} cites DESIGN §{section}")
    assert dangling == []
    assert len(cited) >= 10  # the check looked at real citations


def test_the_toy_worlds_file_names_appear_only_in_the_assets_module():
    names = [Path(assets.MODEL).name, Path(assets.JUDGES).name, assets.TEXT_SAE] + \
        [site.sae(m) for site in assets.ALL_SITES for m in ("saemnesia", "saeuron")]
    found = [f"{path.relative_to(ROOT)}: {name}" for path in tracked(".py", ".sh", ".js")
             if path != ROOT / "saemnesia_tools" / "toy" / "assets.py" for name in names if name in path.read_text()]
    assert found == []


def test_tests_benchmarks_and_scripts_import_shared_helpers_from_packages_not_by_editing_sys_path():
    # the pack's entry; the host finder; the archive test, which hides this checkout from a fresh interpreter
    allowed = {ROOT / "__init__.py", ROOT / "saemnesia_tools" / "comfyui" / "host.py",
               ROOT / "tests" / "test_registry.py"}
    edits = [str(p.relative_to(ROOT)) for p in tracked(".py") if p not in allowed and p != Path(__file__).resolve()
             and re.search(r"sys\.path\.(insert|append)|sys\.path(\[:\])?\s*=(?!=)", p.read_text())]
    assert edits == []


def test_no_module_of_ours_is_longer_than_400_lines():
    long = {str(p.relative_to(ROOT)): n for package in ("saemnesia_comfy", "saemnesia_core", "saemnesia_tools")
            for p in (ROOT / package).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_the_readme_and_the_evaluation_page_show_the_evaluation_as_its_results_file_writes_it():
    import json

    from saemnesia_tools.toy.evaluation.report import (default_against_bar, judged_instead, multi_site_findings,
                                                      one_setting_findings, paper_and_exact, replace_findings,
                                                      summary_table, text_findings)

    readme, page = (ROOT / "README.md").read_text(), (ROOT / "docs" / "evaluation.md").read_text()
    results = json.loads((ROOT / "benchmarks" / "results" / "eval_quick" / "results.json").read_text())
    for shown in (summary_table, replace_findings, paper_and_exact, one_setting_findings, default_against_bar,
                  judged_instead, text_findings, multi_site_findings):
        assert shown(results) in page, shown.__name__
    assert default_against_bar(results)  # the results have the default's row (an evaluation made since it exists)
    assert default_against_bar(results) in readme  # the README's limits hold the node's default against its bar
    verdicts = json.loads((ROOT / "docs" / "demo" / "verdicts.json").read_text())
    assert verdicts["caption"] in " ".join(readme.split())  # the README may wrap the caption's lines


def test_the_readme_quotes_the_teaching_study_as_its_results_file_writes_it():
    import json

    study = json.loads((ROOT / "benchmarks" / "studies" / "results" / "teach_concepts.json").read_text())
    assert study["written_by"] == "python benchmarks/studies/teach_concepts.py"
    assert study["readme"] in " ".join((ROOT / "README.md").read_text().split())  # the README may wrap it


def test_the_toy_world_page_shows_the_shipped_saes_numbers_as_the_build_report_writes_them():
    import json
    import textwrap

    from saemnesia_tools.toy.build_summary import model_line, sae_lines

    report = json.loads((ROOT / "models" / "toy" / "build_report.json").read_text())
    lines = sae_lines(report)
    page = (ROOT / "docs" / "toy-world.md").read_text()
    assert len(lines.splitlines()) == len(report["saes"]) + 1 == 4  # the three sites and the text encoder's SAE
    assert textwrap.indent(lines, "  ") in page
    assert model_line(report) in " ".join(page.split())  # the page may wrap the model's paragraph


def test_every_number_of_the_benchmark_table_is_in_the_results_its_row_links():
    """benchmarks/README.md's table quotes its results files: each number of a row's result is in the files that row
    links (rounded as those files print it)."""
    page = (ROOT / "benchmarks" / "README.md").read_text()
    rows = [r for r in page.splitlines() if r.startswith("| ") and not r.startswith("| what") and "---" not in r]
    assert len(rows) >= 6
    for row in rows:
        result = row.split(" | ")[-1]
        linked = re.findall(r"\]\((results/[^)]+)\)", row)
        assert linked, row[:80]
        text = " ".join((ROOT / "benchmarks" / name).read_text() for name in linked)
        missing = [n for n in re.findall(r"(?<![\w.])\d+(?:\.\d+)?", result) if n not in text]
        assert missing == [], (row[:80], missing)


def test_the_gpu_check_says_there_is_no_cuda_and_succeeds_on_a_machine_without_one():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: the script runs the GPU path there (scripts/gpu_check.sh, tests/test_gpu.py)")
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          env={**os.environ, "SAEMNESIA_PYTHON": sys.executable}, timeout=120)
    assert done.returncode == 0 and "no CUDA device" in done.stdout


def test_the_node_default_is_the_edit_the_removal_study_chose():
    """Erase Concepts' defaults, the demo's and the evaluation's `default` row are DEFAULT_EDIT, and DEFAULT_EDIT is
    the candidate benchmarks/studies/removal_edits.py chose by its rule, with the group's SAEmnesia file."""
    import json

    from saemnesia_core.concepts import DEFAULT_EDIT

    study = json.loads((ROOT / "benchmarks" / "studies" / "results" / "removal_edits.json").read_text())
    assert study["written_by"] == "python benchmarks/studies/removal_edits.py"
    assert study["default_setting"] == {"sae": "saemnesia", **DEFAULT_EDIT._asdict()}
    d = DEFAULT_EDIT  # and the README's node table says so
    stated = f"by default {d.mode} on the {d.branches} branch at {d.strength:g}".replace("-", "−")
    assert stated in (ROOT / "README.md").read_text()
