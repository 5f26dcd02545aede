"""The router's dispatch plan: every (token, k) slot appears once, under the right expert and weight."""
import torch

from serve_app.model.moe import LocalExpertBackend, combine, route


def test_plan_covers_every_token_slot_once_with_its_weight():
    g = torch.Generator().manual_seed(0)
    x, gate = torch.randn(10, 16, generator=g), torch.randn(6, 16, generator=g)   # T=10, D=16, E=6
    plan = route(x, gate, top_k=2, normalize=False, layer=3)
    assert plan.topk_ids.shape == (10, 2) and plan.router_logits.shape == (10, 6)
    assert plan.experts == sorted(plan.experts)
    seen = sorted((int(r), a.expert, float(w)) for a in plan.assignments for r, w in zip(a.rows, a.weights))
    expected = sorted((t, int(plan.topk_ids[t, k]), float(plan.topk_weights[t, k]))
                      for t in range(10) for k in range(2))
    assert seen == expected


def test_renormalised_weights_sum_to_one_and_raw_ones_do_not():
    g = torch.Generator().manual_seed(1)
    x, gate = torch.randn(5, 8, generator=g), torch.randn(4, 8, generator=g)
    norm = route(x, gate, top_k=2, normalize=True, layer=0).topk_weights.sum(-1)
    raw = route(x, gate, top_k=2, normalize=False, layer=0).topk_weights.sum(-1)
    assert torch.allclose(norm, torch.ones(5))
    assert (raw < 1 - 1e-6).all()


def test_combine_equals_dense_weighted_sum_of_experts():
    g = torch.Generator().manual_seed(2)
    backend = LocalExpertBackend([(0, e) for e in range(4)], hidden=8, width=12)
    for p in backend.parameters():
        torch.nn.init.normal_(p, generator=g)
    x, gate = torch.randn(7, 8, generator=g), torch.randn(4, 8, generator=g)
    plan = route(x, gate, top_k=2, normalize=True, layer=0)
    out = combine(plan, backend.run_experts(x, plan), like=x)                    # [T, D]
    dense = torch.stack([backend.ffn[f"0_{e}"](x) for e in range(4)], dim=1)     # [T, E, D]
    ref = (dense.gather(1, plan.topk_ids[..., None].expand(-1, -1, 8)) * plan.topk_weights[..., None]).sum(1)
    assert out.shape == (7, 8)
    assert torch.allclose(out, ref, atol=1e-5)
