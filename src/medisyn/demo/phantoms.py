"""The demo landing zone: procedurally generated phantoms in the formats real repositories come in.

These are synthetic drawings, not patient data. Each class has a visible, learnable signal at 64 px
(sized so the demo's small generator learns it in minutes: vessel defects, drusen and nevi are
several pixels across), and every image is drawn with its own random geometry and noise, so images
are not near-duplicates of each other (de-duplication must not wipe out the demo).

Sources (format; specialty / image_type; classes, as caption labels; signal):

- chest_ct: DICOM CT, uint16 + RescaleIntercept -1024 (HU), fake patient tags; radiology / chest_ct;
  pulmonary embolism, no presence of pulmonary embolism; dark filling defects in bright contrast-filled arteries.
- chest_xray: DICOM DX, 12 bit, MONOCHROME1; radiology / chest_xray; cardiomegaly, pleural effusion;
  wide heart vs opaque lung bases.
- oct: greyscale PNG 320x256; ophthalmology / oct; normal findings, drusen;
  dome-shaped elevations of the bright RPE band.
- dermoscopy: RGB PNG 256x256; dermatology / dermoscopy; melanoma, melanocytic nevi;
  large irregular multicolour lesion vs small round brown one.

Several images per fake patient (3 CT slices, 2 of everything else), so patient-level splitting
matters. The CT headers carry fake names, ids, dates, UIDs and free text on purpose: they exercise
de-identification (none of it may reach the dataset).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import yaml
from PIL import Image

from medisyn import storage
from medisyn.results import StageResult

CT_CLASSES = {"pe": "pulmonary embolism", "no_pe": "no presence of pulmonary embolism"}
XRAY_CLASSES = {"cardiomegaly": "cardiomegaly", "pleural_effusion": "pleural effusion"}
OCT_CLASSES = {"NORMAL": "normal findings", "DRUSEN": "drusen"}
DERM_CLASSES = {"MEL": "melanoma", "NV": "melanocytic nevi"}

IMAGES_PER_PATIENT = {"chest_ct": 3, "chest_xray": 2, "oct": 2, "dermoscopy": 2}


@dataclass(frozen=True)
class LandingZone(StageResult):
    uri: str
    catalog_uri: str
    files: dict[str, int]  # source -> number of image files
    n_images: int
    n_patients: int


def demo_catalog() -> dict[str, Any]:
    """The landing zone's catalog.yaml (captions are the paper's templates, section 4.3)."""
    base = {"labels_table": "labels.csv", "path_column": "file", "label_column": "label"}
    return {
        "version": 1,
        "sources": {
            "chest_ct": {
                **base, "prefix": "chest_ct", "patient_id_dicom_tag": "PatientID",
                "specialty": "radiology", "image_type": "chest_ct",
                "caption_template": "Chest CT pulmonary angiography image showing {label}.",
                "label_map": CT_CLASSES, "rule": "hu_window",
            },
            "chest_xray": {
                **base, "prefix": "chest_xray", "patient_id_column": "patient_id",
                "specialty": "radiology", "image_type": "chest_xray",
                "caption_template": "Frontal (AP) chest X-ray image showing {label}.",
                "label_map": XRAY_CLASSES, "multilabel": True, "rule": "auto",
            },
            "oct": {
                **base, "prefix": "oct", "patient_id_column": "patient_id",
                "specialty": "ophthalmology", "image_type": "oct",
                "caption_template": "Optical coherence tomography image showing {label}.",
                "label_map": OCT_CLASSES, "rule": "keep",
            },
            "dermoscopy": {
                **base, "prefix": "dermoscopy", "patient_id_column": "patient_id",
                "specialty": "dermatology", "image_type": "dermoscopy",
                "caption_template": "Dermoscopy image showing {label}.",
                "label_map": DERM_CLASSES, "rule": "keep",
            },
        },
        "privacy_prompts": [
            {"specialty": "radiology", "source": "chest_ct", "labels": ["no_pe", "pe"]},
            {"specialty": "ophthalmology", "source": "oct", "labels": ["NORMAL", "DRUSEN"]},
            {"specialty": "dermatology", "source": "dermoscopy", "labels": ["MEL", "NV"]},
        ],
        "utility_tasks": [
            {"name": "dermoscopy", "source": "dermoscopy", "labels": ["MEL", "NV"]},
            {"name": "oct", "source": "oct", "labels": ["NORMAL", "DRUSEN"]},
            {"name": "chest_xray", "source": "chest_xray", "labels": ["cardiomegaly", "pleural_effusion"],
             "multilabel": True},
        ],
    }


# ----------------------------------------------------------------------------------------------
# Drawing helpers
# ----------------------------------------------------------------------------------------------
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy, xx


def _ellipse(yy, xx, cy, cx, ry, rx) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int = 8) -> np.ndarray:
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(small, mode="F").resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(img)


def ct_slice_hu(rng: np.random.Generator, embolism: bool, size: int = 256) -> np.ndarray:
    """A chest CT angiography phantom in Hounsfield units (int16)."""
    yy, xx = _grid(size, size)
    c = size / 2 + rng.uniform(-10, 10, 2)
    hu = np.full((size, size), -1000.0, np.float32)
    body = _ellipse(yy, xx, c[0], c[1], size * rng.uniform(0.33, 0.40), size * rng.uniform(0.42, 0.47))
    hu[body] = 40.0
    for side in (-1, 1):  # lungs
        lung = _ellipse(yy, xx, c[0] + rng.uniform(-8, 8), c[1] + side * size * rng.uniform(0.19, 0.23),
                        size * rng.uniform(0.23, 0.28), size * rng.uniform(0.13, 0.17))
        hu[lung & body] = -850.0
    hu += 25.0 * _smooth_noise(rng, size, size) * body
    n_vessels = rng.integers(3, 5)
    defects = set(range(n_vessels)) if embolism else set()
    for k in range(n_vessels):  # contrast-filled pulmonary arteries
        r = rng.uniform(22, 30)
        vy = c[0] + rng.uniform(-0.22, 0.22) * size
        vx = c[1] + rng.choice([-1, 1]) * rng.uniform(0.08, 0.28) * size
        hu[_ellipse(yy, xx, vy, vx, r, r)] = 320.0
        if k in defects:  # filling defect: low-attenuation thrombus inside the bright lumen
            a = rng.uniform(0, 2 * np.pi)
            hu[_ellipse(yy, xx, vy + 0.2 * r * np.sin(a), vx + 0.2 * r * np.cos(a), 0.75 * r, 0.75 * r)] = 25.0
    hu += rng.normal(0, 12, hu.shape).astype(np.float32)
    return np.clip(hu, -1024, 3000).astype(np.int16)


def xray_attenuation(rng: np.random.Generator, finding: str, h: int = 288, w: int = 320) -> np.ndarray:
    """Frontal chest X-ray phantom: attenuation in [0, 1] (1 = dense, shown bright)."""
    yy, xx = _grid(h, w)
    img = np.full((h, w), 0.55, np.float32)
    cx = w / 2 + rng.uniform(-8, 8)
    lungs = np.zeros((h, w), bool)
    for side in (-1, 1):
        lungs |= _ellipse(yy, xx, h * rng.uniform(0.45, 0.52), cx + side * w * rng.uniform(0.19, 0.23),
                          h * rng.uniform(0.30, 0.36), w * rng.uniform(0.13, 0.16))
    img[lungs] = 0.15
    heart_w = w * (rng.uniform(0.26, 0.32) if finding == "cardiomegaly" else rng.uniform(0.13, 0.17))
    heart = _ellipse(yy, xx, h * rng.uniform(0.62, 0.68), cx + rng.uniform(0, 12), h * rng.uniform(0.16, 0.2), heart_w)
    img[heart] = 0.6
    if finding == "pleural_effusion":  # fluid fills the lung bases up to a meniscus
        level = h * rng.uniform(0.58, 0.66)
        curve = level - 12 * np.cos((xx - cx) / w * np.pi)
        img[lungs & (yy > curve)] = 0.62
    img += 0.05 * _smooth_noise(rng, h, w) + rng.normal(0, 0.02, (h, w)).astype(np.float32)
    return np.clip(img, 0, 1)


def oct_bscan(rng: np.random.Generator, drusen: bool, h: int = 256, w: int = 320) -> np.ndarray:
    """Retinal OCT B-scan phantom, uint8: layered bands over a gently curved retina. Drusen lift the
    bright RPE band into large domes filled with reflective material, above an unlifted Bruch's
    membrane line: a signal of shape and of brightness that survives a small generator's blur."""
    yy, xx = _grid(h, w)
    base = h * rng.uniform(0.40, 0.55) + rng.uniform(3, 9) * np.sin(
        xx[0] / w * 2 * np.pi * rng.uniform(0.4, 0.9) + rng.uniform(0, 6.3))
    bruch = base + rng.uniform(50, 70)
    rpe = bruch.copy()
    if drusen:  # one to three large domes: their shape survives the blur of a small generator
        for _ in range(rng.integers(1, 4)):
            x0, width, height = rng.uniform(0.2, 0.8) * w, rng.uniform(45, 70), rng.uniform(40, 60)
            bump = np.clip(1 - ((xx[0] - x0) / width) ** 2, 0, None) * height
            rpe = np.minimum(rpe, bruch - bump)
    img = np.full((h, w), 18.0, np.float32)
    d = yy - base[None, :]
    img += 170 * ((d >= 0) & (d < rng.uniform(6, 10)))  # nerve fibre layer
    img += 70 * ((d >= 10) & (yy < rpe[None, :] - 6))  # inner retina
    r = yy - rpe[None, :]
    b = yy - bruch[None, :]
    img += 210 * ((r >= -4) & (r < 5))  # RPE
    img += 180 * ((r >= 5) & (b < -2))  # drusen material between the lifted RPE and Bruch's membrane
    img += 150 * ((b >= -2) & (b < 2) & (r >= 5))  # Bruch's membrane, seen where the RPE is lifted off it
    img += 60 * ((b >= 5) & (b < 30)) * np.exp(-np.clip(b, 0, None) / 20)  # choroid
    img *= rng.gamma(6.0, 1 / 6.0, (h, w)).astype(np.float32)  # speckle
    return np.clip(img, 0, 255).astype(np.uint8)


def dermoscopy_rgb(rng: np.random.Generator, melanoma: bool, size: int = 256) -> np.ndarray:
    """Dermoscopy phantom, RGB uint8: skin background with one pigmented lesion."""
    yy, xx = _grid(size, size)
    skin = np.array([rng.uniform(210, 235), rng.uniform(165, 190), rng.uniform(140, 165)], np.float32)
    img = np.broadcast_to(skin, (size, size, 3)).copy()
    img += (8 * _smooth_noise(rng, size, size))[..., None]
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    theta = np.arctan2(yy - cy, xx - cx)
    dist = np.hypot(yy - cy, xx - cx)
    if melanoma:
        radius = rng.uniform(55, 80)
        wobble = sum(rng.uniform(0.08, 0.2) * np.cos(k * theta + rng.uniform(0, 6.3)) for k in (2, 3, 5))
        inside = dist <= radius * (1 + wobble)
        colour = np.array([95, 60, 45], np.float32)
        img[inside] = colour + rng.normal(0, 6, 3)
        for _ in range(rng.integers(3, 6)):  # dark and blue-grey blotches
            by, bx = cy + rng.uniform(-0.5, 0.5) * radius, cx + rng.uniform(-0.5, 0.5) * radius
            blot = _ellipse(yy, xx, by, bx, rng.uniform(8, 20), rng.uniform(8, 20)) & inside
            img[blot] = (np.array([40, 30, 35], np.float32) if rng.random() < 0.6
                         else np.array([110, 115, 140], np.float32))
    else:
        radius = rng.uniform(30, 44)
        inside = dist <= radius * (1 + 0.04 * np.cos(2 * theta + rng.uniform(0, 6.3)))
        img[inside] = np.array([140, 90, 60], np.float32) + rng.normal(0, 6, 3)
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# File formats
# ----------------------------------------------------------------------------------------------
def _uid(*parts: Any) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(prefix="1.2.826.0.1.3680043.8.498.", entropy_srcs=[str(p) for p in parts])


def _dicom_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _base_dataset(sop_class: str, patient: dict[str, str], study: str, series: str, instance: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(instance)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, instance
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    # fake identifiers on purpose: de-identification must keep every one of them out of the dataset
    ds.PatientName = patient["name"]
    ds.PatientID = patient["id"]
    ds.PatientBirthDate = patient["birth_date"]
    ds.PatientSex = patient["sex"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = patient["study_date"]
    ds.StudyTime = "101500"
    ds.AccessionNumber = patient["accession"]
    ds.InstitutionName = "Phantom General Hospital"
    ds.ReferringPhysicianName = "Synthetic^Referrer"
    ds.StudyDescription = f"Phantom study for {patient['name']}"
    ds.BurnedInAnnotation = "NO"
    return ds


def _ct_dicom(hu: np.ndarray, patient: dict[str, str], key: str, slice_no: int) -> bytes:
    from pydicom.uid import CTImageStorage

    study, series = _uid("study", key), _uid("series", key)
    ds = _base_dataset(CTImageStorage, patient, study, series, _uid("ct", key, slice_no))
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SeriesDescription = "CTPA phantom"
    ds.InstanceNumber = slice_no + 1
    ds.SliceThickness = "2.5"
    ds.ImagePositionPatient = [-160.0, -160.0, -30.0 * slice_no]
    ds.PixelSpacing = [1.25, 1.25]
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400  # a soft-tissue window the rule ignores (section 4.1 uses 100/700)
    ds.PixelData = (hu.astype(np.int32) + 1024).clip(0, 4095).astype(np.uint16).tobytes()
    return _dicom_bytes(ds)


def _xray_dicom(att: np.ndarray, patient: dict[str, str], key: str, n: int) -> bytes:
    from pydicom.uid import DigitalXRayImageStorageForPresentation

    ds = _base_dataset(DigitalXRayImageStorageForPresentation, patient, _uid("study", key, n), _uid("series", key, n),
                       _uid("dx", key, n))
    ds.Modality = "DX"
    ds.ViewPosition = "AP"
    ds.Rows, ds.Columns = att.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1"  # low stored value = bright, as many X-ray archives store it
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.rint(4095 * (1 - att)).astype(np.uint16).tobytes()
    return _dicom_bytes(ds)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _fake_patient(rng: np.random.Generator, source: str, n: int) -> dict[str, str]:
    first = ["Alex", "Sam", "Robin", "Kim", "Jo", "Lee", "Max", "Noa"][n % 8]
    return {
        "id": f"PHANTOM-{source.upper()}-{n:04d}",
        "name": f"Phantom^{first}{n:04d}",
        "birth_date": f"19{rng.integers(40, 99)}0{rng.integers(1, 9)}1{rng.integers(0, 9)}",
        "sex": "FM"[n % 2],
        "study_date": f"20{rng.integers(10, 25)}0{rng.integers(1, 9)}2{rng.integers(0, 8)}",
        "accession": f"ACC{rng.integers(10**6, 10**7)}",
    }


def write_landing_zone(out_uri: str, n_per_class: int = 24, seed: int = 0) -> LandingZone:
    """Write the demo landing zone (raw files, labels tables, ``catalog.yaml``) at ``out_uri``.

    ``n_per_class`` images per class per source (rounded up to whole patients); deterministic in
    ``seed``. Published atomically (``_COMPLETE`` last) on file:// and s3://.
    """
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    rng = np.random.default_rng(seed)
    files: dict[str, int] = {}
    n_patients = 0
    with storage.staged_dir(out_uri, metadata={"kind": "demo-landing-zone", "seed": seed}) as root:
        generators = {
            "chest_ct": (CT_CLASSES, ".dcm"),
            "chest_xray": (XRAY_CLASSES, ".dcm"),
            "oct": (OCT_CLASSES, ".png"),
            "dermoscopy": (DERM_CLASSES, ".png"),
        }
        for source, (classes, ext) in generators.items():
            per_patient = IMAGES_PER_PATIENT[source]
            n_pat_per_class = -(-n_per_class // per_patient)
            rows: list[dict[str, str]] = []
            pid_counter = 0
            for raw_label in classes:
                for _ in range(n_pat_per_class):
                    patient = _fake_patient(rng, source, pid_counter)
                    pid_counter += 1
                    for k in range(per_patient):
                        rel = f"images/{patient['id'].lower()}/img-{k}{ext}"
                        path = root / source / rel
                        path.parent.mkdir(parents=True, exist_ok=True)
                        if source == "chest_ct":
                            data = _ct_dicom(ct_slice_hu(rng, raw_label == "pe"), patient, patient["id"], k)
                        elif source == "chest_xray":
                            data = _xray_dicom(xray_attenuation(rng, raw_label), patient, patient["id"], k)
                        elif source == "oct":
                            data = _png(oct_bscan(rng, raw_label == "DRUSEN"))
                        else:
                            data = _png(dermoscopy_rgb(rng, raw_label == "MEL"))
                        path.write_bytes(data)
                        row = {"file": rel, "label": raw_label}
                        if source != "chest_ct":  # the CT source takes its patient id from the DICOM header
                            row["patient_id"] = patient["id"]
                        rows.append(row)
            n_patients += pid_counter
            with open(root / source / "labels.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            files[source] = len(rows)
        (root / "catalog.yaml").write_text(
            "# Demo landing zone catalog (phantoms, not patient data); fields: docs/preprocessing.md\n"
            + yaml.safe_dump(demo_catalog(), sort_keys=False)
        )
    uri = storage.normalize(out_uri)
    return LandingZone(uri, storage.join(uri, "catalog.yaml"), files, sum(files.values()), n_patients)
