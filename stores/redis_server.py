"""A throwaway redis-server on loopback (tests, `ragcomp bench redis`, `ragcomp bench kv`)."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from ragcomp.stores.base import StoreError


@contextlib.contextmanager
def local_redis_server(
    workdir: str | os.PathLike[str],
    *,
    port: int | None = None,
    cluster: bool = False,
    binary: str = "redis-server",
    timeout: float = 10.0,
) -> Iterator[str]:
    """Run a redis-server on 127.0.0.1 with no persistence; yield its URL, stop it on exit.

    A free port is picked when none is given (for a cluster node, one whose bus port, +10000,
    is free too). Raises StoreError with the server's log when it does not come up.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for attempt in range(5):
        p = port or free_port(cluster)
        log_file = workdir / f"redis-{p}.log"
        args = [binary, "--port", str(p), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(workdir), "--logfile", str(log_file), "--daemonize", "no"]
        if cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{p}.conf"]
            args += ["--cluster-node-timeout", "5000"]
        try:
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        except OSError as e:
            raise StoreError(f"cannot start {binary}: {e.strerror or e}") from e
        try:
            if _wait_for_ping(proc, p, timeout):
                yield f"redis://127.0.0.1:{p}/0" if not cluster else f"redis://127.0.0.1:{p}"
                return
            if port is not None or attempt == 4:
                tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
                raise StoreError(f"redis-server on port {p} did not answer PING: {tail.strip()}")
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def free_port(with_bus: bool) -> int:
    """A loopback port nothing listens on (with `with_bus`, one whose cluster bus port, +10000, is
    free too)."""
    def free(p: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
            return True

    if not with_bus:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    for _ in range(200):
        p = random.randint(20000, 40000)
        if free(p) and free(p + 10000):
            return p
    raise StoreError("no free port pair for a Redis Cluster node")


def _wait_for_ping(proc: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False  # exited: port taken, bad option...
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return True
        except OSError:
            pass
        time.sleep(0.02)
    return False
