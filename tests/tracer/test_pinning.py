"""Pinned step buffers at their size: PyTorch's allocator setting, applied without losing others."""

from __future__ import annotations

import pytest
import torch

from tracer.pinning import SETTING, THRESHOLD_MB, pin_at_size


@pytest.fixture
def allocator_settings():
    """The process's allocator settings, put back afterwards as far as they can be: a setting
    once given keeps its value (none of these matters on a CPU)."""
    before = torch._C._accelerator_getAllocatorSettings()
    yield
    torch._C._accelerator_setAllocatorSettings(before)


def test_the_threshold_is_added_to_the_settings_the_process_has(allocator_settings):
    torch._C._accelerator_setAllocatorSettings("pinned_use_background_threads:True")
    assert pin_at_size()
    settings = torch._C._accelerator_getAllocatorSettings().split(",")
    assert "pinned_use_background_threads:True" in settings
    assert f"{SETTING}:{THRESHOLD_MB}" in settings


def test_a_threshold_already_set_stands(allocator_settings):
    torch._C._accelerator_setAllocatorSettings(f"{SETTING}:1024")
    assert pin_at_size()
    assert torch._C._accelerator_getAllocatorSettings() == f"{SETTING}:1024"


def test_a_torch_without_the_setting_is_said(monkeypatch):
    def refuse(settings: str) -> None:
        raise RuntimeError(f"Unrecognized key '{SETTING}' in Accelerator allocator config.")

    monkeypatch.setattr(torch._C, "_accelerator_getAllocatorSettings", lambda: "")
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", refuse)
    assert pin_at_size() is False


@pytest.mark.cuda
def test_a_block_past_the_threshold_is_pinned_at_its_size_where_torch_can(allocator_settings):
    torch.cuda.init()  # the host allocator's statistics count from here
    applied = pin_at_size()
    # Past 64 MB; rounded, it would pin 512 MiB (a block size no other test leaves cached).
    size = 300 * 2**20 + 4096
    before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    block = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    assert block.is_pinned()
    grown = torch.cuda.host_memory_stats()["allocated_bytes.current"] - before
    # At its size where this torch has the setting; where pin_at_size said it has not, rounded.
    assert grown == (size if applied else 512 * 2**20)


def test_record_pins_host_memory_at_its_size(tmp_path, allocator_settings):
    from analysis.cli import main

    torch._C._accelerator_setAllocatorSettings("")
    assert main(["record", "--demo", "--num-steps", "1", "--out", str(tmp_path / "t.zarr")]) == 0
    assert f"{SETTING}:{THRESHOLD_MB}" in torch._C._accelerator_getAllocatorSettings()
    # An estimate's probe of the writer pins its step buffers as the recording would.
    torch._C._accelerator_setAllocatorSettings("")
    assert main(["record", "--demo", "--estimate", "--out", str(tmp_path / "e.zarr")]) == 0
    assert f"{SETTING}:{THRESHOLD_MB}" in torch._C._accelerator_getAllocatorSettings()
