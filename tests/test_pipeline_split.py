"""The pipeline-stage splitter: balanced contiguous plans, and stages that chained compute the whole model."""
import pytest
import torch

from model import GPT, GPT2_SIZES, GPTConfig, build_stage, describe_plan, plan_stages, stage_costs


def plan_cost(config: GPTConfig, plan: list[range], balance: str) -> list[float]:
    block, first, last = stage_costs(config, balance)
    return [len(r) * block + (first if s == 0 else 0) + (last if s == len(plan) - 1 else 0)
            for s, r in enumerate(plan)]


@pytest.mark.parametrize("balance", ["flops", "params", "uniform"])
@pytest.mark.parametrize("n_layer,n_stages", [(12, 1), (12, 2), (12, 4), (7, 3), (5, 5), (48, 8)])
def test_plan_covers_every_block_once_in_order(balance, n_layer, n_stages):
    config = GPTConfig(n_layer=n_layer, n_head=4, n_embd=256, block_size=512)
    plan = plan_stages(config, n_stages, balance)
    assert len(plan) == n_stages
    assert [i for r in plan for i in r] == list(range(n_layer))
    assert all(len(r) >= 1 for r in plan[1:-1])


@pytest.mark.parametrize("n_stages", [2, 3, 4])
def test_plan_is_optimal_against_brute_force(n_stages):
    """No other contiguous split has a cheaper most-expensive stage (checked over every split)."""
    import itertools
    config = GPTConfig(n_layer=9, n_head=4, n_embd=128, block_size=256, vocab_size=20000)
    best = min(
        max(plan_cost(config, [range(a, b) for a, b in zip((0, *cuts), (*cuts, 9))], "flops"))
        for cuts in itertools.combinations_with_replacement(range(10), n_stages - 1)
        if all(b - a >= 1 for a, b in zip(cuts, cuts[1:])))   # middle stages hold a block or more
    assert max(plan_cost(config, plan_stages(config, n_stages, "flops"), "flops")) == pytest.approx(best)


def test_gpt2_plans_are_within_ten_percent_of_balanced():
    config = GPT2_SIZES["gpt2"]
    block, _, head = stage_costs(config, "flops")
    assert 4.3 < head / block < 4.6                      # the LM head costs about 4.5 blocks
    for n_stages in (2, 4):
        costs = plan_cost(config, plan_stages(config, n_stages, "flops"), "flops")
        assert max(costs) / (sum(costs) / len(costs)) < 1.10
    assert describe_plan(config, plan_stages(config, 2), "flops")[-1].endswith("1.028x the mean")


@pytest.mark.parametrize("n_stages", [1, 2, 3, 4])
@pytest.mark.parametrize("changes", [{}, {"bias": False, "tie_embeddings": False}, {"n_layer": 6}])
def test_chained_stages_compute_the_whole_model(n_stages, changes):
    torch.manual_seed(0)
    config = GPTConfig(**{**dict(n_layer=4, n_head=2, n_embd=32, block_size=16, vocab_size=50), **changes})
    model = GPT(config).eval()
    plan = plan_stages(config, n_stages, "flops")
    stages = [build_stage(config, plan, s, model.state_dict()).eval() for s in range(n_stages)]
    idx = torch.randint(0, 50, (3, 16))
    x = idx
    for stage in stages:
        x = stage(x)
    torch.testing.assert_close(x, model(idx), rtol=0, atol=0)
    stage_names = [name for stage in stages for name in stage.state_dict()]
    assert sorted(stage_names) == sorted(model.state_dict())   # each parameter lives on exactly one stage
