"""medisyn.demo.phantoms: the demo landing zone (phantoms, not patient data)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pydicom
import pytest

from helpers import demo_config
from medisyn import storage
from medisyn.catalog import load_catalog
from medisyn.data import decode_png, read_split
from medisyn.data.preprocess import preprocess
from medisyn.demo.phantoms import write_landing_zone


@pytest.fixture(scope="module")
def landing(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return root, write_landing_zone(str(root / "lz"), n_per_class=24, seed=0)


def test_layout_and_counts(landing):
    root, lz = landing
    assert lz.files == {"chest_ct": 48, "chest_xray": 48, "oct": 48, "dermoscopy": 48}
    assert lz.n_images == 192 and lz.n_patients == 16 + 24 * 3
    assert storage.is_complete(lz.uri)
    cat = load_catalog(lz.catalog_uri)
    assert {(s.specialty, s.image_type) for s in cat.sources} >= {
        ("radiology", "chest_ct"), ("ophthalmology", "oct"), ("dermatology", "dermoscopy")}
    assert cat.source("oct").caption_for("DRUSEN") == "Optical coherence tomography image showing drusen."
    assert {t.name for t in cat.utility_tasks()} >= {"dermoscopy", "oct"}
    assert set(cat.privacy_prompts()) == {"radiology", "ophthalmology", "dermatology"}
    labels = pd.read_csv(storage.local_path(lz.uri) / "oct" / "labels.csv")
    assert labels.groupby("patient_id").size().eq(2).all()  # several images per patient


def test_ct_is_dicom_in_hounsfield_units_with_fake_identifiers(landing):
    _, lz = landing
    files = sorted((storage.local_path(lz.uri) / "chest_ct").rglob("*.dcm"))
    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "CT" and float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
    hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert hu.min() < -800 and hu.max() > 250  # air/lung and contrast-filled vessels
    assert str(ds.PatientID).startswith("PHANTOM-") and "Phantom" in str(ds.PatientName) and ds.StudyInstanceUID
    xray = pydicom.dcmread(sorted((storage.local_path(lz.uri) / "chest_xray").rglob("*.dcm"))[0])
    assert xray.PhotometricInterpretation == "MONOCHROME1" and xray.BitsStored == 12


def test_formats_of_png_sources(landing):
    _, lz = landing
    oct_png = next((storage.local_path(lz.uri) / "oct").rglob("*.png"))
    derm_png = next((storage.local_path(lz.uri) / "dermoscopy").rglob("*.png"))
    assert decode_png(oct_png.read_bytes()).mode == "L"
    assert decode_png(derm_png.read_bytes()).mode == "RGB"


def test_deterministic_in_seed(tmp_path):
    a = write_landing_zone(str(tmp_path / "a"), n_per_class=2, seed=5)
    b = write_landing_zone(str(tmp_path / "b"), n_per_class=2, seed=5)
    c = write_landing_zone(str(tmp_path / "c"), n_per_class=2, seed=6)

    def digest(lz):
        root = storage.local_path(lz.uri)
        return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    assert digest(a) == digest(b) and digest(a) != digest(c)


@pytest.mark.parametrize("n", [0, -3])
def test_rejects_bad_count(tmp_path, n):
    with pytest.raises(ValueError):
        write_landing_zone(str(tmp_path / "x"), n_per_class=n)


@pytest.mark.slow
def test_preprocessed_demo_is_balanced_unique_and_learnable(landing):
    root, lz = landing
    cfg = demo_config(root)  # resolution 64, as the demo trains
    r = preprocess(cfg, lz.uri, str(root / "dataset"))
    assert r.n_rejected == 0 and r.n_duplicates == 0  # de-duplication must not wipe out the demo
    assert r.n_images == 192
    by_label = r.manifest["counts"]["by_label"]
    assert all(c["val"] >= 1 and c["test"] >= 1 for c in by_label.values())  # every class in every split
    train, held = read_split(r.dataset_uri, "train"), pd.concat([read_split(r.dataset_uri, s) for s in ("val", "test")])

    def tensors(df):
        x = np.stack([np.asarray(decode_png(b).convert("L"), np.float32) / 255 for b in df["image"]])
        return torch.nn.functional.avg_pool2d(torch.from_numpy(x[:, None]), 2)  # 32 px keeps CPU time small

    import torch

    # the class signal is learnable by a tiny CNN at 64 px (what the utility gate's demo classifier sees)
    for source in ("chest_ct", "chest_xray", "oct", "dermoscopy"):
        tr, te = train[train.source == source], held[held.source == source]
        classes = sorted(set(tr.label))
        assert set(te.label) == set(classes) and len(classes) == 2
        x, y = tensors(tr), torch.tensor([classes.index(v) for v in tr.label])
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveMaxPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(16, 2),
        )
        opt = torch.optim.Adam(net.parameters(), lr=5e-3)
        for _ in range(40):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        with torch.no_grad():
            pred = net(tensors(te)).argmax(1).numpy()
        acc = (pred == np.array([classes.index(v) for v in te.label])).mean()
        assert acc >= 0.75, (source, acc)
