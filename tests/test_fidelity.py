"""Whole-model weight-gradient fidelity against plain CRS, on a tiny BERT: the median layer and
every operator must be less noisy than plain CRS.

The figure is each converted Linear's relative MSE ``E ||dW_hat - dW||^2 / ||dW||^2`` with the
whole model converted, measured over ``DRAWS`` sampled backward passes. The baseline is plain
i.i.d. CRS with activation-norm probabilities (pads included) applied layer by layer with the
exact upstream gradient, whose relative MSE is known in closed form:
``E ||G_hat - G||^2 = (1/k) (sum_i ||h_i||^2 ||dz_i||^2 / p_i - ||G||^2)``, ``p_i ∝ ||h_i||``.

Tolerances come from the measured spread: a bootstrap over the draws (fixed seed) gives an
upper quantile of each statistic, which must stay below the baseline (exact, no noise).
"""

import functools

import pytest
import torch

import wtacrs
from tests.factory import tiny_model
from wtacrs.estimator import budget

DRAWS = 60
RESAMPLES = 1000
CONFIGS = {"default": {}, "linears-only": {"tm1": False, "tm2": False}, "sampled-attention": {"tm1": True, "tm2_v": "sample"}}
# the first default: the test's power -- it must catch what made that default train worse
SAMPLED_ATTENTION = pytest.param(
    "sampled-attention",
    marks=pytest.mark.xfail(
        strict=True,
        reason="sampled TensorMul-1 and V columns make the Linear-Q/K weight gradients about 12x noisier than plain CRS",
    ),
)


def _model_and_batch():
    model = tiny_model("bert", head="MASKED_LM", d_model=32, vocab=100, dropout=0.0)
    ids = torch.randint(1, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(16)[None] < torch.tensor([16, 13, 10, 8])[:, None]).long()  # right padding
    return model, dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def plain_crs_relmse(h, dz, k):
    """Relative MSE of plain CRS of ``dz^T h`` (``[n, in]``, ``[n, out]``) from k draws, ``p ∝ ||h_i||``."""
    h, dz = h.double(), dz.double()
    g_sq = (dz.T @ h).pow(2).sum()
    h_norm, dz_norm = h.norm(dim=1), dz.norm(dim=1)
    p = h_norm / h_norm.sum()
    nonzero = p > 0
    second_moment = (h_norm[nonzero] ** 2 * dz_norm[nonzero] ** 2 / p[nonzero]).sum()
    return float((second_moment - g_sq) / k / g_sq)


def test_plain_crs_relmse_matches_sampling():
    """The closed form against plain CRS draws (independent per batch index)."""
    from wtacrs.estimator import estimate_product

    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 6, generator=g) * torch.rand(40, 1, generator=g) ** -1
    dz = torch.randn(40, 5, generator=g)
    draws = 20000
    est = estimate_product(h.expand(draws, 40, 6), dz.expand(draws, 40, 5), 12, method="crs", generator=g)
    exact = h.double().T @ dz.double()
    rel = (est.double() - exact).pow(2).sum(dim=(1, 2)) / exact.pow(2).sum()
    expected = plain_crs_relmse(h, dz, 12)
    assert abs(float(rel.mean()) - expected) < 5 * float(rel.std()) / draws**0.5, (float(rel.mean()), expected)


@functools.lru_cache(maxsize=None)
def _measure(config_name):
    """``(operators [layers], errors [layers, DRAWS], crs [layers])`` for a config of ``CONFIGS``."""
    config = wtacrs.WTACRSConfig(seed=0, **CONFIGS[config_name])
    model, batch = _model_and_batch()
    family = wtacrs.family_of(model)
    linears = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear and family.linear_operator(n) is not None}

    io = {}

    def capture(name):
        def hook(module, args, out):
            io[name] = [args[0].detach()]
            out.register_hook(lambda grad: io[name].append(grad.detach()))

        return hook

    handles = [m.register_forward_hook(capture(n)) for n, m in linears.items()]
    model(**batch).loss.backward()
    for handle in handles:
        handle.remove()
    exact = {n: m.weight.grad.clone() for n, m in linears.items()}
    crs = []
    for name in linears:
        h, dz = (t.reshape(-1, t.shape[-1]) for t in io[name])
        crs.append(plain_crs_relmse(h, dz, budget(h.shape[0], config.ratio, config.min_k)))

    wtacrs.convert(model, config)
    errors = torch.zeros(len(linears), DRAWS, dtype=torch.float64)
    for draw in range(DRAWS):
        model.zero_grad()
        model(**batch).loss.backward()
        for i, (name, module) in enumerate(linears.items()):
            g = exact[name].double()
            errors[i, draw] = (module.weight.grad.double() - g).pow(2).sum() / g.pow(2).sum()
    operators = [family.linear_operator(n) for n in linears]
    return operators, errors, torch.tensor(crs, dtype=torch.float64)


def _upper_quantile(errors, statistic, q):
    """The ``q`` quantile of ``statistic(errors[:, resampled draws])`` over bootstrap resamples."""
    g = torch.Generator().manual_seed(0)
    values = [statistic(errors[:, torch.randint(DRAWS, (DRAWS,), generator=g)]) for _ in range(RESAMPLES)]
    return float(torch.tensor(values).quantile(q))


@pytest.mark.parametrize("config_name", ["default", "linears-only", SAMPLED_ATTENTION])
def test_median_relmse_over_linears_is_below_plain_crs(config_name):
    """Median over the 12 Linear layers. Measured with the token mask alone (before the running
    per-position norms): plain CRS 2.14; sampled attention 2.36 (1.10x: Q and K, 4 of the 12
    layers, sit far above and move the median), linears only 1.61 (0.75x)."""
    _, errors, crs = _measure(config_name)
    bound = _upper_quantile(errors, lambda e: e.mean(dim=1).quantile(0.5), 0.99)
    assert bound < float(crs.quantile(0.5)), (bound, float(crs.quantile(0.5)))


@pytest.mark.parametrize("config_name", ["default", "linears-only", SAMPLED_ATTENTION])
def test_no_operator_relmse_is_above_plain_crs(config_name):
    """Per operator, its layers' summed relative MSE over plain CRS's. Measured with the token
    mask alone, sampled attention: Q 12.2x, K 11.8x, V 0.74x, O 0.76x, U 0.78x, D 0.77x; linears
    only: 0.74x to 0.80x."""
    operators, errors, crs = _measure(config_name)
    for operator in dict.fromkeys(operators):
        rows = torch.tensor([op == operator for op in operators])
        ratio = lambda e, rows=rows: e[rows].mean(dim=1).sum() / crs[rows].sum()
        # 99.9%: six operators are tested at once
        assert _upper_quantile(errors, ratio, 0.999) < 1.0, (operator.value, float(ratio(errors)))
