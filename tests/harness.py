"""Running a job of several local processes in the tests: an environment
that imports the checkout, free loopback ports, and a bounded wait that
leaves no process behind."""

import os
import socket
from pathlib import Path

ROOT = Path(__file__).parents[1]


def env(backend: str, **extra) -> dict:
    """os.environ with the checkout importable and `backend` chosen."""
    path = os.pathsep.join(filter(None, [str(ROOT),
                                         os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "KERAS_BACKEND": backend,
            "TF_CPP_MIN_LOG_LEVEL": "3", **extra}


def free_ports(n: int) -> list:
    """n loopback ports that were free a moment ago."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def wait_all(procs, timeout: float) -> list:
    """Each process's output (stdout + stderr), waiting at most `timeout`
    seconds for each; whatever still runs is then killed."""
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return logs
