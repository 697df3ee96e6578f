"""redis-server processes on loopback, for the shared-tier tests and benchmarks.

Each server gets a free port, no persistence and its own directory; a test
(or benchmark) kills it when done, even on failure.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import redis

from tests.conftest import wait_for

REDIS_DEADLINE = 20.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 >= 65536:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class RedisServer:
    """A redis-server on loopback that a test can kill and start again on the same port."""

    def __init__(self, workdir: Path, port: int | None = None, password: str | None = None) -> None:
        self.port = free_port() if port is None else port
        self.password = password
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, socket_timeout=5)

    def start(self, *options: str) -> None:
        assert self.proc is None
        config: list[str] = []
        if self.password:
            # In a file, not on redis-server's own command line, which every user can read.
            conf = self.workdir / "redis.conf"
            conf.touch(mode=0o600)
            conf.write_text(f"requirepass {self.password}\n")
            config.append(str(conf))
        self.proc = subprocess.Popen(
            [
                "redis-server",
                *config,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--logfile",
                str(self.workdir / "redis.log"),
                *options,
            ],
            stdin=subprocess.DEVNULL,
        )
        proc = self.proc
        wait_for(self._answers, REDIS_DEADLINE, "redis-server", alive=lambda: proc.poll() is None)

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.ConnectionError:
            return False

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


class RedisCluster:
    """Three redis-server processes in cluster mode (no replicas), on loopback."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.servers = [RedisServer(workdir / f"node{i}", free_cluster_port()) for i in range(size)]

    def start(self) -> None:
        for server in self.servers:
            server.start("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
        subprocess.run(
            ["redis-cli", "--cluster", "create"]
            + [f"127.0.0.1:{server.port}" for server in self.servers]
            + ["--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            check=True,
            timeout=60,
        )
        wait_for(self._ready, REDIS_DEADLINE, "the cluster to cover every slot")

    def _ready(self) -> bool:
        def state(server: RedisServer) -> object:
            info = server.client().execute_command("CLUSTER INFO")  # parsed by redis-py
            return info.get("cluster_state") if isinstance(info, dict) else info

        return all(state(server) == "ok" for server in self.servers)

    def kill(self) -> None:
        for server in self.servers:
            server.kill()
