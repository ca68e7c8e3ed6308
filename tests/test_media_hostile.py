"""Hostile media (issue 3.0 items 3, 4, 5, 7, 15, 16, 17 and the NUL-byte path): each input is refused from what
its header or address says, before the work it would cause, with a typed error naming the limit; a trusted caller's
pathological image costs memory near its own size. CPU only; every server is on 127.0.0.1 and started here."""

from __future__ import annotations

import base64
import io
import ipaddress
import socket
import struct
import threading
import time
import tracemalloc
import weakref
import zlib

import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest
import torch

from internvl_engine.errors import (ImageError, MediaPolicyError, MediaTimeoutError, MediaTooLargeError, VideoError,
                                    VideoFormatError)
from internvl_engine.processor import MediaPolicy, Processor, load_image, load_video, preprocess_video
from internvl_engine.processor import images as images_mod
from internvl_engine.processor import media as media_mod
from internvl_engine.processor import video as video_mod

IMG = "<IMG_CONTEXT>"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _gray_png(width: int, height: int) -> bytes:
    """A black 8-bit grayscale PNG, compressed row by row (a 40,000,000 x 1 one is 40 KB and never whole in
    memory here)."""
    z = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def _proc():
    return Processor.from_parts()  # (building the tokenizer takes seconds: once per module)


@pytest.fixture
def proc(_proc):
    _proc.media_policy = MediaPolicy()
    return _proc


@pytest.fixture
def opened(monkeypatch):
    """Counts Image.open calls (a refusal from the signature or header comes before any)."""
    calls = []
    real = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


# ------------------------------------------------------------------------------------------------ item 3: thin images
def test_thin_png_refused_from_its_header(proc, opened):
    uri = _data_uri(_gray_png(40_000_000, 1))
    assert len(uri) < 60_000  # under every byte cap; only its shape is hostile
    tracemalloc.start()
    try:
        with pytest.raises(MediaTooLargeError, match=r"is 40000000 x 1, aspect ratio 40000000, over the 200 limit "
                                                     r"\(media_policy\.max_image_aspect\)$"):
            load_image(uri, MediaPolicy.strict())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20 and opened == [1]  # the header was read; nothing decoded
    proc.media_policy = MediaPolicy.strict()
    with pytest.raises(MediaTooLargeError, match=r"^image 0: image .*max_image_aspect"):
        proc(text=IMG, images=[uri])
    s = MediaPolicy.strict()
    assert (s.max_image_side, s.max_image_aspect) == (65535, 200)
    with pytest.raises(MediaTooLargeError, match=r"is 70000 x 1000, its longest side over the 65535-pixel limit "
                                                 r"\(media_policy\.max_image_side\)"):
        s.check_image_size(70000, 1000, "image")
    s.check_image_size(65535, 328, "image")  # 199.8
    # a caller's array meets the same limits
    with pytest.raises(MediaTooLargeError, match=r"^image 0: image array of shape \(1, 300, 3\) .* aspect ratio 300"):
        proc(text=IMG, images=[np.zeros((1, 300, 3), np.uint8)])
    with pytest.raises(MediaPolicyError, match="max_image_aspect must be"):
        MediaPolicy(max_image_aspect=0.5)


def test_thin_image_from_a_trusted_caller_costs_near_its_own_size(proc):
    """The default policy has no shape limits: a 1 x 4,000,000 strip is tiled, but its resize neither builds taps
    of hundreds of megabytes (about 1 GB before) nor leaves them in the tap cache."""
    strip = np.full((1, 4_000_000, 3), 7, np.uint8)  # 12 MB
    tracemalloc.start()
    try:
        enc = proc(text=IMG, images=[strip])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert enc.num_patches == [13]  # a 12 x 1 grid and its thumbnail
    assert peak < 160 << 20, peak / 2**20
    for w in range(100_000, 100_040):  # odd widths: the cache keeps a bounded number of bytes
        images_mod.bicubic_taps(w, 448)
    assert images_mod.taps_cache_bytes() <= images_mod.TAPS_CACHE_BYTES
    # below MAX_RESAMPLE_SIDE an axis is resized exactly as Pillow does
    img = np.random.default_rng(0).integers(0, 256, (5, 3000, 3), dtype=np.uint8)
    want = np.asarray(PIL.Image.fromarray(img).resize((448, 448), PIL.Image.BICUBIC))
    assert np.array_equal(images_mod.resize_bicubic(img, 448, 448), want)


# ------------------------------------------------------------------------------------------------ item 4: formats
def _ico(png: bytes, side: int) -> bytes:
    """An ICO whose one entry is `png`; its directory says side x side (one byte each: 0 is 256, and the most)."""
    d = side if side < 256 else 0
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", d, d, 0, 0, 1, 32, len(png), 22) + png


def test_image_formats_checked_before_decoding(proc, opened, monkeypatch):
    loads = []
    real_load = PIL.ImageFile.ImageFile.load
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda self: loads.append(1) or real_load(self))
    big_ico = _ico(_gray_png(4000, 4000), 4000)  # 16 MP inside a 20 KB icon
    assert len(big_ico) < 64_000
    uri = "data:image/x-icon;base64," + base64.b64encode(big_ico).decode()
    with pytest.raises(MediaPolicyError, match=r"is in ICO format, not one of the allowed image formats "
                                               r"\(media_policy\.image_formats = \['BMP', 'GIF', 'JPEG', 'PNG', "
                                               r"'WEBP'\]\)"):
        load_image(uri, MediaPolicy.strict())
    # any format allowed, but a pixel limit: the icon's frame sizes are read from its own headers
    with pytest.raises(MediaTooLargeError, match=r"is 4000x4000 = 16000000 pixels, over the 1000000-pixel limit"):
        load_image(uri, MediaPolicy(max_image_pixels=1_000_000))
    assert opened == [] and loads == []
    small = _ico(_gray_png(16, 16), 16)
    assert load_image("data:image/x-icon;base64," + base64.b64encode(small).decode(),
                      MediaPolicy(max_image_pixels=1000)).size == (16, 16)
    # the allowlist is Pillow's: a listed format opens, and only listed plugins are tried
    p = MediaPolicy.strict(image_formats=["png", "ICO"])
    assert p.image_formats == ("PNG", "ICO")
    assert load_image(_data_uri(_gray_png(8, 8)), p).size == (8, 8)
    buf = io.BytesIO()
    PIL.Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    proc.media_policy = MediaPolicy.strict()
    with pytest.raises(MediaPolicyError, match=r"^image 0: image .* is in TIFF format.*image_formats"):
        proc(text=IMG, images=[_data_uri(buf.getvalue())])
    with pytest.raises(MediaPolicyError, match=r"image_formats entries must be format names.*'NOPE'"):
        MediaPolicy(image_formats=["NOPE"])


# ------------------------------------------------------------------------------------------------ item 5: video frames
def _write_video(path, width, height, frames=3, codec="mpeg4", fmt=None):
    av = pytest.importorskip("av")
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=12)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            f = av.VideoFrame.from_ndarray(np.full((height, width, 3), (30 * i) % 256, np.uint8), format="rgb24")
            for pkt in s.encode(f):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return str(path)


@pytest.fixture
def decodes(monkeypatch):
    calls = []
    real = video_mod._decode
    monkeypatch.setattr(video_mod, "_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_video_frame_size_checked_before_decoding(tmp_path, proc, decodes):
    clip = _write_video(tmp_path / "clip.mp4", 64, 48)
    assert len(load_video(clip, 2)) == 2 and decodes == [1]
    decodes.clear()
    with pytest.raises(MediaTooLargeError, match=r"^video '.*clip.mp4' frame is 64x48 = 3072 pixels, over the "
                                                 r"1000-pixel limit \(media_policy\.max_image_pixels\)$"):
        load_video(clip, 2, policy=MediaPolicy(max_image_pixels=1000))
    strip = _write_video(tmp_path / "strip.mp4", 4096, 8, frames=2)
    proc.media_policy = MediaPolicy.strict(local_media_root=tmp_path)
    with pytest.raises(MediaTooLargeError, match=r"^video 0: video .* frame is 4096 x 8, aspect ratio 512, over "
                                                 r"the 200 limit \(media_policy\.max_image_aspect\)$"):
        proc(text="<video>", videos=[strip], num_frames=2)
    assert decodes == []
    # frames given as arrays, a [F, H, W, C] array or image sources meet the same limits, before any is converted
    small = MediaPolicy(max_image_pixels=1000)
    with pytest.raises(MediaTooLargeError, match=r"^video frame 0: video frame of shape \(48, 64, 3\) is 64x48"):
        load_video([np.zeros((48, 64, 3), np.uint8)] * 2, policy=small)
    with pytest.raises(MediaTooLargeError, match=r"frame is 64x48 = 3072 pixels"):
        load_video(np.zeros((2, 48, 64, 3), np.uint8), policy=small)
    with pytest.raises(MediaTooLargeError, match=r"^video frame 0: image .* is 64x48 = 3072 pixels"):
        load_video([_data_uri(_gray_png(64, 48))], policy=small)
    with pytest.raises(MediaTooLargeError, match=r"^video frame 0: image PIL image .* is 64x48"):
        load_video([PIL.Image.new("RGB", (64, 48))], policy=small)


# ------------------------------------------------------------------------------------------------ item 16: demuxers
def test_playlists_and_lists_are_refused(tmp_path, decodes):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    secret = _write_video(outside / "secret.ts", 32, 24, frames=12)
    inside = _write_video(root / "ok.mp4", 32, 24, frames=4)
    (root / "list.m3u8").write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1.0,\n{secret}\n#EXT-X-ENDLIST\n")
    (root / "rel.m3u8").write_text("#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1.0,\n../outside/secret.ts\n"
                                   "#EXT-X-ENDLIST\n")
    (root / "list.ffconcat").write_text(f"ffconcat version 1.0\nfile file://{secret}\n")
    p = MediaPolicy(local_media_root=root)
    assert len(load_video(inside, policy=p)) == 4
    for name, what in (("list.m3u8", "M3U/HLS playlist"), ("rel.m3u8", "M3U/HLS playlist"),
                       ("list.ffconcat", "ffmpeg concat list")):
        with pytest.raises(VideoFormatError, match=rf"is not in an allowed single-file container format \(it is an "
                                                   rf"{what}.*\(media_policy\.video_formats = \['mov', 'mp4'"):
            load_video(str(root / name), 2, policy=p)
    # (the default policy, which reads any local file, refuses them too: they would open URLs as well)
    with pytest.raises(VideoFormatError, match="video_formats"):
        load_video(str(root / "list.m3u8"))
    assert issubclass(VideoFormatError, MediaPolicyError) and issubclass(VideoFormatError, VideoError)
    assert MediaPolicy.strict().video_formats == MediaPolicy().video_formats == media_mod.SINGLE_FILE_VIDEO_FORMATS


# ---------------------------------------------------------------------------------------------- item 15: caller objects
class _BrokenImage(PIL.Image.Image):
    """A caller's image whose pixels cannot be read."""

    @property
    def __array_interface__(self):
        raise ValueError("pixel access failed")


def test_broken_caller_image_is_an_image_error(proc):
    broken = PIL.Image.new("RGB", (16, 16))
    broken.__class__ = _BrokenImage
    good = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ImageError, match=r"^image 1: cannot read the pixels of image PIL image mode RGB size "
                                         r"\(16, 16\): ValueError: pixel access failed$"):
        proc(text=IMG * 2, images=[good, broken])
    assert proc(text=IMG, images=[good]).num_patches == [1]  # the processor is fine afterwards


# ------------------------------------------------------------------------------------------------ NUL bytes in paths
def test_nul_byte_in_a_path(tmp_path, proc):
    for src in (str(tmp_path / "a\0b.png"), "file://" + str(tmp_path) + "/a%00b.png"):
        with pytest.raises(MediaPolicyError, match=r"is not a valid path: it contains a NUL byte"):
            load_image(src)
        with pytest.raises(MediaPolicyError, match=r"^image 0: image file .*NUL byte"):
            proc(text=IMG, images=[src])
        with pytest.raises(MediaPolicyError, match=r"^video 0: video file .*NUL byte"):
            proc(text="<video>", videos=[src])


# ------------------------------------------------------------------------------------------------ item 17: IPv6
def _teredo(server: str, client: str) -> str:
    s, c = int(ipaddress.IPv4Address(server)), int(ipaddress.IPv4Address(client))
    return str(ipaddress.IPv6Address((0x20010000 << 96) | (s << 64) | (0x8000 << 48) | (0x1234 << 32)
                                     | (c ^ 0xFFFFFFFF)))


@pytest.mark.parametrize("addr", [
    "64:ff9b::7f00:1", "64:ff9b::a00:1", "64:ff9b::a9fe:a9fe",  # NAT64 to loopback, 10/8, the metadata address
    "64:ff9b:1::a00:1",  # local-use NAT64
    "2002:7f00:1::1", "2002:c0a8:101::1",  # 6to4 of 127.0.0.1, 192.168.1.1
    "::127.0.0.1", "::10.0.0.1",  # IPv4-compatible
    "::ffff:0:127.0.0.1", "::ffff:0:a00:1",  # SIIT
    "::ffff:127.0.0.1", "::ffff:169.254.169.254",  # IPv4-mapped
    _teredo("65.54.227.120", "10.0.0.1"), _teredo("127.0.0.1", "8.8.8.8"),
])
def test_ipv6_carrying_a_private_ipv4_is_not_public(addr, monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", lambda *a: pytest.fail(f"connected to {a}"))
    with pytest.raises(MediaPolicyError, match=r"resolves to \S+, which is not a public address "
                                               r"\(media_policy\.allow_private_networks is False\)"):
        load_image(f"http://[{addr}]/x.png", MediaPolicy.strict())
    assert not media_mod.is_public_address(ipaddress.ip_address(addr))


@pytest.mark.parametrize("addr", ["64:ff9b::808:808", "::ffff:8.8.8.8", "2606:4700:4700::1111", "8.8.8.8"])
def test_public_addresses_stay_public(addr):
    assert media_mod.is_public_address(ipaddress.ip_address(addr))


# ------------------------------------------------------------------------------------------------ item 7: deadline
class _Trickler:
    """A loopback server that answers every request by sending `head` at once, then one byte of `trickle` every
    50 ms (for at least 120 s), each byte well within any per-read timeout."""

    def __init__(self, head: bytes, trickle: bytes):
        self.head, self.trickle = head, trickle
        self.stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(self.head)
                for b in self.trickle[:2400]:
                    if self.stop.wait(0.05):
                        return
                    conn.sendall(bytes([b]))
            except OSError:
                pass  # the client gave up, as it should

    def close(self):
        self.stop.set()
        self.sock.close()


@pytest.mark.parametrize("head, trickle", [
    (b"", b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 3000),  # the status line
    (b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n", b"X-Pad: " + b"a" * 3000),  # the headers
    (b"HTTP/1.1 302 Found\r\n", b"Location: /next\r\n" + b"X-Pad: " + b"a" * 3000),  # a redirect's headers
])
def test_one_deadline_covers_status_line_and_headers(head, trickle):
    srv = _Trickler(head, trickle)
    result = []

    def fetch():
        try:
            load_image(f"http://127.0.0.1:{srv.port}/x.png", MediaPolicy(fetch_timeout_s=1.0))
        except Exception as e:
            result.append(e)

    t = threading.Thread(target=fetch, daemon=True)
    try:
        t.start()
        # a hang guard: the old per-read timeout let this run for the server's 120 s, which no load can shorten
        t.join(90)
        assert not t.is_alive(), "the fetch outlived its 1 s budget by 89 s"
    finally:
        srv.close()
    assert len(result) == 1 and isinstance(result[0], MediaTimeoutError), result
    assert "took longer than 1.0 s (media_policy.fetch_timeout_s)" in str(result[0])


def test_host_lookup_is_within_the_deadline(monkeypatch):
    real = socket.getaddrinfo

    def slow(host, *a, **k):
        if host == "slow-dns.test":
            time.sleep(3)
            return real("127.0.0.1", *a, **k)
        return real(host, *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    with pytest.raises(MediaTimeoutError, match=r"took longer than 0.5 s"):
        load_image("http://slow-dns.test:9/x.png", MediaPolicy(fetch_timeout_s=0.5))



# ------------------------------------------------------------------------------------------------ item 5: video bloat
def _rss_peak_reset() -> bool:
    """Resets this process's peak RSS (VmHWM) to its current RSS; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def test_video_frames_are_resized_as_they_are_decoded(tmp_path, proc, monkeypatch):
    """Each sampled frame is resized to video_size as soon as it is decoded, so a request holds one full-size frame
    rather than all of them (16 of 3000 x 3000 were 432 MB, and the strict policy's 64 of 50 MP 9.6 GB); the
    pixels are those of preprocessing load_video's full frames."""
    av = pytest.importorskip("av")
    side, n = 3000, 16
    ramp = np.broadcast_to((np.arange(side, dtype=np.uint16) * 255 // side)[None, :, None], (side, side, 3))
    clip = str(tmp_path / "big.mp4")
    with av.open(clip, "w") as c:
        s = c.add_stream("mpeg4", rate=12)
        s.width, s.height, s.pix_fmt = side, side, "yuv420p"
        for i in range(n):
            f = av.VideoFrame.from_ndarray(((ramp + 16 * i) % 256).astype(np.uint8), format="rgb24")
            for pkt in s.encode(f):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    # every full-size frame decoded, tracked while it lives (PyAV's arrays and torch's are not seen by tracemalloc)
    refs, most_live = [], [0]
    real = video_mod._frame_to_rgb

    def tracked(frame):
        rgb = real(frame)
        refs.append(weakref.ref(rgb))
        most_live[0] = max(most_live[0], sum(r() is not None for r in refs))
        return rgb

    monkeypatch.setattr(video_mod, "_frame_to_rgb", tracked)
    proc.media_policy = MediaPolicy.strict(local_media_root=tmp_path)
    rss = _rss_peak_reset() and _rss_kb("VmRSS")
    enc = proc(text="<video>", videos=[clip], num_frames=n)
    grew = rss and (_rss_kb("VmHWM") - rss) << 10
    assert enc.num_patches == [1] * n
    assert most_live[0] <= 2, f"{most_live[0]} full-size frames of {side} x {side} held at once"
    frame = side * side * 3  # 27 MB
    if rss:  # the old code peaked over 1.2 GB here: the frames, their stack and its torch copy
        assert grew < 12 * frame, f"peak RSS grew {grew / 2**20:.0f} MB for {n} frames of {frame / 2**20:.0f} MB"
    monkeypatch.setattr(video_mod, "_frame_to_rgb", real)
    full = load_video(clip, n)
    assert len(full) == n and full[0].shape == (side, side, 3)
    want = preprocess_video(full, size=proc.video_size, mean=proc.video_mean, std=proc.video_std)
    del full
    assert torch.equal(enc.pixel_values, want)


# ------------------------------------------------------------------------------------------------ local image bytes
def test_local_image_file_over_the_byte_cap_is_refused_before_reading(tmp_path, proc):
    """Under --allowed-local-media-path a caller names the files: one naming a 1 GiB file as an image made the
    server read all of it (RSS +1 GB, 5 s) before Pillow said it was no image."""
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.write(_gray_png(4, 4))
        f.truncate(1 << 30)  # sparse: no disk used
    strict = MediaPolicy.strict(local_media_root=tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(MediaTooLargeError, match=r"is 1073741824 bytes, over the 20971520-byte limit "
                                                     r"\(media_policy\.max_download_bytes\)"):
            load_image(str(big), strict)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
    proc.media_policy = strict
    with pytest.raises(MediaTooLargeError, match=r"^image 0: image file .*max_download_bytes"):
        proc(text=IMG, images=[str(big)])
    small = tmp_path / "small.png"
    small.write_bytes(_gray_png(4, 4))
    assert load_image(str(small), strict).size == (4, 4)  # under the cap: read as before
