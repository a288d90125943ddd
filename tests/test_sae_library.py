"""The saemnesia model folders in the real ComfyUI (in-process): the listing terminates on link loops and lists each
entry once, never shows what links outside the allowed folders or is not a regular file, and names are resolved
only to listed entries."""

import os
import threading

import pytest

from helpers_core import write_sparsify_folder
from saemnesia_tools.testing import make_random_sae_file, random_sae

pytestmark = pytest.mark.comfy


@pytest.fixture
def library(comfy, tmp_path):
    """A fresh saemnesia folder registered with ComfyUI (removed again afterwards), and a folder outside it."""
    import folder_paths
    from saemnesia_comfy import sae_library

    inside, outside = tmp_path / "saemnesia", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    make_random_sae_file(d=8, n=16, k=2, concepts=("a",), path=inside / "good.safetensors")
    folder_paths.add_model_folder_path(sae_library.SAE_FOLDER, str(inside))
    yield sae_library, inside, outside
    folder_paths.folder_names_and_paths[sae_library.SAE_FOLDER][0].remove(str(inside))


def listed(sae_library, timeout=60) -> list[str]:
    """The listing, or a failure if it does not finish within `timeout` seconds."""
    result = []
    worker = threading.Thread(target=lambda: result.extend(sae_library.list_sae_entries()), daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), "the listing did not finish"
    return result


def test_link_loops_and_links_back_into_the_folder_do_not_make_the_listing_walk_forever(library):
    sae_library, inside, _ = library
    (inside / "sub").mkdir()
    os.symlink(inside, inside / "sub" / "up")          # back to the top
    os.symlink(inside / "sub", inside / "sub" / "me")  # to itself
    os.symlink(inside, inside / "again")
    entries = [e for e in listed(sae_library) if e.endswith("good.safetensors")]
    assert entries == ["good.safetensors"]


def test_files_and_folders_that_link_outside_the_allowed_folders_are_neither_listed_nor_resolved(library):
    sae_library, inside, outside = library
    make_random_sae_file(d=8, n=16, k=2, concepts=("b",), path=outside / "secret.safetensors")
    os.symlink(outside / "secret.safetensors", inside / "link.safetensors")
    os.symlink(outside, inside / "linked_folder")
    folder = write_sparsify_folder(inside / "ckpt" / "unet.up_blocks.1.attentions.1", random_sae(8, 16, 2))
    (folder / "sae.safetensors").rename(outside / "weights.safetensors")
    os.symlink(outside / "weights.safetensors", folder / "sae.safetensors")  # the folder is inside, its weights not
    entries = listed(sae_library)
    assert "good.safetensors" in entries
    for name in ("link.safetensors", "linked_folder/secret.safetensors", "ckpt/unet.up_blocks.1.attentions.1",
                 "ckpt/unet.up_blocks.1.attentions.1/sae.safetensors"):
        assert name not in entries
        with pytest.raises(FileNotFoundError):
            sae_library.resolve_sae(name)


def test_a_fifo_named_like_an_sae_file_is_not_listed(library):
    sae_library, inside, _ = library
    os.mkfifo(inside / "fifo.safetensors")
    assert "fifo.safetensors" not in listed(sae_library)
    with pytest.raises(FileNotFoundError):
        sae_library.read_entry_header("fifo.safetensors")
