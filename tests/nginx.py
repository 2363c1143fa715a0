"""A real nginx (Debian's package) on loopback, for the mirror tests and the bench.

    with Nginx(tmp_path) as web:
        web.url("mirror")     # http://127.0.0.1:PORT/mirror/: GET of web.mirror_root
        web.url("dav")        # http://127.0.0.1:PORT/dav/:    GET, and PUT/MOVE/DELETE/MKCOL with basic auth

Everything lives under one throwaway directory: the configuration, the pid
file, logs, nginx's temp dirs and both document roots. nginx runs in the
foreground (`daemon off`) as our child with `-p PREFIX -c CONF`, so the
system's nginx service and /etc/nginx are never used, and it is stopped
(SIGQUIT, then SIGKILL) and waited for on the way out.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
DAV_USER, DAV_PASSWORD = "publisher", "s3cret-for-tests"

CONF = """\
daemon off;
master_process on;
worker_processes 1;
user root root;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log {prefix}/logs/access.log;
  client_body_temp_path {prefix}/tmp/body;
  proxy_temp_path {prefix}/tmp/proxy;
  fastcgi_temp_path {prefix}/tmp/fastcgi;
  uwsgi_temp_path {prefix}/tmp/uwsgi;
  scgi_temp_path {prefix}/tmp/scgi;
  types {{ application/json json; text/html html; }}
  default_type application/octet-stream;
  sendfile on;
  tcp_nopush on;
  server {{
    listen 127.0.0.1:{port};
    server_name localhost;
    location /mirror/ {{
      alias {mirror}/;
    }}
    location /dav/ {{
      alias {dav}/;
      dav_methods PUT DELETE MKCOL COPY MOVE;
      create_full_put_path on;
      dav_access user:rw group:r all:r;
      client_max_body_size 0;
      limit_except GET HEAD {{
        auth_basic "vztt test mirror";
        auth_basic_user_file {prefix}/htpasswd;
      }}
    }}
  }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    def __init__(self, base: Path):
        self.prefix = Path(base) / "nginx"
        self.mirror_root = Path(base) / "www-mirror"
        self.dav_root = Path(base) / "www-dav"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def url(self, location: str) -> str:
        return f"http://127.0.0.1:{self.port}/{location}/"

    def config(self) -> str:
        """nginx.conf for this run (subclasses add servers)."""
        return CONF.format(prefix=self.prefix, port=self.port, mirror=self.mirror_root, dav=self.dav_root)

    def start(self) -> "Nginx":
        for d in (self.prefix / "logs", self.prefix / "tmp", self.mirror_root, self.dav_root):
            d.mkdir(parents=True, exist_ok=True)
        sha = base64.b64encode(hashlib.sha1(DAV_PASSWORD.encode()).digest()).decode()
        (self.prefix / "htpasswd").write_text(f"{DAV_USER}:{{SHA}}{sha}\n")
        for attempt in range(5):       # the port could be taken between free_port() and bind
            self.port = free_port()
            conf = self.prefix / "nginx.conf"
            conf.write_text(self.config())
            self.proc = subprocess.Popen([NGINX, "-p", str(self.prefix), "-c", str(conf), "-e",
                                          str(self.prefix / "logs" / "error.log")],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, start_new_session=True)
            if self._wait_listening():
                return self
            self.stop()
        raise RuntimeError(f"nginx did not start: {(self.prefix / 'logs' / 'error.log').read_text()[-2000:]}")

    def _wait_listening(self, timeout: float = 10.0) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGQUIT)      # graceful: master and worker
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def access_log(self) -> list[str]:
        try:
            return (self.prefix / "logs" / "access.log").read_text().splitlines()
        except FileNotFoundError:
            return []

    def __enter__(self) -> "Nginx":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
