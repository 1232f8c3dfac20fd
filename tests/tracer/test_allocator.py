"""tracer.allocator: a recording process reuses the memory it frees instead of faulting it in
again (each step's shard buffers, hundreds of MB at FLUX.1-dev's shape)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys

import pytest

from tracer import allocator

# The environment the module's docstring gives, for a process started with these settings.
DOCUMENTED_ENV = dict(
    pair.split("=")
    for pair in re.search(r"`(MALLOC_ARENA_MAX=[^`]+)`", allocator.__doc__).group(1).split()
)

# Allocates and frees a block of argv[2] bytes, then counts the page faults of doing it again.
FAULTS_OF_A_SECOND_BLOCK = """
import resource, sys
if sys.argv[1] == "tuned":
    from tracer.allocator import tune_for_recording
    assert tune_for_recording()
def block(n=int(sys.argv[2])):
    data = bytearray(n)
    data[::4096] = b"\\x01" * len(range(0, n, 4096))  # one write to every page
block()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str, size: int, env: dict[str, str] | None = None) -> int:
    """Page faults of the second block in a fresh interpreter (the settings are process-wide)."""
    out = subprocess.run(
        [sys.executable, "-c", FAULTS_OF_A_SECOND_BLOCK, mode, str(size)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return int(out.stdout)


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the settings are glibc's; elsewhere nothing is done"
)
@pytest.mark.parametrize("mib", [256, 2304], ids=["256 MiB", "past 2 GiB"])
def test_a_freed_block_is_reused_instead_of_faulted_in_again(mib):
    """Past 2 GiB (a FLUX-sized writer's free heap on two cores), the largest positive trim
    threshold glibc's mallopt takes would still hand the block back."""
    pages = mib * 2**20 // 4096
    assert faults("default", mib * 2**20) > pages // 2  # glibc maps it afresh: a fault per page
    assert faults("tuned", mib * 2**20) < pages // 100


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the settings are glibc's; elsewhere nothing is done"
)
def test_the_environment_the_docs_give_does_the_same():
    size = 2304 * 2**20
    assert faults("default", size, env=os.environ | DOCUMENTED_ENV) < size // 4096 // 100


def test_the_cli_sets_it_for_a_recording(tmp_path, monkeypatch):
    from analysis.cli import main
    from tracer import cli

    applied = []
    monkeypatch.setattr(cli, "tune_for_recording", lambda: applied.append(True) or True)
    out = tmp_path / "demo.zarr"
    assert main(["record", "--demo", "--num-inference-steps", "1", "--out", str(out)]) == 0
    assert applied == [True]
    assert main(["record", "--demo", "--estimate", "--out", str(tmp_path / "no.zarr")]) == 0
    assert applied == [True]  # an estimate records nothing: the process is left as it is
