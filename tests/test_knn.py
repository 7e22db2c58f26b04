"""The kNN layer: every backend exact against a numpy reference, tiling invisible, ties deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from saferclip_data.stages.knn import knn_search


def _unit(rows: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference(queries, pool, k):
    scores = queries @ pool.T
    order = np.lexsort((np.broadcast_to(np.arange(pool.shape[0]), scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), order


@pytest.mark.parametrize("backend", ["faiss", "torch", "auto"])
@pytest.mark.parametrize("block_rows", [1_000_000, 37])
def test_exact_against_numpy(backend, block_rows):
    queries, pool = _unit(50, 32, 1), _unit(500, 32, 2)
    scores, index = knn_search(queries, pool, 8, backend=backend, block_rows=block_rows)
    ref_scores, ref_index = _reference(queries, pool, 8)
    np.testing.assert_array_equal(index, ref_index)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_streamed_blocks_count_indices_across_blocks():
    queries, pool = _unit(20, 16, 3), _unit(300, 16, 4)
    streamed = knn_search(queries, (pool[i : i + 70] for i in range(0, 300, 70)), 5, backend="torch")
    whole = knn_search(queries, pool, 5, backend="torch")
    np.testing.assert_array_equal(streamed[1], whole[1])


def test_ties_go_to_the_lower_index_and_short_pools_pad():
    pool = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], np.float32)
    scores, index = knn_search(np.array([[1.0, 0.0]], np.float32), pool, 5, backend="faiss", block_rows=2)
    assert index.tolist() == [[0, 2, 1, -1, -1]]
    assert scores[0, :3].tolist() == [1.0, 1.0, 0.0] and np.isneginf(scores[0, 3:]).all()


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="pool is empty"):
        knn_search(_unit(2, 4, 0), np.zeros((0, 4), np.float32), 1)
    with pytest.raises(ValueError, match="pool dimension 3 differs from query dimension 4"):
        knn_search(_unit(2, 4, 0), _unit(5, 3, 0), 1)


@pytest.mark.parametrize("query_rows", [None, 7])
def test_tiled_torch_search_with_group_preselection_is_exact(query_rows):
    """A pool block wide enough for the group-max pre-selection (100 groups of 64 columns), queries in tiles."""
    from saferclip_data.stages import knn

    queries, pool = _unit(40, 24, 5), _unit(64 * 100, 24, 6)
    assert 64 * 100 // knn.GROUP > 2 * (8 + knn.RERANK_MARGIN)  # the pre-selection path is the one taken
    scores, index = knn_search(queries, pool, 8, backend="torch", block_rows=6400, query_rows=query_rows)
    ref_scores, ref_index = _reference(queries, pool, 8)
    np.testing.assert_array_equal(index, ref_index)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_group_preselection_finds_the_same_columns_as_a_full_topk():
    import torch

    from saferclip_data.stages.knn import _candidates

    scores = torch.as_tensor(np.random.default_rng(7).standard_normal((9, 64 * 40)).astype(np.float32))
    scores[0, 100:164] = 5.0  # one group holding every top value
    picked = _candidates(scores, 10)
    full = torch.topk(scores, 10, dim=1).indices
    assert [sorted(p) for p in picked.tolist()[1:]] == [sorted(f) for f in full.tolist()[1:]]
    assert all(100 <= c < 164 for c in picked[0].tolist())


def test_a_torch_tensor_pool_is_searched_where_it_lies_and_ties_keep_the_lower_index():
    import torch

    pool = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], np.float32)
    scores, index = knn_search(np.array([[1.0, 0.0]], np.float32), torch.as_tensor(pool), 3, backend="torch")
    assert index.tolist() == [[0, 2, 3]] and scores.tolist() == [[1.0, 1.0, 1.0]]


def test_tile_plan_fits_the_memory_it_is_given():
    from saferclip_data.stages.knn import GROUP, plan_tiles

    free = 80 << 30
    tiles = plan_tiles(768, True, free)
    assert tiles.block_rows % GROUP == 0
    assert tiles.block_rows * 768 * 6 <= free / 4  # fp32 rows + fp16 copy
    assert tiles.query_rows * tiles.block_rows * 2 <= free / 8 + 256 * tiles.block_rows * 2  # fp16 score tile
    small = plan_tiles(768, True, 2 << 30)
    assert small.block_rows < tiles.block_rows
    assert plan_tiles(768, False).query_rows * plan_tiles(768, False).block_rows * 4 <= 1 << 30


@pytest.mark.gpu
def test_cuda_search_with_fp16_candidates_is_exact_against_the_fp32_reference():
    """fp16 product + fp32 re-scoring on the GPU: the same neighbours, in the same order, as exact fp32."""
    import torch

    queries, pool = _unit(300, 768, 11), _unit(64 * 3000, 768, 12)
    ref_scores, ref_index = _reference(queries, pool, 16)
    for resident in (pool, torch.as_tensor(pool, device="cuda")):
        scores, index = knn_search(queries, resident, 16, backend="torch", block_rows=64 * 1000)
        np.testing.assert_array_equal(index, ref_index)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_pq"])
def test_ivf_search_finds_most_exact_neighbours_with_exact_scores(kind):
    from saferclip_data.stages.ivf import build_ivf, search_ivf

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 64)).astype(np.float32)
    pool = centres[rng.integers(0, 40, 8_000)] + 0.6 * rng.standard_normal((8_000, 64)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    queries = pool[rng.choice(8_000, 200, replace=False)] + 0.05 * rng.standard_normal((200, 64)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index = build_ivf([pool[:5_000], pool[5_000:]], pool[::4], kind, nlist=64, pq_bytes=16)
    assert index.ntotal == 8_000
    _, exact = knn_search(queries, pool, 10, backend="faiss")
    scores, found = search_ivf(index, pool, queries, 10, nprobe=16, kind=kind)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, found)])
    assert recall >= 0.9, recall
    valid = found >= 0
    true = np.einsum("qd,qkd->qk", queries, pool[np.where(valid, found, 0)])
    assert np.allclose(scores[valid], true[valid], atol=1e-5)  # re-scored: the real cosines, not codes
    assert np.all(np.diff(np.where(valid, scores, -np.inf), axis=1) <= 0)  # best first
    few = search_ivf(index, pool, queries, 10, nprobe=1, kind=kind)[1]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, few)]) < recall  # nprobe buys recall


def test_ivf_flat_rows_come_back_from_the_index_as_the_pool_stores_them():
    from saferclip_data.stages.ivf import IndexRows, build_ivf, search_ivf

    rng = np.random.default_rng(1)
    pool = rng.standard_normal((3_000, 32)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    stored = pool.astype(np.float16)  # what the neighbours stage keeps
    index = build_ivf([stored[:1_000], stored[1_000:]], stored[::3].astype(np.float32), "ivf_flat", nlist=16)
    ids = np.array([2_999, 0, 1_234, 7])
    assert np.array_equal(IndexRows(index)[ids], stored[ids].astype(np.float32))
    queries = pool[:20]
    from_index = search_ivf(index, IndexRows(index), queries, 5, nprobe=4, kind="ivf_flat")
    from_rows = search_ivf(index, stored, queries, 5, nprobe=4, kind="ivf_flat")
    assert np.array_equal(from_index[1], from_rows[1]) and np.allclose(from_index[0], from_rows[0], atol=1e-6)
