"""Hostile input the preprocess workers refuse with a reason, in bounded memory and time, while the
run goes on (issue #12; the rest of the hostile corpus is tests/test_preprocess_hostile.py): a worker
killed for a file, hostile DICOM headers, non-images and empty files."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from helpers import ct_pixels, demo_config, make_dataset, to_bytes
from medisyn import storage
from medisyn.data import dicom
from medisyn.data.preprocess import process_batch, process_task, worker_settings

pytestmark = pytest.mark.timeout(120)


def _settings(tmp_path: Path, **extra) -> dict:
    return {**worker_settings(demo_config(tmp_path / "cfg", ["data.resolution=64"])), **extra}


def _task(zone: Path, name: str, data: bytes) -> dict:
    (zone / "t").mkdir(parents=True, exist_ok=True)
    (zone / "t" / name).write_bytes(data)
    return {"uri": storage.normalize(zone / "t" / name), "zone": str(zone), "path": f"t/{name}", "rel": name,
            "source": "t", "specialty": "misc", "image_type": "files", "caption": "c", "label": "a",
            "patient_hash": "p", "patient_tag": "", "rule": "auto", "rule_params": "{}", "tile_size": 0}


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- a worker killed
KILLED_WORKER = r"""
import json, os, signal, sys
import pyarrow as pa
from medisyn.data import preprocess
tasks, settings = json.loads(open(sys.argv[1]).read())
real = preprocess.decode_samples
def decode(data, name, task, settings):
    if name == "oom.png":  # what the OS's OOM killer does to the worker decoding this file
        os.kill(os.getpid(), signal.SIGKILL)
    return real(data, name, task, settings)
preprocess.decode_samples = decode
preprocess.process_batch(pa.Table.from_pylist(tasks), settings)
"""


def test_a_file_that_kills_its_worker_is_quarantined_after_bounded_tries(tmp_path):
    import json

    zone = tmp_path / "zone"
    tasks = [_task(zone, "a.png", _png(0)), _task(zone, "oom.png", _png(1)), _task(zone, "b.png", _png(2))]
    settings = _settings(tmp_path, attempts_dir=str(tmp_path / "attempts"), worker_max_tries=2)
    args = tmp_path / "args.json"
    args.write_text(json.dumps([tasks, settings]))
    for _ in range(2):  # Ray retries the batch after each death: data.worker_max_tries = 2 tries
        proc = subprocess.run([sys.executable, "-c", KILLED_WORKER, str(args)], timeout=60)
        assert proc.returncode == -9
    # the third try (Ray's max_retries = worker_max_tries + 1) quarantines it without opening it
    out = process_batch(pa.Table.from_pylist(tasks), settings).to_pylist()
    rejected = [r for r in out if r["status"] == "rejected"]
    assert [(r["path"], r["reason"]) for r in rejected] == [("t/oom.png", "worker_killed")]
    assert "killed 2 times" in rejected[0]["detail"]
    assert sum(r["status"] == "ok" for r in out) == 2  # the run goes on: a.png and b.png
    assert list((tmp_path / "attempts").iterdir())[0].read_text() == "2"  # only the culprit's marker is left


def test_ray_retries_a_killed_worker_a_bounded_number_of_times(tmp_path, monkeypatch):
    """Never forever: the map task's max_retries is data.worker_max_tries + 1."""
    import ray.data

    from medisyn.data import preprocess

    seen = {}
    real = ray.data.Dataset.map_batches

    def spy(self, fn, **kwargs):
        seen.update(kwargs)
        return real(self, fn, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "map_batches", spy)
    monkeypatch.setattr(ray.data.Dataset, "iter_batches", lambda self, **k: iter(()))
    list(preprocess._run_ray([{"path": "x"}], {"worker_max_tries": 3}, 4))
    assert seen["max_retries"] == 4


# ---------------------------------------------------------------------------------------------- hostile DICOM
def _nested(depth: int) -> bytes:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = make_dataset(ct_pixels(8, 8))
    inner = Dataset()
    inner.CodeValue = "x"
    for _ in range(depth):
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        inner = outer
    ds.ContentSequence = inner.ContentSequence
    return to_bytes(ds)


def _huge_text() -> bytes:
    ds = make_dataset(ct_pixels(8, 8))
    ds.ImageComments = "A" * (dicom.MAX_VALUE_BYTES + 2)  # LT: a 1 MiB+ free-text value
    return to_bytes(ds)


def _huge_dims_tiny_data() -> bytes:
    ds = make_dataset(ct_pixels(8, 8))
    ds.Rows, ds.Columns = 10_000, 10_000  # 1e8 pixels declared (under max_pixels), 128 bytes of data
    return to_bytes(ds)


HOSTILE = [  # (name, bytes, reason, words of the detail)
    ("nested.dcm", _nested(dicom.MAX_SEQUENCE_DEPTH + 4), "hostile_header", "nested deeper"),
    ("huge_text.dcm", _huge_text(), "hostile_header", "huge non-pixel value"),
    ("huge_dims.dcm", _huge_dims_tiny_data(), "hostile_header", "pixel data holds 128 bytes"),
    ("text.png", b"this is not an image\n" * 40, "unsupported_format", "not DICOM"),
    ("zip.tif", b"PK\x03\x04" + b"\x00" * 200, "unsupported_format", "not DICOM"),
    ("empty.dcm", b"", "empty_file", "0 bytes"),
]


@pytest.mark.parametrize("name,data,reason,words", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_is_refused_with_a_reason(tmp_path, name, data, reason, words):
    (row,) = process_task(_task(tmp_path / "zone", name, data), _settings(tmp_path))
    assert row["status"] == "rejected" and row["reason"] == reason and words in row["detail"], row


def test_nesting_a_real_file_stays_accepted(tmp_path):
    (row,) = process_task(_task(tmp_path / "zone", "ok.dcm", _nested(3)), _settings(tmp_path))
    assert row["status"] == "ok", row
