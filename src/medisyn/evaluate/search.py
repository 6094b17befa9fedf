"""Exact nearest-neighbour search by cosine similarity (paper eq. 2), chunked in torch.

The privacy gate matches every synthetic image (and every held-out reference image) to the training
image of highest cosine similarity. Embeddings are L2-normalised, so the similarity is a dot product,
and the database (the training split's embeddings, up to ~1M x 512) is streamed chunk by chunk: the
search holds the queries, one database chunk and a few candidates per query, never the database.

What "exact" means here: the neighbour of query q is the row j maximising ``q . x_j`` evaluated in
float64 from the float32 embeddings (the products of two float32 numbers are exact in float64), ties
broken towards the lowest row id, the similarity returned is that float64 value (rounded to float32
by the caller when stored). How it is found fast:

1. On the configured device, in float32 at full IEEE precision (TF32 / bf16 matmul modes are turned
   off for the duration, whatever a trainer set), a block of queries times a block of database rows,
   keeping the ``k`` best candidates per query (``torch.topk``). Blocks are sized so that one
   similarity block stays under ``max_block_bytes``: memory is bounded over both queries and database.
2. The kept candidates are rescored in float64 on the host (numpy, one fixed summation per pair, so a
   pair always gets the same value, whichever block it came in). A float32 dot product of d terms is
   off by at most gamma_d * |q| |x| (gamma_d = d u / (1 - d u), u = 2^-24), so every row that could
   be the exact maximum lies within ``tol = 2 gamma_d |q| max|x|`` of the best float32 score. If the
   k-th kept candidate is below that band, the band is inside the kept set and the float64 rescoring
   decides exactly, ties included.
3. Otherwise (k or more rows within the band: exact duplicates, near-duplicate clusters) the query
   is *unresolved*; :func:`nearest_neighbours` streams the database once more for those queries
   only, in float64, and rescores every row near the float64 maximum the same way.

:func:`nearest_neighbours` is the whole procedure for a re-iterable database; the privacy gate calls
it once per (specialty, image type) group. ``benchmarks/privacy.py`` compares it with scikit-learn's
brute-force ``NearestNeighbors(metric="cosine")``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

DEFAULT_K = 8  # candidates kept per query before the exact float64 decision
DEFAULT_BLOCK_BYTES = 256 << 20  # one float32 similarity block (queries x database rows)
_REFINE_MARGIN = 1e-9  # float64 matmul vs the canonical float64 sum differ by ~1e-13 for unit vectors


@contextlib.contextmanager
def ieee_float32_matmul() -> Iterator[None]:
    """Full-precision float32 matmul (no TF32 on CUDA, no bf16 in oneDNN) inside the block, restoring
    whatever was set before (through the per-backend API: mixing it with the legacy global setter is
    an error in torch >= 2.9 when read back, and restoring the values keeps them consistent)."""
    backends = [b for b in (getattr(torch.backends.cuda, "matmul", None),
                            getattr(getattr(torch.backends, "mkldnn", None), "matmul", None))
                if b is not None and hasattr(b, "fp32_precision")]
    if not backends:  # older torch: the legacy switch only
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(before)
        return
    saved = [b.fp32_precision for b in backends]
    try:
        for b in backends:
            b.fp32_precision = "ieee"
        yield
    finally:
        for b, value in zip(backends, saved, strict=True):
            b.fp32_precision = value


def float32_dot_error_bound(dim: int) -> float:
    """gamma_d: |fl32(q . x) - q . x| <= gamma_d * sum |q_i x_i| <= gamma_d |q| |x|, any summation order."""
    u = 2.0**-24
    return dim * u / (1 - dim * u)


def _canonical_dot(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """float64 dot products of paired rows, (p, d) and (p, d) -> (p,), by one fixed summation (numpy's
    pairwise sum along the last axis): a pair always gets the same value, whatever block it came in."""
    return np.multiply(np.asarray(x, dtype=np.float64), np.asarray(q, dtype=np.float64)).sum(axis=-1)


class ExactCosineSearch:
    """Streaming exact 1-nearest-neighbour by dot product (see the module docstring).

    ``add(rows, emb)`` each database chunk; then, if :meth:`unresolved` is not empty, ``refine(rows,
    emb)`` each chunk again; :meth:`result` returns (row id, similarity) per query: row -1 and
    similarity -inf when the database was empty.
    """

    def __init__(self, queries: np.ndarray, device: str | torch.device = "cpu", *, k: int = DEFAULT_K,
                 max_block_bytes: int = DEFAULT_BLOCK_BYTES):
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2:
            raise ValueError(f"queries must be a (n, dim) array, got shape {q.shape}")
        if not np.isfinite(q).all():
            raise ValueError("queries hold non-finite values")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.m, self.dim = q.shape
        self.k = k
        self.device = torch.device(device)
        self.block_elems = max(1, max_block_bytes // 4)
        self.q_chunk = max(1, min(self.m, 4096, self.block_elems))
        self._q32 = q
        self._q64 = q.astype(np.float64)
        self._q = torch.from_numpy(q).to(self.device)
        self._qnorm = np.linalg.norm(self._q64, axis=1)
        self._xmax = 0.0  # largest database row norm seen (the error band scales with it)
        self.rows_seen = 0
        # the k best candidates per query by float32 score, with their float64 scores (host arrays)
        self._val32 = np.full((self.m, k), -np.inf, dtype=np.float32)
        self._row = np.full((self.m, k), -1, dtype=np.int64)
        self._val64 = np.full((self.m, k), -np.inf, dtype=np.float64)
        self._refining: np.ndarray | None = None  # query indices being refined
        self._ref_best: np.ndarray | None = None
        self._ref_row: np.ndarray | None = None

    # -- pass 1 -------------------------------------------------------------------------------
    def _check_chunk(self, rows: np.ndarray, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(emb, dtype=np.float32)
        if not x.flags.writeable:  # a memory-mapped shard: torch wants a writable buffer
            x = x.copy()
        r = np.asarray(rows, dtype=np.int64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"database chunk has shape {x.shape}, queries have dim {self.dim}")
        if r.shape != (len(x),):
            raise ValueError(f"{len(r)} row ids for {len(x)} database rows")
        if not np.isfinite(x).all():
            raise ValueError("database chunk holds non-finite values")
        return r, x

    def add(self, rows: np.ndarray, emb: np.ndarray) -> None:
        """Search one database chunk: ``rows`` (n,) int row ids, ``emb`` (n, dim) float32."""
        if self._refining is not None:
            raise RuntimeError("add() after refinement started")
        r, x = self._check_chunk(rows, emb)
        n = len(x)
        if n == 0 or self.m == 0:
            self.rows_seen += n
            return
        x_dev = torch.from_numpy(x).to(self.device)
        # largest row norm, in float32 (relative error < 1e-4 at any realistic dim: padded by 1e-3)
        self._xmax = max(self._xmax, float(torch.linalg.vector_norm(x_dev, dim=1).max()) * 1.001)
        d_chunk = max(1, self.block_elems // self.q_chunk)
        with torch.no_grad(), ieee_float32_matmul():
            for d0 in range(0, n, d_chunk):
                xb = x_dev[d0:d0 + d_chunk]
                kk = min(self.k, len(xb))
                for q0 in range(0, self.m, self.q_chunk):
                    sims = self._q[q0:q0 + self.q_chunk] @ xb.T
                    val, idx = torch.topk(sims, kk, dim=1, largest=True, sorted=False)
                    self._merge(q0, val.cpu().numpy(), idx.cpu().numpy() + d0, r, x)
        self.rows_seen += n

    def _merge(self, q0: int, val: np.ndarray, idx: np.ndarray, rows: np.ndarray, x: np.ndarray) -> None:
        """Merge one block's candidates (float32 scores ``val``, chunk positions ``idx``) into the k
        kept per query; the candidates that enter get their canonical float64 score."""
        q1 = q0 + len(val)
        all32 = np.concatenate([self._val32[q0:q1], val], axis=1)
        allrow = np.concatenate([self._row[q0:q1], rows[idx]], axis=1)
        all64 = np.concatenate([self._val64[q0:q1], np.full(val.shape, np.nan)], axis=1)
        keep = np.argpartition(-all32, self.k - 1, axis=1)[:, :self.k]
        new64 = np.take_along_axis(all64, keep, axis=1)
        qi, ci = np.nonzero(keep >= self.k)  # entered from this block
        if len(qi):
            src = idx[qi, keep[qi, ci] - self.k]
            new64[qi, ci] = _canonical_dot(self._q64[q0 + qi], x[src])
        self._val32[q0:q1] = np.take_along_axis(all32, keep, axis=1)
        self._row[q0:q1] = np.take_along_axis(allrow, keep, axis=1)
        self._val64[q0:q1] = new64

    def _band(self) -> np.ndarray:
        """Per query: how far below the best float32 score the exact maximum may lie."""
        return 2.0 * float32_dot_error_bound(self.dim) * self._qnorm * self._xmax * 1.01 + 1e-12

    def unresolved(self) -> np.ndarray:
        """Indices of queries whose k kept candidates may not hold the exact maximum (k or more rows
        within the float32 error band of the best score): they need :meth:`refine`."""
        if self.m == 0 or self.rows_seen <= self.k:
            return np.zeros(0, dtype=np.int64)
        full = (self._row >= 0).all(axis=1)
        best = self._val32.max(axis=1).astype(np.float64)
        worst = self._val32.min(axis=1).astype(np.float64)
        return np.flatnonzero(full & (worst >= best - self._band()))

    # -- pass 2, only for unresolved queries ---------------------------------------------------
    def refine(self, rows: np.ndarray, emb: np.ndarray) -> None:
        """Second pass over one database chunk, for the unresolved queries only: float64 scores on
        the device, then every row within a hair of the chunk's float64 maximum rescored exactly."""
        if self._refining is None:
            self._refining = self.unresolved()
            self._ref_best = np.full(len(self._refining), -np.inf)
            self._ref_row = np.full(len(self._refining), -1, dtype=np.int64)
        assert self._ref_best is not None and self._ref_row is not None
        u = self._refining
        r, x = self._check_chunk(rows, emb)
        if len(u) == 0 or len(x) == 0:
            return
        x_dev = torch.from_numpy(x).to(self.device).double()
        q_dev = torch.from_numpy(self._q64[u]).to(self.device)
        q_chunk = max(1, min(len(u), self.q_chunk))
        d_chunk = max(1, self.block_elems // 2 // q_chunk)
        with torch.no_grad():
            for d0 in range(0, len(x), d_chunk):
                xb = x_dev[d0:d0 + d_chunk]
                for q0 in range(0, len(u), q_chunk):
                    s = q_dev[q0:q0 + q_chunk] @ xb.T
                    near = s >= s.max(dim=1, keepdim=True).values - _REFINE_MARGIN
                    qi, cj = (t.cpu().numpy() for t in torch.nonzero(near, as_tuple=True))
                    if len(qi) == 0:
                        continue
                    cj = cj + d0
                    v = _canonical_dot(self._q64[u[q0 + qi]], x[cj])
                    self._offer(q0 + qi, v, r[cj])

    def _offer(self, slots: np.ndarray, values: np.ndarray, rows: np.ndarray) -> None:
        assert self._ref_best is not None and self._ref_row is not None
        # best first: value descending, then row id ascending; then the first entry per slot
        order = np.lexsort((rows, -values, slots))
        slots, values, rows = slots[order], values[order], rows[order]
        first = np.ones(len(slots), dtype=bool)
        first[1:] = slots[1:] != slots[:-1]
        for s, v, row in zip(slots[first], values[first], rows[first], strict=True):
            if v > self._ref_best[s] or (v == self._ref_best[s] and row < self._ref_row[s]):
                self._ref_best[s], self._ref_row[s] = v, row

    # -- the answer -----------------------------------------------------------------------------
    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(row ids int64, similarities float64) per query: the exact maximum, lowest row id on ties."""
        pending = self.unresolved()
        done = self._refining if self._refining is not None else np.zeros(0, dtype=np.int64)
        if len(np.setdiff1d(pending, done)):
            raise RuntimeError(f"{len(pending)} queries need refine() over the database first")
        # among the kept candidates: highest float64 score, then lowest row id (empty slots: -inf)
        key_row = np.where(self._row >= 0, self._row, np.iinfo(np.int64).max)
        order = np.lexsort((key_row, -self._val64), axis=1) if self.m else np.zeros((0, self.k), dtype=np.int64)
        pick = order[:, 0] if self.m else np.zeros(0, dtype=np.int64)
        rows = self._row[np.arange(self.m), pick]
        sims = self._val64[np.arange(self.m), pick]
        if len(done):
            assert self._ref_best is not None and self._ref_row is not None
            rows[done], sims[done] = self._ref_row, self._ref_best
        return rows.astype(np.int64), sims.astype(np.float64)


def nearest_neighbours(queries: np.ndarray, database: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
                       device: str | torch.device = "cpu", *, k: int = DEFAULT_K,
                       max_block_bytes: int = DEFAULT_BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray, int]:
    """Exact 1-NN of every query row in the database: (row ids, float64 similarities, number of
    queries that needed the second pass). ``database()`` yields (row ids, float32 embeddings) chunks
    and is called a second time only when some query is unresolved after the first pass."""
    search = ExactCosineSearch(queries, device, k=k, max_block_bytes=max_block_bytes)
    for rows, emb in database():
        search.add(rows, emb)
    pending = search.unresolved()
    if len(pending):
        for rows, emb in database():
            search.refine(rows, emb)
    rows, sims = search.result()
    return rows, sims, int(len(pending))


def nearest_neighbours_in_memory(queries: np.ndarray, database: np.ndarray, device: str | torch.device = "cpu",
                                 *, k: int = DEFAULT_K, chunk_rows: int = 65536,
                                 max_block_bytes: int = DEFAULT_BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """:func:`nearest_neighbours` over an in-memory (n, dim) database whose row ids are 0..n-1."""
    db = np.asarray(database, dtype=np.float32)

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(db), chunk_rows):
            yield np.arange(start, min(start + chunk_rows, len(db)), dtype=np.int64), db[start:start + chunk_rows]

    rows, sims, _ = nearest_neighbours(queries, chunks, device, k=k, max_block_bytes=max_block_bytes)
    return rows, sims
