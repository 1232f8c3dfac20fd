"""A recorder server for crash and concurrency tests: real processes, killed or paused on cue.

Importing torch and diffusers takes seconds; a SIGKILL test needs a fresh process per kill. So a
server process imports everything once and forks one child per recording. Each child runs the
real `attnscope record` (`analysis.cli.main`) with a hook on zarr's LocalStore write
(`zarr.storage._local._put`, which every object write goes through) that can, on a chosen write:

- `before`: stop before the object is written;
- `mid`: write half the bytes to the temporary file zarr's atomic write uses (`KEY.<hex>.partial`),
  as if the process died inside `write()`, and stop there;
- `after`: stop right after the object was renamed into place;
- `fail`: raise an OSError with a chosen errno instead of writing (a full or read-only disk).

A stopped child tells the server and waits; the test then inspects the store while the child is
alive (a reader during a recording), and has the server either SIGKILL it or let it go on. A child
may also run under RLIMIT_FSIZE (SIGXFSZ ignored, so writes fail with EFBIG as on a full quota).

Children of one server share its settings (one torch thread), so two recordings of the same
command give identical bytes: an untouched recording is the reference for a killed one.

The server speaks JSON lines on stdin/stdout. The test side is `RecorderServer`.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0  # seconds for any one answer of the server (a recording takes well under one)


# ------------------------------------------------------------------------------ server side


def _install_hook(hook: dict[str, Any], notify: int, control: int, root: str) -> None:
    """Patch zarr's LocalStore write so that the write `hook` describes stops or fails."""
    import errno as errno_module
    import re
    import uuid

    import zarr.storage._local as local

    real_put = local._put
    pattern = re.compile(hook["key"])
    state = {"seen": 0, "done": False}

    def matches(key: str, value: Any) -> bool:
        if state["done"] or not pattern.fullmatch(key):
            return False
        if "listed" in hook or "status" in hook:
            attrs = json.loads(bytes(value.as_buffer_like())).get("attributes", {})
            if "listed" in hook and len(attrs.get("steps_complete", [])) != hook["listed"]:
                return False
            if "status" in hook and attrs.get("status") != hook["status"]:
                return False
        state["seen"] += 1
        return state["seen"] == hook.get("nth", 1)

    def stop(key: str) -> None:
        os.write(notify, (json.dumps({"event": "paused", "key": key}) + "\n").encode())
        os.read(control, 1)  # the server kills us here, or lets us go on

    def act(key: str, target: Path, write: Any, tear: Any) -> Any:
        """Do the hooked write `write()` as the hook's mode says; `tear()` leaves it half done."""
        state["done"] = True
        mode = hook.get("mode", "before")
        if mode == "fail":
            code = getattr(errno_module, hook.get("errno", "ENOSPC"))
            raise OSError(code, os.strerror(code), str(target))
        if mode == "mid":
            tear()
            stop(key)
            raise SystemExit("a `mid` hook is only ever killed")
        if mode == "before":
            stop(key)
            return write()
        written = write()
        stop(key)
        return written

    def put(path: Path, value: Any, exclusive: bool = False) -> int:
        key = Path(path).relative_to(root).as_posix()
        if not matches(key, value):
            return real_put(path, value, exclusive=exclusive)

        def tear() -> None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            data = bytes(value.as_buffer_like())
            with open(Path(path).with_suffix(f".{uuid.uuid4().hex}.partial"), "wb") as file:
                file.write(data[: len(data) // 2])
                file.flush()

        return act(key, path, lambda: real_put(path, value, exclusive=exclusive), tear)

    local._put = put

    # Step shards on a local disk are written aside and renamed to their key (tracer.durable):
    # the hook acts on that rename, a `mid` one leaving the staged file torn, as a kill would.
    from tracer.durable import StagedShards

    real_move = StagedShards._move_into_place

    def move_into_place(staged: Path, final: Path) -> None:
        key = Path(final).relative_to(root).as_posix()
        if not matches(key, None):
            return real_move(staged, final)
        return act(
            key,
            final,
            lambda: real_move(staged, final),
            lambda: os.truncate(staged, os.path.getsize(staged) // 2),
        )

    StagedShards._move_into_place = staticmethod(move_into_place)


def _child(command: dict[str, Any], notify: int, control: int) -> None:
    """The forked child: set up, run `attnscope ARGV`, exit with its status."""
    log = os.open(command["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    os.chdir(command["cwd"])
    if command.get("fsize") is not None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (command["fsize"], command["fsize"]))
    if command.get("hook"):
        _install_hook(command["hook"], notify, control, command["root"])
    if command.get("count_steps"):
        from tracer.session import Recorder

        real = Recorder._on_denoiser

        def counted(self: Any, call: Any) -> None:
            print("crashkit: denoiser call", file=sys.stderr, flush=True)
            real(self, call)

        Recorder._on_denoiser = counted
    from analysis.cli import main

    try:
        status = main(command["argv"])
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        status = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def serve() -> None:
    """The server loop: one JSON command per stdin line, one JSON answer per stdout line."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("MPLBACKEND", "Agg")
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    import analysis.cli  # noqa: F401
    import tracer.cli  # noqa: F401
    from tracer.demo import demo_pipeline

    demo_pipeline(seed=0)  # tokenizers trained once, here, not in every child
    children: dict[str, dict[str, Any]] = {}
    out = sys.stdout

    def answer(message: dict[str, Any]) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    def next_event(name: str) -> dict[str, Any]:
        child = children[name]
        line = b""
        while not line.endswith(b"\n"):
            chunk = os.read(child["notify"], 4096)
            if not chunk:
                break
            line += chunk
        if line:
            return {"id": name, **json.loads(line)}
        _, status = os.waitpid(child["pid"], 0)
        os.close(child["notify"])
        os.close(child["control"])
        del children[name]
        if os.WIFSIGNALED(status):
            return {"id": name, "event": "exited", "signal": os.WTERMSIG(status), "rc": None}
        return {"id": name, "event": "exited", "signal": None, "rc": os.WEXITSTATUS(status)}

    answer({"event": "ready"})
    for raw in sys.stdin:
        command = json.loads(raw)
        op, name = command["op"], command.get("id")
        if op == "start":
            notify_r, notify_w = os.pipe()
            control_r, control_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    for fd in [notify_r, control_w] + [
                        fd for c in children.values() for fd in (c["notify"], c["control"])
                    ]:
                        os.close(fd)
                    _child(command, notify_w, control_r)
                finally:
                    os._exit(98)
            os.close(notify_w)
            os.close(control_r)
            children[name] = {"pid": pid, "notify": notify_r, "control": control_w}
            answer(next_event(name))
        elif op == "resume":
            os.write(children[name]["control"], b"c")
            answer(next_event(name))
        elif op == "release":  # let it go on, and answer at once (then `wait` for it)
            os.write(children[name]["control"], b"c")
            answer({"id": name, "event": "running"})
        elif op == "wait":
            answer(next_event(name))
        elif op == "kill":
            os.kill(children[name]["pid"], signal.SIGKILL)
            answer(next_event(name))
        elif op == "quit":
            for child in children.values():
                os.kill(child["pid"], signal.SIGKILL)
            answer({"event": "bye"})
            return


# -------------------------------------------------------------------------------- test side


def wait_until_listed(store: Path, run: str, steps: list[int]) -> None:
    """Wait until the run lists exactly `steps` complete. A child paused inside step N still
    lists the steps before it: their shards are written alongside step N's, by other threads."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        document = json.loads((Path(store) / run / "zarr.json").read_text())
        listed = document["attributes"].get("steps_complete", [])
        if listed == steps:
            return
        assert time.monotonic() < deadline, f"{run} lists {listed}, never {steps}"
        time.sleep(0.02)


class RecorderServer:
    """The test's handle on a server process (start it once per module: imports take seconds)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
        self.process = subprocess.Popen(
            [sys.executable, __file__],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.workdir / "server.log", "wb"),  # noqa: SIM115
        )
        self._buffer = b""
        self._count = 0
        ready = self._read()
        assert ready["event"] == "ready", ready

    def _read(self) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(left, 0))
            if not ready:
                self.close()
                raise TimeoutError(f"the recorder server gave no answer in {TIMEOUT:.0f} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                log = (self.workdir / "server.log").read_text(errors="replace")
                raise RuntimeError(f"the recorder server died:\n{log[-3000:]}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _send(self, command: dict[str, Any]) -> dict[str, Any]:
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        self.process.stdin.flush()
        return self._read()

    def start(
        self,
        argv: list[str],
        *,
        hook: dict[str, Any] | None = None,
        root: Path | None = None,
        fsize: int | None = None,
        count_steps: bool = False,
    ) -> Child:
        """Fork a child running `attnscope ARGV`; returns once it paused at its hook or exited.

        `root` is the store whose keys the hook's `key` regex matches.
        """
        self._count += 1
        name = f"child{self._count}"
        log = self.workdir / f"{name}.log"
        event = self._send(
            {
                "op": "start",
                "id": name,
                "argv": [str(a) for a in argv],
                "cwd": str(self.workdir),
                "log": str(log),
                "hook": hook,
                "root": str(root) if root is not None else None,
                "fsize": fsize,
                "count_steps": count_steps,
            }
        )
        return Child(self, name, log, event)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(b'{"op": "quit"}\n')
                self.process.stdin.flush()
                self.process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


class Child:
    """One forked recording: its last event (`paused` or `exited`) and its output."""

    def __init__(self, server: RecorderServer, name: str, log: Path, event: dict) -> None:
        self.server, self.name, self.log, self.event = server, name, log, event

    @property
    def paused(self) -> bool:
        return self.event["event"] == "paused"

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> Child:
        """SIGKILL the paused child and reap it."""
        assert self.paused, f"{self.name} is not paused: {self.event}\n{self.output}"
        self.event = self.server._send({"op": "kill", "id": self.name})
        return self

    def resume(self) -> Child:
        """Let the paused child go on; returns when it exits (or pauses again)."""
        assert self.paused, f"{self.name} is not paused: {self.event}\n{self.output}"
        self.event = self.server._send({"op": "resume", "id": self.name})
        return self

    def release(self) -> Child:
        """Let the paused child go on without waiting for it (several may then run at once)."""
        assert self.paused, f"{self.name} is not paused: {self.event}\n{self.output}"
        self.event = self.server._send({"op": "release", "id": self.name})
        return self

    def wait(self) -> Child:
        """Wait for a released child to exit (or pause again)."""
        self.event = self.server._send({"op": "wait", "id": self.name})
        return self

    @property
    def killed(self) -> bool:
        return self.event.get("signal") == signal.SIGKILL

    @property
    def rc(self) -> int | None:
        return self.event.get("rc")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    serve()
