"""What one edit call costs, on the CPU as a proxy for the GPU where users run it (DESIGN §6.1): it launches no more
kernels (ATen ops that compute, views aside) than one call of the released dense hook, in every mode and detection;
and the edit proper (`ConceptEraser.edit`) is a function of tensors that torch.compile captures whole
(fullgraph=True) and that then gives the eager result. The counts are also measured and reported by
benchmarks/bench_edit.py."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from saemnesia_core.eraser import ConceptEraser
from saemnesia_tools.testing import random_sae, released_hook_call, sae_file_with_assigned_latents

SETTINGS = [("exact", "topk"), ("exact", "threshold"), ("paper", "topk"), ("replace", "topk"), ("replace", "threshold"),
            ("shift", "topk"), ("shift", "threshold")]


def directions(sae_file, mode: str) -> dict:
    """Shift mode's mean differences (random: the cost does not depend on their values); nothing for other modes."""
    if mode != "shift":
        return {}
    shape = (len(sae_file.concepts), sae_file.tables.num_buckets, sae_file.config.d_in)
    return {"directions": torch.randn(shape, generator=torch.Generator().manual_seed(2))}


class Kernels(TorchDispatchMode):
    """The ops that compute something (a view's output aliases its input and launches no kernel)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        schema = func._schema
        if schema.is_mutable or not any(r.alias_info is not None for r in schema.returns):
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def count(call) -> list[str]:
    call()  # casts and tables are made on the first call, and kept
    with Kernels() as kernels:
        call()
    return kernels.ops


@pytest.fixture(scope="module")
def world():
    sae = random_sae(d=128, n=1024, k=16, seed=0)
    sae_file = sae_file_with_assigned_latents(sae, list(range(20)), num_buckets=50)
    x = torch.randn(2, 128, 16, 16, generator=torch.Generator().manual_seed(1))  # one CFG step: cond and uncond
    return sae, sae_file, x


@pytest.mark.parametrize("mode, detection", SETTINGS)
def test_one_edit_call_launches_no_more_kernels_than_the_released_dense_hook(world, mode, detection):
    sae, sae_file, x = world
    eraser = ConceptEraser(sae, sae_file.concepts, sae_file.tables, {"concept_0": -1.0}, mode=mode,
                           detection=detection, **directions(sae_file, mode))
    ours = count(lambda: eraser(x, [0.5, 0.5], [True, True]))  # as the ComfyUI patch calls it
    dense = count(lambda: released_hook_call(sae, torch.tensor([0]), torch.zeros(1), torch.full((1,), -1.0), x))
    assert "_local_scalar_dense" not in ours  # no value read back to the host: no synchronisation
    assert len(ours) <= len(dense), (ours, dense)


@pytest.mark.parametrize("mode, detection", SETTINGS)
@pytest.mark.parametrize("update", [False, True], ids=["output", "update"])
def test_the_edit_compiles_whole_and_matches_the_eager_one(world, mode, detection, update):
    sae, sae_file, x = world
    eraser = ConceptEraser(sae, sae_file.concepts, sae_file.tables, {"concept_0": -1.0, "concept_3": -5.0},
                           mode=mode, detection=detection, reads="update" if update else "output",
                           **directions(sae_file, mode))
    base = torch.randn_like(x) * 0.1 if update else None
    captured = {}
    original = eraser.edit

    def keep(*args):
        captured["args"] = args
        return original(*args)

    eraser.edit = keep
    eager = eraser(x, [0.5, 0.5], [True, False], base=base)
    assert not torch.equal(eager, x)
    compiled = torch.compile(original, fullgraph=True, backend="aot_eager", dynamic=False)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled(*captured["args"]), eager, rtol=1e-5, atol=1e-5)


def test_a_timing_cut_by_its_budget_keeps_the_rounds_every_variant_finished():
    """What scripts/gpu_check.sh's time budgets rely on: SIGINT mid-round gives the finished rounds, marked partial."""
    from saemnesia_tools.timing import interleaved

    calls = {"a": 0}

    def b():
        calls["a"] += 1
        if calls["a"] == 5:  # the budget runs out in the fourth round, at its second variant
            raise KeyboardInterrupt

    times, partial = interleaved({"a": lambda: None, "b": b}, repeats=10, warmup=1)
    assert partial and {name: len(v) for name, v in times.items()} == {"a": 3, "b": 3}
    times, partial = interleaved({"a": lambda: None}, repeats=4, warmup=0)
    assert not partial and len(times["a"]) == 4
