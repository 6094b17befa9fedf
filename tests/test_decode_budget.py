"""Decoding within a memory budget (issue #21).

Found in a security probe: a 335-byte JPEG whose header declares 19000x19000 (under ``data.max_pixels``)
was decoded by libjpeg into a blank 361-Mpx image (1.4 GB peak) and kept in the dataset; an 875 KB
15000x15000 RGBA PNG of zeros cost 3.0 GB. Both are refused from their header now: the JPEG as
``truncated`` (its scan cannot code 5.6 M blocks in 3 bytes), the PNG as ``decode_budget`` (900 MB
decoded > ``data.max_decoded_mb``). The bombs are built here without the test ever holding their
pixels; the memory figures come from fresh subprocesses.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageFile

from helpers import REPO, demo_config
from medisyn.data import images
from medisyn.data.decode import DECODED_SHARE_OF_WORKER_MEMORY, decode_samples, max_decoded_bytes, worker_memory_share
from medisyn.data.preprocess import preprocess, worker_settings
from medisyn.data.quarantine import Quarantine

BUDGET_MB = 256  # the limit these tests set: under the PNG bomb's 858 MiB, far above a normal image


def _jpeg(arr: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", **save)
    return buf.getvalue()


def _png(arr: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **save)
    return buf.getvalue()


def jpeg_bomb(w: int = 19_000, h: int = 19_000, colour: bool = False) -> bytes:
    """A valid 16x16 grey (or colour) JPEG whose SOF0 is patched to declare w x h: ~330 bytes."""
    data = _jpeg(np.full((16, 16, 3) if colour else (16, 16), 128, np.uint8))
    sof = data.index(b"\xff\xc0")  # SOF0: marker(2) length(2) precision(1) height(2) width(2)
    return data[: sof + 5] + struct.pack(">HH", h, w) + data[sof + 9 :]


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_zeros(w: int, h: int, colour_type: int = 6, channels: int = 4) -> bytes:
    """A complete, valid w x h 8-bit PNG of zeros (RGBA by default), deflated row by row: the test never
    holds more than one scanline (15000x15000 RGBA: 900 MB of scanlines -> 875 KB, deflate's ~1030:1)."""
    deflate = zlib.compressobj(9)
    row = bytes(1 + channels * w)  # filter byte 0, then the row's samples
    idat = b"".join(deflate.compress(row) for _ in range(h)) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    return images.PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    """The two probe files, written once per module (the PNG takes ~3 s to deflate)."""
    root = tmp_path_factory.mktemp("bombs")
    files = {"jpeg_bomb.jpg": jpeg_bomb(), "png_bomb.png": png_zeros(15_000, 15_000)}
    for name, data in files.items():
        (root / name).write_bytes(data)
    return {name: root / name for name in files}


# (file, quarantine reason, what its detail must name)
EXPECTED = {
    "jpeg_bomb.jpg": ("truncated", ["19000x19000", "5,640,625 blocks", "705,079 bytes"]),
    "png_bomb.png": ("decode_budget", ["15000x15000", "RGBA", "900,000,000 bytes", f"{BUDGET_MB} MiB"]),
}


def _settings(tmp_path: Path, overrides: list[str] | None = None) -> dict:
    return worker_settings(demo_config(tmp_path / "cfg", ["data.resolution=64", *(overrides or [])]))


# ---------------------------------------------------------------------------------------------- the probe files
def test_bombs_are_what_the_probe_found(bombs, tmp_path):
    jpeg, png = bombs["jpeg_bomb.jpg"].read_bytes(), bombs["png_bomb.png"].read_bytes()
    assert len(jpeg) < 400 and len(png) < 900_000
    for data, size, mode in ((jpeg, (19_000, 19_000), "L"), (png, (15_000, 15_000), "RGBA")):
        img = Image.open(io.BytesIO(data))  # header only
        assert (img.size, img.mode) == (size, mode)
        assert img.size[0] * img.size[1] < demo_config(tmp_path).data.max_pixels  # max_pixels lets both in


@pytest.mark.parametrize("name", list(EXPECTED))
def test_decode_refuses_each_bomb_with_its_reason(bombs, tmp_path, name):
    reason, named = EXPECTED[name]
    settings = _settings(tmp_path, [f"data.max_decoded_mb={BUDGET_MB}"])
    with pytest.raises(Quarantine) as q:
        decode_samples(bombs[name].read_bytes(), name, {}, settings)
    assert (q.value.stage, q.value.reason) == ("decode", reason)
    for text in named:
        assert text in q.value.detail, q.value.detail


def test_truncated_jpeg_is_refused_whatever_the_budget(bombs, tmp_path):
    """The JPEG's 361 MB would fit any budget: it is its missing data that refuses it, before decoding."""
    settings = _settings(tmp_path, ["data.max_decoded_mb=100000"])
    with pytest.raises(Quarantine) as q:
        decode_samples(bombs["jpeg_bomb.jpg"].read_bytes(), "x.jpg", {}, settings)
    assert q.value.reason == "truncated"
    with pytest.raises(Quarantine) as q:
        decode_samples(jpeg_bomb(colour=True), "x.jpg", {}, settings)
    assert q.value.reason == "truncated" and "[1, 2, 3]" in q.value.detail  # the colour variant: 1.4 GB as RGBX


NORMAL = {
    "grey.png": lambda: _png(np.random.default_rng(0).integers(0, 256, (300, 200)).astype(np.uint8)),
    "rgba.png": lambda: _png(np.random.default_rng(1).integers(0, 256, (128, 96, 4)).astype(np.uint8)),
    "16bit.png": lambda: _png((np.arange(200 * 150).reshape(200, 150) * 3).astype(np.uint16)),
    "zeros.png": lambda: png_zeros(1500, 1000),  # compressed as far as deflate goes: still whole
    "grey.jpg": lambda: _jpeg(np.random.default_rng(2).integers(0, 256, (256, 320)).astype(np.uint8)),
    "rgb.jpg": lambda: _jpeg(np.random.default_rng(3).integers(0, 256, (200, 200, 3)).astype(np.uint8)),
    "white.jpg": lambda: _jpeg(np.full((2048, 2048), 255, np.uint8), quality=1, optimize=True),
    "progressive.jpg": lambda: _jpeg(np.full((1024, 768, 3), 200, np.uint8), progressive=True, optimize=True),
}


@pytest.mark.parametrize("name", list(NORMAL))
def test_normal_images_still_decode(tmp_path, name):
    samples, _ = decode_samples(NORMAL[name](), name, {}, _settings(tmp_path, [f"data.max_decoded_mb={BUDGET_MB}"]))
    assert len(samples) == 1 and samples[0][1].dtype == np.uint8


# ---------------------------------------------------------------------------------------------- a preprocessing run
def test_preprocess_run_quarantines_the_bombs_and_keeps_the_rest(bombs, tmp_path, ray_local):
    zone = tmp_path / "zone"
    t = zone / "t"
    t.mkdir(parents=True)
    good = {f"good{i}.png": _png(np.random.default_rng(10 + i).integers(0, 256, (40, 48)).astype(np.uint8))
            for i in range(4)}
    good["good.jpg"] = NORMAL["rgb.jpg"]()
    good["zeros.png"] = NORMAL["zeros.png"]()
    for name, data in good.items():
        (t / name).write_bytes(data)
    for name, path in bombs.items():
        (t / name).write_bytes(path.read_bytes())
    names = [*good, *bombs]
    (t / "labels.csv").write_text("file,label\n" + "".join(f"{n},{'ab'[i % 2]}\n" for i, n in enumerate(names)))
    catalog = {"sources": {"t": {"prefix": "t", "specialty": "misc", "image_type": "files",
                                 "caption_template": "File image of {label}.", "labels_table": "labels.csv",
                                 "label_map": {"a": "class a", "b": "class b"}}}}
    (zone / "catalog.yaml").write_text(yaml.safe_dump(catalog))
    cfg = demo_config(tmp_path, ["data.resolution=64", "data.max_error_rate=0.5", "data.ray_batch_size=2",
                                 f"data.max_decoded_mb={BUDGET_MB}"])
    result = preprocess(cfg, str(zone), str(tmp_path / "dataset"))
    rejected = [json.loads(x) for x in (tmp_path / "dataset" / "rejected.jsonl").read_text().splitlines()]
    assert {r["path"]: r["reason"] for r in rejected} == {f"t/{n}": EXPECTED[n][0] for n in bombs}
    for r in rejected:
        assert all(text in r["detail"] for text in EXPECTED[r["path"][2:]][1]), r
    assert result.n_images + result.n_duplicates == len(good)


# ---------------------------------------------------------------------------------------------- bounded memory
_RSS_SCRIPT = """
import re, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a regression fails here instead of taking 3 GB
from medisyn.data.decode import decode_samples
from medisyn.data.quarantine import Quarantine
data = open(sys.argv[1], "rb").read()
settings = {{"max_pixels": 20_000 * 20_000, "max_decoded_mb": {budget}, "rule_defaults": {{}}}}
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode_samples(data, sys.argv[1], {{}}, settings)
    reason = "decoded"
except Quarantine as q:
    reason = q.reason
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
# ru_maxrss survives exec, so it starts at the forking test process's size: the process's own peak is VmHWM
hwm_kb = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
print(reason, hwm_kb // 1024, (peak - base) // 1024)
"""


@pytest.mark.parametrize("name", list(EXPECTED))
def test_refusing_a_bomb_costs_bounded_memory(bombs, name):
    """In a fresh process that imports the decoder and refuses one bomb: peak RSS < 300 MB in all
    (VmHWM; 143 MB measured, the imports), ru_maxrss < 50 MB over the imports (0 measured). Before
    issue #21 the same decode peaked at 1.4 GB (the JPEG), 4.9 GB (its colour variant) and 3.0 GB (the PNG)."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(_RSS_SCRIPT.format(budget=BUDGET_MB)),
                          str(bombs[name])], capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert out.returncode == 0, out.stderr[-3000:]
    reason, peak_mb, grew_mb = out.stdout.split()
    print(f"{name}: {reason}, peak RSS {peak_mb} MB, ru_maxrss {grew_mb} MB over the imports")
    assert reason == EXPECTED[name][0]
    assert int(peak_mb) < 300 and int(grew_mb) < 50, out.stdout


# ---------------------------------------------------------------------------------------------- the checks one by one
def test_png_shortfall_is_the_deflate_bound():
    """IDAT must hold 1/1032 of the scanlines: the 2000x2000 zeros deflate to ~3.9 KB, 1 KB is too little."""
    whole = png_zeros(2000, 2000, colour_type=0, channels=1)
    assert images.png_shortfall(whole) is None
    short = (images.PNG_SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", 2000, 2000, 8, 0, 0, 0, 0))
             + _chunk(b"IDAT", zlib.compress(bytes(1024))) + _chunk(b"IEND", b""))
    detail = images.png_shortfall(short)
    assert detail and "2000x2000" in detail and "3,878 bytes" in detail, detail
    with pytest.raises(images.TruncatedImageError):
        images.open_image(short, 10**8)


@pytest.mark.parametrize("save", [{}, {"optimize": True}, {"progressive": True}, {"subsampling": 0},
                                  {"subsampling": 2, "quality": 5}, {"restart_marker_blocks": 1}])
@pytest.mark.parametrize("content", ["noise", "constant"])
def test_jpeg_shortfall_passes_whole_files(save, content):
    """Constant images are the most compressible case (sequential: two bits a block, progressive DC
    scans: one): they must pass, as must every PIL encoder option."""
    shape = (520, 776, 3)
    arr = (np.random.default_rng(0).integers(0, 256, shape) if content == "noise" else np.full(shape, 7)).astype(
        np.uint8)
    for a in (arr, arr[..., 0]):
        assert images.jpeg_shortfall(_jpeg(a, **save)) is None, save


def test_jpeg_cut_short_then_closed_is_refused_before_decoding():
    """libjpeg pads a scan that ends early and PIL keeps the image: the header check is the guard."""
    data = _jpeg(np.random.default_rng(4).integers(0, 256, (1024, 1024)).astype(np.uint8))
    sos = data.index(b"\xff\xda")
    cut = data[: sos + 200] + b"\xff\xd9"  # the scan's first bytes, then end of image
    img = Image.open(io.BytesIO(cut))
    img.load()  # PIL alone "succeeds": the rest of the image is grey
    detail = images.jpeg_shortfall(cut)
    assert detail and "1024x1024" in detail, detail
    no_scan = data[:sos] + b"\xff\xd9"
    assert "before a scan codes component(s) [1]" in (images.jpeg_shortfall(no_scan) or "")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_file_that_ends_early_is_truncated_even_if_pil_was_told_to_load_it(fmt, monkeypatch):
    """A file cut off (no end marker) is caught by the decoder; a library that turned PIL's
    LOAD_TRUNCATED_IMAGES on does not change that, and the flag is restored afterwards."""
    arr = np.random.default_rng(5).integers(0, 256, (200, 200, 3)).astype(np.uint8)
    data = (_jpeg if fmt == "JPEG" else _png)(arr)
    cut = data[: len(data) * 9 // 10]
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    img = images.open_image(cut, 10**8, 10**8)
    with pytest.raises(images.TruncatedImageError, match="truncated"):
        images.load_pixels(img)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


@pytest.mark.parametrize("mode,bytes_per_pixel", [("1", 1), ("L", 1), ("P", 4), ("I;16", 2), ("LA", 4), ("RGB", 4),
                                                  ("RGBA", 4), ("I", 4), ("F", 4), ("CMYK", 4)])
def test_decoded_bytes_is_pils_storage(mode, bytes_per_pixel):
    """PIL keeps RGB as four bytes a pixel (RGBX): loading the colour 19000x19000 JPEG took 1.4 GB, not 1.08."""
    assert images.decoded_bytes(Image.new(mode, (3, 5))) == 15 * bytes_per_pixel


def test_budget_check_names_size_bytes_and_limit():
    data = _png(np.zeros((100, 120, 4), np.uint8))
    assert images.open_image(data, 10**8, 48_000) is not None
    with pytest.raises(images.DecodeBudgetError, match=r"120x100 RGBA decodes to 48,000 bytes .* limit of 47,999"):
        images.open_image(data, 10**8, 47_999)


# ---------------------------------------------------------------------------------------------- the derived limit
def test_derived_limit_is_a_fifth_of_the_worker_share():
    assert max_decoded_bytes({"max_decoded_mb": None}) == int(worker_memory_share() * DECODED_SHARE_OF_WORKER_MEMORY)
    assert max_decoded_bytes({"max_decoded_mb": 300}) == 300 << 20


@pytest.mark.parametrize("files,memory,cpus", [
    ({"memory.max": "1073741824\n", "cpu.max": "200000 100000\n"}, 1 << 30, 2),  # cgroup v2: 1 GiB, 2 CPUs
    ({"memory/memory.limit_in_bytes": "536870912\n", "cpu/cpu.cfs_quota_us": "150000\n",
      "cpu/cpu.cfs_period_us": "100000\n"}, 1 << 29, 2),  # cgroup v1: 512 MiB, 1.5 CPUs (-> 2)
    ({"memory.max": "max\n", "cpu.max": "max 100000\n", "cpu/cpu.cfs_quota_us": "-1\n"}, None, None),  # no limits
])
def test_worker_share_reads_the_container_limits(tmp_path, files, memory, cpus):
    """Memory: the container's limit when below the machine's; CPUs: its quota when below the affinity."""
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    machine = worker_memory_share(tmp_path / "absent")  # no cgroup files: the machine's memory / CPUs
    if memory is None:
        assert worker_memory_share(tmp_path) == machine
    else:
        assert worker_memory_share(tmp_path) == memory // min(cpus, len(os.sched_getaffinity(0)))
