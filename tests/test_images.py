"""medisyn.data.images: intensity rules, resize + center crop, tiling, PIL decoding (section 4.1)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from medisyn.data import images

HU_CASES = [
    # (HU value, level, width, expected uint8): lo = L - W/2 -> 0, hi = L + W/2 -> 255
    (-250.0, 100, 700, 0),
    (450.0, 100, 700, 255),
    (100.0, 100, 700, 128),  # 0.5 * 255 = 127.5 -> rint -> 128 (round half to even gives 128)
    (-1000.0, 100, 700, 0),
    (3000.0, 100, 700, 255),
    (0.0, 100, 700, round(250 / 700 * 255)),
    (40.0, 40, 400, 128),
]


@pytest.mark.parametrize("hu,level,width,expected", HU_CASES)
def test_hu_window_values(hu, level, width, expected):
    assert images.hu_window(np.array([[hu]]), level, width)[0, 0] == expected


def test_hu_window_rejects_bad_width():
    with pytest.raises(images.RuleError):
        images.hu_window(np.zeros((2, 2)), 100, 0)


def test_percentile_clip_matches_hand_computation():
    rng = np.random.default_rng(0)
    v = rng.integers(0, 4000, (50, 40)).astype(np.uint16)
    lo, hi = np.percentile(v.astype(np.float64), [0.5, 99.5])
    expected = np.rint(np.clip((v - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(images.percentile_clip(v, 0.5, 99.5), expected)


@pytest.mark.parametrize("fn", [images.minmax, lambda v: images.percentile_clip(v, 0.5, 99.5)])
def test_constant_image_maps_to_zero(fn):
    assert (fn(np.full((4, 4), 7)) == 0).all()


def test_percentile_clip_rejects_bad_bounds():
    with pytest.raises(images.RuleError):
        images.percentile_clip(np.arange(10), 60, 40)


def test_minmax_endpoints():
    out = images.minmax(np.array([[100, 200], [300, 1100]], dtype=np.uint16))
    assert out.tolist() == [[0, round(100 / 1000 * 255)], [round(200 / 1000 * 255), 255]]


RESIZE_CASES = [
    # (h, w, size, resized (h, w))
    (512, 512, 512, (512, 512)),
    (1024, 768, 512, (683, 512)),
    (2048, 2500, 512, (512, 625)),
    (100, 50, 64, (128, 64)),
    (64, 64, 512, (512, 512)),
]


@pytest.mark.parametrize("h,w,size,shape", RESIZE_CASES)
def test_resized_shape(h, w, size, shape):
    assert images.resized_shape(h, w, size) == shape


@pytest.mark.parametrize("channels", [None, 3])
@pytest.mark.parametrize("h,w", [(300, 200), (200, 300), (512, 512), (40, 50)])
def test_resize_center_crop_equals_pil_by_hand(h, w, channels):
    rng = np.random.default_rng(h * w)
    shape = (h, w) if channels is None else (h, w, channels)
    arr = rng.integers(0, 256, shape).astype(np.uint8)
    out = images.resize_center_crop(arr, 128)
    assert out.shape == ((128, 128) if channels is None else (128, 128, 3)) and out.dtype == np.uint8
    # hand computation: shorter side -> 128, bicubic, crop the middle
    if h <= w:
        nh, nw = 128, round(w * 128 / h)
    else:
        nh, nw = round(h * 128 / w), 128
    img = Image.fromarray(arr).resize((nw, nh), Image.Resampling.BICUBIC)
    top, left = (nh - 128) // 2, (nw - 128) // 2
    np.testing.assert_array_equal(out, np.asarray(img)[top : top + 128, left : left + 128])


def test_resize_center_crop_identity_at_size():
    arr = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8)
    assert images.resize_center_crop(arr, 64) is arr


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint16), np.zeros((4, 4, 4), np.uint8), np.zeros(4, np.uint8)])
def test_resize_center_crop_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        images.resize_center_crop(bad, 8)


TILE_CASES = [
    # (length, size, overlap cap, positions)
    (512, 512, 0.1, [0]),
    (400, 512, 0.1, []),
    (600, 512, 0.1, [44]),  # two tiles would overlap 83%: one centered tile
    (1024, 512, 0.1, [0, 512]),
    (1000, 512, 0.1, [0, 488]),  # overlap 24 px
    (2048, 512, 0.1, [0, 512, 1024, 1536]),
    (1400, 512, 0.1, [0, 888]),  # 3 tiles would overlap 13%: the cap wins, a gap is left
    (1434, 512, 0.1, [0, 461, 922]),  # 3 tiles overlapping 51 px = 9.96%
]


@pytest.mark.parametrize("length,size,cap,positions", TILE_CASES)
def test_tile_positions(length, size, cap, positions):
    assert images.tile_positions(length, size, cap) == positions


@pytest.mark.parametrize("length", list(range(512, 5000, 97)))
def test_tile_overlap_never_exceeds_cap(length):
    pos = images.tile_positions(length, 512, 0.10)
    assert pos and pos[-1] + 512 <= length
    for a, b in zip(pos, pos[1:], strict=False):  # consecutive pairs: the shorter pos[1:] ends it, by design
        assert 512 - (b - a) <= 0.10 * 512


def test_tiles_cut_the_array():
    arr = np.arange(1024 * 1000, dtype=np.int64).reshape(1024, 1000).astype(np.uint8)
    out = images.tiles(arr, 512, 0.1)
    assert [(y, x) for y, x, _ in out] == [(0, 0), (0, 488), (512, 0), (512, 488)]
    np.testing.assert_array_equal(out[3][2], arr[512:1024, 488:1000])


def _png(arr, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_16bit_png_minmax():
    v = (np.arange(20 * 30).reshape(20, 30) * 50 + 1000).astype(np.uint16)
    img = images.open_image(_png(v), 10**8)
    out = images.image_to_uint8(img)
    np.testing.assert_array_equal(out, images.minmax(v))


@pytest.mark.parametrize("mode,expected_ndim", [("L", 2), ("RGB", 3), ("RGBA", 3), ("P", 3), ("LA", 2)])
def test_8bit_modes_kept(mode, expected_ndim):
    rgb = np.random.default_rng(1).integers(0, 256, (10, 12, 3)).astype(np.uint8)
    img = Image.fromarray(rgb).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    out = images.image_to_uint8(images.open_image(buf.getvalue(), 10**8), "auto")
    assert out.ndim == expected_ndim and out.dtype == np.uint8
    ref = np.asarray(img.convert("L" if expected_ndim == 2 else "RGB"))
    np.testing.assert_array_equal(out, ref)


def test_png_bomb_rejected_before_decoding():
    data = _png(np.zeros((10, 10), np.uint8))
    with pytest.raises(images.DecompressionBombError):
        images.open_image(data, max_pixels=99)


def test_rule_errors_on_colour_percentile():
    img = Image.fromarray(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(images.RuleError):
        images.image_to_uint8(img, "percentile_clip")


def test_png_roundtrip_and_hashes():
    arr = np.random.default_rng(2).integers(0, 256, (32, 32)).astype(np.uint8)
    data = images.encode_png(arr)
    assert data.startswith(images.PNG_SIGNATURE)
    np.testing.assert_array_equal(np.asarray(images.decode_png(data)), arr)
    assert images.pixel_hash(arr) == images.pixel_hash(arr.copy())
    assert images.pixel_hash(arr) != images.pixel_hash(arr.reshape(16, 64))
    assert images.hamming(0b1011, 0b0001) == 2
    assert images.hamming(images.perceptual_hash(arr), images.perceptual_hash(arr)) == 0


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, ">u2", ">i2"])  # big endian: DICOM
def test_by_stored_value_equals_the_function_on_every_pixel(dtype):
    info = np.iinfo(dtype)
    v = np.random.default_rng(0).integers(info.min, info.max, (300, 700), endpoint=True).astype(dtype)  # > one chunk
    v[0, 0], v[-1, -1] = info.min, info.max

    def window(x):
        return images.hu_window(np.asarray(x, dtype=np.float64) * 0.7 - 11.0, 40.0, 400.0)

    np.testing.assert_array_equal(images.by_stored_value(v, window), window(v))
    np.testing.assert_array_equal(images.minmax(v), images._minmax_float(v))
    # non-integer or wider input: computed directly
    f = v.astype(np.float32)
    np.testing.assert_array_equal(images.by_stored_value(f, window), window(f))


def test_minmax_constant_integer_image_maps_to_zero():
    assert not images.minmax(np.full((4, 4), 7, np.uint16)).any()


def _percentile_clip_float64(values, low, high):
    """The rule by hand: np.percentile over float64 values, then the linear map."""
    v = np.asarray(values, dtype=np.float64)
    p_lo, p_hi = np.percentile(v, [low, high])
    if not p_hi > p_lo:
        return np.zeros(v.shape, np.uint8)
    return np.rint(np.clip((v - p_lo) / (p_hi - p_lo), 0, 1) * 255).astype(np.uint8)


MAPS = {  # stored -> values: identity, rescale up, rescale down, and a non-monotone table
    "identity": None,
    "rescale": lambda d: np.asarray(d, np.float64) * 0.37 - 1024.5,
    "negative_slope": lambda d: np.asarray(d, np.float64) * -2.0 + 7.0,
    "non_monotone": lambda d: (np.asarray(d, np.float64) - 300.0) ** 2,
}


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, ">i2"])
@pytest.mark.parametrize("mapping", list(MAPS))
@pytest.mark.parametrize("low,high", [(0.5, 99.5), (0, 100), (1, 99), (25, 50), (33.3, 66.7)])
def test_percentile_clip_from_histogram_equals_np_percentile(dtype, mapping, low, high):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(int(low * 10 + high))
    for shape, span in (((257, 509), min(info.max, 4095)), ((7, 11), 40), ((300, 600), info.max)):
        stored = rng.integers(max(info.min, -span), span, shape, endpoint=True).astype(dtype)
        to_values = MAPS[mapping]
        values = stored if to_values is None else to_values(stored)
        np.testing.assert_array_equal(images.percentile_clip_stored(stored, to_values, low, high),
                                      _percentile_clip_float64(values, low, high))
    constant = np.full((5, 5), 3, dtype)
    assert not images.percentile_clip_stored(constant, None, low, high).any()
