"""Re-ID ranking metrics (CMC, mAP) and k-fold verification accuracy: hand-computed cases and a naive reference."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from amlfs_trainer.tasks import metrics
from amlfs_trainer.tasks.metrics import best_threshold, cosine_distance, rank_metrics, verification_accuracy

# --- a direct reference, one query at a time, in plain Python ----------------------------------------------------


def naive_rank(dist, q_ids, g_ids, q_cams, g_cams, ranks=(1, 5, 10)):
    aps, cmc_hits, valid = [], {k: 0 for k in ranks}, 0
    for i in range(len(q_ids)):
        order = sorted(range(len(g_ids)), key=lambda j: (dist[i][j], j))  # ties: gallery order
        kept = [j for j in order if not (g_ids[j] == q_ids[i] and g_cams[j] == q_cams[i])]
        good = [g_ids[j] == q_ids[i] for j in kept]
        if not any(good):
            continue
        valid += 1
        first = good.index(True) + 1
        for k in ranks:
            cmc_hits[k] += first <= k
        found, precisions = 0, []
        for pos, g in enumerate(good, start=1):
            if g:
                found += 1
                precisions.append(found / pos)
        aps.append(sum(precisions) / len(precisions))
    return sum(aps) / valid, {k: cmc_hits[k] / valid for k in ranks}, valid


def naive_verification(scores, same, folds):
    accs = []
    for k in sorted(set(folds)):
        train = [(s, t) for s, t, f in zip(scores, same, folds, strict=True) if f != k]
        values = sorted({s for s, _ in train})
        candidates = [values[0] - 1.0] + [(a + b) / 2 for a, b in itertools.pairwise(values)] + [values[-1] + 1.0]
        best, best_acc = None, -1
        for c in candidates:  # ascending: the first maximum is the lowest threshold
            acc = sum((s > c) == t for s, t in train)
            if acc > best_acc:
                best, best_acc = c, acc
        test = [(s, t) for s, t, f in zip(scores, same, folds, strict=True) if f == k]
        accs.append(sum((s > best) == t for s, t in test) / len(test))
    mean = sum(accs) / len(accs)
    return mean, math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs))


def t(values, dtype=torch.int64):
    return torch.tensor(values, dtype=dtype)


# --- retrieval -------------------------------------------------------------------------------------------------


def test_same_camera_exclusion_distractor_and_ap_by_hand() -> None:
    # gallery by distance: g0 same person+camera (excluded), g1 wrong person, g2 correct, g3 distractor (0), g4 correct
    dist = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]])
    r = rank_metrics(dist, t([1]), t([1, 2, 1, 0, 1]), t([0]), t([0, 1, 1, 1, 2]))
    # kept ranking: g1, g2, g3, g4 -> correct at positions 2 and 4: AP = (1/2 + 2/4) / 2
    assert r.mAP == pytest.approx(0.5)
    assert r.cmc == {1: 0.0, 5: 1.0, 10: 1.0}
    assert r.valid_queries == 1


def test_excluded_entry_would_have_been_rank_one() -> None:
    dist = torch.tensor([[0.0, 0.9]])
    r = rank_metrics(dist, t([3]), t([3, 3]), t([2]), t([2, 5]))  # the nearest is the same camera's
    assert (r.mAP, r.cmc[1]) == (1.0, 1.0)  # the other camera's image is first among those kept
    r = rank_metrics(dist, t([3]), t([3, 3]), t([2]), t([2, 2]))  # only same-camera matches: no valid match
    assert r.valid_queries == 0 and math.isnan(r.mAP)


def test_queries_without_a_valid_match_are_skipped() -> None:
    dist = torch.tensor([[0.1, 0.2], [0.3, 0.1]])
    # query 0 (person 1) matches g1 at rank 2; query 1 (person 9) has no match at all
    r = rank_metrics(dist, t([1, 9]), t([2, 1]), t([0, 0]), t([1, 1]))
    assert r.valid_queries == 1
    assert r.mAP == pytest.approx(0.5) and r.cmc[1] == 0.0 and r.cmc[5] == 1.0


def test_ties_keep_the_gallery_order() -> None:
    dist = torch.tensor([[0.2, 0.2]])
    wrong_first = rank_metrics(dist, t([1]), t([2, 1]), t([0]), t([1, 1]))
    right_first = rank_metrics(dist, t([1]), t([1, 2]), t([0]), t([1, 1]))
    assert wrong_first.cmc[1] == 0.0 and wrong_first.mAP == pytest.approx(0.5)
    assert right_first.cmc[1] == 1.0 and right_first.mAP == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(6))
def test_against_the_naive_reference(seed: int, monkeypatch) -> None:
    monkeypatch.setattr(metrics, "QUERY_CHUNK", 7)  # several chunks
    rng = random.Random(seed)
    n_q, n_g, people, cams = rng.randint(5, 30), rng.randint(10, 80), rng.randint(2, 8), rng.randint(2, 4)
    q_ids = [rng.randint(1, people) for _ in range(n_q)]
    g_ids = [rng.randint(0, people) for _ in range(n_g)]  # 0: distractors
    q_cams = [rng.randrange(cams) for _ in range(n_q)]
    g_cams = [rng.randrange(cams) for _ in range(n_g)]
    dist = [[rng.randint(0, 6) / 6 for _ in range(n_g)] for _ in range(n_q)]  # coarse: many ties
    args = (t(q_ids), t(g_ids), t(q_cams), t(g_cams))
    got = rank_metrics(torch.tensor(dist, dtype=torch.float32), *args)
    want_map, want_cmc, want_valid = naive_rank(dist, q_ids, g_ids, q_cams, g_cams)
    assert got.valid_queries == want_valid > 0
    assert got.mAP == pytest.approx(want_map, abs=1e-9)
    for k in (1, 5, 10):
        assert got.cmc[k] == pytest.approx(want_cmc[k], abs=1e-9)


def test_cosine_distance_of_embeddings() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    g = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    d = cosine_distance(q, g)
    s = 1 / math.sqrt(2)
    assert torch.allclose(d, torch.tensor([[0.0, 1 - s, 1.0], [1.0, 1 - s, 2.0]]), atol=1e-6)


# --- verification ----------------------------------------------------------------------------------------------


def test_ten_fold_style_accuracy_by_hand() -> None:
    scores = torch.tensor([0.9, 0.1, 0.8, 0.6])
    same = torch.tensor([True, False, True, False])
    folds = t([0, 0, 1, 1])
    r = verification_accuracy(scores, same, folds)
    # fold 0 uses fold 1's threshold 0.7 (both right); fold 1 uses fold 0's 0.5 (0.6 wrongly "same")
    assert r.thresholds == pytest.approx([0.7, 0.5])
    assert r.fold_accuracy == [1.0, 0.5]
    assert r.accuracy == pytest.approx(0.75) and r.std == pytest.approx(0.25)


def test_best_threshold_takes_the_lowest_of_equal_candidates() -> None:
    # any threshold in (0.2, 0.4) separates; the midpoint 0.3 is the only candidate there
    assert best_threshold(torch.tensor([0.4, 0.2]), torch.tensor([True, False])) == pytest.approx(0.3)
    # everything "different" and everything "same" tie (1 of 2 right): the lowest candidate wins
    assert best_threshold(torch.tensor([0.2, 0.4]), torch.tensor([True, False])) == pytest.approx(-0.8)


@pytest.mark.parametrize("seed", range(6))
def test_ten_fold_against_the_naive_reference(seed: int) -> None:
    rng = random.Random(100 + seed)
    per = rng.randint(2, 12)
    folds = [k for k in range(10) for _ in range(2 * per)]
    same = [i % (2 * per) < per for i in range(len(folds))]
    scores = [round(rng.gauss(0.5 if s else 0.2, 0.25), 1) for s in same]  # rounded: ties
    got = verification_accuracy(torch.tensor(scores, dtype=torch.float64), torch.tensor(same), t(folds))
    mean, std = naive_verification(scores, same, folds)
    assert got.accuracy == pytest.approx(mean, abs=1e-12)
    assert got.std == pytest.approx(std, abs=1e-12)
    assert len(got.fold_accuracy) == 10


def test_one_fold_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 folds"):
        verification_accuracy(torch.tensor([0.1, 0.2]), torch.tensor([True, False]), t([0, 0]))
