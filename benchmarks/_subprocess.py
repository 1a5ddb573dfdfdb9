"""Child processes: the parent starts them, streams their result lines, and
stops the ones that pass their time.

A child (``python -m <script> --child <spec>``) prints one line per result,
tagged :data:`RESULT_TAG`, as each case finishes; the parent reads them as
they come, so a table prints as the run goes. A child that dies or runs out
of time loses only the cases it had not finished: :func:`run_child_spec`
starts a fresh child for the implementations not yet begun (after a CUDA
error that leaves the context unusable, the child exits with
:data:`STICKY_EXIT`) and reports the cases never reported as errors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable

from benchmarks import common
from benchmarks._results import Spec

RESULT_TAG = "@@bench-result "
STICKY_EXIT = 17  # a child's exit status after a CUDA error that broke its context


# --- child side -------------------------------------------------------------------

def emit(result: dict) -> None:
    """Print one result line for the parent."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def exit_with_parent() -> None:
    """End this child when its parent goes (a parent stopped at a timeout must not leave
    children running: they lead sessions of their own, out of reach of its process group)."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


# --- parent side ------------------------------------------------------------------

def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    common.run_id()  # children stamp their rows with the parent's run id
    env[common.RUN_ID_ENV] = os.environ[common.RUN_ID_ENV]
    return env


def stream_child(args: list[str], on_result: Callable[[dict], None],
                 timeout: float | None = None) -> tuple[list[dict], str | None]:
    """Run ``python ARGS`` (a child of this harness) and call ``on_result`` for each result
    line as it arrives; returns (results, why it ended early or None)."""
    results: list[dict] = []
    with tempfile.TemporaryFile(mode="w+") as stderr:
        proc = subprocess.Popen([sys.executable, *args], cwd=common.ROOT, env=child_env(),
                                stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True)
        started = time.time()
        timed_out = False
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        while True:
            wait = None if timeout is None else timeout - (time.time() - started)
            if wait is not None and wait <= 0:
                timed_out = True
                break
            try:
                line = lines.get(timeout=wait)
            except queue.Empty:
                continue
            if line is None:  # end of the child's output
                break
            if line.startswith(RESULT_TAG):
                result = json.loads(line[len(RESULT_TAG):])
                results.append(result)
                on_result(result)
        if timed_out:
            _kill(proc)
        proc.wait()
        stderr.seek(0)
        tail = [line for line in stderr.read().strip().splitlines() if line.strip()]
    if timed_out:
        why = f"timed out after {timeout:.0f} s"
    elif proc.returncode and proc.returncode < 0:
        why = f"child killed by signal {-proc.returncode} (out of memory?)"
    elif proc.returncode:
        why = tail[-1][:300] if tail else f"child exited with status {proc.returncode}"
    else:
        why = None
    return results, why


def run_child_spec(module: str, spec: Spec, on_result: Callable[[dict], None],
                   timeout: float | None = None) -> list[dict]:
    """Run ``python -m module --child SPEC``; call ``on_result`` for each result as it
    arrives. When the child ends early, implementations it had not started get a fresh
    child; cases it never reported (crash, timeout) come back as errors."""
    started = time.time()
    results: list[dict] = []
    pending = spec.impls()
    why_by_impl: dict[str, str | None] = {}
    begun: list[str] = []

    def on_line(line: dict) -> None:
        if line.get("event") == "start":
            begun.append(line["impl"])
        else:
            results.append(line)
            on_result(line)

    while pending:
        child = dataclasses.replace(spec, impl=pending[0], then=pending[1:])
        left = None if timeout is None else timeout - (time.time() - started)
        begun.clear()
        _, why = stream_child(["-m", module, "--child", child.to_json()], on_line, left)
        why_by_impl.update({impl: why for impl in pending})
        if why is None or not begun or (left is not None and time.time() - started >= timeout):
            break
        # the child died (e.g. a CUDA error) while running begun[-1]: the implementations
        # after it start again in a fresh process
        pending = pending[pending.index(begun[-1]) + 1:]
    done = {(r["impl"], r["n"], r["m"], r["d"], r["dtype"]) for r in results}
    for impl in spec.impls():
        for case in spec.cases:
            if (impl, *case.key()) not in done:
                result = {"impl": impl, **dataclasses.asdict(case), "status": "error",
                          "error": why_by_impl.get(impl) or "the child reported nothing"}
                results.append(result)
                on_result(result)
    return results


def _pump(stream, lines: "queue.Queue") -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _kill(proc: subprocess.Popen) -> None:
    """End a child we started, and its own children (it leads its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
