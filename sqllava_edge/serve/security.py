"""What a browser page and a local path may do to the server: the Host allowlist (against DNS rebinding) and local
image files under the directories the operator named.

- Host: a page on another site can make the browser send requests to 127.0.0.1; with DNS rebinding (a foreign name
  that resolves to this machine) it can even read the answers, as a same-origin page. Its requests then carry the
  foreign name in `Host`, so only these names are served: the loopback names, the `--host` value, and the names given
  with `--allowed-hosts`; when listening on every address (`--host 0.0.0.0` / `::`), also any IP-address literal
  (a user who types the server's address; a rebinding page always sends a name) and this machine's host name.
- Local files (`--allowed-local-media-path DIR`, repeatable): `file://` URLs (`file:///abs`, `file://localhost/abs`,
  percent-escapes decoded) and plain paths; a relative path is taken under each directory in turn. The resolved path
  (symlinks followed) must lie inside one of the directories; anything else gets one error that says nothing about
  what exists.
"""
from __future__ import annotations

import ipaddress
import json
import os
import socket
from typing import Iterable
from urllib.parse import unquote, urlsplit

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class HostCheck:
    """ASGI middleware: refuse (421) any HTTP request whose Host header is not allowed (see the module docstring)."""

    def __init__(self, app, bind_host: str, extra: Iterable[str] = ()):
        self.app = app
        self.names = {name.lower().strip("[]") for name in (*LOOPBACK_NAMES, bind_host, *extra) if name}
        self.any_ip = bind_host in WILDCARD_HOSTS
        if self.any_ip:
            hostname = socket.gethostname().lower()
            self.names |= {hostname, f"{hostname}.local"}
        self.any_name = "*" in self.names

    def allowed(self, host: str) -> bool:
        name = _host_name(host)
        if self.any_name or name in self.names:
            return True
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return False
        return self.any_ip or address.is_loopback

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = next((value.decode("latin-1") for key, value in scope["headers"] if key == b"host"), "")
        if self.allowed(host):
            return await self.app(scope, receive, send)
        message = (f"this server does not answer requests for host {host!r}: only loopback names, its --host value "
                   "and the names given with --allowed-hosts (a guard against DNS rebinding); start it with "
                   f"--allowed-hosts {_host_name(host) or 'NAME'} if you reach it by that name")
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": "host_not_allowed"}}).encode()
        await send({"type": "http.response.start", "status": 421,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _host_name(host: str) -> str:
    """'Example.com:8080' -> 'example.com'; '[::1]:8080' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    if host.count(":") == 1:
        return host.split(":")[0]
    return host


class MediaPathError(ValueError):
    """A local image path that is not a readable file under an allowed directory (one message for every case)."""


def local_media_path(url: str, allowed: Iterable[str]) -> str:
    """A file:// URL or plain path -> the real path of a regular file inside one of the `allowed` directories.
    Raises MediaPathError (the same message whatever the reason) otherwise."""
    roots = [os.path.realpath(d) for d in allowed]
    refused = MediaPathError("no image file at that path under this server's media folders (--allowed-local-media-path); "
                             "send the bytes as a data URI (data:image/png;base64,...) or put the file there")
    if not roots:
        raise refused
    if url.startswith("file:"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise refused
        path = unquote(parts.path)
    else:
        path = url
    if "\x00" in path or not path:
        raise refused
    candidates = [path] if os.path.isabs(path) else [os.path.join(root, path) for root in roots]
    for candidate in candidates:
        real = os.path.realpath(candidate)
        inside = any(os.path.commonpath([real, root]) == root for root in roots)
        if inside and os.path.isfile(real) and os.access(real, os.R_OK):
            return real
    raise refused
