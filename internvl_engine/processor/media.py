"""The media policy: the one object that decides which media sources the processor may read and how much of them
(docs/ARCHITECTURE.md, "Failure model": untrusted input meets one media policy before any byte is read). The default
policy trusts its caller (today's behaviour: any local file, any host, no caps); MediaPolicy.strict() is the
server's. Every refusal raises a MediaPolicyError subclass whose message names the field it hit."""

from __future__ import annotations

import dataclasses
import functools
import http.client
import ipaddress
import os
import socket
import threading
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


# The common single-image formats (MediaPolicy.strict()'s image_formats); a multi-image format (ICO, TIFF) or a
# vector one (EPS, WMF) is a door to decoders that do their work before any size is known.
STRICT_IMAGE_FORMATS = ("BMP", "GIF", "JPEG", "PNG", "WEBP")
# ffmpeg demuxers that read one file and open nothing else (a demuxer matches when any of its comma-separated names
# is listed: "mov" and "mp4" both name "mov,mp4,m4a,3gp,3g2,mj2"; mov's external references stay off, its default).
SINGLE_FILE_VIDEO_FORMATS = ("mov", "mp4", "matroska", "webm", "avi", "mpegts", "mpeg", "ogg", "flv", "asf")


@functools.lru_cache(maxsize=1)
def _pillow_formats() -> frozenset[str]:
    import PIL.Image

    PIL.Image.init()
    return frozenset(PIL.Image.OPEN)


def _names(field: str, names, case, known) -> tuple[str, ...] | None:
    """A tuple of format names (one string is one name), case-normalised, each known when `known` is given."""
    if names is None:
        return None
    if isinstance(names, str):
        names = (names,)
    out = []
    for n in names:
        if not isinstance(n, str) or not n.strip() or "," in n or (known is not None and case(n.strip()) not in known):
            hint = f" (Pillow knows {sorted(known)})" if known is not None else ""
            raise MediaPolicyError(f"media_policy.{field} entries must be format names{hint}, got {n!r}")
        out.append(case(n.strip()))
    return tuple(out)


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
    max_download_bytes: bytes one URL may send (Content-Length checked before the body, the body read in chunks),
        and bytes one local image file may hold (checked before it is read).
    max_data_uri_bytes: length of one data: URI, checked before decoding.
    fetch_timeout_s: wall-clock budget of one URL fetch, all of it: host lookups, connects, TLS handshakes, status
        lines, headers, every redirect hop and the body.
    max_images: images per request (video frames not counted).
    max_tiles: tiles per request, summed over its images (thumbnails included).
    max_video_frames: video frames per request after sampling, summed over its videos; frames are sampled before
        they are decoded, so this also bounds what a video holds in memory.
    max_image_pixels: width * height of an image, checked from its header before decoding (and of every video
        frame, from the stream's header before any frame is decoded).
    max_image_side: the longest side of an image or video frame, checked as max_image_pixels is.
    max_image_aspect: longest side / shortest side of an image or video frame, checked as max_image_pixels is
        (Qwen2-VL's processor refuses ratios over 200; thin strips carry no picture and cost far more than their
        pixels to tile).
    image_formats: the Pillow formats an image's bytes may be in ("PNG", "JPEG", ...), checked before anything
        is decoded (Pillow decodes some formats, such as ICO, inside Image.open); None: any Pillow can open.
    video_formats: the ffmpeg demuxers a video file may be opened with. Only single-file containers: a playlist
        (HLS), a concat list or an image-sequence pattern opens further files and URLs, outside every check here.
        None: any demuxer (still only local files).
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
    max_image_side: int | None = None
    max_image_aspect: float | None = None
    image_formats: tuple[str, ...] | None = None
    video_formats: tuple[str, ...] | None = SINGLE_FILE_VIDEO_FORMATS

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
                  "max_image_pixels", "max_image_side"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise MediaPolicyError(f"media_policy.{f} must be None or an integer >= 0, got {v!r}")
        t = self.fetch_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise MediaPolicyError(f"media_policy.fetch_timeout_s must be a number > 0, got {t!r}")
        a = self.max_image_aspect
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not a >= 1):
            raise MediaPolicyError(f"media_policy.max_image_aspect must be None or a number >= 1, got {a!r}")
        object.__setattr__(self, "image_formats", _names("image_formats", self.image_formats, str.upper,
                                                         _pillow_formats()))
        object.__setattr__(self, "video_formats", _names("video_formats", self.video_formats, str.lower, None))

    @classmethod
    def strict(cls, **changes) -> "MediaPolicy":
        """The policy for untrusted requests (the HTTP server): no local files; any public host, no private
        networks; 20 MiB per download and per data: URI; 10 s per fetch; 16 images and 64 tiles per request (a
        default-tiled image is at most 13); 64 video frames per request; 50 megapixels per image or video frame
        (about 150 MB decoded), sides up to 65535 (JPEG's own limit) and aspect ratios up to 200 (Qwen2-VL's);
        images in PNG, JPEG, WebP, GIF or BMP only. `changes` replace fields, e.g.
        strict(allowed_domains=["example.com"])."""
        base = cls(local_media_root=None, allowed_domains=None, allow_private_networks=False,
                   max_download_bytes=20 * MiB, max_data_uri_bytes=20 * MiB, fetch_timeout_s=10.0, max_images=16,
                   max_tiles=64, max_video_frames=64, max_image_pixels=50_000_000, max_image_side=65535,
                   max_image_aspect=200, image_formats=STRICT_IMAGE_FORMATS)
        return dataclasses.replace(base, **changes)

    # ---------------------------------------------------------------- checks (raise MediaPolicyError)
    def local_path(self, path: str, what: str) -> str:
        """The resolved path to open (symlinks and `..` followed, so what is checked is what is read)."""
        if self.local_media_root is None:
            raise MediaPolicyError(f"{what} is a local file, and local files are refused "
                                   f"(media_policy.local_media_root is None)")
        if "\0" in path:  # no file has such a name; os.path would raise a bare ValueError
            raise MediaPolicyError(f"{what} is not a valid path: it contains a NUL byte")
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

    def check_image_size(self, width: int, height: int, what: str) -> None:
        """An image's or video frame's size (from its header, before decoding) against the aspect, side and pixel
        limits. A zero side is left to the caller's emptiness check."""
        long, short = max(width, height), min(width, height)
        cap = self.max_image_aspect
        if cap is not None and short > 0 and long > cap * short:
            ratio = f"{long / short:.2f}".rstrip("0").rstrip(".")
            raise MediaTooLargeError(f"{what} is {width} x {height}, aspect ratio {ratio}, over the {cap:g} limit "
                                     f"(media_policy.max_image_aspect)")
        cap = self.max_image_side
        if cap is not None and long > cap:
            raise MediaTooLargeError(f"{what} is {width} x {height}, its longest side over {_limit(cap, 'pixel')} "
                                     f"(media_policy.max_image_side)")
        cap = self.max_image_pixels
        if cap is not None and width * height > cap:
            raise MediaTooLargeError(f"{what} is {width}x{height} = {width * height} pixels, over "
                                     f"{_limit(cap, 'pixel')} (media_policy.max_image_pixels)")

    def check_image_format(self, fmt: str | None, what: str) -> None:
        """fmt: the Pillow format the bytes' signature names (None: none does)."""
        if self.image_formats is not None and fmt not in self.image_formats:
            found = f"in {fmt} format" if fmt else "in no format Pillow recognises"
            raise MediaPolicyError(f"{what} is {found}, not one of the allowed image formats "
                                   f"(media_policy.image_formats = {list(self.image_formats)})")

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


# IPv6 ranges whose low 32 bits are an IPv4 address that a connection to them reaches (through a translator or the
# host's own stack): such an address is as public as the IPv4 address it carries.
_IPV4_IN_LOW_BITS = tuple(ipaddress.ip_network(n) for n in (
    "::ffff:0:0/96",  # IPv4-mapped
    "::ffff:0:0:0/96",  # IPv4-translated (SIIT, RFC 2765)
    "::/96",  # IPv4-compatible (deprecated, RFC 4291)
    "64:ff9b::/96",  # NAT64 well-known prefix (RFC 6052)
))
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")  # local-use NAT64 (RFC 8215): a translator inside a network


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries: mapped, translated, compatible, NAT64, 6to4, Teredo (server and
    client)."""
    out = []
    if any(ip in net for net in _IPV4_IN_LOW_BITS):
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour is not None:
        out.append(ip.sixtofour)
    if ip.teredo is not None:
        out.extend(ip.teredo)
    return out


def is_public_address(ip) -> bool:
    """A global unicast address. An IPv6 address that carries IPv4 addresses is public when each of them is, whatever
    the version of Python's tables says of its range (3.11 calls 64:ff9b::127.0.0.1 and 2002:7f00:1:: global)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _LOCAL_NAT64:
            return False
        inner = embedded_ipv4(ip)
        if inner:
            return all(is_public_address(v4) for v4 in inner)
    return ip.is_global and not ip.is_multicast


# ------------------------------------------------------------------------------------------------ fetching URLs
class _NotPublic(Exception):
    """Raised inside a connection, which does not know the URL; fetch_url turns it into a MediaPolicyError."""


class _Deadline:
    """One fetch's wall-clock budget, covering host lookups, connects, TLS handshakes, status lines, headers, every
    redirect hop and the body. A socket timeout bounds one operation only, and a server that sends a byte at a time
    restarts it with every byte; so each socket the fetch opens is watched, and at the deadline a timer shuts them
    all down, which ends whatever read or handshake waits on them (the fetch then reports the timeout)."""

    def __init__(self, policy: MediaPolicy, name: str):
        self.policy, self.name = policy, name
        self.end = time.monotonic() + policy.fetch_timeout_s
        self.expired = False
        self._lock = threading.Lock()
        self._watched: list[socket.socket] = []  # duplicates of the fetch's sockets: ours to shut down and close
        self._timer = threading.Timer(policy.fetch_timeout_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def error(self) -> MediaTimeoutError:
        return MediaTimeoutError(f"fetching {self.name} took longer than {self.policy.fetch_timeout_s} s "
                                 f"(media_policy.fetch_timeout_s)")

    def remaining(self) -> float:
        left = self.end - time.monotonic()
        if self.expired or left <= 0:
            raise self.error()
        return left

    def watch(self, sock: socket.socket) -> None:
        # a duplicate descriptor of the same connection: shutting it down ends reads on sock (and on the TLS socket
        # that later takes over sock's descriptor), and it cannot be closed and reused behind the timer's back
        dup = sock.dup()
        with self._lock:
            if not self.expired:
                self._watched.append(dup)
                return
        dup.close()
        sock.close()
        raise self.error()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for s in self._watched:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already shut by the peer

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            for s in self._watched:
                s.close()
            self._watched.clear()


def _resolve(host: str, port: int, deadline: _Deadline) -> list:
    """getaddrinfo within the deadline: a name is looked up on a helper thread (the C resolver cannot be
    interrupted), which the fetch stops waiting for at the deadline; the thread ends with the resolver's own
    timeout."""
    if _as_ip(host) is not None:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    box: list = []

    def lookup():
        try:
            box.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except BaseException as e:  # handed to the fetch
            box.append(e)

    t = threading.Thread(target=lookup, name="media-dns", daemon=True)
    t.start()
    t.join(deadline.remaining())
    if not box:
        raise deadline.error()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


class _FetchConnection:
    """Connection mixin: resolve the host within the fetch's deadline, refuse it (public_only) when any of its
    addresses is not public, connect to a resolved address (not the name again, which a second lookup could point
    elsewhere) and put the socket under the deadline. HTTPS still verifies the certificate against the host name
    (HTTPSConnection wraps this socket with server_hostname=host)."""

    def __init__(self, *args, deadline: _Deadline, public_only: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self._deadline, self._public_only = deadline, public_only
        self._create_connection = self._connect  # the hook http.client's connect() calls

    def _connect(self, address, timeout, source_address=None):
        host, port = address
        infos = _resolve(host, port, self._deadline)
        if self._public_only:
            for *_, sockaddr in infos:
                ip = _as_ip(sockaddr[0])
                if ip is None or not is_public_address(ip):
                    raise _NotPublic(f"host {host!r} resolves to {sockaddr[0]}, which is not a public address "
                                     f"(media_policy.allow_private_networks is False)")
        err: OSError = OSError(f"no address for {host!r}")
        for family, type_, proto, _, sockaddr in infos:
            sock = socket.socket(family, type_, proto)
            try:
                sock.settimeout(self._deadline.remaining())
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
            except OSError as e:
                sock.close()
                err = e
                continue
            except BaseException:
                sock.close()
                raise
            self._deadline.watch(sock)
            return sock
        raise err


class _FetchHTTPConnection(_FetchConnection, http.client.HTTPConnection):
    pass


class _FetchHTTPSConnection(_FetchConnection, http.client.HTTPSConnection):
    pass


class _FetchHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, **conn_args):
        super().__init__()
        self._conn_args = conn_args

    def http_open(self, req):
        return self.do_open(functools.partial(_FetchHTTPConnection, **self._conn_args), req)


class _FetchHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, **conn_args):
        super().__init__()
        self._conn_args = conn_args

    def https_open(self, req):
        return self.do_open(functools.partial(_FetchHTTPSConnection, **self._conn_args), req, context=self._context)


class _PolicyRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Each redirect hop meets the policy again (scheme, host) and the fetch's deadline, before urllib's own checks
    (which would let ftp:// through and refuse file:// as an HTTP error rather than a policy refusal)."""

    def __init__(self, policy: MediaPolicy, name: str, deadline: _Deadline):
        self.policy, self.name, self.deadline = policy, name, deadline

    def http_error_302(self, req, fp, code, msg, headers):
        location = headers.get("location") or headers.get("uri")
        if location:
            newurl = urllib.parse.urljoin(req.full_url, location)
            try:
                self.policy.check_url(newurl, f"{self.name} redirected to {newurl!r}")
                self.deadline.remaining()
            except MediaPolicyError:
                fp.close()
                raise
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _is_timeout(e: BaseException) -> bool:
    return isinstance(e, TimeoutError) or (isinstance(e, urllib.error.URLError) and isinstance(e.reason, TimeoutError))


def fetch_url(url: str, policy: MediaPolicy, name: str) -> bytes:
    """The body of an http(s) URL under the policy, all of it within fetch_timeout_s. name: the URL as error messages
    show it ("image URL '...'")."""
    policy.check_url(url, name)
    deadline = _Deadline(policy, name)
    try:
        conn_args = dict(deadline=deadline, public_only=not policy.allow_private_networks)
        handlers = [_PolicyRedirectHandler(policy, name, deadline), _FetchHTTPHandler(**conn_args),
                    _FetchHTTPSHandler(**conn_args)]
        if not policy.allow_private_networks:
            handlers.append(urllib.request.ProxyHandler({}))  # the checked address must be the one connected to
        opener = urllib.request.build_opener(*handlers)
        req = urllib.request.Request(url, headers={"User-Agent": "internvl_engine"})
        try:
            with opener.open(req, timeout=deadline.remaining()) as resp:
                body = _read_body(resp, policy, name, deadline)
        except MediaPolicyError:
            raise
        except _NotPublic as e:
            raise MediaPolicyError(f"{name}: {e}") from None
        except Exception as e:  # HTTP errors, URLError, timeouts, connection resets, a read the deadline ended
            if deadline.expired or _is_timeout(e):
                raise deadline.error() from e
            if isinstance(e, urllib.error.HTTPError):
                raise ImageError(f"cannot fetch {name}: HTTP {e.code} {e.reason}") from e
            reason = e.reason if isinstance(e, urllib.error.URLError) else f"{type(e).__name__}: {e}"
            raise ImageError(f"cannot fetch {name}: {reason}") from e
        if deadline.expired:  # the timer's shutdown reads as the end of a body sent without a length
            raise deadline.error()
        return body
    finally:
        deadline.close()


def _read_body(resp, policy: MediaPolicy, name: str, deadline: _Deadline) -> bytes:
    cap = policy.max_download_bytes
    length = resp.headers.get("Content-Length")
    if cap is not None and length is not None and length.strip().isdigit() and int(length) > cap:
        raise MediaTooLargeError(f"{name} is {int(length)} bytes (Content-Length), over {_limit(cap, 'byte')} "
                                 f"(media_policy.max_download_bytes)")
    parts, total = [], 0
    while True:
        deadline.remaining()
        chunk = resp.read1(_CHUNK)  # one receive at a time, so the byte cap is checked as the body arrives
        if not chunk:
            return b"".join(parts)
        total += len(chunk)
        if cap is not None and total > cap:
            raise MediaTooLargeError(f"{name} sent more than {cap} bytes, over {_limit(cap, 'byte')} "
                                     f"(media_policy.max_download_bytes)")
        parts.append(chunk)
