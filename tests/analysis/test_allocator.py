"""analysis.allocator: the `attnscope` command's process reuses the memory it frees instead of
faulting it in again (a recording's shard buffers, a reduction's chunk buffers)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from collections.abc import Sequence

import pytest

from analysis import allocator

# The environment the module's docstring gives, for a process started with these settings.
DOCUMENTED_ENV = dict(
    pair.split("=")
    for pair in re.search(r"`(MALLOC_ARENA_MAX=[^`]+)`", allocator.__doc__).group(1).split()
)

# Sets the allocator up as argv[1] says (as the library leaves it; tuned; or the `attnscope`
# command run with the arguments after the size), allocates and frees a block of argv[2] bytes,
# then counts the page faults of doing it again.
FAULTS_OF_A_SECOND_BLOCK = """
import resource, sys
if sys.argv[1] == "tuned":
    from analysis.allocator import reuse_freed_memory
    assert reuse_freed_memory()
elif sys.argv[1] == "command":
    from analysis.cli import main
    assert main(sys.argv[3:]) == 0
def block(n=int(sys.argv[2])):
    data = bytearray(n)
    data[::4096] = b"\\x01" * len(range(0, n, 4096))  # one write to every page
block()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(
    mode: str, size: int, env: dict[str, str] | None = None, command: Sequence[str] = ()
) -> int:
    """Page faults of the second block in a fresh interpreter (the settings are process-wide)."""
    out = subprocess.run(
        [sys.executable, "-c", FAULTS_OF_A_SECOND_BLOCK, mode, str(size), *command],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return int(out.stdout.splitlines()[-1])  # after what the command printed


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


# A thread allocates (and so makes an arena of its own) before the settings if argv[1] says so;
# then a thread started after them allocates and frees a block of argv[2] bytes, and counts its
# page faults of doing it again.
FAULTS_IN_A_LATER_THREAD = """
import resource, sys, threading
from analysis.allocator import arenas, reuse_freed_memory
if sys.argv[1] == "thread first":
    ready = threading.Barrier(2)
    early = threading.Thread(target=lambda: (bytearray(10**5), ready.wait()))
    early.start()
    ready.wait()
    early.join()
print(reuse_freed_memory(), arenas())
def later(n=int(sys.argv[2])):
    def block():
        data = bytearray(n)
        data[::4096] = b"\\x01" * len(range(0, n, 4096))
    block()
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    block()
    print(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=later)
thread.start()
thread.join()
"""


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the settings are glibc's; elsewhere nothing is done"
)
def test_a_thread_that_allocated_first_defeats_the_settings_and_it_is_said():
    """Threads started after the settings take over the early thread's arena, where glibc maps
    large blocks afresh: the settings say they do not hold, and indeed they do not."""
    size = 256 * 2**20
    pages = size // 4096
    runs = {}
    for order in ("settings first", "thread first"):
        out = subprocess.run(
            [sys.executable, "-c", FAULTS_IN_A_LATER_THREAD, order, str(size)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        runs[order] = (out[0], int(out[1]), int(out[2]))
    assert runs["settings first"][:2] == ("True", 1)
    assert runs["settings first"][2] < pages // 100
    held, arenas, faults = runs["thread first"]
    assert held == "False" and arenas >= 2
    assert faults > pages // 2


def test_a_recording_says_when_the_settings_do_not_hold(tmp_path, monkeypatch, capsys):
    from analysis.cli import main
    from tracer import cli

    monkeypatch.setattr(cli, "reuse_freed_memory", lambda: False)
    monkeypatch.setattr(cli, "arenas", lambda: 3)
    out = tmp_path / "demo.zarr"
    assert main(["record", "--demo", "--num-inference-steps", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "attnscope: warning: this process has 3 malloc arenas" in err
    assert allocator.ENVIRONMENT in err
    assert "run-0000" in err  # and it recorded


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the settings are glibc's; elsewhere nothing is done"
)
def test_the_environment_the_docs_give_does_the_same():
    size = 2304 * 2**20
    assert faults("default", size, env=os.environ | DOCUMENTED_ENV) < size // 4096 // 100


def test_the_cli_sets_it_for_a_recording(tmp_path, monkeypatch):
    import analysis.cli
    from analysis.cli import main
    from tracer import cli

    applied = []
    monkeypatch.setattr(cli, "reuse_freed_memory", lambda: applied.append("record") or True)
    monkeypatch.setattr(
        analysis.cli, "reuse_freed_memory", lambda: applied.append("command") or True
    )
    out = tmp_path / "demo.zarr"
    assert main(["record", "--demo", "--num-inference-steps", "1", "--out", str(out)]) == 0
    assert applied == ["record"]
    # An estimate records nothing, but its probe of the writer writes as the recording would.
    assert main(["record", "--demo", "--estimate", "--out", str(tmp_path / "no.zarr")]) == 0
    assert applied == ["record", "record"]


@pytest.mark.parametrize("verb", [["info"], ["verify"], ["heatmap", "-q", "-o", "{tmp}/m.png"]])
def test_the_cli_sets_it_for_the_verbs_that_read(verb, tmp_path, monkeypatch, store):
    import analysis.cli

    applied = []
    monkeypatch.setattr(analysis.cli, "reuse_freed_memory", lambda: applied.append(True) or True)
    args = [verb[0], str(store[0]), *(a.format(tmp=tmp_path) for a in verb[1:])]
    assert analysis.cli.main(args) == 0
    assert applied == [True]


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the settings are glibc's; elsewhere nothing is done"
)
def test_a_command_that_read_maps_reuses_the_memory_it_frees(store):
    """The settings themselves, in a fresh interpreter that ran `attnscope info` first."""
    size = 256 * 2**20
    assert faults("command", size, command=["info", str(store[0])]) < size // 4096 // 100
