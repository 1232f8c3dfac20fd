"""diffusers FLUX: which attention backends can be traced, checked before any run exists."""

from __future__ import annotations

from importlib import metadata

import pytest
import torch

import tracer
from analysis.errors import UnsupportedModelError
from tracer.adapters.base import token_grid
from tracer.adapters.diffusers_flux import DiffusersFlux
from tracer.demo import demo_pipeline


@pytest.fixture
def pipe():
    return demo_pipeline(seed=0, max_sequence_length=16)


@pytest.fixture(autouse=True)
def active_backend_restored():
    """`set_attention_backend` also sets diffusers' process-wide active backend, which
    `reset_attention_backend` leaves alone: later tests in this process must not inherit it."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before, _ = _AttentionBackendRegistry.get_active_backend()
    yield
    _AttentionBackendRegistry.set_active_backend(before)


def test_a_module_on_a_non_sdpa_backend_is_refused_before_the_store_exists(pipe, tmp_path):
    pipe.transformer.set_attention_backend("flex")
    path = tmp_path / "never.zarr"
    refused = pytest.raises(UnsupportedModelError, match=r"transformer_blocks\.0 runs its")
    with refused as e, tracer.trace(pipe, path):
        pass
    assert "'flex' backend" in str(e.value) and "set_attention_backend('native')" in str(e.value)
    assert not path.exists()


@pytest.mark.parametrize("backend", ["native", "_native_math"])
def test_sdpa_backends_are_traced(pipe, backend):
    pipe.transformer.set_attention_backend(backend)
    adapter = DiffusersFlux(pipe)
    adapter.check_attention(adapter.layers())  # does not raise


def test_a_pipeline_built_in_code_is_named_by_its_transformer(pipe):
    assert DiffusersFlux(pipe).run_attrs()["model"] == "FluxTransformer2DModel built in code"
    assert isinstance(pipe.transformer, torch.nn.Module)


def test_every_run_names_the_installed_library_versions(pipe):
    installed = {name: metadata.version(name) for name in ("torch", "diffusers", "transformers")}
    for _ in range(2):  # read once per process, then remembered: the second run says the same
        versions = DiffusersFlux(pipe).run_attrs()["versions"]
        assert {name: versions[name] for name in installed} == installed


def grid_ids(rows, cols, first=0, width=3):
    """Image ids as the FLUX pipelines make them: (first, row, col[, 0]) in row-major order."""
    ids = torch.zeros(rows * cols, width)
    ids[:, 0] = first
    ids[:, 1] = torch.arange(rows).repeat_interleave(cols)
    ids[:, 2] = torch.arange(cols).repeat(rows)
    return ids


def test_the_grid_is_the_generated_images_tokens_before_any_reference_images():
    kontext = torch.cat([grid_ids(2, 3), grid_ids(4, 4, first=1)])  # FLUX.1 Kontext
    assert token_grid(kontext) == (2, 3)
    flux2 = torch.cat([grid_ids(3, 5, width=4), grid_ids(2, 2, first=10, width=4)])
    assert token_grid(flux2.expand(2, -1, -1)) == (3, 5)  # FLUX.2: batched (B, N, 4)
    with pytest.raises(UnsupportedModelError, match="not a complete row-major 2x3 grid"):
        token_grid(grid_ids(2, 3)[[0, 2, 1, 3, 4, 5]])
