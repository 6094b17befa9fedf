"""The preprocess stage end to end on a messy corpus built on the fly (issue: preprocessing at
production grade): every transfer syntax, MONOCHROME1, multi-frame, 16-bit PNG, JPEG, TIFF, a whole
slide, truncated and non-image files, decompression-bomb headers, burned-in annotations, duplicates
and near-duplicates, PHI-laden headers."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from helpers import (
    PHI,
    PHI_STRINGS,
    S3_BUCKET,
    ct_pixels,
    demo_config,
    jpeg_baseline_bytes,
    make_dataset,
    to_bytes,
    with_phi,
)
from medisyn import storage
from medisyn.data import read_manifest, read_split
from medisyn.data.preprocess import (
    PreprocessError,
    assign_splits,
    find_duplicates,
    id_salt,
    preprocess,
    salted_hash,
)

SIZE = 512


# ---------------------------------------------------------------------------------------------- hand computations
def hand_hu(raw, slope=1.0, intercept=-1024.0, level=100.0, width=700.0):
    hu = raw.astype(np.float64) * slope + intercept
    return np.rint(np.clip((hu - (level - width / 2)) / width, 0, 1) * 255).astype(np.uint8)


def hand_percentile(v, low=0.5, high=99.5):
    v = v.astype(np.float64)
    lo, hi = np.percentile(v, [low, high])
    return np.rint(np.clip((v - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def hand_minmax(v):
    v = v.astype(np.float64)
    return np.rint((v - v.min()) / (v.max() - v.min()) * 255).astype(np.uint8)


def hand_resize(arr, size=SIZE):
    h, w = arr.shape[:2]
    nh, nw = (size, round(w * size / h)) if h <= w else (round(h * size / w), size)
    img = Image.fromarray(arr)
    if (nh, nw) != (h, w):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.asarray(img)[top : top + size, left : left + size]


def _png(arr, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _png_bomb_header(w=100_000, h=100_000) -> bytes:
    """A PNG whose IHDR declares w x h pixels (no real image data)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
            + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------------- the corpus
def build_messy_corpus(root: Path):
    """Write the corpus; returns (expected good images {(source, rel, suffix): 512 array}, bad {path: reason},
    {(source, rel): raw DICOM patient id}, near/exact duplicate pairs)."""
    good: dict[tuple[str, str, str], np.ndarray] = {}
    bad: dict[str, str] = {}
    rows: dict[str, list[dict]] = {s: [] for s in ("ct", "mr", "misc", "png", "slide")}
    dicom_pids: dict[tuple[str, str], str] = {}

    def put(source, rel, data, label, patient=None, expected=None, reason=None, suffix=""):
        p = root / source / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if data is not None:
            p.write_bytes(data)
        row = {"file": rel, "label": label}
        if source != "ct":
            row["patient_id"] = patient or rel
        rows[source].append(row)
        if expected is not None:
            good[(source, rel, suffix)] = expected
        if reason is not None:
            bad[f"{source}/{rel}"] = reason

    # CT in HU: every lossless syntax pydicom writes; two slices share a patient (from the header)
    syntaxes = [None, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless, JPEG2000Lossless]
    for i, syntax in enumerate(syntaxes):
        raw = ct_pixels(96 + 8 * i, 128, seed=i)
        pid = PHI["PatientID"] if i < 2 else f"CT-PATIENT-{i}"
        ds = with_phi(make_dataset(raw), patient_id=pid, tag=f"ct{i}")
        rel = f"slices/ct{i}.dcm"
        put("ct", rel, to_bytes(ds, syntax) if syntax else to_bytes(ds), "pe" if i % 2 else "no_pe",
            expected=hand_resize(hand_hu(raw)))
        dicom_pids[("ct", rel)] = pid
    raw = ct_pixels(60, 60, seed=9)
    ds = with_phi(make_dataset(raw, slope=2.0, intercept=-1000.0), patient_id="CT-PATIENT-9", tag="ct9")
    put("ct", "slices/ct_slope2.dcm", to_bytes(ds), "pe", expected=hand_resize(hand_hu(raw, 2.0, -1000.0)))
    # exact duplicate of ct0's pixels under another patient
    dup = with_phi(make_dataset(ct_pixels(96, 128, seed=0)), patient_id="CT-PATIENT-DUP", tag="ctdup")
    put("ct", "slices/ct0_copy.dcm", to_bytes(dup), "no_pe", expected=good[("ct", "slices/ct0.dcm", "")])
    # bad CT files
    full = to_bytes(with_phi(make_dataset(ct_pixels(), intercept=None, slope=None), tag="norescale"))
    put("ct", "bad/no_rescale.dcm", full, "pe", reason="rule_failed")
    # pixel data shorter than the header declares: refused before decoding (#12)
    trunc = to_bytes(with_phi(make_dataset(ct_pixels()), tag="trunc"))
    put("ct", "bad/truncated.dcm", trunc[: len(trunc) // 2], "pe", reason="hostile_header")
    bomb = with_phi(make_dataset(ct_pixels(8, 8)), tag="bomb")
    bomb.Rows, bomb.Columns = 60000, 60000
    put("ct", "bad/bomb.dcm", to_bytes(bomb), "pe", reason="decompression_bomb")
    burned = with_phi(make_dataset(ct_pixels(20, 20)), tag="burned")
    burned.BurnedInAnnotation = "YES"
    put("ct", "bad/burned.dcm", to_bytes(burned), "pe", reason="burned_in_annotation")
    put("ct", "bad/missing.dcm", None, "pe", reason="missing_file")
    put("ct", "bad/unknown_label.dcm", to_bytes(with_phi(make_dataset(ct_pixels(8, 8)), tag="u")), "nonsense",
        reason="unknown_label")

    # MR: JPEG-LS, big endian, multi-frame (middle frame)
    import pydicom

    mr_ref = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    mr_values = mr_ref.pixel_array.astype(np.float64)
    for name in ("MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        data = open(get_testdata_file(name), "rb").read()
        if "bigendian" not in name:  # keep the big-endian file as is (pydicom does not write it)
            ds = with_phi(ds, tag=name)
            buf = io.BytesIO()
            ds.save_as(buf)
            data = buf.getvalue()
        put("mr", name, data, "a", patient=name, expected=hand_resize(hand_percentile(mr_values)))
    frames = np.stack([np.random.default_rng(20 + k).integers(0, 3000, (48, 40)).astype(np.uint16) for k in range(5)])
    ds = with_phi(make_dataset(frames, modality="MR", frames=5, slope=None, intercept=None), tag="mf")
    put("mr", "multiframe.dcm", to_bytes(ds), "b", patient="mf", expected=hand_resize(hand_percentile(frames[2])),
        suffix="frame=2")
    put("mr", "report.dcm", open(get_testdata_file("reportsi.dcm"), "rb").read(), "a", reason="not_an_image")

    # misc DICOM: JPEG extended, JPEG lossless RGB, JPEG baseline grey, MONOCHROME1 DX
    jx = open(get_testdata_file("JPGExtended.dcm"), "rb").read()
    jx_pixels = pydicom.dcmread(io.BytesIO(jx)).pixel_array
    put("misc", "jpeg_extended.dcm", jx, "a", expected=hand_resize(hand_minmax(jx_pixels)))
    rgb_ref = pydicom.dcmread(get_testdata_file("SC_rgb_rle.dcm")).pixel_array
    put("misc", "jpeg_lossless_rgb.dcm", open(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"), "rb").read(), "b",
        expected=hand_resize(rgb_ref))
    grey = np.random.default_rng(5).integers(0, 256, (80, 64)).astype(np.uint8)
    jb, jb_decoded = jpeg_baseline_bytes(grey)
    put("misc", "jpeg_baseline.dcm", jb, "a", expected=hand_resize(jb_decoded))
    dx = np.random.default_rng(6).integers(0, 4096, (70, 90)).astype(np.uint16)
    dx_ds = make_dataset(dx, modality="DX", photometric="MONOCHROME1", bits_stored=12, slope=None, intercept=None)
    ds = with_phi(dx_ds, tag="dx")
    put("misc", "dx_monochrome1.dcm", to_bytes(ds), "b", expected=hand_resize(255 - hand_minmax(dx)))
    put("misc", "notes.txt", b"this is not an image, just notes\n", "a", reason="unsupported_format")

    # plain image files
    g16 = (np.random.default_rng(7).integers(0, 60000, (50, 70))).astype(np.uint16)
    put("png", "grey16.png", _png(g16), "a", expected=hand_resize(hand_minmax(g16)))
    blocks = np.random.default_rng(12).integers(0, 256, (8, 8)).astype(np.uint8)
    g8 = np.asarray(Image.fromarray(blocks).resize((96, 80), Image.Resampling.BICUBIC))
    put("png", "grey8.png", _png(g8), "a", patient="p-grey8", expected=hand_resize(g8))
    noise = np.random.default_rng(13).integers(-3, 4, g8.shape)
    g8n = np.clip(g8.astype(int) + noise, 0, 255).astype(np.uint8)  # near-duplicate: re-encoded, a little noise
    put("png", "grey8_near.png", _png(g8n), "a", patient="p-grey8-near", expected=hand_resize(g8n))
    rgb = np.random.default_rng(8).integers(0, 256, (40, 60, 3)).astype(np.uint8)
    jpg = _png(rgb, "JPEG")
    put("png", "photo.jpg", jpg, "b", expected=hand_resize(np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))))
    tif = np.random.default_rng(9).integers(0, 256, (45, 30, 3)).astype(np.uint8)
    put("png", "scan.tiff", _png(tif, "TIFF"), "b", expected=hand_resize(tif))
    trunc_png = _png(np.random.default_rng(10).integers(0, 256, (64, 64)).astype(np.uint8))
    put("png", "truncated.png", trunc_png[: len(trunc_png) // 2], "a", reason="truncated")
    put("png", "bomb.png", _png_bomb_header(), "a", reason="decompression_bomb")

    # a whole slide: 1100 x 1030 RGB -> 2 x 2 tiles of 512 (overlap cap 10%)
    slide = np.random.default_rng(11).integers(0, 256, (1100, 1030, 3)).astype(np.uint8)
    put("slide", "wsi.png", _png(slide), "a")
    for y in (0, 588):
        for x in (0, 518):
            good[("slide", "wsi.png", f"tile={y},{x}")] = slide[y : y + 512, x : x + 512]

    base = {"labels_table": "labels.csv", "path_column": "file", "label_column": "label"}
    lm = {"a": "class a", "b": "class b"}
    catalog = {"sources": {
        "ct": {**base, "prefix": "ct", "patient_id_dicom_tag": "PatientID", "specialty": "radiology",
               "image_type": "chest_ct", "caption_template": "Chest CT pulmonary angiography image showing {label}.",
               "label_map": {"pe": "pulmonary embolism", "no_pe": "no presence of pulmonary embolism"}, "rule": "auto"},
        "mr": {**base, "prefix": "mr", "patient_id_column": "patient_id", "specialty": "neurology",
               "image_type": "brain_mri", "caption_template": "Brain MRI image showing {label}.", "label_map": lm},
        "misc": {**base, "prefix": "misc", "patient_id_column": "patient_id", "specialty": "misc", "image_type": "misc",
                 "caption_template": "Misc image of {label}.", "label_map": lm},
        "png": {**base, "prefix": "png", "patient_id_column": "patient_id", "specialty": "misc", "image_type": "files",
                "caption_template": "File image of {label}.", "label_map": lm},
        "slide": {**base, "prefix": "slide", "patient_id_column": "patient_id", "specialty": "pathology",
                  "image_type": "wsi", "caption_template": "Slide showing {label}.", "label_map": lm, "rule": "keep",
                  "tile": {"size": 512}},
    }}
    (root / "catalog.yaml").write_text(yaml.safe_dump(catalog))
    for source, rs in rows.items():
        pd.DataFrame(rs).to_csv(root / source / "labels.csv", index=False)
    return good, bad, dicom_pids


@pytest.fixture(scope="module")
def messy(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("messy")
    raw = root / "raw"
    good, bad, pids = build_messy_corpus(raw)
    cfg = demo_config(root, ["data.resolution=512", "data.max_error_rate=0.6", "data.ray_batch_size=3",
                             "data.rows_per_shard=7"])
    return cfg, raw, good, bad, pids, root


@pytest.fixture(scope="module")
def messy_run(messy):
    cfg, raw, good, bad, pids, root = messy
    handler_records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            handler_records.append(record.getMessage())

    h = Capture(level=logging.DEBUG)
    medisyn_log = logging.getLogger("medisyn")
    old_level = medisyn_log.level
    medisyn_log.setLevel(logging.DEBUG)
    medisyn_log.addHandler(h)
    try:
        result = preprocess(cfg, str(raw), str(root / "dataset"))
    finally:
        medisyn_log.removeHandler(h)
        medisyn_log.setLevel(old_level)
    return result, handler_records


def _all_rows(uri):
    return pd.concat([read_split(uri, s) for s in ("train", "val", "test")], ignore_index=True)


def test_every_good_file_equals_hand_computation(messy, messy_run):
    cfg, raw, good, bad, pids, root = messy
    result, _ = messy_run
    rows = _all_rows(result.dataset_uri)
    salt = id_salt(cfg)
    by_hash = {r.image_hash: r for r in rows.itertuples()}
    lines = storage.read_text(result.dataset_uri + "/duplicates.jsonl").splitlines()
    removed = {json.loads(line)["removed"] for line in lines}
    assert len(good) == 23
    for (source, rel, suffix), expected in good.items():
        h = salted_hash(salt, "image", source, rel, suffix)
        if h in removed:
            continue
        row = by_hash[h]
        got = np.asarray(Image.open(io.BytesIO(row.image)))
        assert got.shape[:2] == (SIZE, SIZE) and (row.width, row.height) == (SIZE, SIZE)
        if rel == "jpeg_baseline.dcm":  # lossy: two JPEG decoders may differ by one grey level before resizing
            assert np.abs(got.astype(int) - expected).max() <= 2, rel
        else:
            np.testing.assert_array_equal(got, expected, err_msg=f"{source}/{rel} {suffix}")
        assert row.pixel_hash == hashlib.sha256(f"{got.shape}|uint8".encode() + got.tobytes()).hexdigest()
    assert len(rows) == len(good) - len(removed)


def test_every_bad_file_rejected_with_reason(messy, messy_run):
    _, _, _, bad, _, _ = messy
    result, _ = messy_run
    lines = [json.loads(x) for x in storage.read_text(result.dataset_uri + "/rejected.jsonl").splitlines()]
    got = {r["path"]: r["reason"] for r in lines}
    assert got == bad
    assert all(r["stage"] and r["source"] for r in lines)
    assert result.n_rejected == len(bad)
    assert result.manifest["rejected"]["by_reason"]["decompression_bomb"] == 2


def test_duplicates_removed_and_counted(messy, messy_run):
    cfg = messy[0]
    result, _ = messy_run
    dups = [json.loads(x) for x in storage.read_text(result.dataset_uri + "/duplicates.jsonl").splitlines()]
    salt = id_salt(cfg)
    pairs = {
        # same pixels under another patient; the same MR_small pixels as JPEG-LS and as big endian
        frozenset(salted_hash(salt, "image", "ct", r, "") for r in ("slices/ct0.dcm", "slices/ct0_copy.dcm")): "exact",
        frozenset(salted_hash(salt, "image", "mr", r, "")
                  for r in ("MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm")): "exact",
        frozenset(salted_hash(salt, "image", "png", r, "") for r in ("grey8.png", "grey8_near.png")): "near",
    }
    assert {frozenset((d["kept"], d["removed"])): d["kind"] for d in dups} == pairs
    assert all(d["hamming"] <= cfg.data.dedup_hamming for d in dups)
    assert result.n_duplicates == 3 == result.manifest["duplicates"]["total"]
    assert result.manifest["duplicates"]["near"] == 1
    rows = _all_rows(result.dataset_uri)
    assert rows["pixel_hash"].is_unique


def test_no_phi_in_any_output_byte(messy, messy_run):
    *_, root = messy
    result, log_lines = messy_run
    out = storage.local_path(result.dataset_uri)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) >= 8
    assert any("preprocess done" in line for line in log_lines)  # the log was captured
    blobs = [p.read_bytes() for p in files] + ["\n".join(log_lines).encode(), json.dumps(result.to_dict()).encode()]
    for phi in PHI_STRINGS + ["CT-PATIENT-9", "CT-PATIENT-DUP"]:
        for blob in blobs:
            assert phi.encode() not in blob, phi
    # de-identification by construction: only the contract's columns
    rows = _all_rows(result.dataset_uri)
    assert list(rows.columns) == ["image", "caption", "specialty", "image_type", "label", "source", "split",
                                  "patient_hash", "image_hash", "pixel_hash", "width", "height"]


def test_no_patient_crosses_splits(messy, messy_run):
    cfg, _, _, _, pids, _ = messy
    result, _ = messy_run
    rows = _all_rows(result.dataset_uri)
    assert (rows.groupby("patient_hash")["split"].nunique() == 1).all()
    # the two CT slices sharing a PatientID header share one patient hash (hashed in the worker)
    salt = id_salt(cfg)
    ct0, ct1 = (salted_hash(salt, "image", "ct", f"slices/ct{i}.dcm", "") for i in (0, 1))
    r = rows.set_index("image_hash")
    if ct0 in r.index and ct1 in r.index:
        assert r.loc[ct0, "patient_hash"] == r.loc[ct1, "patient_hash"]
        assert r.loc[ct0, "patient_hash"] == salted_hash(salt, "patient", "ct", PHI["PatientID"])


def test_manifest_tables_and_shards(messy, messy_run):
    result, _ = messy_run
    m = read_manifest(result.dataset_uri)
    assert m == result.manifest
    assert m["counts"]["total"] == result.n_images == sum(result.counts.values())
    assert sum(v["total"] for v in m["counts"]["by_specialty"].values()) == result.n_images
    assert m["counts"]["by_image_type"]["pathology/wsi"]["total"] == 4  # 2 x 2 tiles
    for split, shards in m["shards"].items():
        assert sum(s["rows"] for s in shards) == result.counts[split]
        assert all(s["rows"] <= 7 for s in shards)
    rows = _all_rows(result.dataset_uri)
    assert set(rows["caption"]) >= {"Chest CT pulmonary angiography image showing pulmonary embolism.",
                                    "Slide showing class a."}


def test_rerun_gives_same_hash_and_same_files(messy, messy_run):
    cfg, raw, *_, root = messy
    first, _ = messy_run
    again = preprocess(cfg, str(raw), str(root / "dataset-again"))
    assert again.dataset_hash == first.dataset_hash
    a, b = storage.local_path(first.dataset_uri), storage.local_path(again.dataset_uri)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_error_rate_exceeded_publishes_nothing(messy):
    cfg, raw, *_, root = messy
    strict = demo_config(root, ["data.resolution=64", "data.max_error_rate=0.05"])
    out = root / "never"
    with pytest.raises(PreprocessError, match="max_error_rate"):
        preprocess(strict, str(raw), str(out))
    assert not out.exists()


def test_burned_in_kept_when_quarantine_off(tmp_path, ray_local):
    raw = tmp_path / "raw"
    (raw / "ct").mkdir(parents=True)
    ds = with_phi(make_dataset(ct_pixels(32, 32)), tag="b")
    ds.BurnedInAnnotation = "YES"
    (raw / "ct" / "a.dcm").write_bytes(to_bytes(ds))
    pd.DataFrame([{"file": "a.dcm", "label": "x"}]).to_csv(raw / "ct" / "labels.csv", index=False)
    cat = {"sources": {"ct": {"prefix": "ct", "specialty": "radiology", "image_type": "chest_ct",
                              "caption_template": "CT {label}.", "label_map": {"x": "x"}}}}
    (raw / "catalog.yaml").write_text(yaml.safe_dump(cat))
    off_cfg = demo_config(tmp_path, ["data.quarantine_burned_in=false", "data.max_error_rate=1.0"])
    off = preprocess(off_cfg, str(raw), str(tmp_path / "o1"))
    on = preprocess(demo_config(tmp_path, ["data.max_error_rate=1.0"]), str(raw), str(tmp_path / "o2"))
    assert (off.n_images, off.n_rejected) == (1, 0)
    assert (on.n_images, on.n_rejected) == (0, 1)


def test_explicit_catalog_path_wins(tmp_path, ray_local):
    from medisyn.demo.phantoms import write_landing_zone

    lz = write_landing_zone(str(tmp_path / "lz"), n_per_class=2, seed=1)
    only_oct = yaml.safe_load(storage.read_text(lz.catalog_uri))
    only_oct["sources"] = {"oct": only_oct["sources"]["oct"]}
    only_oct["privacy_prompts"] = [p for p in only_oct["privacy_prompts"] if p["source"] == "oct"]
    only_oct["utility_tasks"] = [p for p in only_oct["utility_tasks"] if p["source"] == "oct"]
    (tmp_path / "oct.yaml").write_text(yaml.safe_dump(only_oct))
    cfg = demo_config(tmp_path, [f"data.catalog={tmp_path / 'oct.yaml'}"])
    r = preprocess(cfg, lz.uri, str(tmp_path / "ds"))
    assert set(r.manifest["counts"]["by_source"]) == {"oct"} and r.n_images == 4
    assert r.manifest["catalog"]["origin"] == str(tmp_path / "oct.yaml")
    # the catalog that described the data travels with it (the gates read prompts and tasks there)
    from medisyn.catalog import load_catalog

    copied = load_catalog(storage.join(r.dataset_uri, "catalog.yaml"))
    assert copied.names == ["oct"] and copied.digest == r.manifest["catalog"]["digest"]


# ---------------------------------------------------------------------------------------------- units
SPLIT_CASES = [
    # (patients per class, expected train/val/test patients per class)
    (10, (8, 1, 1)),
    (12, (10, 1, 1)),
    (20, (16, 2, 2)),
    (1, (1, 0, 0)),
]


@pytest.mark.parametrize("n,expected", SPLIT_CASES)
def test_assign_splits_is_80_10_10_per_class(n, expected):
    meta = pd.DataFrame([
        {"source": "s", "label": lab, "patient_hash": salted_hash("salt", "patient", lab, str(i))}
        for lab in ("a", "b") for i in range(n) for _ in range(2)  # two images per patient
    ])
    split_of = assign_splits(meta)
    for lab in ("a", "b"):
        pats = set(meta.loc[meta.label == lab, "patient_hash"])
        counts = tuple(sum(split_of[p] == s for p in pats) for s in ("train", "val", "test"))
        assert counts == expected
    # order independence
    assert assign_splits(meta.sample(frac=1, random_state=0)) == split_of


def test_find_duplicates_keeps_train_copy():
    columns = ["image_hash", "pixel_hash", "phash", "split", "specialty", "image_type"]
    meta = pd.DataFrame([
        ("b1", "P", "0" * 16, "test", "s", "t"),
        ("a9", "P", "0" * 16, "train", "s", "t"),
        ("c0", "Q", "000000000000000f", "val", "s", "t"),
        ("d0", "R", "00000000000000ff", "val", "s", "t"),
        ("e0", "S", "000000000000000f", "val", "s", "other"),
    ], columns=columns)
    dups = find_duplicates(meta, max_hamming=4)
    assert {(d["kept"], d["removed"], d["kind"], d["hamming"]) for d in dups} == {
        ("a9", "b1", "exact", 0), ("a9", "c0", "near", 4)}  # d0 is 8 bits away; e0 is another image type


@pytest.mark.parametrize("d", [0, 20])
def test_find_duplicates_thresholds(d):
    meta = pd.DataFrame([
        {"image_hash": f"h{i}", "pixel_hash": f"p{i}", "phash": format((1 << (i * 3)) - 1, "016x"), "split": "train",
         "specialty": "s", "image_type": "t"} for i in range(1, 6)
    ])  # phash i has 3i low bits set: neighbours are 3 bits apart
    dups = find_duplicates(meta, max_hamming=d)
    assert len(dups) == (0 if d == 0 else 4)


@pytest.mark.s3
def test_s3_landing_zone_to_s3_dataset(tmp_path, s3_endpoint, ray_local):
    from medisyn.demo.phantoms import write_landing_zone

    raw = f"s3://{S3_BUCKET}/landing"
    out = f"s3://{S3_BUCKET}/datasets/v1"
    write_landing_zone(raw, n_per_class=2, seed=3)
    cfg = demo_config(tmp_path, [f"storage.s3_endpoint_url={s3_endpoint}"])
    r = preprocess(cfg, raw, out)
    assert r.dataset_uri == out and storage.is_complete(out)
    rows = _all_rows(out)
    assert len(rows) == r.n_images == 18 and r.n_rejected == 0  # CT: one patient of 3 slices per class
    local = preprocess(cfg, raw, str(tmp_path / "local"))
    assert local.dataset_hash == r.dataset_hash  # same content whatever the storage


@pytest.mark.slow
@pytest.mark.mlflow
def test_manifest_logged_to_mlflow_as_dataset_without_phi(tmp_path, monkeypatch, ray_local):
    import mlflow
    import pydicom

    from medisyn.demo.phantoms import write_landing_zone

    monkeypatch.chdir(tmp_path)  # the sqlite store puts artifacts under ./mlruns
    lz = write_landing_zone(str(tmp_path / "lz"), n_per_class=2, seed=4)
    ct = pydicom.dcmread(next((tmp_path / "lz" / "chest_ct").rglob("*.dcm")))
    header_values = [str(ct.PatientName), str(ct.PatientID), str(ct.StudyInstanceUID), str(ct.InstitutionName),
                     str(ct.AccessionNumber), str(ct.StudyDescription)]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = demo_config(tmp_path, [f"tracking.tracking_uri={uri}"])
    r = preprocess(cfg, lz.uri, str(tmp_path / "ds"))
    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    assert run.data.tags["medisyn.dataset_hash"] == r.dataset_hash
    assert run.data.metrics["n_images"] == r.n_images
    assert run.inputs.dataset_inputs[0].dataset.digest == r.dataset_hash[:36]
    manifest = mlflow.artifacts.load_dict(run.info.artifact_uri + "/dataset/manifest.json")
    assert manifest["dataset_hash"] == r.dataset_hash
    for p in tmp_path.rglob("*"):
        if p.is_file() and "lz" not in p.relative_to(tmp_path).parts:
            blob = p.read_bytes()
            for v in header_values:
                assert v.encode() not in blob, (v, p)


def test_interrupted_run_leaves_previous_output_intact(tmp_path, monkeypatch, ray_local):
    from medisyn.data import preprocess as stage
    from medisyn.demo.phantoms import write_landing_zone

    lz = write_landing_zone(str(tmp_path / "lz"), n_per_class=1, seed=2)
    cfg = demo_config(tmp_path)
    out = tmp_path / "ds"
    first = preprocess(cfg, lz.uri, str(out))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(stage, "build_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        preprocess(cfg, lz.uri, str(out))
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before and storage.is_complete(first.dataset_uri)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "lz"]  # no staging directory left visible


@pytest.mark.parametrize("fractions", ["[0.8, 0.1, 0.2]", "[1.2, -0.1, -0.1]"])
def test_split_fractions_must_sum_to_one(fractions):
    from medisyn.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="split_fractions"):
        load_config(None, [f"data.split_fractions={fractions}"])


def test_worker_heap_setting_applies_once_per_process():
    import subprocess
    import sys

    code = (
        "from medisyn.data.preprocess import retain_freed_memory as r\n"
        "print(r(0), r(64), r(64))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    # 0 leaves malloc alone; glibc accepts the setting once; the second call in the same process is a no-op
    assert out == ["False", "True", "False"]
