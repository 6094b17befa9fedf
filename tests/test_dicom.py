"""medisyn.data.dicom: every common transfer syntax, modality rules, MONOCHROME1, multi-frame,
rescale, VOI LUT policy, decompression bombs (section 4.1). The DICOM builders (make_dataset, to_bytes,
with_phi, ...) live in tests/helpers.py, shared with the messy corpus of tests/test_preprocess.py."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from helpers import PHI, ct_pixels, jpeg_baseline_bytes, make_dataset, to_bytes, with_phi
from medisyn.data import dicom
from medisyn.data.images import DecompressionBombError, RuleError, hu_window, minmax, percentile_clip


def read(data: bytes) -> Dataset:
    return dicom.read_dataset(data, max_pixels=10**8)


# ------------------------------------------------------------------------------------------------
SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless,
            JPEG2000Lossless]


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda s: s.name)
def test_ct_hu_window_every_lossless_syntax(syntax):
    raw = ct_pixels()
    out = dicom.to_uint8(read(to_bytes(make_dataset(raw), syntax)))
    # hand computation: HU = raw - 1024; window L 100 / W 700 -> [-250, 450] -> 0..255
    hu = raw.astype(np.float64) - 1024
    expected = np.rint(np.clip((hu + 250) / 700, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    "name,reference",
    [("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"), ("MR_small_bigendian.dcm", "MR_small.dcm"),
     ("MR_small_RLE.dcm", "MR_small.dcm"), ("MR_small_jp2klossless.dcm", "MR_small.dcm")],
)
def test_mr_percentile_clip_lossless_syntaxes(name, reference):
    out = dicom.to_uint8(read(open(get_testdata_file(name), "rb").read()))
    ref = pydicom.dcmread(get_testdata_file(reference))
    slope, intercept = float(ref.get("RescaleSlope", 1)), float(ref.get("RescaleIntercept", 0))
    values = ref.pixel_array.astype(np.float64) * slope + intercept
    lo, hi = np.percentile(values, [0.5, 99.5])
    np.testing.assert_array_equal(out, np.rint(np.clip((values - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8))


def test_jpeg_lossless_rgb_equals_uncompressed():
    out = dicom.to_uint8(read(open(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"), "rb").read()))
    ref = pydicom.dcmread(get_testdata_file("SC_rgb_rle.dcm")).pixel_array
    assert out.shape == (100, 100, 3)
    np.testing.assert_array_equal(out, ref)


def test_jpeg_extended_12bit_minmax():
    data = open(get_testdata_file("JPGExtended.dcm"), "rb").read()
    out = dicom.to_uint8(read(data))
    np.testing.assert_array_equal(out, minmax(pydicom.dcmread(io.BytesIO(data)).pixel_array))


def test_jpeg_baseline_grey_kept():
    grey = np.random.default_rng(3).integers(0, 256, (64, 80)).astype(np.uint8)
    data, decoded = jpeg_baseline_bytes(grey)
    out = dicom.to_uint8(read(data))
    # lossy: JPEG decoders (pydicom's plugin vs PIL's libjpeg-turbo) may round the IDCT differently
    assert np.abs(out.astype(int) - decoded).max() <= 1


def test_jpeg_baseline_ybr_converted_to_rgb():
    out = dicom.to_uint8(read(open(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"), "rb").read()))
    ref = pydicom.dcmread(get_testdata_file("SC_rgb_rle.dcm")).pixel_array
    assert out.shape == (100, 100, 3)
    assert np.abs(out.astype(int) - ref).mean() < 3  # lossy JPEG of the same picture


def test_jpeg_ls_near_lossless_decodes():
    out = dicom.to_uint8(read(open(get_testdata_file("JPEGLSNearLossless_16.dcm"), "rb").read()))
    assert out.dtype == np.uint8 and out.shape == (50, 10)


def test_monochrome1_inverted():
    raw = np.random.default_rng(4).integers(0, 4096, (40, 50)).astype(np.uint16)
    ds = make_dataset(raw, modality="DX", photometric="MONOCHROME1", bits_stored=12, slope=None, intercept=None)
    out = dicom.to_uint8(read(to_bytes(ds)))
    np.testing.assert_array_equal(out, 255 - minmax(raw))


def test_rescale_slope_intercept_applied():
    raw = np.arange(0, 1200, dtype=np.uint16).reshape(30, 40)
    ds = make_dataset(raw, slope=2.0, intercept=-1000.0)
    out = dicom.to_uint8(read(to_bytes(ds)))
    np.testing.assert_array_equal(out, hu_window(raw * 2.0 - 1000.0, 100, 700))


def test_voi_lut_ignored_unless_asked():
    raw = np.arange(0, 1000, dtype=np.uint16).reshape(25, 40)
    ds = make_dataset(raw, modality="OT", bits_stored=12, slope=None, intercept=None)
    ds.WindowCenter, ds.WindowWidth = 300, 200
    d = read(to_bytes(ds))
    np.testing.assert_array_equal(dicom.to_uint8(d), minmax(raw))
    windowed = dicom.to_uint8(d, "minmax", apply_voi_lut=True)
    assert windowed[0, 0] == 0 and windowed[-1, -1] == 255 and (windowed[raw < 150] == 0).all()


@pytest.mark.parametrize("policy_frame,expected_frame", [(None, 2), (0, 0), (4, 4)])
def test_multiframe_frame_choice(policy_frame, expected_frame):
    frames = np.stack([np.full((16, 16), 100 * (i + 1), np.uint16) for i in range(5)])
    frames[:, 0, 0] = 0  # so minmax has a range
    ds = make_dataset(frames, modality="MR", frames=5, slope=None, intercept=None)
    out = dicom.to_uint8(read(to_bytes(ds)), "minmax", frame=policy_frame)
    np.testing.assert_array_equal(out, minmax(frames[expected_frame]))


def test_multiframe_frame_out_of_range():
    frames = np.zeros((3, 8, 8), np.uint16)
    with pytest.raises(IndexError):
        dicom.to_uint8(read(to_bytes(make_dataset(frames, frames=3))), frame=3)


AUTO_CASES = [
    ("CT", 16, "MONOCHROME2", False, "hu_window"),
    ("MR", 16, "MONOCHROME2", False, "percentile_clip"),
    ("MG", 16, "MONOCHROME1", False, "percentile_clip"),
    ("DX", 12, "MONOCHROME1", False, "minmax"),
    ("OT", 8, "MONOCHROME2", False, "keep"),
    ("US", 8, "RGB", True, "keep"),
]


@pytest.mark.parametrize("modality,bits,photometric,colour,rule", AUTO_CASES)
def test_auto_rule_resolution(modality, bits, photometric, colour, rule):
    ds = Dataset()
    ds.Modality, ds.BitsStored, ds.PhotometricInterpretation = modality, bits, photometric
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PixelData = b""
    assert dicom.resolve_rule(ds) == rule
    assert dicom.resolve_rule(ds, "minmax") == "minmax"


def test_explicit_rule_params_override():
    raw = ct_pixels(20, 20)
    d = read(to_bytes(make_dataset(raw)))
    np.testing.assert_array_equal(dicom.to_uint8(d, "hu_window", level=40, width=400), hu_window(raw - 1024.0, 40, 400))
    np.testing.assert_array_equal(dicom.to_uint8(d, "percentile_clip", low=1, high=99),
                                  percentile_clip(raw - 1024.0, 1, 99))


def test_ct_without_rescale_fails_rule():
    d = read(to_bytes(make_dataset(ct_pixels(10, 10), intercept=None, slope=None)))
    with pytest.raises(RuleError, match="Hounsfield"):
        dicom.to_uint8(d)


def test_keep_refuses_16bit():
    d = read(to_bytes(make_dataset(ct_pixels(10, 10), modality="OT", slope=None, intercept=None)))
    with pytest.raises(RuleError):
        dicom.to_uint8(d, "keep")


def test_decompression_bomb_rejected_on_declared_size():
    ds = make_dataset(np.zeros((8, 8), np.uint16))
    ds.Rows, ds.Columns = 60000, 60000  # pixel data is tiny; only the header lies
    with pytest.raises(DecompressionBombError):
        dicom.read_dataset(to_bytes(ds), max_pixels=20000 * 20000)


def test_no_pixel_data_is_not_an_image():
    with pytest.raises(dicom.NotAnImageError):
        read(open(get_testdata_file("reportsi.dcm"), "rb").read())


def test_truncated_pixel_data_fails_to_decode():
    """Refused when read, before the decoder allocates the declared frame (issue #12)."""
    data = to_bytes(make_dataset(ct_pixels()))
    with pytest.raises(dicom.HostileHeaderError, match="pixel data holds"):
        read(data[: len(data) // 2])


def test_patient_id_and_burned_in():
    ds = with_phi(make_dataset(ct_pixels(4, 4)))
    assert dicom.patient_id(ds) == PHI["PatientID"]
    assert not dicom.burned_in_annotation(ds)
    ds.BurnedInAnnotation = "YES"
    assert dicom.burned_in_annotation(ds)
    assert dicom.is_dicom(to_bytes(ds)) and not dicom.is_dicom(b"\x89PNG" + b"0" * 200)


def _float64_rule(values: np.ndarray, rule: str) -> np.ndarray:
    """The rule written out in float64 over every pixel (the reference the lookup tables must equal)."""
    v = np.asarray(values, dtype=np.float64)
    scaled = (v - (100.0 - 350.0)) / 700.0 if rule == "hu_window" else (v - v.min()) / (v.max() - v.min())
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


LUT_CASES = [  # (dtype, bits stored, slope, intercept, rule): unsigned and signed, odd slopes, both rules
    (np.uint16, 12, 1.0, -1024.0, "hu_window"),
    (np.uint16, 16, 0.37, -2048.5, "hu_window"),
    (np.int16, 16, 1.0, 0.0, "hu_window"),
    (np.int16, 16, -1.5, 40.0, "hu_window"),
    (np.uint16, 12, None, None, "minmax"),
    (np.uint16, 16, 3.3, -7.0, "minmax"),
    (np.int16, 16, -0.5, 100.0, "minmax"),
    (np.uint8, 8, 2.0, -3.0, "minmax"),
]


@pytest.mark.parametrize("dtype,bits,slope,intercept,rule", LUT_CASES)
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_rules_by_lookup_table_equal_float64_per_pixel(dtype, bits, slope, intercept, rule, photometric):
    """to_uint8 runs the rules as tables over the stored values; every pixel must equal the float64 formula."""
    info = np.iinfo(dtype)
    if info.min < 0:
        lo, hi = max(info.min, -(2 ** (bits - 1))), min(info.max, 2 ** (bits - 1) - 1)
    else:
        lo, hi = 0, 2**bits - 1
    raw = np.random.default_rng(bits).integers(lo, hi, (64, 48), endpoint=True).astype(dtype)
    raw[0, 0], raw[-1, -1] = lo, hi  # the widest value range the type allows
    ds = make_dataset(raw, modality="CT" if rule == "hu_window" else "DX", photometric=photometric, bits_stored=bits,
                      slope=slope, intercept=intercept)
    values = raw.astype(np.float64) * slope + intercept if slope is not None else raw
    expected = _float64_rule(values, rule)
    if photometric == "MONOCHROME1":
        expected = 255 - expected
    np.testing.assert_array_equal(dicom.to_uint8(read(to_bytes(ds)), rule), expected)
