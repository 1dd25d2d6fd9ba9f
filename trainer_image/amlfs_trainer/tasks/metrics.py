"""Evaluation metrics of the open-set kinds, vectorised in torch on the embeddings' device.

Retrieval (re-ID, as torchreid's `eval_market1501` and open-reid define it): per query the gallery is ranked by
cosine distance; gallery entries of the query's person seen by the query's camera are excluded (they are the
same track, trivially easy). CMC rank-k is whether a correct match lies within the first k remaining entries;
AP is the mean of precision@i over the positions i of the correct matches. Queries without any correct match
left are skipped. Ties in distance keep the gallery's order (a stable sort), so results are deterministic.

Verification (LFW's protocol): scores are cosine similarities of the pairs; with 10 folds, each fold's
threshold is the one maximising accuracy on the other folds and is applied to that fold; the result is the
mean and the (population) standard deviation of the fold accuracies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

RANKS = (1, 5, 10)
QUERY_CHUNK = 1024  # queries ranked at once: bounds the (chunk, gallery) matrices in memory


@dataclass(frozen=True)
class RankResult:
    mAP: float
    cmc: dict[int, float]  # rank k -> share of valid queries with a correct match within the first k
    valid_queries: int  # queries with at least one correct match left after the exclusions


def cosine_distance(q: Tensor, g: Tensor) -> Tensor:
    """1 - cos between the rows of q (Q, D) and of g (G, D)."""
    q = torch.nn.functional.normalize(q.float(), dim=1)
    g = torch.nn.functional.normalize(g.float(), dim=1)
    return 1.0 - q @ g.T


def rank_metrics(
    dist: Tensor, q_ids: Tensor, g_ids: Tensor, q_cams: Tensor, g_cams: Tensor, ranks: tuple[int, ...] = RANKS
) -> RankResult:
    """mAP and CMC from a (Q, G) distance matrix; ids and cameras are int tensors on any device."""
    device = dist.device
    q_ids, g_ids = q_ids.to(device), g_ids.to(device)
    q_cams, g_cams = q_cams.to(device), g_cams.to(device)
    ap_sum = torch.zeros((), dtype=torch.float64, device=device)
    hits = torch.zeros(len(ranks), dtype=torch.float64, device=device)
    valid = torch.zeros((), dtype=torch.long, device=device)
    kth = torch.tensor(ranks, device=device)
    for s in range(0, dist.shape[0], QUERY_CHUNK):
        d = dist[s : s + QUERY_CHUNK]
        qi, qc = q_ids[s : s + QUERY_CHUNK, None], q_cams[s : s + QUERY_CHUNK, None]
        order = torch.sort(d, dim=1, stable=True).indices
        gi, gc = g_ids[order], g_cams[order]
        same = gi == qi
        kept = ~(same & (gc == qc))  # same person, same camera: excluded
        match = same & kept
        n_match = match.sum(1)
        pos = kept.cumsum(1)  # 1-based position of a kept entry among the kept ones
        correct = match.cumsum(1)  # correct matches up to and including each entry
        precision = torch.where(match, correct.double() / pos.clamp(min=1).double(), 0.0)
        ok = n_match > 0
        ap = precision.sum(1) / n_match.clamp(min=1).double()
        first = torch.where(match, pos, torch.iinfo(pos.dtype).max).min(1).values  # rank of the first match
        ap_sum += torch.where(ok, ap, 0.0).sum()
        hits += ((first[:, None] <= kth[None, :]) & ok[:, None]).sum(0).double()
        valid += ok.sum()
    n = int(valid.item())
    if n == 0:
        return RankResult(float("nan"), {k: float("nan") for k in ranks}, 0)
    cmc = (hits / n).tolist()
    return RankResult(float(ap_sum.item() / n), dict(zip(ranks, cmc, strict=True)), n)


@dataclass(frozen=True)
class VerificationResult:
    accuracy: float  # mean over folds
    std: float  # population standard deviation over folds
    fold_accuracy: list[float]
    thresholds: list[float]  # per fold, chosen on the other folds


def best_threshold(scores: Tensor, same: Tensor) -> float:
    """The similarity threshold (predict "same" when score > threshold) maximising accuracy on these pairs.

    Candidates: below the lowest score, the midpoints between consecutive distinct scores, above the highest;
    ties in accuracy go to the lowest candidate.
    """
    values = torch.unique(scores.double())  # sorted
    candidates = torch.cat([values[:1] - 1.0, (values[1:] + values[:-1]) / 2, values[-1:] + 1.0])
    predicted = scores.double()[None, :] > candidates[:, None]  # (T, P)
    correct = (predicted == same[None, :].bool()).sum(1)
    return float(candidates[int(torch.argmax(correct).item())].item())  # argmax: the first maximum


def verification_accuracy(scores: Tensor, same: Tensor, folds: Tensor) -> VerificationResult:
    """k-fold accuracy: each fold's threshold is chosen on the other folds (fold ids as given, in file order)."""
    scores, same, folds = scores.double(), same.bool(), folds.to(scores.device)
    ids = torch.unique(folds).tolist()
    if len(ids) < 2:
        raise ValueError(f"verification needs at least 2 folds, got {len(ids)}")
    accs, thresholds = [], []
    for k in ids:
        test = folds == k
        thr = best_threshold(scores[~test], same[~test])
        accs.append(float(((scores[test] > thr) == same[test]).double().mean().item()))
        thresholds.append(thr)
    t = torch.tensor(accs, dtype=torch.float64)
    return VerificationResult(float(t.mean()), float(t.std(unbiased=False)), accs, thresholds)
