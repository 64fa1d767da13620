"""Shared by the tests that launch subprocesses."""

from __future__ import annotations

import socket
import subprocess


def failure_report(proc: subprocess.CompletedProcess, chars: int = 4000) -> str:
    """The exit status, the first traceback of stderr (the cause, in a multi-process run: the other ranks' errors
    follow it) and the end of stderr."""
    err = proc.stderr or ""
    first = err.find("Traceback")
    head = err[first : first + chars] if first >= 0 else ""
    return f"exit status {proc.returncode}\n--- first traceback:\n{head}\n--- end of stderr:\n{err[-chars:]}"


def free_port() -> int:
    """A TCP port free on this machine now (for a launcher's --master_port; a fixed port can collide with a run
    still shutting down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
