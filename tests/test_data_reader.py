"""medisyn.data, the one dataset reader: sorted shards, row ids before filtering, bounded batches,
the ``_COMPLETE`` check, and every reader (iter_rows, iter_split, read_split) seeing the same rows."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medisyn import data, storage
from medisyn.data import decode_png, iter_rows, iter_split, read_split, split_files, train_shards


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_split(root: Path, split: str, n_files: int, rows_per_file: int, order: list[int] | None = None) -> None:
    """``n_files`` shards of ``rows_per_file`` rows; row k has label str(k) and specialty "b" when k % 3 == 0.
    ``order`` writes the shards in that order (the listing must still come back sorted)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / split).mkdir(parents=True, exist_ok=True)
    for f in order if order is not None else range(n_files):
        recs = []
        for k in range(f * rows_per_file, (f + 1) * rows_per_file):
            recs.append({"image": _png(k), "specialty": "a" if k % 3 else "b", "image_type": "x", "label": str(k)})
        pq.write_table(pa.Table.from_pylist(recs), root / split / f"part-{f:05d}.parquet", row_group_size=2)


@pytest.fixture
def dataset(tmp_path: Path) -> str:
    _write_split(tmp_path, "train", n_files=3, rows_per_file=5, order=[2, 0, 1])
    (tmp_path / storage.COMPLETE_MARKER).write_text("{}")
    return str(tmp_path)


def test_split_files_are_sorted_parquet_shards(dataset: str) -> None:
    (Path(dataset) / "train" / "notes.txt").write_text("not a shard")
    names = [u.rsplit("/", 1)[1] for u in split_files(dataset, "train")]
    assert names == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert train_shards(dataset) == split_files(dataset, "train")
    assert split_files(dataset, "val") == []  # a split without shards is empty, not an error


def test_iter_rows_numbers_rows_across_files_and_filters(dataset: str) -> None:
    ids: list[int] = []
    labels: list[str] = []
    for row_ids, cols in iter_rows(dataset, "train", ["label"], batch_size=4):
        assert len(row_ids) <= 4 and set(cols) == {"label"}
        ids.extend(row_ids.tolist())
        labels.extend(cols["label"])
    assert ids == list(range(15)) and labels == [str(i) for i in range(15)]
    b_ids = [i for row_ids, _ in iter_rows(dataset, "train", ["label"], 4, where={"specialty": "b"})
             for i in row_ids.tolist()]
    assert b_ids == [0, 3, 6, 9, 12]  # row ids survive the filter, so a second pass can fetch them


def test_iter_rows_where_columns_are_read_but_not_returned_and_filters_combine(dataset: str) -> None:
    batches = list(iter_rows(dataset, "train", ["image", "label"], 2, where={"specialty": "b", "image_type": "x"}))
    assert all(set(cols) == {"image", "label"} for _, cols in batches)
    assert all(len(ids) > 0 for ids, _ in batches)  # batches the filter empties are skipped
    rows = {int(i): (label, png)
            for ids, cols in batches for i, label, png in zip(ids, cols["label"], cols["image"], strict=True)}
    assert sorted(rows) == [0, 3, 6, 9, 12]
    for i, (label, png) in rows.items():
        assert label == str(i) and int(np.asarray(decode_png(png))[0, 0]) == i
    assert list(iter_rows(dataset, "train", ["label"], where={"specialty": "nope"})) == []


def test_iter_split_and_read_split_see_the_rows_in_the_same_order(dataset: str) -> None:
    frames = list(iter_split(dataset, "train", columns=["label", "specialty"], batch_size=4))
    assert all(len(f) <= 4 and list(f.columns) == ["label", "specialty"] for f in frames)
    streamed = pd.concat(frames, ignore_index=True)
    whole = read_split(dataset, "train", columns=["label", "specialty"])
    pd.testing.assert_frame_equal(streamed, whole)
    by_rows = [v for _, cols in iter_rows(dataset, "train", ["label"], 7) for v in cols["label"]]
    assert whole["label"].tolist() == by_rows == [str(i) for i in range(15)]


def test_decode_png_gives_the_stored_mode(dataset: str) -> None:
    img = decode_png(read_split(dataset, "train", columns=["image"])["image"][4])
    assert img.mode == "L" and img.size == (4, 4) and int(np.asarray(img)[0, 0]) == 4


@pytest.mark.parametrize("reader", [
    lambda uri: list(iter_rows(uri, "train", ["label"])),
    lambda uri: list(iter_split(uri, "train")),
    lambda uri: read_split(uri, "train"),
    lambda uri: split_files(uri, "train"),
], ids=["iter_rows", "iter_split", "read_split", "split_files"])
def test_every_reader_refuses_an_incomplete_dataset(tmp_path: Path, reader) -> None:
    _write_split(tmp_path, "train", 1, 2)
    with pytest.raises(FileNotFoundError, match="_COMPLETE"):
        reader(str(tmp_path))


def test_an_unknown_split_is_an_error(dataset: str) -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        list(iter_rows(dataset, "training", ["label"]))


def test_the_gates_have_no_reader_of_their_own() -> None:
    from medisyn.evaluate import gates, privacy, utility

    for twin in ("split_files", "iter_rows", "decode_image"):
        assert not hasattr(gates, twin), f"medisyn.evaluate.gates.{twin} duplicates medisyn.data"
    assert privacy.iter_rows is utility.iter_rows is data.iter_rows
    assert privacy.decode_png is utility.decode_png is data.decode_png
