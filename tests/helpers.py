"""Builders shared by the tests (and the benchmarks), in one place: test modules import from here,
never from each other. pytest fixtures defined here (``s3_endpoint``) are registered for every
test module by conftest.py.

- configuration: :func:`demo_config` (tests/tiny.yaml with every path under a temp root);
- object storage: :data:`S3_BUCKET` and the ``s3_endpoint`` fixture (``medisyn.demo.services.MotoS3Server``);
- PostgreSQL: the ``postgres_url`` fixture (a throwaway Debian cluster on loopback);
- DICOM inputs: :data:`PHI`, :func:`make_dataset`, :func:`with_phi`, :func:`to_bytes`, ...;
- dataset prefixes (docs/stages.md): :func:`write_dataset` (two specialties, full columns) and
  :func:`write_tiny_dataset` (the columns the encoder reads);
- models and checkpoints: :func:`model_env`, :func:`write_checkpoints`, :func:`build_sdxl_and_cache`,
  :func:`train_config`.

Heavy libraries (torch, pydicom, pyarrow, boto3) are imported inside the builders, so importing this
module (conftest does, for every test session) stays cheap.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, cast

import numpy as np
import pytest
from PIL import Image

from medisyn import storage
from medisyn.config import RunConfig, load_config

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
def demo_config(root: Path, overrides: list[str] | None = None) -> RunConfig:
    """tests/tiny.yaml (the demo's layout, smallest sizes) with every path moved under ``root``."""
    m = root / "models"
    base = [
        f"storage.root={root / 'runs'}",
        f"models.sdxl_base={m / 'sdxl-tiny'}",
        f"models.vae={m / 'sdxl-vae-fp16-fix-tiny'}",
        f"models.biomedclip={m / 'biomedclip-tiny'}",
        f"models.fid_inception_weights={m / 'fid-features-tiny.pth'}",
        f"models.resnet50_weights={m / 'resnet-tiny.pth'}",
    ]
    return load_config(REPO / "tests" / "tiny.yaml", base + list(overrides or []))


# ----------------------------------------------------------------------------------------------
# Object storage: an S3 API on loopback (moto), through the platform's own service wrapper
# ----------------------------------------------------------------------------------------------
S3_BUCKET = "medisyn-test"

# Fake credentials at import time (conftest imports this module before any Ray worker starts, so
# workers inherit them); moto accepts any.
for _k, _v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(_k, _v)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a fresh moto S3 server on 127.0.0.1 (``medisyn.demo.services.MotoS3Server``) with bucket
    ``S3_BUCKET`` created; exported as ``$MEDISYN_S3_ENDPOINT_URL`` for the session::

        def test_x(s3_endpoint):
            uri = f"s3://{S3_BUCKET}/some/prefix"
    """
    from medisyn.demo.services import MotoS3Server

    old = os.environ.get("MEDISYN_S3_ENDPOINT_URL")
    with MotoS3Server() as s3:
        s3.create_bucket(S3_BUCKET)
        os.environ["MEDISYN_S3_ENDPOINT_URL"] = s3.endpoint_url
        try:
            yield s3.endpoint_url
        finally:
            if old is None:
                os.environ.pop("MEDISYN_S3_ENDPOINT_URL", None)
            else:
                os.environ["MEDISYN_S3_ENDPOINT_URL"] = old


# ----------------------------------------------------------------------------------------------
# Local Ray for the preprocessing tests
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A local Ray (2 CPUs) for one test module, stopped after it; a Ray an earlier module's
    in-process stage left running is stopped first."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


# ----------------------------------------------------------------------------------------------
# Headless Chromium (Debian's chromium + chromium-driver, installed by `make sysdeps`)
# ----------------------------------------------------------------------------------------------
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1366,900",
)


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Any]:
    """A Selenium WebDriver on Debian's headless Chromium, with a fresh profile; closed (browser and
    driver processes included) after the test. The flags keep Chromium off the closed network
    (no background connections, no component updates)::

        def test_page(chromium):
            chromium.get("file:///.../report.html")
    """
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.fail("Debian's chromium / chromium-driver are missing: run `make sysdeps`")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


# ----------------------------------------------------------------------------------------------
# PostgreSQL (the chart's database): a throwaway cluster per test
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def postgres_cluster() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on loopback (Debian's postgresql, run as its `postgres` user),
    stopped and deleted on exit: yields a SQLAlchemy URL (psycopg 3) of its ``postgres`` database
    for user ``medisyn`` (trust auth, loopback only). Skips without Debian's postgresql or root."""
    import glob
    import os
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    from medisyn.demo.services import free_port

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins or os.geteuid() != 0 or shutil.which("runuser") is None:
        missing_tool("needs Debian's postgresql and root (make sysdeps installs it)")
    bindir = os.path.dirname(bins[-1])
    data = Path(tempfile.mkdtemp(prefix="medisyn-pg-"))  # not under tmp_path: postgres cannot enter root's 0700 dirs
    shutil.chown(data, "postgres", "postgres")
    port = free_port()

    def as_postgres(*cmd: str) -> None:
        # no pipes: the server pg_ctl leaves running would hold them open (its log goes to -l)
        subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)

    as_postgres(f"{bindir}/initdb", "-D", str(data), "-A", "trust", "-U", "medisyn")
    as_postgres(f"{bindir}/pg_ctl", "-D", str(data), "-l", str(data / "server.log"), "-o",
                f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "-w", "start")
    try:
        yield f"postgresql+psycopg://medisyn@127.0.0.1:{port}/postgres"
    finally:
        as_postgres(f"{bindir}/pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL cluster of the test's own (:func:`postgres_cluster`)."""
    with postgres_cluster() as url:
        yield url


# ----------------------------------------------------------------------------------------------
# DICOM inputs (tests/test_dicom.py, and the messy corpus of tests/test_preprocess.py)
# ----------------------------------------------------------------------------------------------
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"  # pydicom.uid.CTImageStorage
SECONDARY_CAPTURE_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"  # pydicom.uid.SecondaryCaptureImageStorage
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"  # pydicom.uid.ExplicitVRLittleEndian

# Every one of these goes into every header; none may reach any output (tests/test_preprocess.py).
PHI = {
    "PatientName": "Quixotic^Zebulon^Marmaduke",
    "PatientID": "PID-7781-SECRET",
    "PatientBirthDate": "19610417",
    "StudyDate": "20190823",
    "AccessionNumber": "ACCX99173",
    "InstitutionName": "Mercy Phantom Clinic Zeta",
    "ReferringPhysicianName": "Doctor^Yolanda^Strangelove",
    "StudyDescription": "Zebulon free text: chest pain since Tuesday",
    "StudyInstanceUID": "1.2.826.0.1.3680043.99.424242",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.99.525252",
}
PHI_STRINGS = list(PHI.values())


def with_phi(ds: Dataset, patient_id: str | None = None, tag: str = "") -> Dataset:
    """``ds`` with every :data:`PHI` element set (``patient_id`` overrides PatientID) and a SOP
    instance UID derived from ``tag``."""
    for k, v in PHI.items():
        setattr(ds, k, v)
    if patient_id:
        ds.PatientID = patient_id
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.99.7.{abs(hash(tag)) % 10**9}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def make_dataset(pixels: np.ndarray, modality: str = "CT", photometric: str = "MONOCHROME2",
                 bits_stored: int | None = None, slope: float | None = 1.0, intercept: float | None = -1024.0,
                 frames: int = 1, sop_class: str = CT_IMAGE_STORAGE) -> Dataset:
    """A minimal, valid uncompressed dataset (explicit VR little endian) around ``pixels``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(EXPLICIT_VR_LITTLE_ENDIAN)
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = UID("1.2.3.4")
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, "1.2.3.4"
    ds.Modality = modality
    shape = pixels.shape[1:] if frames > 1 else pixels.shape
    ds.Rows, ds.Columns = shape[0], shape[1]
    if frames > 1:
        ds.NumberOfFrames = frames
    colour = pixels.ndim == (4 if frames > 1 else 3)
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = "RGB" if colour else photometric
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits_stored or bits, (bits_stored or bits) - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def to_bytes(ds: Dataset, syntax: str = EXPLICIT_VR_LITTLE_ENDIAN) -> bytes:
    """``ds`` as a DICOM file in transfer syntax ``syntax`` (RLE and JPEG 2000 lossless compress the
    pixels; the other syntaxes re-encode the header only)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, JPEG2000Lossless, RLELossless

    ds = ds.copy()
    ds.file_meta = cast(FileMetaDataset, ds.file_meta.copy())
    if syntax in (RLELossless, JPEG2000Lossless):
        ds.compress(syntax)
    elif syntax != ds.file_meta.TransferSyntaxUID:
        ds.file_meta.TransferSyntaxUID = UID(syntax)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def jpeg_baseline_bytes(grey: np.ndarray) -> tuple[bytes, np.ndarray]:
    """(DICOM bytes with a PIL-encoded baseline JPEG frame, the pixels PIL decodes from that JPEG)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)))
    ds = make_dataset(grey, modality="OT", slope=None, intercept=None, sop_class=SECONDARY_CAPTURE_IMAGE_STORAGE)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue(), decoded


def ct_pixels(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    """Stored values (uint16) spanning air to bone once the intercept -1024 is applied."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2500, (h, w)).astype(np.uint16)


# ----------------------------------------------------------------------------------------------
# Dataset prefixes (docs/stages.md), built directly so later stages' tests do not wait on preprocessing
# ----------------------------------------------------------------------------------------------
SPECIALTIES = {  # specialty -> (image_type, caption template, labels)
    "dermatology": ("dermoscopy", "Dermoscopy image showing {}.", ["melanoma", "melanocytic nevi"]),
    "ophthalmology": ("oct", "Optical coherence tomography image showing {}.", ["drusen", "normal findings"]),
}


def write_dataset(uri: str, n_per_specialty: int = 12, resolution: int = 64, seed: int = 0,
                  split: str = "train") -> str:
    """A complete dataset prefix with one split (``train`` unless ``split`` names another) of phantom
    images, two specialties, two shards, every documented column (the FID / generation / registry /
    reader-study tests)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    for spec, (itype, template, labels) in SPECIALTIES.items():
        for i in range(n_per_specialty):
            label = labels[i % len(labels)]
            base = 60 if spec == "dermatology" else 160
            arr = np.clip(rng.normal(base, 40, (resolution, resolution, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            rows.append(dict(
                image=buf.getvalue(), caption=template.format(label), specialty=spec, image_type=itype,
                label=label, source="phantom", split=split, patient_hash=f"p{len(rows)}",
                image_hash=f"i{len(rows)}", pixel_hash=f"x{len(rows)}", width=resolution, height=resolution,
            ))
    with storage.staged_dir(uri) as d:
        (d / split).mkdir()
        half = len(rows) // 2
        for k, chunk in enumerate((rows[:half], rows[half:])):
            pq.write_table(pa.Table.from_pylist(chunk), d / split / f"part-{k:05d}.parquet")
        (d / "manifest.json").write_text(json.dumps({
            "dataset_hash": f"phantom-{seed}-{n_per_specialty}-{resolution}",
            "counts": {split: dict.fromkeys(SPECIALTIES, n_per_specialty)},
        }))
    return storage.normalize(uri)


CAPTIONS = (
    "Dermoscopy image showing melanoma",
    "Optical coherence tomography image showing drusen",
    "Chest X-ray image showing no findings",
)


def write_tiny_dataset(root: Path, n: int = 40, resolution: int = 64, seed: int = 0, shards: int = 2) -> str:
    """A dataset prefix in the docs/stages.md format (train split only, the columns encode reads):
    smooth random blobs a tiny U-Net can learn, captions cycling through :data:`CAPTIONS`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    images, captions = [], []
    for i in range(n):
        base = rng.random((4, 4, 3))
        arr = np.kron(base, np.ones((resolution // 4, resolution // 4, 1)))
        buf = io.BytesIO()
        Image.fromarray((arr * 255).astype(np.uint8)).save(buf, format="PNG")
        images.append(buf.getvalue())
        captions.append(CAPTIONS[i % len(CAPTIONS)])
    table = pa.table({"image": images, "caption": captions, "split": ["train"] * n})
    (root / "train").mkdir(parents=True, exist_ok=True)
    per = -(-n // shards)
    for s in range(shards):
        pq.write_table(table.slice(s * per, per), root / "train" / f"part-{s:05d}.parquet")
    (root / "manifest.json").write_text(json.dumps({"dataset_hash": f"tiny-{n}-{resolution}-{seed}"}))
    (root / storage.COMPLETE_MARKER).write_text("{}")
    return str(root)


# ----------------------------------------------------------------------------------------------
# Models and checkpoints
# ----------------------------------------------------------------------------------------------
def write_checkpoints(cfg: RunConfig, uri: str, epochs: int = 2, incomplete_epoch: int | None = None) -> list[str]:
    """Epoch checkpoints (``unet/`` + ``checkpoint.json`` + ``_COMPLETE``) of the tiny base U-Net,
    each perturbed differently (so their FIDs differ); ``incomplete_epoch`` is left without
    ``_COMPLETE`` (a checkpoint being written) and is not returned."""
    import shutil
    import tempfile

    import torch

    from medisyn.models.sdxl import load_unet

    out = []
    for epoch in range(1, epochs + 1):
        unet = load_unet(cfg.models)
        torch.manual_seed(epoch)
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(torch.randn_like(p) * 0.02 * epoch)
        ck = storage.join(uri, f"epoch-{epoch:04d}")
        tmp = Path(tempfile.mkdtemp())
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        (tmp / "checkpoint.json").write_text(json.dumps({"epoch": epoch, "global_step": 10 * epoch, "kind": "epoch"}))
        if epoch == incomplete_epoch:
            assert not storage.is_remote(ck), "an incomplete checkpoint is only written to local storage"
            shutil.copytree(tmp, Path(storage.local_path(ck)))
        else:
            storage.publish_dir(tmp, ck)
            out.append(storage.normalize(ck))
    return out


_BUILT: dict[str, Path] = {}


def model_env(tmp_root: Path, overrides: list[str] | None = None) -> tuple[RunConfig, Path]:
    """(cfg, root): the demo config under ``tmp_root`` with the tiny SDXL and tiny FID extractor built
    once per process (not the shared ``tiny_cfg``: these tests need only these two models), and fast
    sampling / FID settings."""
    from medisyn.models import inception, sdxl

    if "root" not in _BUILT:
        root = Path(tmp_root)
        cfg = demo_config(root)
        sdxl.build_tiny_sdxl(cfg.models.tiny, storage.local_path(cfg.models.sdxl_base),
                             storage.local_path(cfg.models.vae))
        inception.build_tiny_feature_extractor(cfg.models.tiny, cfg.models.fid_inception_weights)
        _BUILT["root"] = root
    root = _BUILT["root"]
    fast = ["sampling.num_inference_steps=2", "fid.num_samples=16", "fid.bootstrap_resamples=20", "fid.batch_size=8"]
    return demo_config(root, fast + list(overrides or [])), root


NUM_SAMPLES = 40  # train_config: batch 8 on 1 device -> 5 optimizer steps per epoch


def build_sdxl_and_cache(root: Path, n: int = NUM_SAMPLES) -> str:
    """Tiny SDXL under ``root`` and a float32 latent cache of a tiny dataset; returns the cache URI."""
    from medisyn.models import sdxl
    from medisyn.train.encode import encode

    cfg = demo_config(root, ["train.cache_dtype=float32"])
    sdxl.build_tiny_sdxl(cfg.models.tiny, storage.local_path(cfg.models.sdxl_base), storage.local_path(cfg.models.vae))
    dataset = write_tiny_dataset(root / "dataset", n=n)
    return encode(cfg, dataset, str(root / "cache")).cache_uri


def train_config(root: Path, overrides: list[str] | None = None) -> RunConfig:
    """Demo config: batch 8 on 1 device, 40 samples -> 5 optimizer steps per epoch."""
    return demo_config(root, ["train.epochs=2", "train.log_every_steps=2", "train.cache_dtype=float32",
                              *(overrides or [])])


def register_tiny_version(root: Path, overrides: list[str] | None = None) -> tuple[RunConfig, str]:
    """(cfg, models:/<name>/<version>): the tiny SDXL (``model_env``) registered as a real model version
    in an MLflow store under ``root`` (SQLite, artifacts on local disk, no server), ``cfg`` pointed at
    it. The reader-study tests generate from it through the registry, as consumers do."""
    from mlflow import MlflowClient

    from medisyn import registry
    from medisyn.evaluate.fid import ScoreResult

    cfg, _ = model_env(root / "models", overrides)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"tracking_uri": uri})})
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if client.get_experiment_by_name(cfg.tracking.experiment) is None:  # artifacts under root, not ./mlruns
        client.create_experiment(cfg.tracking.experiment, artifact_location=(root / "artifacts").as_uri())
    (ck,) = write_checkpoints(cfg, str(root / "checkpoints"), epochs=1)
    score = ScoreResult(out_uri="/nowhere", best_epoch=1, best_checkpoint_uri=ck, best_fid=1.0, fid_by_epoch={1: 1.0},
                        fid_by_specialty={}, fid_ci=None, num_samples=1, seed=0, mode="full", provenance={},
                        dataset_hash="d", real_stats_uri="", real_stats_cached=False)
    reg = registry.register_candidate(cfg, score, str(root / "no-dataset"))
    return cfg, reg.model_uri


def sqlite_registry(db: Path, experiment: str, artifacts: Path, copy_of: str | None = None) -> str:
    """The URI of an MLflow store in the SQLite file ``db`` (no server): a fresh one whose experiment
    keeps its artifacts under ``artifacts`` (not ./mlruns), or, with ``copy_of`` (such a URI), a copy
    of that store as it is now (the same registry state for two runs of a stage that edits it)."""
    import shutil

    from mlflow import MlflowClient

    uri = f"sqlite:///{db}"
    if copy_of is not None:
        shutil.copyfile(copy_of.removeprefix("sqlite:///"), db)
        return uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment, artifact_location=artifacts.as_uri())
    return uri


# ----------------------------------------------------------------------------------------------
# A gated, reported model version (tests/test_report.py): a dataset with every split and class-coded
# images, and fake generators for the gates
# ----------------------------------------------------------------------------------------------
GATE_CLASSES = {  # (specialty, image type, caption template) -> class -> dominant colour
    ("dermatology", "dermoscopy", "Dermoscopy image showing {}."): {
        "melanoma": (200, 40, 40), "melanocytic nevi": (40, 40, 200)},
    ("ophthalmology", "oct", "Optical coherence tomography image showing {}."): {
        "drusen": (40, 170, 40), "normal findings": (170, 170, 40)},
}


def class_image(label: str, rng: np.random.Generator, resolution: int = 64) -> np.ndarray:
    """A phantom of a class: its colour plus a smooth random field (unique per draw, so two draws of
    one class lie well apart by the patch distance while a classifier still tells classes apart)."""
    colour = next(c[label] for c in GATE_CLASSES.values() if label in c)
    field = rng.normal(0, 45, (8, 8, 3))
    smooth = np.asarray(Image.fromarray(np.clip(field + 128, 0, 255).astype(np.uint8)).resize(
        (resolution, resolution), Image.Resampling.BICUBIC), dtype=float) - 128
    return np.clip(np.array(colour, dtype=float) + smooth, 0, 255).astype(np.uint8)


def gate_captions() -> dict[str, str]:
    """caption -> class of every class in :data:`GATE_CLASSES`."""
    return {template.format(label): label for (_, _, template), classes in GATE_CLASSES.items() for label in classes}


def write_gate_dataset(uri: str, n_train: int = 12, n_eval: int = 6, resolution: int = 64, seed: int = 0) -> str:
    """A complete dataset prefix with train/val/test splits (per class ``n_train`` / ``n_eval`` /
    ``n_eval`` images of :func:`class_image`), two specialties of two classes each, every documented
    column: enough for the privacy gate (with its test-split reference) and the utility gate."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    counts: dict[str, dict[str, int]] = {}
    with storage.staged_dir(uri) as d:
        for split, n in (("train", n_train), ("val", n_eval), ("test", n_eval)):
            rows = []
            for (spec, itype, template), classes in GATE_CLASSES.items():
                for label in classes:
                    for _ in range(n):
                        buf = io.BytesIO()
                        Image.fromarray(class_image(label, rng, resolution)).save(buf, format="PNG")
                        k = len(rows)
                        rows.append(dict(
                            image=buf.getvalue(), caption=template.format(label), specialty=spec, image_type=itype,
                            label=label, source="phantom", split=split, patient_hash=f"{split}-p{k}",
                            image_hash=f"{split}-{k:04d}", pixel_hash=f"{split}-x{k}", width=resolution,
                            height=resolution))
                    counts.setdefault(split, {})[spec] = counts.get(split, {}).get(spec, 0) + n
            (d / split).mkdir()
            pq.write_table(pa.Table.from_pylist(rows), d / split / "part-00000.parquet", row_group_size=16)
        (d / "manifest.json").write_text(json.dumps({"dataset_hash": f"gate-{seed}-{n_train}-{n_eval}-{resolution}",
                                                     "counts": counts}))
    return storage.normalize(uri)


def class_faithful_sampler(resolution: int = 64, copy_of: tuple[str, np.ndarray] | None = None):
    """A fake generator that draws a fresh :func:`class_image` of the prompt's class; with ``copy_of``
    = (prompt, training image), the first image asked for that prompt is a near-copy of it (a
    memorized image the privacy gate must flag)."""
    classes = gate_captions()
    copied: list[bool] = []

    def sample(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        out = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            rng = np.random.default_rng(seed)
            if copy_of is not None and prompt == copy_of[0] and not copied:
                copied.append(True)
                noisy = copy_of[1].astype(int) + rng.integers(-2, 3, copy_of[1].shape)
                out.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
            else:
                out.append(Image.fromarray(class_image(classes[prompt], rng, resolution)))
        return out

    return sample


# ----------------------------------------------------------------------------------------------
# Fake generators for the gates: a memorizing "model" (privacy negative control)
# ----------------------------------------------------------------------------------------------
def train_images(uri: str) -> dict[str, list[np.ndarray]]:
    """The training split's images (RGB arrays) by caption, read with the one dataset reader."""
    from medisyn.data import iter_rows

    out: dict[str, list[np.ndarray]] = {}
    for _, cols in iter_rows(uri, "train", ["image", "caption"]):
        for caption, data in zip(cols["caption"], cols["image"], strict=True):
            out.setdefault(caption, []).append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return out


def copying_sampler(dataset_uri: str, jitter: int = 2):
    """A memorizing 'model': for each prompt, a training image with that caption, +-``jitter`` noise."""
    by_caption = train_images(dataset_uri)
    rng = np.random.default_rng(1)

    def sample(prompts, seeds):
        out = []
        for p, s in zip(prompts, seeds, strict=True):
            src = by_caption[p][s % len(by_caption[p])].astype(int)
            noisy = np.clip(src + rng.integers(-jitter, jitter + 1, src.shape), 0, 255).astype(np.uint8)
            out.append(Image.fromarray(noisy))
        return out

    return sample


# ----------------------------------------------------------------------------------------------
# Registry (mlflow/REGISTRY.md): a candidate version with a real manifest and digest, and real verdicts
# ----------------------------------------------------------------------------------------------
def fake_candidate(client: Any, cfg: RunConfig, root: Path) -> str:
    """Version 1 of the candidates' model: a model directory holding ``artifacts/pipeline`` with a
    sha256 manifest, its digest recorded on the version as registration does (no weights: enough for the
    gates through the runner and for promote, not for loading). Returns ``models:/<candidates>/1``."""
    import hashlib

    from medisyn import registry

    name = registry.candidates_model(cfg)
    pipeline = root / "model" / "artifacts" / registry.PIPELINE_ARTIFACT
    pipeline.mkdir(parents=True)
    (pipeline / "model_index.json").write_text("{}")
    manifest = {"model_index.json": hashlib.sha256(b"{}").hexdigest()}
    (pipeline / registry.MANIFEST_FILE).write_text(json.dumps(manifest))
    client.create_registered_model(name)
    client.create_model_version(name, source=str(root / "model"), tags={
        registry.MANIFEST_DIGEST_TAG: storage.sha256(pipeline / registry.MANIFEST_FILE)})
    client.set_registered_model_alias(name, "candidate", "1")
    return f"models:/{name}/1"


# ----------------------------------------------------------------------------------------------
# Tools and formats shared by several test modules
# ----------------------------------------------------------------------------------------------
def missing_tool(reason: str) -> NoReturn:
    """A tool the test needs is not on this machine (helm, PostgreSQL, Chromium, unshare, tmpfs): skip
    on a developer's machine, but fail under CI (``CI=true``), where `make test` installs every tool
    first and a skip would hide a check that silently stopped running (issue #22)."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"CI: {reason}", pytrace=False)
    pytest.skip(reason)


def helm_binary() -> str:
    """The helm binary `make tools` installs (or $HELM / one on PATH); skips the test without one."""
    import shutil

    for cand in (os.environ.get("HELM"), str(REPO / ".tools" / "bin" / "helm"), shutil.which("helm")):
        if cand and Path(cand).exists():
            return cand
    missing_tool("helm is not installed: run `make tools` (make test installs it first)")


def png_chunks(data: bytes) -> list[str]:
    """The chunk types of a PNG file, in order (IHDR, ..., IEND)."""
    import struct

    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, names = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        names.append(data[pos + 4:pos + 8].decode("ascii"))
        pos += 12 + length
    return names
