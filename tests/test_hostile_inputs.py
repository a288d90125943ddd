"""Hostile and degenerate inputs, one class at a time: each is built in a temporary folder and must end in a clear
one-line error of our own type, within seconds and a bounded amount of memory, with nothing written or half
written. Where a bound matters the work runs in a subprocess under a memory limit and a timeout."""

import collections
import json
import os
import pickle
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import save_file

from helpers_core import write_sparsify_folder
from saemnesia_tools.cli import main as cli_main
from saemnesia_core.eraser import ConceptEraser
from saemnesia_core.concept_statistics import import_concept_statistics
from saemnesia_core.pickles import load_pickle
from saemnesia_core.sae_file import METADATA_KEY, SAEFileError, load_sae_file, read_header, save_sae_file
from saemnesia_core.sae_format import MAX_BUCKETS
from saemnesia_tools.testing import make_random_sae_file, random_sae, sae_file_with_assigned_latents

BASE = make_random_sae_file(d=8, n=16, k=2, concepts=())


def bounded(code: str, memory_mb: int = 1024, seconds: float = 60) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter allowed `memory_mb` more address space than it had after its imports."""
    preamble = textwrap.dedent(f"""
        import resource, re, torch
        from saemnesia_core.sae_file import SAEFileError
        size = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size + {memory_mb} * 2**20, resource.RLIM_INFINITY))
    """)
    return subprocess.run([sys.executable, "-c", preamble + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=seconds)


def one_line(error: Exception) -> str:
    text = str(error)
    assert "\n" not in text, text
    return text


# ------------------------------------------------------------------- 1. statistics pickles and .pth files


class _ExpandedTensor:
    """Pickles as a tensor of one stored value with a huge shape and zero strides (a hand-made hostile pickle)."""

    def __reduce__(self):
        storage = torch.zeros(1, dtype=torch.float16).storage()
        return torch._utils._rebuild_tensor_v2, (storage, 0, (100_000, 100, 16), (0, 0, 0), False,
                                                 collections.OrderedDict())


def test_statistics_tensors_that_claim_more_values_than_they_store_are_refused_within_bounds(tmp_path):
    torch.save({"a": torch.zeros(1).expand(1_000_000, 100, 16)}, tmp_path / "expanded.pth")  # 6 GB if materialised
    with open(tmp_path / "expanded.pkl", "wb") as f:
        pickle.dump({"a": _ExpandedTensor()}, f, protocol=2)
    base = tmp_path / "base.safetensors"
    save_sae_file(BASE, base)
    for name in ("expanded.pth", "expanded.pkl"):
        done = bounded(f"""
            from saemnesia_core.concept_statistics import import_concept_statistics
            from saemnesia_core.sae_file import load_sae_file
            try:
                import_concept_statistics(load_sae_file({str(base)!r}), {str(tmp_path / name)!r})
            except SAEFileError as e:
                print("refused:", e)
        """, memory_mb=512, seconds=60)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "refused:" in done.stdout and "expanded or overlapping" in done.stdout, done.stdout


@pytest.mark.parametrize("payload, message", [
    ({"a": torch.zeros(3, 0, 16)}, "steps ≥ 1"),
    ({"a": torch.zeros(0, 4, 16)}, "n_prompts ≥ 1"),
    ({"a": torch.zeros(3, 4, 17)}, "has 17 latents, the SAE has 16"),
    ({"a": "not a tensor"}, "must be a float tensor"),
    ({"a": torch.zeros(3, 4, 16, dtype=torch.int64)}, "must be a float tensor"),
    ({" a": torch.zeros(3, 4, 16)}, "without spaces around them"),
    ({"\x1b[31ma": torch.zeros(3, 4, 16)}, "control characters"),
    ({"a": torch.zeros(1, 20_000, 16)}, "at most 10000 are supported"),
    ([1, 2, 3], "expected a non-empty dict"),
])
def test_degenerate_statistics_are_refused_with_a_message_saying_what_is_wrong(tmp_path, payload, message):
    torch.save(payload, tmp_path / "stats.pth")
    with pytest.raises(SAEFileError, match=message) as caught:
        import_concept_statistics(BASE, tmp_path / "stats.pth")
    one_line(caught.value)


def test_torch_loader_errors_are_reported_on_one_line(tmp_path):
    (tmp_path / "broken.pth").write_bytes(b"PK\x03\x04" + b"\x00" * 200)  # a zip header, nothing behind it
    with pytest.raises(SAEFileError, match="cannot load safely") as caught:
        load_pickle(tmp_path / "broken.pth")
    one_line(caught.value)


# ------------------------------------------------------------------------ 2. cfg.json / config.json arithmetic


@pytest.mark.parametrize("cfg, message", [
    ({"d_in": "x" * 10, "expansion_factor": 10**9, "k": 4}, "d_in or d_model or features must be an int"),   # str * int
    ({"d_in": 8, "expansion_factor": 10**12, "k": 4}, "expansion_factor must be an int from 1 to"),
    ({"d_in": 8, "num_latents": 2**40, "k": 4}, "num_latents or n_dirs_local or pages must be an int from 1 to"),
    ({"d_in": 8, "num_latents": 16, "k": 17}, "k must be an int from 1 to 16"),
    ({"d_in": 8, "num_latents": 16, "k": 4.5}, "k must be an int"),
    ({"d_in": 8, "num_latents": 16, "k": 4, "input_unit_norm": "yes"}, "input_unit_norm must be true or false"),
    ({"d_in": 1024, "num_latents": 1 << 20, "k": 4}, "need at least"),                # more than the file holds
])
def test_checkpoint_configs_are_checked_field_by_field_before_any_arithmetic(tmp_path, cfg, message):
    folder = write_sparsify_folder(tmp_path / "unet.up_blocks.1.attentions.1", random_sae(8, 16, 2))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    done = bounded(f"""
        from saemnesia_core.importers import load_any
        try:
            load_any({str(folder)!r})
        except SAEFileError as e:
            print("refused:", e)
    """, memory_mb=256, seconds=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused:" in done.stdout and message in done.stdout, done.stdout


# ------------------------------------------------------------------ 3. files that load but would break the eraser


def test_a_file_whose_tables_have_no_latent_slots_loads_and_its_eraser_edits_nothing(tmp_path):
    f = make_random_sae_file(d=8, n=16, k=2, concepts=("a", "b"), supervised=False)
    t = f.tables
    empty = type(t)(t.latents[:, :, :0], t.mean_acts[:, :, :0], t.thresholds[:, :, :0])
    save_sae_file(type(f)(**{**f.__dict__, "tables": empty}), tmp_path / "l0.safetensors")
    x = torch.randn(2, 5, 8)
    assert torch.equal(ConceptEraser.from_file(load_sae_file(tmp_path / "l0.safetensors"), {"a": -5.0})(x, 0.5), x)


def raw_file(path, sae_file, **meta_changes):
    """Write `sae_file` with its metadata changed after validation (what a hostile writer could produce)."""
    save_sae_file(sae_file, path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    meta = json.loads(header["__metadata__"][METADATA_KEY])
    meta.update(meta_changes)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})


@pytest.mark.parametrize("concepts", [(), ("a",)])
def test_a_huge_bucket_count_is_refused_by_the_loader_with_or_without_concepts(tmp_path, concepts):
    path = tmp_path / "buckets.safetensors"
    raw_file(path, make_random_sae_file(d=8, n=16, k=2, concepts=concepts, num_buckets=2), num_buckets=10**9)
    for read in (read_header, load_sae_file):
        with pytest.raises(SAEFileError, match=f"num_buckets must be an int from 1 to {MAX_BUCKETS}"):
            read(path)


def test_building_an_eraser_at_the_bucket_limit_takes_well_under_a_second():
    f = sae_file_with_assigned_latents(random_sae(8, 16, 2), [1, 2, 3], ["a", "b", "c"], num_buckets=MAX_BUCKETS)
    start = time.perf_counter()
    eraser = ConceptEraser.from_file(f, {"a": -1.0, "b": -1.0, "c": -1.0})
    eraser(torch.randn(1, 4, 8), 0.3)
    assert time.perf_counter() - start < 5  # linear in the file's own size (generous on a busy CPU)


# --------------------------------------------------------------------------------- 4. special files and folders


def test_a_fifo_named_like_an_sae_file_is_refused_without_blocking_any_reader(tmp_path):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    done = bounded(f"""
        from saemnesia_core.importers import load_any
        from saemnesia_core.sae_file import load_sae_file, read_header, is_sae_file
        for read in (read_header, load_sae_file, load_any, is_sae_file):
            try:
                read({str(fifo)!r})
                print("read", read.__name__)
            except SAEFileError as e:
                print("refused:", e)
    """, seconds=30)  # a reader that opened the FIFO would block here until the timeout
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("refused:") == 4, done.stdout


# ------------------------------------------------------------------------- 5. what we write, we can read


def test_convert_refuses_metadata_that_its_own_reader_would_refuse_and_writes_nothing(tmp_path, capsys):
    folder = write_sparsify_folder(tmp_path / "unet.up_blocks.1.attentions.1", random_sae(8, 16, 2),
                                   notes="x" * (17 << 20))  # cfg.json travels into the provenance
    out = tmp_path / "out.safetensors"
    assert cli_main(["convert", str(folder), str(out)]) == 1
    assert "a reader accepts" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


# -------------------------------------------------------------------------------- 6. strengths and numbers


@pytest.mark.parametrize("gamma", [1e39, -1e300, float("nan"), float("inf"), 100.5])
def test_strengths_outside_the_nodes_range_are_refused_not_turned_into_nan_images(gamma):
    f = make_random_sae_file(d=8, n=16, k=2, concepts=("a",))
    with pytest.raises(ValueError, match="from -100 to 100"):
        ConceptEraser.from_file(f, {"a": gamma})


def test_a_default_strength_that_overflows_float32_is_refused_by_the_loader(tmp_path):
    path = tmp_path / "strength.safetensors"
    f = make_random_sae_file(d=8, n=16, k=2, concepts=("a",))
    raw_file(path, f, concepts=[{"label": "a", "group": "object", "latent": f.concepts[0].latent,
                                 "default_strength": 1e39}])
    with pytest.raises(SAEFileError, match=r"default strength 1e\+39 is outside \[-100, 100\]"):
        load_sae_file(path)


# ----------------------------------------------------------------------------------------------- 7. labels


@pytest.mark.parametrize("label", ["   ", "Cats ", " Cats", "\x1b[31mCats", "Ca\u200bts", "Cats\n"])
def test_unreadable_labels_are_refused_at_save_and_at_import(tmp_path, label):
    with pytest.raises(SAEFileError, match="spaces around it or control characters"):
        save_sae_file(make_random_sae_file(d=8, n=16, k=2, concepts=(label, "Dogs")), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    torch.save({label: torch.rand(2, 4, 16), "Dogs": torch.rand(2, 4, 16)}, tmp_path / "stats.pth")
    with pytest.raises(SAEFileError, match="control characters"):
        import_concept_statistics(BASE, tmp_path / "stats.pth")


def test_inspect_never_prints_raw_control_characters(tmp_path, capsys):
    path = tmp_path / "\x1b[31mred.safetensors"
    raw_file(path, make_random_sae_file(d=8, n=16, k=2, concepts=("a",)), hookpoint="unet.up\x1b[2J")
    assert cli_main(["inspect", str(path)]) == 1
    captured = capsys.readouterr()
    assert "\x1b" not in captured.out + captured.err and "\\x1b" in captured.err


def test_the_loader_refuses_control_characters_in_the_hookpoint_and_family(tmp_path):
    path = tmp_path / "x.safetensors"
    raw_file(path, make_random_sae_file(d=8, n=16, k=2, concepts=("a",)), model_family="toy\x1b[0m")
    with pytest.raises(SAEFileError, match="control characters"):
        read_header(path)


@pytest.mark.comfy
@pytest.mark.parametrize("text, message", [
    ('{"Hearts": -1e300}', "from -100 to 100"),
    ('{"Hearts": 1e999}', "from -100 to 100"),               # JSON's way to write infinity
    ('{"Hearts": -1, "Hearts": -5}', "a label twice"),
    ('["Hearts", "Hearts"]', "a label twice"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_the_erase_nodes_concepts_text_refuses_hostile_json_with_a_value_error(comfy, text, message):
    from saemnesia_comfy.erase import parse_concepts

    with pytest.raises(ValueError, match=message) as caught:
        parse_concepts(text)
    assert type(caught.value) is ValueError
    one_line(caught.value)
