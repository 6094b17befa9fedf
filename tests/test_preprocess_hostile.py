"""Hostile input in the landing zone (issue 12, the urgent part): nothing outside the zone is ever
opened (symlinks, ``..`` and absolute paths, FIFOs and devices), labels tables with invalid UTF-8 or
control characters are quarantined row by row, and compressed images whose declared size (PIL header,
DICOM header, or the JPEG / JPEG 2000 codestream inside an encapsulated DICOM) exceeds
``data.max_pixels`` are refused before any pixel is decoded. Each case is a quarantine record with a
reason; the run goes on."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from helpers import REPO, S3_BUCKET, demo_config, jpeg_baseline_bytes, make_dataset, to_bytes
from medisyn import storage
from medisyn.catalog import load_catalog
from medisyn.data.preprocess import list_inputs, preprocess, process_task, worker_settings

LM = {"a": "class a", "b": "class b"}


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _grey(seed: int, h: int = 40, w: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w)).astype(np.uint8)


def _png_bomb(w: int = 30_000, h: int = 30_000) -> bytes:
    """A ~100-byte PNG whose IHDR declares w x h 8-bit greyscale pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
            + chunk(b"IEND", b""))


def _jpeg_dicom_bomb(w: int = 30_000, h: int = 30_000) -> bytes:
    """JPEG baseline in DICOM: the header says 64x64, the codestream's SOF0 says w x h."""
    data, _ = jpeg_baseline_bytes(np.full((64, 64), 128, np.uint8))
    sof = data.index(b"\xff\xc0")
    # SOF0: marker(2) length(2) precision(1) height(2) width(2)
    patched = data[: sof + 5] + struct.pack(">HH", h, w) + data[sof + 9 :]
    assert len(patched) == len(data)
    return patched


def _j2k_dicom_bomb(w: int = 30_000, h: int = 30_000) -> bytes:
    """JPEG 2000 lossless in DICOM: the header says 64x64, the codestream's SIZ says w x h."""
    from pydicom.uid import JPEG2000Lossless

    raw = np.full((64, 64), 77, np.uint8)
    ds = make_dataset(raw, modality="OT", slope=None, intercept=None)
    data = to_bytes(ds, JPEG2000Lossless)
    siz = data.index(b"\xff\x4f\xff\x51") + 2
    # SIZ: marker(2) Lsiz(2) Rsiz(2) Xsiz(4) Ysiz(4) XOsiz(4) YOsiz(4) XTsiz(4) YTsiz(4)
    patched = data[: siz + 6] + struct.pack(">II", w, h) + data[siz + 14 : siz + 22] + struct.pack(">II", w, h) + \
        data[siz + 30 :]
    assert len(patched) == len(data)
    return patched


def _catalog(root: Path, sources: dict) -> None:
    base = {"specialty": "misc", "image_type": "files", "caption_template": "File image of {label}.",
            "label_map": LM}
    cat = {"sources": {name: {**base, "prefix": name, **s} for name, s in sources.items()}}
    (root / "catalog.yaml").write_text(yaml.safe_dump(cat))


def _reasons(rejected: list[dict]) -> dict[str, str]:
    return {r["path"]: r["reason"] for r in rejected}


def _settings(tmp_path: Path, overrides: list[str] | None = None) -> dict:
    return worker_settings(demo_config(tmp_path / "cfg", ["data.resolution=64", *(overrides or [])]))


# ---------------------------------------------------------------------------------------------- 1. outside the zone
@pytest.fixture()
def hostile_zone(tmp_path):
    """A landing zone with a labels-table source ``t`` and a folder-per-class source ``f``, each holding
    good files beside symlinks (to a file outside, /etc/passwd, /dev/zero, a directory outside),
    a FIFO, and (in the table) ``..`` and absolute paths."""
    zone, outside = tmp_path / "zone", tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(_png(_grey(99)))
    (outside / "dir").mkdir()
    (outside / "dir" / "x.png").write_bytes(_png(_grey(98)))
    t = zone / "t"
    (t / "sub").mkdir(parents=True)
    (t / "good.png").write_bytes(_png(_grey(1)))
    (t / "sub" / "good2.png").write_bytes(_png(_grey(2)))
    (t / "link_out.png").symlink_to(outside / "secret.png")
    (t / "passwd.png").symlink_to("/etc/passwd")
    (t / "zero.png").symlink_to("/dev/zero")
    (t / "dirlink").symlink_to(outside / "dir")
    (t / "inner_link.png").symlink_to(t / "good.png")  # even a link that stays inside is refused
    os.mkfifo(t / "fifo.png")
    rows = [("good.png", "a"), ("sub/good2.png", "b"), ("./sub/good2.png", "b"), ("link_out.png", "a"),
            ("passwd.png", "a"), ("zero.png", "a"), ("dirlink/x.png", "a"), ("inner_link.png", "a"),
            ("fifo.png", "a"), ("../outside/secret.png", "a"), ("sub/../../outside/secret.png", "a"),
            ("/etc/passwd", "a"), ("/dev/zero", "b"), (str(outside / "secret.png"), "a")]
    pd.DataFrame(rows, columns=["file", "label"]).to_csv(t / "labels.csv", index=False)
    f = zone / "f"
    (f / "a").mkdir(parents=True)
    (f / "b").mkdir()
    (f / "a" / "good.png").write_bytes(_png(_grey(3)))
    (f / "b" / "good.png").write_bytes(_png(_grey(4)))
    (f / "a" / "passwd.png").symlink_to("/etc/passwd")
    (f / "b" / "zero.png").symlink_to("/dev/zero")
    (f / "b" / "outdir").symlink_to(outside / "dir")
    os.mkfifo(f / "a" / "fifo.png")
    _catalog(zone, {"t": {"labels_table": "labels.csv"}, "f": {"labels_table": None}})
    return zone


EXPECTED_OUTSIDE = {
    "t/link_out.png": "symlink",
    "t/passwd.png": "symlink",
    "t/zero.png": "symlink",
    "t/dirlink/x.png": "symlink",
    "t/inner_link.png": "symlink",
    "t/fifo.png": "not_a_regular_file",
    "t/../outside/secret.png": "outside_landing_zone",
    "t/sub/../../outside/secret.png": "outside_landing_zone",
    "t//etc/passwd": "outside_landing_zone",
    "t//dev/zero": "outside_landing_zone",
    "f/a/passwd.png": "symlink",
    "f/b/zero.png": "symlink",
    "f/b/outdir": "symlink",
    "f/a/fifo.png": "not_a_regular_file",
}


def test_listing_refuses_everything_outside_the_zone(hostile_zone, tmp_path):
    catalog = load_catalog(str(hostile_zone / "catalog.yaml"))
    tasks, rejected = list_inputs(catalog, storage.normalize(hostile_zone), "salt")
    reasons = _reasons(rejected)
    absolute_secret = "t/" + str(tmp_path / "outside" / "secret.png")
    assert reasons.pop(absolute_secret) == "outside_landing_zone"
    assert reasons == EXPECTED_OUTSIDE
    assert sorted(t["path"] for t in tasks) == ["f/a/good.png", "f/b/good.png", "t/good.png", "t/sub/good2.png",
                                                "t/sub/good2.png"]
    for r in rejected:
        assert r["stage"] == "list" and r["detail"]


@pytest.fixture()
def alarm():
    """Fail (instead of hanging the suite) if a test blocks, e.g. on a FIFO."""

    def on_alarm(signum, frame):
        raise TimeoutError("blocked: a FIFO or device was opened")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("swap", ["symlink_out", "symlink_passwd", "fifo", "symlink_dir", "device"])
def test_worker_refuses_a_file_swapped_after_listing(hostile_zone, tmp_path, alarm, swap):
    """Time of check vs time of use: the worker opens component by component without following links
    and checks the file type on the open descriptor, so a file replaced after listing is refused too."""
    catalog = load_catalog(str(hostile_zone / "catalog.yaml"))
    tasks, _ = list_inputs(catalog, storage.normalize(hostile_zone), "salt")
    task = next(t for t in tasks if t["path"] == "t/sub/good2.png")
    target = hostile_zone / "t" / "sub" / "good2.png"
    if swap == "symlink_dir":
        (hostile_zone / "t" / "sub").rename(hostile_zone / "t" / "sub_moved")
        (hostile_zone / "t" / "sub").symlink_to(hostile_zone / "t" / "sub_moved")
    else:
        target.unlink()
        if swap == "symlink_out":
            target.symlink_to(tmp_path / "outside" / "secret.png")
        elif swap == "symlink_passwd":
            target.symlink_to("/etc/passwd")
        elif swap == "fifo":
            os.mkfifo(target)
        else:  # a device node cannot be made without privileges: a symlink to one is the hostile case
            target.symlink_to("/dev/zero")
    (row,) = process_task(task, _settings(tmp_path))
    assert row["status"] == "rejected"
    assert row["reason"] == ("not_a_regular_file" if swap == "fifo" else "symlink"), row


def test_worker_reads_regular_files_inside(hostile_zone, tmp_path):
    catalog = load_catalog(str(hostile_zone / "catalog.yaml"))
    tasks, _ = list_inputs(catalog, storage.normalize(hostile_zone), "salt")
    for task in tasks:
        rows = process_task(task, _settings(tmp_path))
        assert [r["status"] for r in rows] == ["ok"], rows


def test_preprocess_run_goes_on_and_quarantines(tmp_path, ray_local):
    """One end-to-end run over every hostile class at once (outside-zone entries, bombs, bad tables):
    it finishes, the good files are in the dataset, every hostile one is in rejected.jsonl."""
    zone = tmp_path / "zone"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(_png(_grey(99)))
    t = zone / "t"
    t.mkdir(parents=True)
    for i in range(6):
        (t / f"good{i}.png").write_bytes(_png(_grey(10 + i)))
    (t / "link_out.png").symlink_to(outside / "secret.png")
    (t / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(t / "fifo.png")
    (t / "bomb.png").write_bytes(_png_bomb())
    (t / "jpeg_bomb.dcm").write_bytes(_jpeg_dicom_bomb())
    (t / "j2k_bomb.dcm").write_bytes(_j2k_dicom_bomb())
    (t / "empty.png").write_bytes(b"")
    (t / "text.png").write_bytes(b"not an image at all\n")
    lines = ["file,label"] + [f"good{i}.png,{'ab'[i % 2]}" for i in range(6)]
    lines += ["link_out.png,a", "zero.png,a", "fifo.png,a", "../outside/secret.png,a", "/etc/passwd,a",
              "bomb.png,a", "jpeg_bomb.dcm,a", "j2k_bomb.dcm,a", "empty.png,a", "text.png,a"]
    body = ("\n".join(lines) + "\n").encode() + b"bad\xff\xfe.png,a\n" + b"ctl\x07.png,a\n"
    (t / "labels.csv").write_bytes(body)
    _catalog(zone, {"t": {"labels_table": "labels.csv"}})
    cfg = demo_config(tmp_path, ["data.resolution=64", "data.max_error_rate=0.9", "data.ray_batch_size=4"])
    result = preprocess(cfg, str(zone), str(tmp_path / "dataset"))
    assert result.n_images == 6
    rejected = [json.loads(x) for x in (tmp_path / "dataset" / "rejected.jsonl").read_text().splitlines()]
    reasons = _reasons(rejected)
    assert reasons["t/link_out.png"] == "symlink"
    assert reasons["t/zero.png"] == "symlink"
    assert reasons["t/fifo.png"] == "not_a_regular_file"
    assert reasons["t/../outside/secret.png"] == "outside_landing_zone"
    assert reasons["t//etc/passwd"] == "outside_landing_zone"
    for name in ("bomb.png", "jpeg_bomb.dcm", "j2k_bomb.dcm"):
        assert reasons[f"t/{name}"] == "decompression_bomb", name
    assert reasons["t/empty.png"] in ("empty_file", "unsupported_format")
    assert reasons["t/text.png"] == "unsupported_format"
    assert reasons["t/labels.csv#line=18"] == "invalid_utf8"
    assert reasons["t/labels.csv#line=19"] == "control_characters"
    assert len(rejected) == 12


def test_s3_zone_refuses_dotdot_and_absolute_keys(tmp_path, s3_endpoint):
    zone = f"s3://{S3_BUCKET}/hostile-zone"
    storage.write_bytes(f"{zone}/t/good.png", _png(_grey(1)))
    storage.write_bytes(f"{zone}/outside.png", _png(_grey(2)))
    table = "file,label\ngood.png,a\n../outside.png,a\n/outside.png,a\nx/../good.png,b\n"
    storage.write_bytes(f"{zone}/t/labels.csv", table.encode())
    base = {"specialty": "misc", "image_type": "files", "caption_template": "File image of {label}.",
            "label_map": LM}
    storage.write_bytes(f"{zone}/catalog.yaml",
                        yaml.safe_dump({"sources": {"t": {**base, "prefix": "t"}}}).encode())
    catalog = load_catalog(f"{zone}/catalog.yaml")
    tasks, rejected = list_inputs(catalog, zone, "salt")
    assert [t["path"] for t in tasks] == ["t/good.png"]
    assert _reasons(rejected) == {"t/../outside.png": "outside_landing_zone", "t//outside.png": "outside_landing_zone",
                                  "t/x/../good.png": "outside_landing_zone"}
    (row,) = process_task(tasks[0], _settings(tmp_path))
    assert row["status"] == "ok"


# ---------------------------------------------------------------------------------------------- 2. labels tables
def _table_zone(tmp_path: Path, body: bytes) -> Path:
    zone = tmp_path / "zone"
    t = zone / "t"
    t.mkdir(parents=True)
    for name in ("one.png", "two.png", "three.png"):
        (t / name).write_bytes(_png(_grey(len(name))))
    (t / "labels.csv").write_bytes(body)
    _catalog(zone, {"t": {"labels_table": "labels.csv", "patient_id_column": "pid"}})
    return zone


def test_invalid_utf8_row_is_quarantined_with_table_and_line(tmp_path):
    body = b"file,label,pid\none.png,a,p1\ntwo.png,b\xff\xfe,p2\nthree.png,a,p3\n"
    zone = _table_zone(tmp_path, body)
    tasks, rejected = list_inputs(load_catalog(str(zone / "catalog.yaml")), storage.normalize(zone), "salt")
    assert sorted(t["path"] for t in tasks) == ["t/one.png", "t/three.png"]
    (r,) = rejected
    assert r["path"] == "t/labels.csv#line=3" and r["reason"] == "invalid_utf8"
    assert "t/labels.csv" in r["detail"] and "line 3" in r["detail"]


@pytest.mark.parametrize("bad", ["\x07", "\x1b[31m", "\x00", "\u202e", "\x85"])
def test_control_characters_quarantine_the_row(tmp_path, bad):
    body = f"file,label,pid\none.png,a,p1\ntwo.png,b,p{bad}2\nthree{bad}.png,a,p3\n".encode()
    zone = _table_zone(tmp_path, body)
    tasks, rejected = list_inputs(load_catalog(str(zone / "catalog.yaml")), storage.normalize(zone), "salt")
    assert [t["path"] for t in tasks] == ["t/one.png"]
    assert {r["path"]: r["reason"] for r in rejected} == {"t/labels.csv#line=3": "control_characters",
                                                          "t/labels.csv#line=4": "control_characters"}
    assert all("line" in r["detail"] and "t/labels.csv" in r["detail"] for r in rejected)


def test_undecodable_table_is_quarantined_whole(tmp_path):
    zone = _table_zone(tmp_path, b"fi\xffle,label,pid\none.png,a,p1\n")
    tasks, rejected = list_inputs(load_catalog(str(zone / "catalog.yaml")), storage.normalize(zone), "salt")
    assert tasks == []
    (r,) = rejected
    assert r["path"] == "t/labels.csv" and r["reason"] == "invalid_utf8" and "line 1" in r["detail"]


def test_captions_never_carry_control_characters(tmp_path):
    zone = _table_zone(tmp_path, b"file,label,pid\none.png,a,p1\ntwo.png,b,p2\n")
    cat = yaml.safe_load((zone / "catalog.yaml").read_text())
    cat["sources"]["t"]["label_map"] = {"a": "class a", "b": "class\x1b[2J b"}
    (zone / "catalog.yaml").write_text(yaml.safe_dump(cat))
    tasks, rejected = list_inputs(load_catalog(str(zone / "catalog.yaml")), storage.normalize(zone), "salt")
    assert [t["path"] for t in tasks] == ["t/one.png"]
    assert _reasons(rejected) == {"t/two.png": "control_characters"}
    for t in tasks:
        assert t["caption"].isprintable()


def test_labels_table_that_is_a_symlink_or_fifo_is_refused(tmp_path, alarm):
    zone = _table_zone(tmp_path, b"file,label\n")
    (zone / "t" / "labels.csv").unlink()
    os.mkfifo(zone / "t" / "labels.csv")
    tasks, rejected = list_inputs(load_catalog(str(zone / "catalog.yaml")), storage.normalize(zone), "salt")
    assert tasks == [] and _reasons(rejected) == {"t/labels.csv": "not_a_regular_file"}
    (zone / "t" / "labels.csv").unlink()
    (zone / "t" / "labels.csv").symlink_to("/etc/passwd")
    tasks, rejected = list_inputs(load_catalog(str(zone / "catalog.yaml")), storage.normalize(zone), "salt")
    assert tasks == [] and _reasons(rejected) == {"t/labels.csv": "symlink"}


# ---------------------------------------------------------------------------------------------- 3. bombs
def _task(tmp_path: Path, name: str, data: bytes) -> dict:
    zone = tmp_path / "bombzone"
    (zone / "t").mkdir(parents=True, exist_ok=True)
    (zone / "t" / name).write_bytes(data)
    return {"uri": storage.normalize(zone / "t" / name), "zone": str(zone), "path": f"t/{name}", "rel": name,
            "source": "t", "specialty": "misc", "image_type": "files", "caption": "c", "label": "a",
            "patient_hash": "p", "patient_tag": "", "rule": "auto", "rule_params": "{}", "tile_size": 0}


BOMBS = {"png": ("bomb.png", _png_bomb), "jpeg_dicom": ("jpeg_bomb.dcm", _jpeg_dicom_bomb),
         "j2k_dicom": ("j2k_bomb.dcm", _j2k_dicom_bomb)}


@pytest.mark.parametrize("kind", list(BOMBS))
def test_bomb_rejected_before_decoding(tmp_path, kind):
    name, build = BOMBS[kind]
    data = build()
    assert len(data) < 4096
    (row,) = process_task(_task(tmp_path, name, data), _settings(tmp_path))
    assert row["status"] == "rejected" and row["reason"] == "decompression_bomb", row
    assert "30000" in row["detail"]


def test_codestream_larger_than_header_is_refused_even_under_max_pixels(tmp_path):
    """A codestream that declares more pixels than the DICOM header is refused before decoding."""
    (row,) = process_task(_task(tmp_path, "j.dcm", _jpeg_dicom_bomb(2000, 2000)), _settings(tmp_path))
    assert row["reason"] == "decompression_bomb" and "2000x2000" in row["detail"], row


def test_tiff_pages_count_toward_max_pixels(tmp_path):
    pages = [Image.fromarray(_grey(i, 40, 40)) for i in range(4)]
    buf = io.BytesIO()
    pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:])
    (row,) = process_task(_task(tmp_path, "multi.tiff", buf.getvalue()),
                          _settings(tmp_path, ["data.max_pixels=5000"]))
    assert row["reason"] == "decompression_bomb" and "4 frames" in row["detail"], row
    (row,) = process_task(_task(tmp_path, "multi.tiff", buf.getvalue()), _settings(tmp_path))
    assert row["status"] == "ok"


def test_dicom_samples_per_pixel_count_toward_max_pixels(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 40, 3)).astype(np.uint8)
    data = to_bytes(make_dataset(rgb, modality="OT", slope=None, intercept=None))
    (row,) = process_task(_task(tmp_path, "rgb.dcm", data), _settings(tmp_path, ["data.max_pixels=4000"]))
    assert row["reason"] == "decompression_bomb", row


def test_good_compressed_dicoms_still_decode(tmp_path):
    from pydicom.data import get_testdata_file
    from pydicom.uid import JPEG2000Lossless

    raw = np.random.default_rng(2).integers(0, 255, (64, 64)).astype(np.uint8)
    j2k = to_bytes(make_dataset(raw, modality="OT", slope=None, intercept=None), JPEG2000Lossless)
    files = {"j2k.dcm": j2k, "jpeg.dcm": jpeg_baseline_bytes(_grey(1, 64, 64))[0]}
    for name in ("JPGExtended.dcm", "SC_rgb_jpeg_gdcm.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm",
                 "SC_rgb_rle.dcm"):
        files[name] = Path(get_testdata_file(name)).read_bytes()
    for name, data in files.items():
        rows = process_task(_task(tmp_path, name, data), _settings(tmp_path))
        assert [r["status"] for r in rows] == ["ok"], (name, rows)


def test_bombs_cost_bounded_memory_and_time(tmp_path):
    """In a fresh process: rejecting the three bombs costs < 300 MB over the import baseline and < 20 s."""
    for name, build in BOMBS.values():
        (tmp_path / name).write_bytes(build())
    script = textwrap.dedent(f"""
        import resource, sys, time
        from pathlib import Path
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from helpers import demo_config
        from medisyn.data.preprocess import process_task, worker_settings
        settings = worker_settings(demo_config(Path({str(tmp_path)!r}) / "cfg", ["data.resolution=64"]))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.monotonic()
        for name in {[b[0] for b in BOMBS.values()]!r}:
            task = {{"uri": "file://" + {str(tmp_path)!r} + "/" + name, "zone": {str(tmp_path)!r}, "path": name,
                    "rel": name, "source": "t", "specialty": "m", "image_type": "f", "caption": "c", "label": "a",
                    "patient_hash": "p", "patient_tag": "", "rule": "auto", "rule_params": "{{}}", "tile_size": 0}}
            (row,) = process_task(task, settings)
            assert row["reason"] == "decompression_bomb", row
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((peak - base) // 1024, time.monotonic() - t0)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=str(REPO))
    assert out.returncode == 0, out.stderr[-3000:]
    grew_mb, seconds = out.stdout.split()
    assert int(grew_mb) < 300 and float(seconds) < 20, out.stdout


# ---------------------------------------------------------------------------------------------- 4. empty / fake
@pytest.mark.parametrize("name,data", [("empty.png", b""), ("empty.dcm", b""), ("fake.png", b"hello\n" * 50),
                                       ("fake.jpg", b"\xff\xd8\xff\xe0 but then nothing"),
                                       ("fake.dcm", b"\x00" * 128 + b"DICM" + b"\x00" * 20)])
def test_empty_and_fake_images_are_quarantined(tmp_path, name, data):
    (row,) = process_task(_task(tmp_path, name, data), _settings(tmp_path))
    assert row["status"] == "rejected" and row["reason"], row
