"""A Hugging Face Hub look-alike served by a real nginx, for benchmarks.

The harness writes generated files into ``<data>/<org>/<repo>/resolve/<commit>/<path>`` so a Hub resolve URL
maps straight onto the file; one ``location =`` block per file adds the Hub's headers (``X-Repo-Commit``,
``X-Linked-Etag`` = quoted sha256, ``X-Linked-Size``) to GET and HEAD answers. The repo tree that
``snapshot_download`` lists (``/api/models/<repo>/tree/<commit>``) is a static JSON file. nginx runs in the
foreground as our child (``daemon off``) with its own config, pid, logs and temp dirs, and is stopped on exit.

Two ports: ``port`` serves at full speed, ``slow_port`` caps every connection with ``limit_rate`` (a CDN).
Requests are counted from the access log.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["HubServer", "RepoFile", "find_nginx", "make_file"]

NGINX_HINT = "nginx not found: install it with `apt-get update && apt-get install -y nginx` (Debian/Ubuntu, as root)"


def find_nginx() -> str | None:
    """Path of the nginx binary (also looks in /usr/sbin, which is not on a normal user's PATH)."""
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                          if os.access(p, os.X_OK)), None)


def _free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_file(path: Path, size: int, seed: int) -> str:
    """Write ``size`` pseudo-random bytes to ``path``; return their sha256."""
    import random

    rng = random.Random(seed)
    h = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            block = rng.randbytes(min(left, 16 << 20))
            h.update(block)
            f.write(block)
            left -= len(block)
    return h.hexdigest()


@dataclass
class RepoFile:
    """One file the fake Hub serves."""

    repo: str
    commit: str
    path: str
    size: int
    sha256: str

    @property
    def uri(self) -> str:
        """The resolve path, as hf_hub_url builds it."""
        return f"/{self.repo}/resolve/{self.commit}/{self.path}"


@dataclass
class HubServer:
    """nginx serving ``data`` with Hub headers; use as a context manager or call start()/stop()."""

    data: Path
    workdir: Path
    files: list[RepoFile] = field(default_factory=list)
    limit_rate: str = "50m"
    port: int = 0
    slow_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def add(self, repo: str, commit: str, path: str, size: int, seed: int) -> RepoFile:
        """Generate a file of ``size`` random bytes under the repo's resolve path and register it."""
        target = self.data / repo / "resolve" / commit / path
        sha = make_file(target, size, seed)
        rf = RepoFile(repo, commit, path, size, sha)
        self.files.append(rf)
        return rf

    def add_existing(self, repo: str, commit: str, path: str, src: Path, sha256: str) -> RepoFile:
        """Serve an existing file (hard link, else copy) under the repo's resolve path."""
        target = self.data / repo / "resolve" / commit / path
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, target)
        except OSError:
            shutil.copyfile(src, target)
        rf = RepoFile(repo, commit, path, target.stat().st_size, sha256)
        self.files.append(rf)
        return rf

    def _write_api(self) -> None:
        """Static JSON for the tree listing snapshot_download asks for."""
        by_repo: dict[tuple[str, str], list[RepoFile]] = {}
        for rf in self.files:
            by_repo.setdefault((rf.repo, rf.commit), []).append(rf)
        for (repo, commit), files in by_repo.items():
            tree = [{"type": "file", "path": f.path, "size": f.size, "oid": hashlib.sha1(f.sha256.encode()).hexdigest(),
                     "lfs": {"oid": f.sha256, "size": f.size, "pointerSize": 134}} for f in files]
            base = self.data / "api" / "models" / repo
            (base / "tree").mkdir(parents=True, exist_ok=True)
            (base / "tree" / f"{commit}.json").write_text(json.dumps(tree))
            (base / "revision").mkdir(parents=True, exist_ok=True)
            (base / "revision" / f"{commit}.json").write_text(json.dumps({
                "id": repo, "sha": commit, "siblings": [{"rfilename": f.path} for f in files]}))

    def _config(self) -> str:
        """The whole nginx.conf."""
        w = self.workdir
        locs = []
        for rf in self.files:
            locs.append(
                f"    location = {rf.uri} {{\n"
                f"      add_header X-Repo-Commit {rf.commit} always;\n"
                f"      add_header X-Linked-Etag '\"{rf.sha256}\"' always;\n"
                f"      add_header X-Linked-Size {rf.size} always;\n"
                f"    }}\n")
        (w / "files.conf").write_text("".join(locs) +
                                      "    location /api/ { default_type application/json; try_files $uri.json =404; }\n")
        user = "user root root;\n" if os.geteuid() == 0 else ""  # workers must read the 0700 temp dirs
        temps = "".join(f"  {k}_temp_path {w}/tmp_{k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        server = ("  server {{\n    listen 127.0.0.1:{port};\n    root {root};\n{extra}"
                  "    include {w}/files.conf;\n  }}\n")
        return (
            f"{user}daemon off;\nmaster_process on;\nworker_processes 1;\npid {w}/nginx.pid;\n"
            f"error_log {w}/error.log warn;\nevents {{ worker_connections 512; }}\n"
            "http {\n"
            "  log_format bench '$request_method $uri $status $body_bytes_sent \"$http_range\"';\n"
            f"  access_log {w}/access.log bench;\n{temps}"
            "  sendfile on;\n  tcp_nopush on;\n  keepalive_requests 10000;\n"
            "  default_type application/octet-stream;\n"
            + server.format(port=self.port, root=self.data, extra="", w=w)
            + server.format(port=self.slow_port, root=self.data, extra=f"    limit_rate {self.limit_rate};\n", w=w)
            + "}\n"
        )

    @property
    def endpoint(self) -> str:
        """Full-speed base URL (HF_ENDPOINT)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def slow_endpoint(self) -> str:
        """Rate-limited base URL."""
        return f"http://127.0.0.1:{self.slow_port}"

    def start(self) -> HubServer:
        """Write the config and run nginx in the foreground as our child; wait until it answers."""
        nginx = find_nginx()
        if nginx is None:
            raise RuntimeError(NGINX_HINT)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or _free_port()
        self.slow_port = self.slow_port or _free_port()
        self._write_api()
        conf = self.workdir / "nginx.conf"
        conf.write_text(self._config())
        self.proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(self.workdir), "-e", str(self.workdir / "error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"nginx exited at start: {err}\nsee {conf}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2), \
                        socket.create_connection(("127.0.0.1", self.slow_port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("nginx did not start listening within 10 s")

    def stop(self) -> None:
        """Stop nginx (SIGQUIT lets workers finish; SIGKILL after 5 s) and wait for it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: fast shutdown of master and workers
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @property
    def running(self) -> bool:
        """Whether nginx is up."""
        return self.proc is not None and self.proc.poll() is None

    def log_lines(self) -> list[str]:
        """The access log so far (nginx writes each line at request end)."""
        try:
            return (self.workdir / "access.log").read_text().splitlines()
        except FileNotFoundError:
            return []

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
