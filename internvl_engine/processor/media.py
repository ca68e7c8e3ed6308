"""The media policy: the one object that decides which media sources the processor may read and how much of them
(ARCHITECTURE.md, "Failure model": untrusted input meets one media policy before any byte is read). The default
policy trusts its caller (today's behaviour: any local file, any host, no caps); MediaPolicy.strict() is the
server's. Every refusal raises a MediaPolicyError subclass whose message names the field it hit."""

from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from ..errors import ImageError, MediaPolicyError, MediaTimeoutError, MediaTooLargeError

MiB = 1 << 20
_CHUNK = 64 * 1024
_URL_SCHEMES = ("http", "https")


def _limit(n: int, unit: str) -> str:
    return f"the {n}-{unit} limit"


@dataclass(frozen=True)
class MediaPolicy:
    """Limits on the media one processor call (one request) may read. None = no limit.

    local_media_root: local files (paths and file:// URIs) are read only when they resolve (symlinks and `..`
        followed) inside this directory; None refuses every local file. Default "/": anywhere.
    allowed_domains: URL hosts allowed, each matching itself and its subdomains ("example.com" allows
        "img.example.com"; an IP address matches only itself); None allows any host, () none. Every redirect hop is
        checked again, and only http and https are followed.
    allow_private_networks: False refuses hosts that resolve to a loopback, private, link-local or otherwise
        non-global address (the server must not be a proxy into its own network); the checked address is the one
        connected to, and such a policy ignores *_proxy environment variables (it must see the address it uses).
    max_download_bytes: bytes one URL may send (Content-Length checked before the body, the body read in chunks).
    max_data_uri_bytes: length of one data: URI, checked before decoding.
    fetch_timeout_s: wall-clock budget of one URL fetch (connect, redirects, body).
    max_images: images per request (video frames not counted).
    max_tiles: tiles per request, summed over its images (thumbnails included).
    max_video_frames: video frames per request after sampling, summed over its videos; frames are sampled before
        they are decoded, so this also bounds what a video holds in memory.
    max_image_pixels: width * height of an image decoded from bytes, checked from its header before decoding.
    """

    local_media_root: str | os.PathLike | None = "/"
    allowed_domains: tuple[str, ...] | None = None
    allow_private_networks: bool = True
    max_download_bytes: int | None = None
    max_data_uri_bytes: int | None = None
    fetch_timeout_s: float = 10.0
    max_images: int | None = None
    max_tiles: int | None = None
    max_video_frames: int | None = None
    max_image_pixels: int | None = None

    def __post_init__(self):
        root = self.local_media_root
        if root is not None:
            if not isinstance(root, (str, os.PathLike)):
                raise MediaPolicyError(f"media_policy.local_media_root must be None or a path, got {root!r}")
            # resolved once, here: a relative root means the working directory at construction
            object.__setattr__(self, "local_media_root", os.path.realpath(os.fspath(root)))
        if self.allowed_domains is not None:
            object.__setattr__(self, "allowed_domains", _normalize_domains(self.allowed_domains))
        if not isinstance(self.allow_private_networks, bool):
            raise MediaPolicyError(
                f"media_policy.allow_private_networks must be a bool, got {self.allow_private_networks!r}")
        for f in ("max_download_bytes", "max_data_uri_bytes", "max_images", "max_tiles", "max_video_frames",
                  "max_image_pixels"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise MediaPolicyError(f"media_policy.{f} must be None or an integer >= 0, got {v!r}")
        t = self.fetch_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise MediaPolicyError(f"media_policy.fetch_timeout_s must be a number > 0, got {t!r}")

    @classmethod
    def strict(cls, **changes) -> "MediaPolicy":
        """The policy for untrusted requests (the HTTP server): no local files; any public host, no private
        networks; 20 MiB per download and per data: URI; 10 s per fetch; 16 images and 64 tiles per request (a
        default-tiled image is at most 13); 64 video frames per request; 50 megapixels per image (about 150 MB
        decoded). `changes` replace fields, e.g. strict(allowed_domains=["example.com"])."""
        base = cls(local_media_root=None, allowed_domains=None, allow_private_networks=False,
                   max_download_bytes=20 * MiB, max_data_uri_bytes=20 * MiB, fetch_timeout_s=10.0, max_images=16,
                   max_tiles=64, max_video_frames=64, max_image_pixels=50_000_000)
        return dataclasses.replace(base, **changes)

    # ---------------------------------------------------------------- checks (raise MediaPolicyError)
    def local_path(self, path: str, what: str) -> str:
        """The resolved path to open (symlinks and `..` followed, so what is checked is what is read)."""
        if self.local_media_root is None:
            raise MediaPolicyError(f"{what} is a local file, and local files are refused "
                                   f"(media_policy.local_media_root is None)")
        resolved = os.path.realpath(path)
        root = self.local_media_root
        if os.path.commonpath([resolved, root]) != root:
            where = "is" if resolved == os.path.abspath(path) else f"resolves to {resolved!r},"
            raise MediaPolicyError(f"{what} {where} outside the allowed local media root {root!r} "
                                   f"(media_policy.local_media_root)")
        return resolved

    def check_url(self, url: str, what: str) -> None:
        """Scheme http/https and an allowed host, before any connection."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in _URL_SCHEMES:
            raise MediaPolicyError(f"{what}: scheme {parts.scheme!r} is not http or https")
        try:
            host = parts.hostname
        except ValueError:
            host = None
        if not host:
            raise MediaPolicyError(f"{what}: the URL has no host")
        if not self.host_allowed(host):
            raise MediaPolicyError(f"{what}: host {host!r} is not an allowed domain "
                                   f"(media_policy.allowed_domains = {list(self.allowed_domains)})")

    def host_allowed(self, host: str) -> bool:
        if self.allowed_domains is None:
            return True
        host = host.lower().rstrip(".")
        ip = _as_ip(host)
        # exact or subdomain match; an IP address has no subdomains ("x.127.0.0.1" is a name, not that address)
        return any(host == d or (ip is None and _as_ip(d) is None and host.endswith("." + d))
                   for d in self.allowed_domains)

    def check_data_uri(self, uri: str, what: str) -> None:
        cap = self.max_data_uri_bytes
        if cap is not None and len(uri) > cap:  # data: URIs are ASCII, so characters are bytes
            raise MediaTooLargeError(f"{what} is {len(uri)} bytes, over {_limit(cap, 'byte')} "
                                     f"(media_policy.max_data_uri_bytes)")

    def check_pixels(self, width: int, height: int, what: str) -> None:
        cap = self.max_image_pixels
        if cap is not None and width * height > cap:
            raise MediaTooLargeError(f"{what} is {width}x{height} = {width * height} pixels, over "
                                     f"{_limit(cap, 'pixel')} (media_policy.max_image_pixels)")

    def check_image_count(self, n: int) -> None:
        if self.max_images is not None and n > self.max_images:
            raise MediaPolicyError(f"{n} images in the request, over {_limit(self.max_images, 'image')} "
                                   f"(media_policy.max_images)")

    def check_tiles(self, total: int, what: str) -> None:
        """what: the words before "<total> tiles", e.g. "its 13 tiles bring the request to"."""
        cap = self.max_tiles
        if cap is not None and total > cap:
            raise MediaPolicyError(f"{what} {total} tiles, over {_limit(cap, 'tile')} (media_policy.max_tiles)")

    def check_video_frames(self, total: int, what: str) -> None:
        """what: the words before "<total> video frames"."""
        cap = self.max_video_frames
        if cap is not None and total > cap:
            raise MediaPolicyError(f"{what} {total} video frames, over {_limit(cap, 'frame')} "
                                   f"(media_policy.max_video_frames)")


def _as_ip(host: str):
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None


def _normalize_domains(domains) -> tuple[str, ...]:
    if isinstance(domains, str):
        domains = (domains,)  # one host, not its characters
    out = []
    for d in domains:
        if not isinstance(d, str):
            raise MediaPolicyError(f"media_policy.allowed_domains entries must be host names, got {d!r}")
        h = d.strip().lower().rstrip(".")
        if h.startswith("[") and h.endswith("]"):
            h = h[1:-1]
        if not h or "/" in h or "@" in h or (":" in h and _as_ip(h) is None):
            raise MediaPolicyError(f"media_policy.allowed_domains entries are host names such as 'example.com' "
                                   f"(no scheme, port or path), got {d!r}")
        out.append(h)
    return tuple(out)


def _public(ip) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


# ------------------------------------------------------------------------------------------------ fetching URLs
class _NotPublic(Exception):
    """Raised inside a connection, which does not know the URL; fetch_url turns it into a MediaPolicyError."""


class _AddressCheck:
    """Connection mixin: resolve the host, refuse it when any of its addresses is not public, and connect to a
    checked address (not the name again, which a second lookup could point elsewhere). HTTPS still verifies the
    certificate against the host name (HTTPSConnection wraps this socket with server_hostname=host)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = self._connect_checked  # the hook http.client's connect() calls

    def _connect_checked(self, address, timeout, source_address=None):
        host, port = address
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        for *_, sockaddr in infos:
            ip = _as_ip(sockaddr[0])
            if ip is None or not _public(ip):
                raise _NotPublic(f"host {host!r} resolves to {sockaddr[0]}, which is not a public address "
                                 f"(media_policy.allow_private_networks is False)")
        err = OSError(f"no address for {host!r}")
        for *_, sockaddr in infos:
            try:
                return socket.create_connection(sockaddr[:2], timeout, source_address)
            except OSError as e:
                err = e
        raise err


class _CheckedHTTPConnection(_AddressCheck, http.client.HTTPConnection):
    pass


class _CheckedHTTPSConnection(_AddressCheck, http.client.HTTPSConnection):
    pass


class _CheckedHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_CheckedHTTPConnection, req)


class _CheckedHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_CheckedHTTPSConnection, req, context=self._context)


class _PolicyRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Each redirect hop meets the policy again (scheme, host) and the fetch's deadline, before urllib's own checks
    (which would let ftp:// through and refuse file:// as an HTTP error rather than a policy refusal)."""

    def __init__(self, policy: MediaPolicy, name: str, deadline: float):
        self.policy, self.name, self.deadline = policy, name, deadline

    def http_error_302(self, req, fp, code, msg, headers):
        location = headers.get("location") or headers.get("uri")
        if location:
            newurl = urllib.parse.urljoin(req.full_url, location)
            try:
                self.policy.check_url(newurl, f"{self.name} redirected to {newurl!r}")
                _check_deadline(self.deadline, self.policy, self.name)
            except MediaPolicyError:
                fp.close()
                raise
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _check_deadline(deadline: float, policy: MediaPolicy, name: str) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise MediaTimeoutError(f"fetching {name} took longer than {policy.fetch_timeout_s} s "
                                f"(media_policy.fetch_timeout_s)")
    return remaining


def _is_timeout(e: BaseException) -> bool:
    return isinstance(e, TimeoutError) or (isinstance(e, urllib.error.URLError) and isinstance(e.reason, TimeoutError))


def fetch_url(url: str, policy: MediaPolicy, name: str) -> bytes:
    """The body of an http(s) URL under the policy. name: the URL as error messages show it ("image URL '...'")."""
    policy.check_url(url, name)
    deadline = time.monotonic() + policy.fetch_timeout_s
    handlers = [_PolicyRedirectHandler(policy, name, deadline)]
    if not policy.allow_private_networks:
        handlers += [urllib.request.ProxyHandler({}), _CheckedHTTPHandler(), _CheckedHTTPSHandler()]
    opener = urllib.request.build_opener(*handlers)
    req = urllib.request.Request(url, headers={"User-Agent": "internvl_engine"})
    try:
        with opener.open(req, timeout=policy.fetch_timeout_s) as resp:
            return _read_body(resp, policy, name, deadline)
    except MediaPolicyError:
        raise
    except _NotPublic as e:
        raise MediaPolicyError(f"{name}: {e}") from None
    except urllib.error.HTTPError as e:
        raise ImageError(f"cannot fetch {name}: HTTP {e.code} {e.reason}") from e
    except Exception as e:  # URLError, timeouts, connection resets
        if _is_timeout(e):
            raise MediaTimeoutError(f"fetching {name} took longer than {policy.fetch_timeout_s} s "
                                    f"(media_policy.fetch_timeout_s)") from e
        reason = e.reason if isinstance(e, urllib.error.URLError) else f"{type(e).__name__}: {e}"
        raise ImageError(f"cannot fetch {name}: {reason}") from e


def _read_body(resp, policy: MediaPolicy, name: str, deadline: float) -> bytes:
    cap = policy.max_download_bytes
    length = resp.headers.get("Content-Length")
    if cap is not None and length is not None and length.strip().isdigit() and int(length) > cap:
        raise MediaTooLargeError(f"{name} is {int(length)} bytes (Content-Length), over {_limit(cap, 'byte')} "
                                 f"(media_policy.max_download_bytes)")
    sock = getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)  # best effort, see below
    parts, total = [], 0
    while True:
        remaining = _check_deadline(deadline, policy, name)
        if sock is not None:
            # each read waits at most what is left of the budget; without the socket (a future http.client) a
            # stalled read is noticed after at most another fetch_timeout_s (the per-operation timeout)
            sock.settimeout(remaining)
        chunk = resp.read1(_CHUNK)  # read1: one receive, so a trickling server cannot hold one call for long
        if not chunk:
            return b"".join(parts)
        total += len(chunk)
        if cap is not None and total > cap:
            raise MediaTooLargeError(f"{name} sent more than {cap} bytes, over {_limit(cap, 'byte')} "
                                     f"(media_policy.max_download_bytes)")
        parts.append(chunk)
