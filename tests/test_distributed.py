"""WTA-CRS under DDP and FSDP2 on two gloo ranks (CPU): it trains, the ranks agree, the ranks draw
independent rows, and each rank's sampled weight gradient is unbiased for its local batch."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import wtacrs
from tests.factory import tiny_batch, tiny_model

WORLD = 2
TRIALS = 120
SAMPLED = "encoder.block.0.layer.1.DenseReluDense.wi.weight"  # a sampled linear of T5


def _unbiased(model, local, exact) -> float:
    """Largest excess of |mean sampled grad - exact| over 6 standard errors (<= 0: unbiased)."""
    total = {n: torch.zeros_like(g) for n, g in exact.items()}
    total_sq = {n: torch.zeros_like(g) for n, g in exact.items()}
    with model.no_sync():  # each rank's own gradient, before DDP averages it
        for _ in range(TRIALS):
            model.zero_grad()
            model(**local).loss.backward()
            for n, p in model.module.named_parameters():
                total[n] += p.grad
                total_sq[n] += p.grad**2
    excess = -math.inf
    for n, g in exact.items():
        mean = total[n] / TRIALS
        sd = (total_sq[n] / TRIALS - mean**2).clamp_min(0).sqrt()
        bound = 6 * sd / math.sqrt(TRIALS) + 1e-5 + 1e-4 * g.abs().max()
        excess = max(excess, float(((mean - g).abs() - bound).max()))
    return excess


def _train(model, batch, steps: int) -> list[float]:
    """``steps`` AdamW steps on ``batch``; the losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _ddp_checks(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    local = tiny_batch("t5", seed=1 + rank)
    plain = tiny_model("t5", dropout=0.0).train()
    plain(**local).loss.backward()
    exact = {n: p.grad.clone() for n, p in plain.named_parameters() if p.grad is not None}
    model = DistributedDataParallel(wtacrs.convert(tiny_model("t5", dropout=0.0).train(), wtacrs.WTACRSConfig(ratio=0.4, seed=0)))
    same = tiny_batch("t5", seed=1)  # one batch on both ranks: only the generators can tell them apart
    with model.no_sync():
        model(**same).loss.backward()
    first_draw = model.module.get_parameter(SAMPLED).grad.flatten()[:64].tolist()
    excess = _unbiased(model, local, exact)
    losses = _train(model, local, steps=3)
    checksum = sum(float(p.double().sum()) for p in model.parameters())
    return {"excess": excess, "first_draw": first_draw, "losses": losses, "checksum": checksum}


def _fsdp_checks(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = wtacrs.convert(tiny_model("t5").train(), wtacrs.WTACRSConfig(ratio=0.3, seed=0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in [*model.encoder.block, *model.decoder.block]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    losses = _train(model, tiny_batch("t5", seed=1 + rank), steps=2)
    full = {n: p.full_tensor() for n, p in model.named_parameters()}
    changed = sum(int(not torch.equal(full[n], before[n])) for n in full)
    checksum = sum(float(t.double().sum()) for t in full.values())
    return {"losses": losses, "checksum": checksum, "changed": changed, "params": len(full)}


def _worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        result = {"ddp": _ddp_checks(rank), "fsdp": _fsdp_checks(rank)}
    finally:
        dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp / "rank")), nprocs=WORLD, join=True)
    return [json.loads((tmp / f"rank.{r}").read_text()) for r in range(WORLD)]


def test_each_rank_sampled_gradient_is_unbiased_for_its_local_batch(ranks):
    for rank in ranks:
        assert rank["ddp"]["excess"] <= 0, rank["ddp"]["excess"]


def test_ranks_draw_independent_rows(ranks):
    """Same batch, same WTACRSConfig.seed: the rows differ because the pools are seeded per rank."""
    first, second = (r["ddp"]["first_draw"] for r in ranks)
    assert any(a != 0 for a in first)
    assert first != second


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_wtacrs_trains_and_ranks_agree(ranks, strategy):
    for rank in ranks:
        assert all(math.isfinite(loss) for loss in rank[strategy]["losses"])
    assert ranks[0][strategy]["checksum"] == ranks[1][strategy]["checksum"]
    if strategy == "fsdp":
        assert ranks[0]["fsdp"]["changed"] == ranks[0]["fsdp"]["params"]  # every parameter trained
    else:
        assert ranks[0]["ddp"]["losses"][0] != ranks[1]["ddp"]["losses"][0]  # local batches differ
