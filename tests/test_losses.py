"""Loss programs -> PyTorch losses (amlfs_trainer.losses): exactness, numerics, presets, warm starts."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F

from amlfs.spaces import SpaceConfig, evaluate, get_space, preset_program
from amlfs.spaces.base import piece_index, preset_tau
from amlfs.spec import REPRESENTABLE, InitSpec
from amlfs_trainer.losses import TAU_FLOOR, build_loss, class_balanced_weights

AMLFS = get_space("amlfs")
SEARCH_SOFTMAX = get_space("search-softmax")
PARAMS = ("monotone", "paper", "bounded")
SIGMA = 0.2


def cfg_for(
    head: str, m: int, parameterization: str = "monotone", logit_range: float = 10.0, scale: float = 16.0
) -> SpaceConfig:
    """What SpaceConfig.from_spec gives for this head (scale: the cosine head's s)."""
    if head == "cosine":
        return SpaceConfig(m, parameterization, -1.0, 1.0, scale)
    return SpaceConfig(m, parameterization, -logit_range, logit_range, 1.0)


def random_outputs(
    head: str, n: int, c: int, gen: torch.Generator, spread: float = 8.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random outputs and targets; the first quarter of the rows are confidently wrong."""
    y = torch.randint(0, c, (n,), generator=gen)
    if head == "cosine":
        z = torch.rand(n, c, generator=gen, dtype=dtype) * 2 - 1
        wrong_target, wrong_other = -1.0, 1.0
    else:
        z = torch.randn(n, c, generator=gen, dtype=dtype) * spread
        wrong_target, wrong_other = -3 * spread, 3 * spread
    k = n // 4
    z[torch.arange(k), (y[:k] + 1) % c] = wrong_other
    z[torch.arange(k), y[:k]] = wrong_target
    return z, y


def noisy_theta(cfg: SpaceConfig, gen: torch.Generator) -> list[float]:
    mu = torch.tensor(AMLFS.identity(cfg), dtype=torch.float64)
    noise = (torch.randn(mu.shape, generator=gen, dtype=torch.float64) * SIGMA).clamp(-3 * SIGMA, 3 * SIGMA)
    return (mu + noise).tolist()


def scale_of(head: str, scale: float) -> float:
    return scale if head == "cosine" else 1.0


# --- identity == cross-entropy --------------------------------------------------------------------


@pytest.mark.parametrize("parameterization", PARAMS)
@pytest.mark.parametrize("m", [1, 6, 16])
@pytest.mark.parametrize(("head", "scale"), [("linear", 1.0), ("cosine", 16.0), ("cosine", 64.0)])
def test_identity_is_cross_entropy(parameterization: str, m: int, head: str, scale: float) -> None:
    gen = torch.Generator().manual_seed(m)
    cfg = cfg_for(head, m, parameterization, scale=scale)
    loss = build_loss(AMLFS.program(AMLFS.identity(cfg), cfg), head, scale)
    z, y = random_outputs(head, 64, 10, gen, spread=12.0)
    z.requires_grad_(True)
    logits = z * scale_of(head, scale)
    ce_rows = F.cross_entropy(logits.detach(), y, reduction="none")
    assert ce_rows.max() > min(50.0, 1.9 * scale_of(head, scale))  # confidently wrong rows are in the batch
    got = loss(z, y)
    ce = F.cross_entropy(logits, y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ce, rtol=1e-5, atol=0)
    (g_got,) = torch.autograd.grad(got, z)
    (g_ce,) = torch.autograd.grad(ce, z)
    torch.testing.assert_close(g_got, g_ce, rtol=1e-4, atol=1e-7)
    rows = build_loss(AMLFS.program(AMLFS.identity(cfg), cfg), head, scale, reduction="none")(z, y)
    torch.testing.assert_close(rows, ce_rows, rtol=1e-5, atol=1e-6)


def test_identity_is_cross_entropy_for_huge_losses() -> None:
    """The log-space tau keeps identity == CE where p underflows float32 (loss > 104)."""
    cfg = cfg_for("linear", 6)
    loss = build_loss(AMLFS.program(AMLFS.identity(cfg), cfg), "linear", 1.0, reduction="none")
    z = torch.tensor([[-150.0, 150.0, 0.0], [400.0, -400.0, 3.0], [-30.0, 30.0, 0.0]])
    y = torch.tensor([0, 1, 0])
    torch.testing.assert_close(loss(z, y), F.cross_entropy(z, y, reduction="none"))
    # the same when another piece of tau can reach the floor (the mixed code path)
    mixed = {
        "kind": "piecewise",
        "t": {"lo": -10.0, "hi": 10.0, "a": [1.0], "b": [0.0]},
        "tau": {"lo": 0.0, "hi": 1.0, "a": [1.0, 1.0], "b": [0.0, -0.01]},
    }
    z.requires_grad_(True)
    rows = build_loss(mixed, "linear", 1.0, reduction="none")(z, y)
    torch.testing.assert_close(rows, F.cross_entropy(z, y, reduction="none"))
    (g,) = torch.autograd.grad(rows.sum(), z)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(z, y, reduction="sum"), z)
    torch.testing.assert_close(g, g_ce)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize(("head", "scale"), [("linear", 1.0), ("cosine", 64.0)])
def test_search_softmax_identity_is_cross_entropy(k: int, head: str, scale: float) -> None:
    gen = torch.Generator().manual_seed(k)
    cfg = cfg_for(head, k)
    loss = build_loss(SEARCH_SOFTMAX.program(SEARCH_SOFTMAX.identity(cfg), cfg), head, scale)
    z, y = random_outputs(head, 64, 10, gen, spread=12.0)
    torch.testing.assert_close(loss(z, y), F.cross_entropy(z * scale_of(head, scale), y), rtol=1e-5, atol=0)


# --- presets against references written here --------------------------------------------------------


def ref_cross_entropy_rows(logits: torch.Tensor, y: torch.Tensor) -> list[float]:
    out = []
    for row, t in zip(logits.double().tolist(), y.tolist(), strict=True):
        mx = max(row)
        lse = mx + math.log(sum(math.exp(v - mx) for v in row))
        out.append(lse - row[t])
    return out


def ref_cosface(z: torch.Tensor, y: torch.Tensor, head: str, s: float, m: float) -> float:
    logits = z.double() * scale_of(head, s)
    for i, t in enumerate(y.tolist()):
        logits[i, t] = s * (z[i, t].item() - m) if head == "cosine" else z[i, t].item() - m
    rows = ref_cross_entropy_rows(logits, y)
    return sum(rows) / len(rows)


def ref_arcface_phi(c: float, m: float) -> float:
    """insightface: cos(theta + m) where cos theta > cos(pi - m), else cos theta - m sin m."""
    return math.cos(math.acos(max(-1.0, min(1.0, c))) + m) if c > math.cos(math.pi - m) else c - m * math.sin(m)


def ref_arcface_rows(z: torch.Tensor, y: torch.Tensor, s: float, m: float) -> list[float]:
    logits = z.double() * s
    for i, t in enumerate(y.tolist()):
        logits[i, t] = s * ref_arcface_phi(z[i, t].item(), m)
    return ref_cross_entropy_rows(logits, y)


def ref_focal(z: torch.Tensor, y: torch.Tensor, head: str, s: float, gamma: float) -> float:
    rows = ref_cross_entropy_rows(z.double() * scale_of(head, s), y)
    return sum((1 - math.exp(-r)) ** gamma * r for r in rows) / len(rows)


def ref_label_smoothing(z: torch.Tensor, y: torch.Tensor, head: str, s: float, eps: float) -> float:
    logp = torch.log_softmax(z.double() * scale_of(head, s), 1)
    c = z.shape[1]
    rows = [-(1 - eps) * logp[i, t] - eps / c * logp[i].sum() for i, t in enumerate(y.tolist())]
    return float(sum(rows) / len(rows))


@pytest.mark.parametrize(("head", "scale"), [("linear", 1.0), ("cosine", 16.0), ("cosine", 64.0)])
def test_presets_match_references(head: str, scale: float) -> None:
    gen = torch.Generator().manual_seed(7)
    z, y = random_outputs(head, 48, 7, gen, spread=4.0)

    def loss(name: str, **kw: float) -> float:
        init = InitSpec(preset=name, **kw)
        return build_loss(preset_program(init, kw.get("eps", 0.0)), head, scale)(z, y).item()

    for eps in (0.0, 0.1):
        program = preset_program(InitSpec(preset="softmax"), eps)
        got = build_loss(program, head, scale)(z, y).item()
        assert got == pytest.approx(ref_label_smoothing(z, y, head, scale, eps), rel=1e-5)
    for m in (0.0, 0.35, 1.0):
        assert loss("cosface", margin=m) == pytest.approx(ref_cosface(z, y, head, scale, m), rel=1e-5)
    for gamma in (0.0, 0.5, 2.0, 5.0):
        assert loss("focal", gamma=gamma) == pytest.approx(ref_focal(z, y, head, scale, gamma), rel=1e-5)
    if head == "cosine":
        for m in (0.2, 0.5, 1.2):  # 1.2: cos(pi - m) = -0.36, many rows take the fallback
            rows = ref_arcface_rows(z, y, scale, m)
            assert loss("arcface", margin=m) == pytest.approx(sum(rows) / len(rows), rel=1e-5)
    else:
        with pytest.raises(ValueError, match="arcface"):
            build_loss(preset_program(InitSpec(preset="arcface")), head, scale)


@pytest.mark.parametrize("preset", ["cosface", "arcface", "focal"])
def test_preset_gradients_are_finite_at_the_edges(preset: str) -> None:
    """|cos| = 1 (ArcFace's sqrt) and p = 1 (focal with gamma < 1) keep finite gradients."""
    z = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [1.0, -1.0, -1.0]], requires_grad=True)
    y = torch.tensor([0, 0, 0])
    init = InitSpec(preset=preset, margin=0.5, gamma=0.5)
    loss = build_loss(preset_program(init), "cosine", 128.0)(z, y)
    (g,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(loss) and torch.isfinite(g).all()


def ref_target_probability_rows(z: torch.Tensor, y: torch.Tensor, head: str, s: float, name: str, **k: float):
    """The robust presets from their papers' formulas, in float64 from the cross-entropy rows."""
    logits = z.double() * scale_of(head, s)
    probs = torch.softmax(logits, 1)
    out = []
    for i, (r, t) in enumerate(zip(ref_cross_entropy_rows(logits, y), y.tolist(), strict=True)):
        p = math.exp(-r)
        if name == "gce":
            out.append((1 - p ** k["q"]) / k["q"])
        elif name == "mae":  # L1 between the one-hot label and the softmax
            out.append(sum(abs((j == t) - probs[i, j].item()) for j in range(z.shape[1])))
        elif name == "sce":  # the reference's RCE: -sum_k p_k log(clamp(onehot_k, 1e-4, 1))
            rce = -sum(probs[i, j].item() * math.log(1.0 if j == t else 1e-4) for j in range(z.shape[1]))
            out.append(k["alpha"] * r + k["beta"] * rce)
        else:
            out.append(r + k["poly_epsilon"] * (1 - p))
    return out


@pytest.mark.parametrize(("head", "scale"), [("linear", 1.0), ("cosine", 16.0)])
def test_robust_and_polynomial_presets_match_references(head: str, scale: float) -> None:
    gen = torch.Generator().manual_seed(11)
    z, y = random_outputs(head, 48, 7, gen, spread=4.0)
    cases = [
        ("gce", {"q": 0.7}),
        ("gce", {"q": 0.3}),
        ("gce", {"q": 1.0}),
        ("mae", {}),
        ("sce", {"alpha": 0.1, "beta": 1.0}),
        ("sce", {"alpha": 1.0, "beta": 0.5}),
        ("poly1", {"poly_epsilon": 1.0}),
        ("poly1", {"poly_epsilon": -0.5}),
    ]
    for name, k in cases:
        init = InitSpec(preset=name, **k)  # type: ignore[arg-type]
        rows = build_loss(preset_program(init), head, scale, reduction="none")(z, y)
        want = torch.tensor(ref_target_probability_rows(z, y, head, scale, name, **k), dtype=torch.float32)
        torch.testing.assert_close(rows, want, rtol=1e-5, atol=1e-6)
    eps = InitSpec(preset="label-smoothing", smoothing=0.2)
    got = build_loss(preset_program(eps), head, scale)(z, y).item()
    assert got == pytest.approx(ref_label_smoothing(z, y, head, scale, 0.2), rel=1e-5)


def test_bounded_presets_are_bounded_and_ignore_hopeless_rows() -> None:
    """tau(0) > 0 (gce, mae) bounds the loss and takes the gradient of a hopeless row to 0; CE does not."""
    z = torch.tensor([[-30.0, 30.0, 0.0]], requires_grad=True)
    y = torch.tensor([0])
    for name, bound, tau0 in (("gce", 1 / 0.7, math.exp(-1 / 0.7)), ("mae", 2.0, math.exp(-2.0))):
        program = preset_program(InitSpec(preset=name))
        assert evaluate(program, "tau", 0.0) == pytest.approx(tau0)
        loss = build_loss(program, "linear", 1.0)(z, y)
        (g,) = torch.autograd.grad(loss, z)
        assert loss.item() == pytest.approx(bound, rel=1e-6) and g.abs().max() < 1e-20
    ce = build_loss(preset_program(InitSpec()), "linear", 1.0)(z, y)
    (g,) = torch.autograd.grad(ce, z)
    assert ce.item() > 59 and g[0, 0].item() == pytest.approx(-1.0)


def test_class_balanced_weights_follow_the_effective_number() -> None:
    counts = [1000, 100, 10]
    beta = 0.999
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    w = class_balanced_weights(counts, beta)
    assert w == pytest.approx([r * 3 / sum(raw) for r in raw])
    assert sum(w) / 3 == pytest.approx(1.0) and w[0] < w[1] < w[2]
    assert class_balanced_weights([50, 50], 0.99) == pytest.approx([1.0, 1.0])
    gen = torch.Generator().manual_seed(5)
    z, y = random_outputs("linear", 64, 3, gen, spread=2.0)
    for name in ("softmax", "focal", "gce"):
        init = InitSpec(preset=name, class_balance=beta)
        program = preset_program(init)
        assert program["classBalance"] == beta
        with pytest.raises(ValueError, match="class counts"):
            build_loss(program, "linear", 1.0)
        got = build_loss(program, "linear", 1.0, class_counts=counts)(z, y)
        plain = build_loss(preset_program(InitSpec(preset=name)), "linear", 1.0, reduction="none")(z, y)
        want = (plain * torch.tensor(w)[y]).mean()
        torch.testing.assert_close(got, want)
    # searched programs carry it too
    cfg = cfg_for("linear", 3)
    rows = build_loss(
        AMLFS.program(AMLFS.identity(cfg), cfg) | {"classBalance": beta}, "linear", 1.0, class_counts=counts
    )(z, y)
    torch.testing.assert_close(rows, (F.cross_entropy(z, y, reduction="none") * torch.tensor(w)[y]).mean())


# --- warm starts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("parameterization", PARAMS)
@pytest.mark.parametrize("m", [1, 6])
@pytest.mark.parametrize(("head", "scale"), [("linear", 1.0), ("cosine", 64.0)])
def test_cosface_warm_start_is_exact(parameterization: str, m: int, head: str, scale: float) -> None:
    init = InitSpec(preset="cosface", margin=0.35)
    cfg = cfg_for(head, m, parameterization, scale=scale)
    warm = build_loss(AMLFS.program(AMLFS.from_preset(init, cfg), cfg), head, scale)
    exact = build_loss(preset_program(init), head, scale)
    z, y = random_outputs(head, 64, 10, torch.Generator().manual_seed(1))
    torch.testing.assert_close(warm(z, y), exact(z, y), rtol=1e-5, atol=0)


@pytest.mark.parametrize("parameterization", PARAMS)
@pytest.mark.parametrize("m", [6, 16])
def test_arcface_warm_start_is_close(parameterization: str, m: int) -> None:
    """Tolerance: CE is 1-Lipschitz in the target logit (dL/dl_y = p_y - 1), so per row
    |L_warm - L_exact| <= s |t_warm(cos_y) - phi(cos_y)|: the interpolation error of t, which is largest
    near cos = 1 (sqrt singularity of sin theta) and below cos(pi - m), where the warm start follows
    cos(theta + m) but the exact loss takes insightface's fallback. cos(theta + m) decreases on
    [-1, cos(pi - m)]; the monotone parameterisation keeps t increasing and cannot follow that."""
    s, margin = 16.0, 0.5
    init = InitSpec(preset="arcface", margin=margin)
    cfg = cfg_for("cosine", m, parameterization, scale=s)
    program = AMLFS.program(AMLFS.from_preset(init, cfg), cfg)
    warm = build_loss(program, "cosine", s, reduction="none")
    exact = build_loss(preset_program(init), "cosine", s, reduction="none")
    z, y = random_outputs("cosine", 256, 10, torch.Generator().manual_seed(2))
    cos_y = z.gather(1, y.view(-1, 1)).squeeze(1).tolist()
    bound = torch.tensor([s * abs(evaluate(program, "t", c) - ref_arcface_phi(c, margin)) for c in cos_y])
    diff = (warm(z, y) - exact(z, y)).abs()
    assert (diff <= bound + 1e-4).all()
    assert diff.max() > 0  # it is an approximation, not the exact loss
    assert (diff <= s * 0.37).all()  # sup |t_warm - phi| on [-1, 1] is 0.362 (at cos = -1) for m = 0.5


@pytest.mark.parametrize("parameterization", ["monotone", "paper"])  # bounded cannot start from focal
@pytest.mark.parametrize("m", [6, 16])
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_warm_start_is_close(parameterization: str, m: int, gamma: float) -> None:
    """Tolerance: t is the identity, so L_warm - L_exact = log tau_f(p) - log tau_warm(p), with
    tau_f(p) = p^((1-p)^gamma) and tau_warm its linear interpolant on the M knots. The gap is largest as
    p -> 0, where tau_warm(p) / tau_f(p) -> M tau_f(1/M) = M^(1 - (1 - 1/M)^gamma), so per row
    |L_warm - L_exact| <= (1 - (1 - 1/M)^gamma) ln M  (0.34 for M = 16, gamma = 2; checked on a grid here)."""
    init = InitSpec(preset="focal", gamma=gamma)
    cfg = cfg_for("linear", m, parameterization)
    program = AMLFS.program(AMLFS.from_preset(init, cfg), cfg)
    eps = (1 - (1 - 1 / m) ** gamma) * math.log(m)
    grid = [i / 20001 for i in range(1, 20001)]
    gap = max(abs(math.log(evaluate(program, "tau", p)) - (1 - p) ** gamma * math.log(p)) for p in grid)
    assert gap <= eps + 1e-6
    warm = build_loss(program, "linear", 1.0, reduction="none")
    exact = build_loss(preset_program(init), "linear", 1.0, reduction="none")
    z, y = random_outputs("linear", 256, 10, torch.Generator().manual_seed(3), spread=3.0)
    diff = (warm(z, y) - exact(z, y)).abs()
    assert (diff <= eps + 1e-4).all()
    assert diff.max() > 0.01


@pytest.mark.parametrize("parameterization", PARAMS)
@pytest.mark.parametrize("preset", ["gce", "mae", "sce", "poly1", "label-smoothing"])
def test_robust_warm_starts_interpolate_tau_where_representable(parameterization: str, preset: str) -> None:
    init = InitSpec(preset=preset)  # type: ignore[arg-type]
    cfg = cfg_for("linear", 6, parameterization)
    bounded = preset in ("gce", "mae")
    if preset not in REPRESENTABLE[parameterization]:
        with pytest.raises(ValueError, match="not representable"):
            AMLFS.from_preset(init, cfg)
        return
    program = AMLFS.program(AMLFS.from_preset(init, cfg), cfg)
    if parameterization == "bounded":  # tau(0) and tau(1) exactly, linear in between
        for k in range(7):
            tau0 = preset_tau(init, 0.0)
            assert evaluate(program, "tau", k / 6) == pytest.approx(tau0 + (1 - tau0) * k / 6, rel=1e-9)
    else:
        for k in range(7):
            assert evaluate(program, "tau", k / 6) == pytest.approx(preset_tau(init, k / 6), rel=1e-9, abs=1e-12)
    assert (evaluate(program, "tau", 0.0) > 0.1) == bounded
    # so the warm loss is bounded exactly when the preset is
    z = torch.tensor([[-30.0, 30.0, 0.0]])
    warm = build_loss(program, "linear", 1.0)(z, torch.tensor([0])).item()
    assert (warm < 5.0) == bounded


# --- the module applies exactly the program's t and tau ------------------------------------------------


def random_program(cfg: SpaceConfig, gen: torch.Generator, sigma: float) -> dict:
    mu = torch.tensor(AMLFS.identity(cfg), dtype=torch.float64)
    return AMLFS.program((mu + sigma * torch.randn(mu.shape, generator=gen, dtype=torch.float64)).tolist(), cfg)


@pytest.mark.parametrize("parameterization", PARAMS)
@pytest.mark.parametrize("m", [1, 3, 7])
def test_t_and_tau_match_evaluate(parameterization: str, m: int) -> None:
    gen = torch.Generator().manual_seed(m)
    for head in ("linear", "cosine"):
        cfg = cfg_for(head, m, parameterization, logit_range=5.0)
        for _ in range(5):
            program = random_program(cfg, gen, 0.5)
            loss = build_loss(program, head, 16.0)
            s = scale_of(head, 16.0)
            lo, hi = cfg.t_lo, cfg.t_hi
            x = torch.rand(500, generator=gen, dtype=torch.float64) * (hi - lo) * 2 + lo - (hi - lo) / 2
            tl = loss.target_logit(x.view(-1, 1))[0].view(-1)
            want = torch.tensor([s * evaluate(program, "t", v) for v in x.tolist()], dtype=torch.float64)
            torch.testing.assert_close(tl, want, rtol=1e-6, atol=1e-6 * s)
            p = torch.cat([torch.rand(500, generator=gen, dtype=torch.float64), torch.tensor([0.0, 1.0])])
            lt, _ = loss.log_tau(p.log().view(-1, 1))
            for pi, li in zip(p.tolist(), lt.view(-1).tolist(), strict=True):
                k = piece_index(pi, 0.0, 1.0, m)
                a, b = program["tau"]["a"][k], program["tau"]["b"][k]
                tau = evaluate(program, "tau", pi)
                if a > 0 and b >= 0:  # positive piece: exact, no floor
                    want_l = math.log(tau) if tau > 0 else -math.inf
                else:
                    want_l = math.log(max(tau, TAU_FLOOR))
                # a and b are float32 in the module: a p + b cancels to |a p| + |b| times float32's epsilon
                cond = (abs(a * pi) + abs(b)) / max(abs(tau), TAU_FLOOR)
                assert li == pytest.approx(want_l, rel=1e-5, abs=1e-5 + 2e-7 * cond), (pi, k, a, b)


@pytest.mark.parametrize(
    ("tau_a", "tau_b", "path"),
    [
        ([1.3, 0.8, 1.1], [0.0, 0.2, 0.1], "tau_all_pos"),  # every piece a > 0, b >= 0
        ([1.3, 0.8, 1.1], [0.0, 0.1, -0.1], "tau_ratio"),  # tau(0) = 0 and tau > 0 on every piece
        ([1.3, 0.8, 1.1], [0.0, -0.5, 0.1], "tau_mixed"),  # piece 1 crosses 0: floor there
    ],
)
def test_every_tau_code_path_is_exact_for_tiny_p(tau_a: list[float], tau_b: list[float], path: str) -> None:
    """log tau = log p + log a_0 on a piece 0 with b_0 = 0, even where p underflows float32."""
    program = {"kind": "piecewise", "t": GOOD["t"], "tau": {"lo": 0.0, "hi": 1.0, "a": tau_a, "b": tau_b}}
    loss = build_loss(program, "linear", 1.0)
    flags = {
        "tau_all_pos": loss.tau_all_pos,
        "tau_ratio": loss.tau_ratio,
        "tau_mixed": not (loss.tau_all_pos or loss.tau_ratio),
    }
    assert flags[path] and sum(flags.values()) == 1
    logp = torch.tensor([-0.01, -0.5, -1.5, -20.0, -90.0, -200.0]).view(-1, 1)
    lt, g = loss.log_tau(logp, None, True)
    want = [
        math.log(max(evaluate(program, "tau", math.exp(v)), TAU_FLOOR)) if v > -80 else v + math.log(1.3)
        for v in logp.view(-1).tolist()
    ]
    torch.testing.assert_close(lt.view(-1), torch.tensor(want), rtol=1e-5, atol=1e-5)
    assert g is not None and torch.isfinite(g).all()
    torch.testing.assert_close(g[-2:].view(-1), torch.ones(2))  # a p / tau = 1 on a piece through 0


@pytest.mark.parametrize("parameterization", PARAMS)
@pytest.mark.parametrize(("head", "scale"), [("linear", 1.0), ("cosine", 16.0)])
def test_loss_matches_a_python_reference(parameterization: str, head: str, scale: float) -> None:
    """End to end: logits with the target replaced by s t(x), p in float64, -log tau(p)."""
    gen = torch.Generator().manual_seed(11)
    cfg = cfg_for(head, 6, parameterization, scale=scale)
    s = scale_of(head, scale)
    for _ in range(5):
        program = random_program(cfg, gen, SIGMA)
        z, y = random_outputs(head, 32, 5, gen, spread=3.0)
        rows = build_loss(program, head, scale, reduction="none")(z, y)
        for i, t in enumerate(y.tolist()):
            logits = [s * v for v in z[i].tolist()]
            logits[t] = s * evaluate(program, "t", z[i, t].item())
            p = math.exp(-ref_cross_entropy_rows(torch.tensor([logits]), torch.tensor([t]))[0])
            tau = evaluate(program, "tau", p)
            k = piece_index(p, 0.0, 1.0, 6)
            positive = program["tau"]["a"][k] > 0 and program["tau"]["b"][k] >= 0
            want = -math.log(tau if positive else max(tau, TAU_FLOOR))
            assert rows[i].item() == pytest.approx(want, rel=2e-5, abs=2e-5)


# --- gradients --------------------------------------------------------------------------------------


@pytest.mark.parametrize("parameterization", PARAMS)
@pytest.mark.parametrize(("head", "scale"), [("linear", 1.0), ("cosine", 16.0), ("cosine", 64.0)])
def test_random_theta_within_3_sigma_gives_finite_loss_and_gradient(
    parameterization: str, head: str, scale: float
) -> None:
    gen = torch.Generator().manual_seed(5)
    cfg = cfg_for(head, 6, parameterization, scale=scale)
    for _ in range(200):
        loss = build_loss(AMLFS.program(noisy_theta(cfg, gen), cfg), head, scale)
        z, y = random_outputs(head, 32, 10, gen)
        z.requires_grad_(True)
        value = loss(z, y)
        (g,) = torch.autograd.grad(value, z)
        assert torch.isfinite(value), AMLFS.program(noisy_theta(cfg, gen), cfg)
        assert torch.isfinite(g).all()


def _gradcheck(loss: torch.nn.Module, head: str, gen: torch.Generator) -> None:
    z, y = random_outputs(head, 8, 5, gen, spread=3.0, dtype=torch.float64)
    if head == "cosine":
        z = z.clamp(-0.999, 0.999)  # ArcFace's sqrt
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: loss(v, y), (z,), eps=1e-7, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("parameterization", PARAMS)
@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_hand_written_backward_matches_finite_differences(parameterization: str, head: str) -> None:
    gen = torch.Generator().manual_seed(13)
    cfg = cfg_for(head, 6, parameterization)
    for _ in range(3):
        _gradcheck(build_loss(random_program(cfg, gen, SIGMA), head, 16.0), head, gen)
    _gradcheck(build_loss(random_program(cfg, gen, SIGMA), head, 16.0, reduction="none"), head, gen)
    _gradcheck(build_loss({"kind": "search-softmax", "a": [-0.5, 0.0, -2.0]}, head, 16.0), head, gen)
    _gradcheck(build_loss(preset_program(InitSpec(preset="cosface")), head, 16.0), head, gen)


# --- non-finite inputs and the floor ------------------------------------------------------------------


def all_kinds(head: str) -> list[dict]:
    cfg = cfg_for(head, 6, "paper")
    programs = [
        AMLFS.program(noisy_theta(cfg, torch.Generator().manual_seed(0)), cfg),
        AMLFS.program(AMLFS.identity(cfg), cfg),
        {"kind": "search-softmax", "a": [-0.5, -1.0]},
    ]
    for name in ("softmax", "cosface", "focal") + (("arcface",) if head == "cosine" else ()):
        programs.append(preset_program(InitSpec(preset=name), 0.1))
    return programs


@pytest.mark.parametrize("head", ["linear", "cosine"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["target", "other"])
def test_non_finite_outputs_give_a_non_finite_loss(head: str, bad: float, where: str) -> None:
    z, y = random_outputs(head, 8, 4, torch.Generator().manual_seed(0))
    z[3, y[3] if where == "target" else (y[3] + 1) % 4] = bad
    for program in all_kinds(head):
        for reduction in ("mean", "none"):
            value = build_loss(program, head, 16.0, reduction=reduction)(z, y)
            assert not torch.isfinite(value).all(), (program, reduction)


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_tau_at_or_below_zero_is_clamped(head: str) -> None:
    """tau(p) = p - 0.5: rows with p <= 0.5 + floor take -log TAU_FLOOR and no gradient."""
    program = {
        "kind": "piecewise",
        "t": {"lo": -1.0, "hi": 1.0, "a": [1.0], "b": [0.0]},
        "tau": {"lo": 0.0, "hi": 1.0, "a": [1.0, 1.0], "b": [-0.5, -0.5]},
    }
    z, y = random_outputs(head, 64, 3, torch.Generator().manual_seed(0), spread=3.0)
    z.requires_grad_(True)
    rows = build_loss(program, head, 4.0, reduction="none")(z, y)
    (g,) = torch.autograd.grad(rows.sum(), z)
    p = torch.softmax(z.detach() * scale_of(head, 4.0), 1).gather(1, y.view(-1, 1)).squeeze(1)
    low = p <= 0.5
    assert low.any() and (~low).any()
    torch.testing.assert_close(rows[low], torch.full_like(rows[low], -math.log(TAU_FLOOR)))
    torch.testing.assert_close(rows[~low], -torch.log(p[~low] - 0.5), rtol=1e-4, atol=1e-5)
    assert (g[low] == 0).all() and torch.isfinite(g).all()


# --- search-softmax ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("head", "scale"), [("linear", 1.0), ("cosine", 16.0)])
def test_search_softmax_up_weights_hard_examples(head: str, scale: float) -> None:
    z, y = random_outputs(head, 128, 10, torch.Generator().manual_seed(4), spread=3.0)
    ce = F.cross_entropy(z * scale_of(head, scale), y, reduction="none")
    for a in ([-0.3], [-2.0, -0.5, -1.0], [-5.0] * 8):
        rows = build_loss({"kind": "search-softmax", "a": a}, head, scale, reduction="none")(z, y)
        assert (rows >= ce - 1e-6).all()
        assert (rows > ce + 1e-3).any()


def test_search_softmax_picks_the_bin_of_p() -> None:
    a = [0.0, 0.0, -1.5, 0.0]  # only p in [0.5, 0.75) is modulated
    z, y = random_outputs("linear", 512, 3, torch.Generator().manual_seed(9), spread=2.0)
    rows = build_loss({"kind": "search-softmax", "a": a}, "linear", 1.0, reduction="none")(z, y)
    ce = F.cross_entropy(z, y, reduction="none").double()
    p = torch.exp(-ce)
    in_bin = (p >= 0.5) & (p < 0.75)
    assert in_bin.sum() > 10 and (~in_bin).sum() > 10
    want = torch.where(in_bin, ce + torch.log(-1.5 * p + 2.5), ce).float()
    edge = ((p - 0.5).abs() < 1e-6) | ((p - 0.75).abs() < 1e-6)
    torch.testing.assert_close(rows[~edge], want[~edge], rtol=1e-5, atol=1e-6)


# --- dtypes, devices, reductions -------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_bf16_autocast_on_cpu(head: str) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 10)
    x = torch.randn(32, 16)
    y = torch.randint(0, 10, (32,))
    for program in all_kinds(head):
        loss = build_loss(program, head, 16.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
            if head == "cosine":
                out = torch.tanh(out)
            assert out.dtype == torch.bfloat16
            value = loss(out, y)
        assert value.dtype == torch.float32 and torch.isfinite(value), program
        layer.zero_grad()
        value.backward()
        assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_module_moves_and_keeps_no_state_dict() -> None:
    cfg = cfg_for("linear", 6)
    loss = build_loss(AMLFS.program(noisy_theta(cfg, torch.Generator().manual_seed(0)), cfg), "linear", 1.0)
    assert loss.state_dict() == {}  # the program, not a checkpoint, defines the loss
    moved = loss.to(torch.float64)  # buffers follow .to(); float64 buffers still compute
    z, y = random_outputs("linear", 16, 10, torch.Generator().manual_seed(1))
    assert torch.isfinite(moved(z, y))


def test_integer_targets_of_any_width() -> None:
    z, y = random_outputs("linear", 16, 10, torch.Generator().manual_seed(1))
    cfg = cfg_for("linear", 6)
    loss = build_loss(AMLFS.program(noisy_theta(cfg, torch.Generator().manual_seed(0)), cfg), "linear", 1.0)
    torch.testing.assert_close(loss(z, y.int()), loss(z, y))


# --- malformed programs ---------------------------------------------------------------------------------
_DELETE = object()
GOOD = {
    "kind": "piecewise",
    "t": {"lo": -1.0, "hi": 1.0, "a": [1.0], "b": [0.0]},
    "tau": {"lo": 0.0, "hi": 1.0, "a": [1.0], "b": [0.0]},
}


def _with(path: str, value: object) -> dict:
    program = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = program
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return program


@pytest.mark.parametrize(
    ("program", "field"),
    [
        ("not a dict", "program"),
        ({"kind": "softmax"}, "program.kind"),
        ({}, "program.kind"),
        (_with("t", _DELETE), "program.t"),
        (_with("tau.a", [1.0, 1.0]), "program.tau.b"),
        (_with("t.hi", -1.0), "program.t.hi"),
        (_with("t.a", [math.nan]), "program.t.a[0]"),
        (_with("t.b", []), "program.t.b"),
        (_with("tau.lo", "0"), "program.tau.lo"),
        (_with("t.extra", 1), "program.t.extra"),
        ({"kind": "search-softmax", "a": [0.5]}, "program.a[0]"),
        ({"kind": "search-softmax"}, "program.a"),
        ({"kind": "preset", "name": "triplet"}, "program.name"),
        ({"kind": "preset", "name": "focal", "gamma": -1.0}, "program.gamma"),
        ({"kind": "preset", "name": "softmax", "labelSmoothing": 1.0}, "program.labelSmoothing"),
        ({"kind": "preset", "name": "cosface", "margin": True}, "program.margin"),
    ],
)
def test_malformed_programs_name_the_field(program: object, field: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(field) + ":"):
        build_loss(program, "cosine", 16.0)  # type: ignore[arg-type]


def test_bad_head_scale_and_shapes() -> None:
    with pytest.raises(ValueError, match=r"^head"):
        build_loss(GOOD, "arc", 16.0)
    with pytest.raises(ValueError, match=r"^scale"):
        build_loss(GOOD, "cosine", 0.0)
    with pytest.raises(ValueError, match=r"^reduction"):
        build_loss(GOOD, "cosine", 16.0, reduction="sum")
    with pytest.raises(ValueError, match="outputs"):
        build_loss(GOOD, "cosine", 16.0)(torch.zeros(4), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_bounded_floor_ignores_hopeless_rows_and_is_cross_entropy_below_zero(head: str) -> None:
    """tau = tau0 + (1 - tau0) p: the loss is at most -log tau0 and the gradient of a row with p << tau0 is
    (1 - tau0) p / tau times cross-entropy's; w <= 0 is cross-entropy exactly."""
    cfg = cfg_for(head, 6, "bounded", scale=16.0)
    z, y = random_outputs(head, 64, 10, torch.Generator().manual_seed(8), spread=4.0)
    ce = build_loss(AMLFS.program(AMLFS.identity(cfg), cfg), head, 16.0, reduction="none")(z, y)
    for w in (0.0, -0.7):
        theta = [*AMLFS.identity(cfg)[:-1], w]
        rows = build_loss(AMLFS.program(theta, cfg), head, 16.0, reduction="none")(z, y)
        assert torch.equal(rows, ce)
    theta = [*AMLFS.identity(cfg)[:-1], 0.4]  # tau0 = 0.1
    z.requires_grad_(True)
    rows = build_loss(AMLFS.program(theta, cfg), head, 16.0, reduction="none")(z, y)
    p = torch.softmax(z.detach() * scale_of(head, 16.0), 1).gather(1, y.view(-1, 1)).squeeze(1)
    torch.testing.assert_close(rows, -torch.log(0.1 + 0.9 * p), rtol=1e-5, atol=1e-6)
    assert rows.max() <= -math.log(0.1) + 1e-6
    (g,) = torch.autograd.grad(rows.sum(), z)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(z * scale_of(head, 16.0), y, reduction="sum"), z)
    ratio = g.gather(1, y.view(-1, 1)).squeeze(1) / g_ce.gather(1, y.view(-1, 1)).squeeze(1)
    torch.testing.assert_close(ratio, 0.9 * p / (0.1 + 0.9 * p), rtol=1e-3, atol=1e-5)
    assert (ratio[p < 1e-3] < 0.01).all() and (p < 1e-3).any()


# --- logit adjustment ------------------------------------------------------------------------------


def test_logit_adjustment_is_cross_entropy_of_the_prior_shifted_logits() -> None:
    """L = CE(s z + a log pi)_y with pi the training priors, by hand; a = 0 is the program itself."""
    from amlfs_trainer.losses import logit_adjustment

    counts = [400, 100, 25, 5, 1]
    log_pi = torch.tensor([math.log(n / sum(counts)) for n in counts], dtype=torch.float64)
    assert logit_adjustment(counts, 1.0) == pytest.approx((log_pi - log_pi.mean()).tolist())
    assert logit_adjustment([0, 3], 1.0) == pytest.approx([-math.log(3) / 2, math.log(3) / 2])  # empty: one
    gen = torch.Generator().manual_seed(3)
    for head, s in (("linear", 1.0), ("cosine", 16.0)):
        z, y = random_outputs(head, 64, 5, gen, spread=3.0, dtype=torch.float64)
        z.requires_grad_(True)
        for a in (0.0, 1.0, 0.6):
            want = F.cross_entropy(s * z + a * log_pi, y)
            (g_want,) = torch.autograd.grad(want, z)
            programs = [
                preset_program(InitSpec(logit_adjustment=a)),
                AMLFS.program(
                    AMLFS.identity(cfg_for(head, 6, "bounded", scale=s)), cfg_for(head, 6, "bounded", scale=s)
                )
                | {"logitAdjust": a},
            ]
            for program in programs:
                got = build_loss(program, head, s, class_counts=counts)(z, y)
                (g,) = torch.autograd.grad(got, z)
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(g, g_want, rtol=1e-10, atol=1e-12)
        # the other presets see the shifted logits too: focal with gamma 0 and poly1 with epsilon 0 are CE
        for program in (
            {"kind": "preset", "name": "focal", "gamma": 0.0},
            {"kind": "preset", "name": "poly1", "epsilon": 0.0},
        ):
            got = build_loss(program | {"logitAdjust": 1.0}, head, s, class_counts=counts)(z, y)
            torch.testing.assert_close(got, F.cross_entropy(s * z + log_pi, y), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="logitAdjust: needs the training split's class counts"):
        build_loss({"kind": "preset", "name": "softmax", "logitAdjust": 1.0}, "linear", 1.0)
    # with class balance: the weighted rows of the adjusted loss
    z, y = random_outputs("linear", 32, 5, gen, spread=2.0, dtype=torch.float64)
    w = torch.tensor(class_balanced_weights(counts, 0.99), dtype=torch.float64)
    got = build_loss(
        preset_program(InitSpec(class_balance=0.99, logit_adjustment=1.0)), "linear", 1.0, class_counts=counts
    )(z, y)
    torch.testing.assert_close(got, (F.cross_entropy(z + log_pi, y, reduction="none") * w[y]).mean())


def test_the_prior_coordinate_of_the_bounded_space() -> None:
    """theta = [d_0 .. d_M, w, c]: a = PRIOR_SCALE max(c, 0); identity and c <= 0 are plain; uniform priors: no-op."""
    from amlfs.spaces.amlfs_space import PRIOR_MAX, PRIOR_SCALE

    cfg = SpaceConfig(6, "bounded", -10.0, 10.0, 1.0, prior_adjustment=True)
    assert AMLFS.dim(cfg) == 9 and AMLFS.names(cfg)[-2:] == ["floor", "logit_adjust"]
    assert AMLFS.dim(SpaceConfig(6, "bounded")) == 8 and "logit_adjust" not in AMLFS.names(SpaceConfig(6, "bounded"))
    for c, a in ((0.0, 0.0), (-0.3, 0.0), (0.25, 0.25 * PRIOR_SCALE), (100.0, PRIOR_MAX)):
        theta = [*AMLFS.identity(cfg)[:-1], c]
        assert AMLFS.program(theta, cfg)["logitAdjust"] == pytest.approx(a)
    warm = AMLFS.from_preset(InitSpec(logit_adjustment=1.0), cfg)
    assert warm[-1] == pytest.approx(1.0 / PRIOR_SCALE) and AMLFS.program(warm, cfg)["logitAdjust"] == pytest.approx(
        1.0
    )
    gen = torch.Generator().manual_seed(4)
    z, y = random_outputs("linear", 64, 4, gen, spread=3.0)
    ce = F.cross_entropy(z, y)
    identity = AMLFS.program(AMLFS.identity(cfg), cfg)
    assert torch.equal(build_loss(identity, "linear", 1.0, class_counts=[9, 1, 1, 1])(z, y), ce)
    adjusted = AMLFS.program([*AMLFS.identity(cfg)[:-1], 0.5], cfg)
    torch.testing.assert_close(build_loss(adjusted, "linear", 1.0, class_counts=[50, 50, 50, 50])(z, y), ce)
    assert build_loss(adjusted, "linear", 1.0, class_counts=[90, 5, 3, 2])(z, y).item() != pytest.approx(ce.item())


# --- the Poly-1 term ------------------------------------------------------------------------------


def test_a_poly_term_adds_epsilon_times_one_minus_p_to_a_target_loss() -> None:
    """``poly: eps`` on a piecewise or search-softmax program: the rows' loss plus eps (1 - p), values and gradients
    by hand; on the identity program it is the poly1 preset exactly; presets and bad values are refused."""
    gen = torch.Generator().manual_seed(5)
    for head, s in (("linear", 1.0), ("cosine", 16.0)):
        cfg = cfg_for(head, 6, "bounded", scale=s)
        z, y = random_outputs(head, 64, 5, gen, spread=3.0, dtype=torch.float64)
        z.requires_grad_(True)
        p = torch.softmax(s * z, 1).gather(1, y.view(-1, 1)).view(-1)
        a_p = torch.where(p < 0.5, -0.5, 0.0)  # search-softmax's a on its two bins
        for eps in (1.0, -0.5, 2.0):
            preset = build_loss({"kind": "preset", "name": "poly1", "epsilon": eps}, head, s)(z, y)
            identity = build_loss(AMLFS.program(AMLFS.identity(cfg), cfg) | {"poly": eps}, head, s)(z, y)
            torch.testing.assert_close(identity, preset, rtol=1e-12, atol=1e-12)
            floored = AMLFS.program([0.0] * (cfg.intervals + 1) + [1.2], cfg)  # tau0 = 0.3
            for program, rows in (
                (floored, -torch.log(0.3 + 0.7 * p)),
                ({"kind": "search-softmax", "a": [-0.5, 0.0]}, -torch.log(p / (a_p * p + 1 - a_p))),
            ):
                want = (rows + eps * (1 - p)).mean()
                (g_want,) = torch.autograd.grad(want, z, retain_graph=True)
                got = build_loss(program | {"poly": eps}, head, s)(z, y)
                (g,) = torch.autograd.grad(got, z)
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(g, g_want, rtol=1e-5, atol=1e-7)
                assert not torch.allclose(got, rows.mean())  # the term is there
    with pytest.raises(ValueError, match=r"program\.poly: only piecewise and search-softmax programs"):
        build_loss({"kind": "preset", "name": "softmax", "poly": 1.0}, "linear", 1.0)
    with pytest.raises(ValueError, match=r"program\.poly: must be in \[-1, 10\]"):
        build_loss(AMLFS.program(AMLFS.identity(cfg), cfg) | {"poly": 11.0}, "linear", 1.0)


def test_a_bounded_search_from_poly1_carries_its_term_on_every_sample() -> None:
    """init.preset poly1 in the bounded space: mu starts at the identity of t with no floor, and every sampled
    program carries Poly-1's fixed term; the monotone space approximates it in tau instead (no term)."""
    from amlfs import core
    from amlfs.spec import LossSearchSpec

    def spec(parameterization: str, **init: object) -> LossSearchSpec:
        return LossSearchSpec.model_validate(
            {
                "task": {"dataset": "digits"},
                "search": {"parameterization": parameterization, "init": {"preset": "poly1", **init}},
            }
        )

    bounded = spec("bounded", polyEpsilon=2.0)
    mu = core.initial_mu(bounded)
    assert mu == [0.0] * len(mu)  # t identity, floor 0, no prior adjustment
    theta = [0.1] * len(mu)
    program = core.program_for(bounded, theta)
    assert program["poly"] == 2.0
    assert {k: v for k, v in program.items() if k != "poly"} == core.program_for(
        spec("bounded", polyEpsilon=0.0), theta
    )
    assert "poly" not in core.program_for(spec("monotone"), core.initial_mu(spec("monotone")))
    # what the report plots: the term is part of tau, as the preset's own tau
    for p in (0.01, 0.3, 0.9, 1.0):
        assert evaluate(core.program_for(bounded, mu), "tau", p) == pytest.approx(
            preset_tau(InitSpec(preset="poly1", poly_epsilon=2.0), p)
        )
    gen = torch.Generator().manual_seed(6)
    z, y = random_outputs("linear", 32, 10, gen, spread=3.0, dtype=torch.float64)
    torch.testing.assert_close(
        build_loss(core.program_for(bounded, mu), "linear", 1.0, class_counts=[10] * 10)(z, y),
        build_loss({"kind": "preset", "name": "poly1", "epsilon": 2.0}, "linear", 1.0)(z, y),
    )


def test_the_default_search_moves_around_poly1_and_a_search_keeps_the_term_it_began_with() -> None:
    """search.polyTerm (default 1): every sampled loss of the bounded search carries epsilon (1 - p), so the
    default search is the search from init.preset poly1; 0 gives the search around cross-entropy. The status
    records the term; a status without it (a search begun before the field) keeps training without it."""
    from amlfs import core
    from amlfs.spec import LossSearchSpec

    def spec(**search: object) -> LossSearchSpec:
        return LossSearchSpec.model_validate({"task": {"dataset": "digits"}, "search": search})

    default, poly1 = spec(), spec(init={"preset": "poly1", "polyEpsilon": 1.0})
    assert default.search.poly_term == 1.0
    mu = core.initial_mu(default)
    assert mu == core.initial_mu(poly1)
    theta = [0.05 * (i - 3) for i in range(len(mu))]
    assert core.program_for(default, theta) == core.program_for(poly1, theta)
    assert core.program_for(default, theta)["poly"] == 1.0
    assert "poly" not in core.program_for(spec(polyTerm=0), theta)
    assert core.program_for(spec(polyTerm=2.5), theta)["poly"] == 2.5
    # init.preset poly1 fixes the term at its own epsilon
    assert core.program_for(spec(polyTerm=2.5, init={"preset": "poly1", "polyEpsilon": 0.5}), theta)["poly"] == 0.5
    # other parameterisations do not take it: the default does nothing there, another value is refused
    monotone = spec(parameterization="monotone")
    assert "poly" not in core.program_for(monotone, core.initial_mu(monotone))
    with pytest.raises(ValueError, match="polyTerm applies to the bounded parameterization"):
        spec(parameterization="monotone", polyTerm=2.0)
    with pytest.raises(ValueError, match="polyTerm applies to the bounded parameterization"):
        spec(space="search-softmax", polyTerm=0.5)

    st = core.initial_status(default)
    assert st.poly_term == 1.0 and st.to_json_dict()["polyTerm"] == 1.0
    assert core.spec_as_begun(default, st) == default
    # a CRD whose default changed later: the search keeps the term it began with
    assert core.spec_as_begun(spec(polyTerm=0.5), st).search.poly_term == 1.0
    # begun before the field existed: no term, whatever the CRD now defaults
    old = st.model_copy(update={"poly_term": None})
    begun = core.spec_as_begun(default, old)
    assert begun.search.poly_term == 0.0 and "poly" not in core.program_for(begun, theta)
    assert core.spec_as_begun(default, None) == default  # not begun: the spec as it is
