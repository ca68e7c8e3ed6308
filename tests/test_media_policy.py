"""The media policy (issue 2.2 item 6): local root, URL domains and redirects, private networks, byte and pixel caps,
fetch timeout, image/tile/frame counts, each refusal a typed error naming its field; video decoding keeps only the
sampled frames and samples exactly as before. CPU only; HTTP on loopback, every fetch bounded in time."""

from __future__ import annotations

import base64
import http.server
import io
import os
import threading
import time

import numpy as np
import PIL.Image
import pytest

from internvl_engine.errors import (ImageError, InternVLEngineError, MediaPolicyError, MediaTimeoutError,
                                    MediaTooLargeError, VideoError)
from internvl_engine.processor import MediaPolicy, Processor, load_image, load_video, sample_frame_indices
from internvl_engine.processor import images as images_mod
from internvl_engine.processor import video as video_mod
from internvl_engine.processor.files import write_processor_files

IMG = "<IMG_CONTEXT>"


def _png(w=16, h=16, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()
PNG_ARRAY = np.asarray(PIL.Image.open(io.BytesIO(PNG)).convert("RGB"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    write_processor_files(d)
    return d


@pytest.fixture
def proc(ckpt):
    """A processor with small tiles (the policy does not care about tile size), default policy."""
    return Processor.from_pretrained(ckpt)


def _with(proc, **fields) -> Processor:
    proc.media_policy = MediaPolicy(**fields)
    return proc


# ------------------------------------------------------------------------------------------------ loopback server
class _Handler(http.server.BaseHTTPRequestHandler):
    hits: list[str]

    def log_message(self, *args):
        pass

    def _send(self, code, body=b"", headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.server.hits.append(self.path)
        port = self.server.server_address[1]
        try:
            if self.path == "/img.png":
                self._send(200, PNG, [("Content-Type", "image/png"), ("Content-Length", str(len(PNG)))])
            elif self.path == "/huge":  # says it is huge; refused from the header, the body never read
                self._send(200, b"", [("Content-Length", str(1 << 30))])
                self.wfile.write(b"\0" * (1 << 16))
            elif self.path == "/stream":  # no Content-Length: 64 MiB (past any socket buffer) until it closes
                self._send(200)
                for _ in range(1024):
                    self.wfile.write(b"\0" * (1 << 16))
            elif self.path == "/redirect-same":
                self._send(302, headers=[("Location", "/img.png"), ("Content-Length", "0")])
            elif self.path == "/redirect-other":
                self._send(302, headers=[("Location", f"http://localhost:{port}/img.png"), ("Content-Length", "0")])
            elif self.path == "/redirect-ftp":
                self._send(302, headers=[("Location", f"ftp://127.0.0.1:{port}/img.png"), ("Content-Length", "0")])
            elif self.path == "/redirect-file":
                self._send(307, headers=[("Location", "file:///etc/passwd"), ("Content-Length", "0")])
            elif self.path == "/slow":  # nothing until the module's tests are done (60 s at most)
                self.server.release.wait(60)
                self._send(200, PNG, [("Content-Length", str(len(PNG)))])
            elif self.path == "/trickle":  # headers at once, then a byte every 0.1 s for 3 s
                self._send(200, b"", [("Content-Length", "30")])
                for _ in range(30):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.1)
            else:
                self._send(404, b"", [("Content-Length", "0")])
            self.server.sent_all.add(self.path)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should
        finally:
            self.server.done.add(self.path)


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.hits = []
    srv.sent_all = set()  # paths whose whole response was written: the client read it, or a socket buffer did
    srv.done = set()  # paths whose handler has returned, either way
    srv.release = threading.Event()  # ends /slow's silence
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def _url(server, path):
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


LOOPBACK = dict(allowed_domains=["127.0.0.1"])  # allow_private_networks stays True: the server is on loopback


# ------------------------------------------------------------------------------------------------ policy object
def test_defaults_and_strict():
    p = MediaPolicy()
    assert p.local_media_root == "/" and p.allowed_domains is None and p.allow_private_networks
    assert p.fetch_timeout_s == 10.0
    assert all(getattr(p, f) is None for f in ("max_download_bytes", "max_data_uri_bytes", "max_images",
                                               "max_tiles", "max_video_frames", "max_image_pixels"))
    s = MediaPolicy.strict()
    assert s.local_media_root is None and not s.allow_private_networks
    assert (s.max_download_bytes, s.max_data_uri_bytes) == (20 << 20, 20 << 20)
    assert (s.fetch_timeout_s, s.max_images, s.max_tiles, s.max_video_frames) == (10.0, 16, 64, 64)
    assert (p.max_image_side, p.max_image_aspect, p.image_formats) == (None, None, None)
    assert (s.max_image_pixels, s.max_image_side, s.max_image_aspect) == (50_000_000, 65535, 200)
    assert s.image_formats == ("BMP", "GIF", "JPEG", "PNG", "WEBP")
    assert p.video_formats == s.video_formats and "mp4" in s.video_formats and "hls" not in s.video_formats
    assert MediaPolicy.strict(max_images=2, allowed_domains="Example.COM.").allowed_domains == ("example.com",)
    assert issubclass(MediaPolicyError, InternVLEngineError) and issubclass(MediaPolicyError, ValueError)
    assert issubclass(MediaTooLargeError, MediaPolicyError) and issubclass(MediaTimeoutError, MediaPolicyError)


@pytest.mark.parametrize("fields, field", [
    (dict(max_images=-1), "max_images"), (dict(max_tiles=1.5), "max_tiles"), (dict(fetch_timeout_s=0), "timeout"),
    (dict(allowed_domains=["https://example.com"]), "allowed_domains"), (dict(local_media_root=3), "root"),
    (dict(allowed_domains=["example.com:80"]), "allowed_domains"), (dict(allow_private_networks=1), "private"),
])
def test_bad_fields(fields, field):
    with pytest.raises(MediaPolicyError, match=field):
        MediaPolicy(**fields)


def test_domain_matching():
    p = MediaPolicy(allowed_domains=["example.com", "10.0.0.1", "::1"])
    assert p.host_allowed("example.com") and p.host_allowed("IMG.Example.com.")
    assert not p.host_allowed("badexample.com") and not p.host_allowed("example.com.evil.org")
    assert p.host_allowed("10.0.0.1") and not p.host_allowed("x.10.0.0.1") and not p.host_allowed("10.0.0.2")
    assert p.host_allowed("::1")
    assert MediaPolicy(allowed_domains=()).host_allowed("example.com") is False
    # the userinfo part is not the host
    with pytest.raises(MediaPolicyError, match="'evil.test' is not an allowed domain"):
        p.check_url("http://example.com@evil.test/x.png", "image URL")


def test_processor_takes_the_policy(ckpt):
    strict = MediaPolicy.strict()
    assert Processor.from_pretrained(ckpt).media_policy == MediaPolicy()
    assert Processor.from_pretrained(ckpt, media_policy=strict).media_policy is strict
    assert Processor.from_parts(media_policy=strict).media_policy is strict
    with pytest.raises(MediaPolicyError, match="MediaPolicy"):
        Processor.from_parts(media_policy={"max_images": 1})


# ------------------------------------------------------------------------------------------------ local files
def test_local_files(tmp_path, proc):
    root, outside = tmp_path / "media", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (root / "in.png").write_bytes(PNG)
    (outside / "out.png").write_bytes(PNG)
    (root / "link.png").symlink_to(outside / "out.png")
    (tmp_path / "rootlink").symlink_to(root)

    none = MediaPolicy(local_media_root=None)
    for src in (str(root / "in.png"), "file://" + str(root / "in.png"), root / "in.png"):
        with pytest.raises(MediaPolicyError, match=r"local files are refused \(media_policy.local_media_root is None"):
            load_image(src, none)
    with pytest.raises(MediaPolicyError, match="local_media_root"):
        load_video(str(root / "clip.mp4"), policy=none)
    with pytest.raises(MediaPolicyError, match="video frame 0: .*local_media_root"):
        load_video([str(root / "in.png")], policy=none)

    rooted = MediaPolicy(local_media_root=tmp_path / "rootlink")  # the root itself is resolved
    assert rooted.local_media_root == os.path.realpath(root)
    for src in (str(root / "in.png"), "file://" + str(root / "in.png"), str(tmp_path / "rootlink" / "in.png")):
        assert np.array_equal(np.asarray(load_image(src, rooted)), PNG_ARRAY)
    for src in (str(outside / "out.png"), str(root / ".." / "outside" / "out.png"), str(root / "link.png"),
                "file://" + str(root / "link.png"), str(outside / "missing.png"), "/etc/passwd"):
        with pytest.raises(MediaPolicyError, match="outside the allowed local media root"):
            load_image(src, rooted)
    with pytest.raises(ImageError, match="not found"):  # inside the root, a missing file is just missing
        load_image(str(root / "missing.png"), rooted)
    with pytest.raises(MediaPolicyError, match="outside the allowed local media root"):
        load_video(str(outside / "clip.mp4"), policy=rooted)

    # through the processor: named by index, the default policy reads anything as before
    enc = proc(text=IMG, images=[str(outside / "out.png")])
    with pytest.raises(MediaPolicyError, match=r"^image 1: image file .*out.png' is outside the allowed local "
                                               r"media root .*local_media_root\)$"):
        _with(proc, local_media_root=root)(text=IMG * 2, images=[str(root / "in.png"), str(outside / "out.png")])
    assert proc(text=IMG, images=[str(root / "in.png")]).media_digests == enc.media_digests


# ------------------------------------------------------------------------------------------------ URLs
def test_domains_and_private_networks(server):
    assert np.array_equal(np.asarray(load_image(_url(server, "/img.png"), MediaPolicy(**LOOPBACK))), PNG_ARRAY)
    n = len(server.hits)
    with pytest.raises(MediaPolicyError, match=r"'127.0.0.1' is not an allowed domain .*allowed_domains"):
        load_image(_url(server, "/img.png"), MediaPolicy(allowed_domains=["example.com"]))
    # strict: any public host, so loopback is refused by its address, before a request is sent
    with pytest.raises(MediaPolicyError, match=r"resolves to 127.0.0.1.*allow_private_networks is False"):
        load_image(_url(server, "/img.png"), MediaPolicy.strict())
    with pytest.raises(MediaPolicyError, match=r"resolves to 127.0.0.1.*allow_private_networks"):
        load_image(_url(server, "/img.png"), MediaPolicy.strict(allowed_domains=["127.0.0.1"]))
    with pytest.raises(MediaPolicyError, match=r"resolves to 127.0.0.1.*allow_private_networks"):
        load_image("https://127.0.0.1:9/x.png", MediaPolicy.strict())  # (the HTTPS connection checks it too)
    assert len(server.hits) == n
    with pytest.raises(ImageError, match="unsupported image source .*'ftp'"):
        load_image("ftp://127.0.0.1/x.png", MediaPolicy())


def test_redirects(server):
    p = MediaPolicy(**LOOPBACK)
    assert np.array_equal(np.asarray(load_image(_url(server, "/redirect-same"), p)), PNG_ARRAY)
    n = len(server.hits)
    with pytest.raises(MediaPolicyError, match=r"redirected to 'http://localhost:\d+/img.png': host 'localhost' is "
                                               r"not an allowed domain"):
        load_image(_url(server, "/redirect-other"), p)
    with pytest.raises(MediaPolicyError, match=r"redirected to 'ftp://.*scheme 'ftp' is not http or https"):
        load_image(_url(server, "/redirect-ftp"), MediaPolicy())
    with pytest.raises(MediaPolicyError, match=r"redirected to 'file:///etc/passwd': scheme 'file'"):
        load_image(_url(server, "/redirect-file"), MediaPolicy())
    assert server.hits[n:] == ["/redirect-other", "/redirect-ftp", "/redirect-file"]  # no target was requested
    # the default policy follows redirects anywhere, as before
    assert np.array_equal(np.asarray(load_image(_url(server, "/redirect-other"), MediaPolicy())), PNG_ARRAY)


def test_download_cap(server):
    p = MediaPolicy(max_download_bytes=1 << 20, **LOOPBACK)
    assert np.array_equal(np.asarray(load_image(_url(server, "/img.png"), p)), PNG_ARRAY)
    with pytest.raises(MediaTooLargeError, match=r"is 1073741824 bytes \(Content-Length\), over the 1048576-byte "
                                                 r"limit \(media_policy.max_download_bytes\)"):
        load_image(_url(server, "/huge"), p)
    with pytest.raises(MediaTooLargeError, match=r"sent more than 1048576 bytes.*max_download_bytes"):
        load_image(_url(server, "/stream"), p)
    # the reader stopped at the cap: the server could not write its 64 MiB (measured in bytes, not seconds)
    deadline = time.monotonic() + 60  # the server thread notices the closed connection on its next write
    while "/stream" not in server.done and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "/stream" in server.done and "/stream" not in server.sent_all
    with pytest.raises(MediaTooLargeError, match=r"^image 0: image URL .*max_download_bytes"):
        Processor.from_parts(media_policy=MediaPolicy(max_download_bytes=100))(
            text=IMG, images=[_url(server, "/img.png")])


def test_fetch_timeout(server):
    p = MediaPolicy(fetch_timeout_s=0.5, **LOOPBACK)
    for path in ("/slow", "/trickle"):  # silent server; a server that trickles bytes within each read's timeout
        with pytest.raises(MediaTimeoutError, match=r"took longer than 0.5 s \(media_policy.fetch_timeout_s\)"):
            load_image(_url(server, path), p)
        # the fetch gave up before the response was complete (/slow's never comes while the tests run; /trickle's
        # takes 3 s of the server's own schedule, and its next write after the client left fails): the deadline
        # bounds the whole fetch, not each read; judged by the server's progress, not by a wall-clock bound that a
        # loaded machine could overrun
        assert path not in server.sent_all, path


# ------------------------------------------------------------------------------------------------ data: URIs, pixels
def test_data_uri_cap(proc, monkeypatch):
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    small = "data:image/png;base64," + base64.b64encode(_png(4, 4)).decode()
    p = _with(proc, max_data_uri_bytes=len(uri) - 1)
    assert p(text=IMG, images=[small]).num_patches == [1]
    decoded = []
    real = base64.b64decode
    monkeypatch.setattr(images_mod.base64, "b64decode", lambda *a, **k: decoded.append(1) or real(*a, **k))
    with pytest.raises(MediaTooLargeError) as ei:
        p(text=IMG * 2, images=[small, uri])
    assert str(ei.value) == (f"image 1: data: URI is {len(uri)} bytes, over the {len(uri) - 1}-byte limit "
                             f"(media_policy.max_data_uri_bytes)")
    assert decoded == [1]  # the small one only
    load_image(uri, MediaPolicy(max_data_uri_bytes=len(uri)))


def test_pixel_cap():
    uri = "data:image/png;base64," + base64.b64encode(_png(100, 60)).decode()
    with pytest.raises(MediaTooLargeError, match=r"is 100x60 = 6000 pixels, over the 5999-pixel limit "
                                                 r"\(media_policy.max_image_pixels\)"):
        load_image(uri, MediaPolicy(max_image_pixels=5999))
    assert load_image(uri, MediaPolicy(max_image_pixels=6000)).size == (100, 60)


# ------------------------------------------------------------------------------------------------ counts
def test_max_images(proc, tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    assert len(_with(proc, max_images=2)(text=IMG * 2, images=[img, img]).num_patches) == 2
    # refused before any image is read: the missing file is never looked at
    with pytest.raises(MediaPolicyError, match=r"^3 images in the request, over the 2-image limit "
                                               r"\(media_policy.max_images\)$"):
        proc(text=IMG * 3, images=[img, img, str(tmp_path / "missing.png")])


def test_max_tiles(proc):
    wide = np.zeros((16, 64, 3), np.uint8)  # 4x1 grid + thumbnail = 5 tiles at the default 1..12
    square = np.zeros((16, 16, 3), np.uint8)  # 1 tile
    p = _with(proc, max_tiles=6)
    assert p(text=IMG * 2, images=[wide, square]).num_patches == [5, 1]
    with pytest.raises(MediaPolicyError, match=r"^image 2: its 1 tiles bring the request to 7 tiles, over the "
                                               r"6-tile limit \(media_policy.max_tiles\)$"):
        p(text=IMG * 3, images=[wide, square, square])
    with pytest.raises(MediaPolicyError, match=r"^image 1: its 5 tiles bring the request to 6 tiles"):
        _with(proc, max_tiles=5)(text=IMG * 2, images=[square, "data:image/png;base64,"
                                                       + base64.b64encode(_png(64, 16)).decode()])
    assert _with(proc, max_tiles=2)(text=IMG * 2, images=[wide, square], max_num_tiles=1).num_patches == [1, 1]
    with pytest.raises(MediaPolicyError, match=r"^3 images make at least 3 tiles, over the 2-tile limit"):
        proc(text=IMG * 3, images=[square] * 3)


def test_max_video_frames(proc):
    frames = [np.full((8, 8, 3), i, np.uint8) for i in range(8)]
    p = _with(proc, max_video_frames=4)
    assert p(text="<video>", videos=[frames], num_frames=4).num_patches == [1] * 4
    with pytest.raises(MediaPolicyError, match=r"^video 0: its 8 frames bring the request to 8 video frames, over "
                                               r"the 4-frame limit \(media_policy.max_video_frames\)$"):
        p(text="<video>", videos=[frames])
    with pytest.raises(MediaPolicyError, match=r"^video 1: its 2 frames bring the request to 5 video frames"):
        p(text="<video><video>", videos=[frames[:3], frames[:2]])
    with pytest.raises(MediaPolicyError, match=r"^2 videos of num_frames=3 make 6 video frames, over the 4-frame"):
        p(text="<video><video>", videos=[frames, frames], num_frames=3)


# ------------------------------------------------------------------------------------------------ video decoding
@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    av = pytest.importorskip("av")
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    rng = np.random.default_rng(1)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=12)
        s.width, s.height, s.pix_fmt = 32, 24, "yuv420p"
        for i in range(13):
            f = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    with av.open(str(path)) as c:
        every = [fr.to_ndarray(format="rgb24") for fr in c.decode(video=0)]  # today's load_video: all, then sample
    assert len(every) == 13
    return str(path), every


@pytest.fixture
def conversions(monkeypatch):
    """Counts frames converted to arrays (the only frames a video holds in memory)."""
    count = [0]
    real = video_mod._frame_to_rgb

    def counting(frame):
        count[0] += 1
        return real(frame)

    monkeypatch.setattr(video_mod, "_frame_to_rgb", counting)
    return count


@pytest.mark.parametrize("stated", [None, 0, 20, 7])  # the container's count, none, too many, too few
def test_video_keeps_only_sampled_frames(clip, conversions, monkeypatch, stated):
    path, every = clip
    if stated is not None:
        monkeypatch.setattr(video_mod, "_container_frame_count", lambda *a: stated)
    for n in (1, 4, 13):
        conversions[0] = 0
        got = load_video(path, n)
        # a wrong stated count costs one more pass (its first picks were the wrong frames)
        assert conversions[0] == n if stated in (None, 0) else n <= conversions[0] <= 2 * n
        want = [every[i] for i in sample_frame_indices(len(every), n)]
        assert len(got) == n and all(np.array_equal(a, b) for a, b in zip(got, want))
    with pytest.raises(VideoError, match="num_frames=14"):
        load_video(path, 14)
    assert all(np.array_equal(a, b) for a, b in zip(load_video(path), every))


def test_video_processor_results_unchanged(clip, proc, conversions):
    path, every = clip
    enc = proc(text="<video>", videos=[path], num_frames=5)
    assert conversions[0] == 5
    ref = proc(text="<video>", videos=[np.stack([every[i] for i in sample_frame_indices(13, 5)])])
    assert enc.input_ids == ref.input_ids and enc.media_digests == ref.media_digests
    assert (enc.pixel_values == ref.pixel_values).all()
    # over the frame limit: refused from the count, before a frame is converted
    conversions[0] = 0
    with pytest.raises(MediaPolicyError, match=r"^video 0: its 13 frames .*max_video_frames"):
        _with(proc, max_video_frames=12)(text="<video>", videos=[path])
    assert conversions[0] == 0


def test_video_frame_sources_sampled_before_loading(tmp_path):
    (tmp_path / "f.png").write_bytes(PNG)
    # 7 frames, 3 sampled (indices 1, 3, 5): the others are never loaded, so their missing files do not matter
    src = [str(tmp_path / ("f.png" if i in (1, 3, 5) else f"missing{i}.png")) for i in range(7)]
    assert sample_frame_indices(7, 3) == [1, 3, 5]
    got = load_video(src, 3)
    assert len(got) == 3 and all(np.array_equal(g, PNG_ARRAY) for g in got)
    arr = np.stack([np.full((4, 4, 3), i, np.uint8) for i in range(7)])
    assert [int(f[0, 0, 0]) for f in load_video(arr, 3)] == [1, 3, 5]
