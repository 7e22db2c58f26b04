"""The pure cores of score, filter, dedup and mine, without a pipeline around them."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from saferclip_data.stages.columns import column_part
from saferclip_data.stages.dedup import leader_over_edges
from saferclip_data.stages.dedup.partitions import EDGE_SCHEMA, near_duplicates
from saferclip_data.stages.filter import FilterConfig, FilterStage
from saferclip_data.stages.mine import capped_picks, difficulty
from saferclip_data.stages.score import ScoreConfig, ScoreStage


# ---- score --------------------------------------------------------------------------------------------------
def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def _fixed(rows: list[np.ndarray | None], dim: int) -> pa.Array:
    flat = np.concatenate([r if r is not None else np.zeros(dim, np.float32) for r in rows]).astype(np.float16)
    mask = pa.array([r is None for r in rows])
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), dim, mask=mask)


def test_score_is_highest_for_the_category_an_embedding_sits_on():
    stage = ScoreStage(ScoreConfig(taxonomy={"violence": ["x"], "hate": ["y"]}, role_column="role"), {})
    stage.categories = ["violence", "hate"]
    stage.category_matrix = np.stack([_unit([1, 0, 0, 0]), _unit([0, 1, 0, 0])])
    stage.neutral = _unit([0, 0, 1, 0])
    stage.scale = 50.0
    violent, neutral = _unit([1, 0, 0.3, 0]), _unit([0, 0, 1, 0.1])
    batch = pa.table(
        {
            "key": ["a", "b", "c"],
            "image_embedding": _fixed([violent, neutral, None], 4),
            "text_embedding": _fixed([violent, violent, neutral], 4),
            "category": ["violence", None, None],
            "role": ["unsafe", "safe", None],
        }
    )
    out = stage.process_batch(batch).table.to_pydict()
    assert out["image_score_violence"][0] > 0.99 and out["image_score_hate"][0] < 0.01
    assert out["image_score_violence"][1] < 0.01
    assert out["image_score_violence"][2] is None and out["alignment"][2] is None  # no image: no score, no guess
    assert out["text_top_category"] == ["violence", "violence", "violence"]
    assert out["alignment"][0] == pytest.approx(1.0, abs=1e-2)
    assert out["label_role"] == ["unsafe", "safe", None]
    assert out["label_source"] == ["source.role", "source.role", None]
    assert out["label_category"] == ["violence", None, None]


def test_taxonomy_names_must_make_distinct_columns():
    with pytest.raises(ValueError, match="clashes"):
        ScoreConfig(taxonomy={"self-harm": ["a"], "self harm": ["b"]})
    assert column_part("illegal activity") == "illegal_activity"


# ---- filter -------------------------------------------------------------------------------------------------
def _scored(**over) -> dict:
    row = {
        "key": "k",
        "caption": "a red ball at the beach",
        "alignment": 0.3,
        "image_unsafe_score": 0.2,
        "text_unsafe_score": 0.1,
        "image_top_category": "hate",
        "text_top_category": "violence",
        "label_role": None,
        "label_category": None,
        "text_score_violence": 0.1,
    }
    row.update(over)
    return row


def _filter(config: FilterConfig, rows: list[dict]):
    result = FilterStage(config, {}).process_batch(pa.Table.from_pylist(rows))
    return result.table.to_pylist(), {r.key: (r.reason, r.error) for r in result.rejects}


def test_filter_roles_come_from_labels_first_then_scores():
    rows = [
        _scored(key="labelled", label_role="unsafe", label_category="sexual"),
        _scored(key="scored-unsafe", image_unsafe_score=0.8),
        _scored(key="scored-safe"),
    ]
    kept, rejects = _filter(FilterConfig(), rows)
    by_key = {r["key"]: r for r in kept}
    assert not rejects
    assert by_key["labelled"]["role"] == "unsafe" and by_key["labelled"]["category"] == "sexual"
    assert by_key["labelled"]["role_source"] == "label"
    assert by_key["scored-unsafe"]["role"] == "unsafe" and by_key["scored-unsafe"]["category"] == "hate"
    assert by_key["scored-safe"]["role"] == "safe" and by_key["scored-safe"]["category"] is None
    kept, rejects = _filter(FilterConfig(role_from="labels"), rows)
    assert [r["key"] for r in kept] == ["labelled"] and rejects["scored-safe"][0] == "no safe/unsafe label"


def test_filter_rules_reject_with_stable_reasons_and_the_value():
    config = FilterConfig(
        min_alignment=0.2,
        caption_words={"min": 3},
        safe_max_score=0.5,
        rules=[{"column": "text_score_violence", "max": 0.4, "role": "safe"}],
    )
    rows = [
        _scored(key="ok"),
        _scored(key="misaligned", alignment=0.1),
        _scored(key="short", caption="a ball"),
        _scored(key="safe-but-violent", text_score_violence=0.45),
        _scored(key="unsafe-violent", label_role="unsafe", text_score_violence=0.9, text_unsafe_score=0.9),
        _scored(key="label-contradicted", label_role="safe", image_unsafe_score=0.7),
    ]
    kept, rejects = _filter(config, rows)
    assert sorted(r["key"] for r in kept) == ["ok", "unsafe-violent"]  # the rule is for safe records only
    assert rejects["misaligned"] == ("alignment below 0.2", "0.100")
    assert rejects["short"] == ("caption shorter than 3 words", "2 words")
    assert rejects["safe-but-violent"][0] == "text_score_violence above 0.4"
    assert "0.45" in rejects["safe-but-violent"][1]
    assert rejects["label-contradicted"][0] == "labelled safe but scores unsafe"


def test_a_rule_needs_a_bound():
    with pytest.raises(ValueError, match="min, max"):
        FilterConfig(rules=[{"column": "alignment"}])


# ---- dedup --------------------------------------------------------------------------------------------------
def leader_clusters(keys, graphs):
    """The stage's leader rule over the edges one search found: duplicate row -> (kept row, why)."""
    rows = [(m, keys[q], keys[o], s, 0, 0) for m, graph in graphs for q, found in graph.items() for o, s in found]
    edges = pa.Table.from_pylist([dict(zip(EDGE_SCHEMA.names, r)) for r in rows], schema=EDGE_SCHEMA)
    row = {k: i for i, k in enumerate(keys)}
    return {row[d]: (row[k], why) for d, (k, why) in leader_over_edges(edges, [m for m, _ in graphs]).items()}


def test_leader_clustering_keeps_the_first_key_and_never_chains():
    base = _unit([1, 0, 0])
    near = _unit([1, 0.2, 0])  # cos(base, near) ~ 0.98
    far_from_base = _unit([1, 0.42, 0])  # ~0.92 from base, ~0.98 from near
    other = _unit([0, 0, 1])
    keys = ["c", "a", "b", "z"]
    vectors = np.stack([near, base, far_from_base, other])
    graph = near_duplicates(vectors, np.ones(4, bool), threshold=0.97, neighbours=3)
    decided = leader_clusters(keys, [("image", graph)])
    # "a" (base) is visited first and absorbs "c" (near); "b" is not within 0.97 of "a", so it stays: no chain
    assert set(decided) == {0} and decided[0][0] == 1 and decided[0][1].startswith("image cosine 0.98")
    # the result does not depend on row order
    perm = [2, 0, 3, 1]
    graph_p = near_duplicates(vectors[perm], np.ones(4, bool), 0.97, 3)
    decided_p = leader_clusters([keys[i] for i in perm], [("image", graph_p)])
    assert {keys[perm[d]]: keys[perm[k]] for d, (k, _) in decided_p.items()} == {"c": "a"}


def test_rows_without_the_embedding_are_never_duplicates():
    vectors = np.stack([_unit([1, 0]), _unit([1, 0]), np.zeros(2, np.float32)])
    graph = near_duplicates(vectors, np.array([True, False, True]), 0.9, 4)
    assert graph == {}


# ---- mine ---------------------------------------------------------------------------------------------------
def apply_reuse_cap(queries, candidates, sims, k, cap):
    """The stage's greedy over every pair of a small example, sorted the way the merge of sorted runs feeds it."""
    pairs = sorted((-s, q, t, i) for i, q in enumerate(queries) for t, s in zip(candidates[i], sims[i]))
    chosen = [[] for _ in queries]
    for _, target, sim, i in capped_picks(pairs, k, cap):
        chosen[i].append((target, sim))
    return chosen


def test_reuse_cap_holds_and_is_greedy_by_similarity():
    queries = ["q1", "q2", "q3"]
    candidates = [["popular", "x"], ["popular", "y"], ["popular", "z"]]
    sims = [[0.9, 0.5], [0.95, 0.4], [0.8, 0.7]]
    chosen = apply_reuse_cap(queries, candidates, sims, k=1, cap=2)
    assert chosen == [[("popular", 0.9)], [("popular", 0.95)], [("z", 0.7)]]  # q3 had the weakest claim


def test_reuse_cap_cannot_be_broken_by_order_or_ties():
    rng = random.Random(3)
    targets = [f"t{i}" for i in range(12)]
    queries = [f"q{i:03d}" for i in range(200)]
    candidates = [rng.sample(targets, 6) for _ in queries]
    sims = [[round(rng.random(), 1) for _ in range(6)] for _ in queries]  # many exact ties
    for cap in (1, 3, 50):
        chosen = apply_reuse_cap(queries, candidates, sims, k=4, cap=cap)
        uses = {}
        for picks in chosen:
            assert len(picks) <= 4 and len({t for t, _ in picks}) == len(picks)
            for t, _ in picks:
                uses[t] = uses.get(t, 0) + 1
        assert max(uses.values()) <= cap
        perm = list(range(len(queries)))
        rng.shuffle(perm)
        shuffled = apply_reuse_cap(
            [queries[i] for i in perm], [candidates[i] for i in perm], [sims[i] for i in perm], k=4, cap=cap
        )
        assert {queries[p]: c for p, c in zip(perm, shuffled)} == dict(zip(queries, chosen))


def test_difficulty_tertiles():
    buckets, (low, high) = difficulty(np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]))
    assert buckets == ["hard", "hard", "medium", "medium", "easy", "easy"]
    assert low == pytest.approx(0.2666, abs=1e-3) and high == pytest.approx(0.4333, abs=1e-3)


# ---- probe --------------------------------------------------------------------------------------------------
def test_probe_is_cross_fitted_and_matches_sklearn(tmp_path):
    from sklearn.linear_model import LogisticRegression

    from saferclip_data.stages.probe import Probes, fit_probes, fold_of, save_probes

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 16)) * 2
    labels = rng.integers(0, 3, 300)
    x = (centres[labels] + rng.standard_normal((300, 16))).astype(np.float32)
    labels[:50] = -1  # unlabelled
    keys = [f"k{i}" for i in range(300)]
    arrays, summary = fit_probes({"text": x}, labels, keys, ["safe", "hate", "violence"], folds=2, c=1.0)
    assert summary["labelled"] == 250 and summary["accuracy"]["text"] > 0.9
    save_probes(tmp_path, arrays, summary)
    probes = Probes(tmp_path)
    labelled = labels >= 0
    p = probes.probabilities("text", x, keys, labelled)
    assert np.allclose(p.sum(1), 1, atol=1e-5)
    # an unlabelled row is scored by the probe fitted on every labelled row, exactly as sklearn scores it
    full = LogisticRegression(C=1.0, max_iter=2000).fit(x[labelled], labels[labelled])
    assert np.allclose(p[:50], full.predict_proba(x[:50]), atol=1e-4)
    # a labelled row is scored by the probe that never saw it
    row = 60
    held_out = np.array([fold_of(k, 2) for k in keys]) != fold_of(keys[row], 2)
    fold_model = LogisticRegression(C=1.0, max_iter=2000).fit(x[labelled & held_out], labels[labelled & held_out])
    assert np.allclose(p[row], fold_model.predict_proba(x[row : row + 1])[0], atol=1e-4)


def test_binary_probe_probabilities_match_sklearn(tmp_path):
    from sklearn.linear_model import LogisticRegression

    from saferclip_data.stages.probe import Probes, fit_probes, save_probes

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200) * 2  # classes 0 (safe) and 2: class 1 never seen
    x = (rng.standard_normal((200, 8)) + labels[:, None]).astype(np.float32)
    arrays, summary = fit_probes({"image": x}, labels, [f"k{i}" for i in range(200)], ["safe", "a", "b"], 2, 1.0)
    save_probes(tmp_path, arrays, summary)
    p = Probes(tmp_path).probabilities("image", x, [f"k{i}" for i in range(200)], np.zeros(200, bool))
    expected = LogisticRegression(C=1.0, max_iter=2000).fit(x, labels).predict_proba(x)
    assert np.allclose(p[:, [0, 2]], expected, atol=1e-4) and p[:, 1].max() < 1e-6


def test_prompt_centroids_do_not_depend_on_the_workers_thread_count():
    """A Ray worker runs torch with as many threads as the cpus it reserves, an in-process run with all cores:
    both must score the same embeddings alike (the demo's scores differed by ~4e-7 before)."""
    import torch

    from saferclip_data.stages.embed import ModelConfig

    threads = torch.get_num_threads()
    made = []
    try:
        for count in (2, 1):
            torch.set_num_threads(count)
            stage = ScoreStage(ScoreConfig(taxonomy="toy-world"), {"model": ModelConfig(arch="toy-vit-tiny")})
            stage.setup()
            assert torch.get_num_threads() == count  # the worker's own setting is left as it was
            made.append(np.concatenate([stage.category_matrix.ravel(), stage.neutral]))
    finally:
        torch.set_num_threads(threads)
    assert made[0].tobytes() == made[1].tobytes()
