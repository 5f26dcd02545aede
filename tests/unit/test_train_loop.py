"""The training loop of the default model: loss goes down, resume is exact, padding is ignored,
the export loads with the serving loader and gives the same logits."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from serve_app.model import load_model
from serve_app.train.samples import SampleTensors, next_batch
from serve_app.train.train import (RunOptions, TrainConfig, build_model, compute_loss, export,
                                   fit_to_budget,
                                   lm_loss, load_balance_loss, lr_at, resolve_autocast, TrainState, train)

EOS = 1


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is fastest, and a second one only spins on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(**overrides) -> TrainConfig:
    cfg = TrainConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
                      top_k=2, moe_intermediate_size=32, max_len=16, batch_size=4, lr=1e-2, warmup_steps=3,
                      max_steps=30, seed=0)
    return replace(cfg, **overrides)


def synthetic_samples(num_rows: int = 6, max_len: int = 16, vocab: int = 64) -> SampleTensors:
    """Counting sequences (easy to learn); every other row is half padding, like a FIM sample."""
    ids, lengths = [], []
    for row in range(num_rows):
        start = 2 + 7 * row
        ids.append([2 + (start + i) % (vocab - 2) for i in range(max_len)])
        lengths.append(max_len if row % 2 == 0 else max_len // 2)
    input_ids = torch.tensor(ids)
    num_tokens = torch.tensor(lengths)
    pad = torch.arange(max_len)[None, :] >= num_tokens[:, None]
    input_ids[pad] = EOS
    return SampleTensors(input_ids, num_tokens, num_tokens < max_len)


def run(cfg: TrainConfig, tmp_path, name: str, **opts):
    options = RunOptions(tmp_path / name, checkpoint_every=opts.pop("checkpoint_every", 4), log_every=1,
                         eval_rows=0, **opts)
    options.run_dir.mkdir(exist_ok=True)
    return train(cfg, options, synthetic_samples(), EOS)


def test_loss_goes_down_on_a_few_synthetic_samples(tmp_path):
    _, state, losses = run(tiny_config(max_steps=20), tmp_path, "a")
    assert state.step == 20 and len(losses) == 20
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    assert losses[0] == pytest.approx(math.log(64), rel=0.1)  # initialisation predicts ~uniformly


def test_resume_from_checkpoint_continues_exactly_like_an_uninterrupted_run(tmp_path):
    cfg = tiny_config(max_steps=8)
    straight, straight_state, straight_losses = run(cfg, tmp_path, "straight")
    _, half_state, first_half = run(cfg, tmp_path, "resumed", stop_after=5, checkpoint_every=100)
    assert half_state.step == 5
    resumed, resumed_state, second_half = run(cfg, tmp_path, "resumed", resume=True)
    assert first_half + second_half == straight_losses  # the same loss at every step k
    assert resumed_state == straight_state or (
        resumed_state.step, resumed_state.epoch, resumed_state.cursor, resumed_state.tokens_seen
    ) == (straight_state.step, straight_state.epoch, straight_state.cursor, straight_state.tokens_seen)
    assert straight_state.epoch >= 1  # 8 steps of 4 rows over 6 rows: the cursor crossed epochs
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_warm_start_continues_a_finished_run_under_a_new_schedule(tmp_path):
    from serve_app.train.train import warm_start_config

    first, first_state, _ = run(tiny_config(max_steps=5), tmp_path, "first")
    cfg = warm_start_config(tiny_config(max_steps=5), {"lr": 5e-3, "max_steps": 3})
    assert (cfg.lr, cfg.max_steps, cfg.hidden_size) == (5e-3, 3, 32)
    with pytest.raises(SystemExit, match="hidden_size"):
        warm_start_config(tiny_config(), {"hidden_size": 64})
    # Stopped before its first step: the weights are the old run's, the data position carries over.
    same, start, _ = run(cfg, tmp_path, "same", init_from=tmp_path / "first" / "checkpoint.pt", stop_after=0)
    assert (start.step, start.total_steps, start.train_seconds) == (0, 3, 0.0)
    assert (start.epoch, start.cursor, start.tokens_seen) == (
        first_state.epoch, first_state.cursor, first_state.tokens_seen)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, same.state_dict()[name]), name
    # Trained: a new warmup and cosine over 3 steps, the token count keeps growing.
    _, state, losses = run(cfg, tmp_path, "second", init_from=tmp_path / "first" / "checkpoint.pt")
    assert state.step == 3 and len(losses) == 3 and state.tokens_seen > first_state.tokens_seen
    expected = TrainState(epoch=first_state.epoch, cursor=first_state.cursor)
    for _ in range(3):                                              # read on from the old position
        next_batch(synthetic_samples(), expected, cfg)
    assert (state.epoch, state.cursor) == (expected.epoch, expected.cursor)


def test_warm_start_uses_the_new_recipes_optimizer_settings(tmp_path):
    from serve_app.train.train import make_optimizer, save_checkpoint, warm_start

    old_cfg = tiny_config(weight_decay=0.1)
    model = build_model(old_cfg, EOS)
    save_checkpoint(tmp_path / "old.pt", model, make_optimizer(model, old_cfg), TrainState(step=7), old_cfg)
    new_cfg = tiny_config(weight_decay=0.0, lr=1e-4)
    new_model = build_model(new_cfg, EOS)
    opt = make_optimizer(new_model, new_cfg)
    state = warm_start(tmp_path / "old.pt", new_model, opt, total_steps=5)
    assert (state.step, state.total_steps) == (0, 5)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]
    assert all(g["lr"] == 1e-4 for g in opt.param_groups)


def test_pad_positions_do_not_contribute_to_the_loss():
    cfg = tiny_config()
    model = build_model(cfg, EOS)
    data = synthetic_samples()
    ids, num_tokens = data.input_ids[1:3], data.num_tokens[1:3]     # row 1 is half padding
    scrambled = ids.clone()
    pad = torch.arange(ids.shape[1])[None, :] >= num_tokens[:, None]
    scrambled[pad] = torch.randint(2, 64, (int(pad.sum()),))
    a = compute_loss(model, ids, num_tokens, cfg.aux_loss_coef)
    b = compute_loss(model, scrambled, num_tokens, cfg.aux_loss_coef)
    assert a.lm == pytest.approx(b.lm, abs=1e-6) and a.aux == pytest.approx(b.aux, abs=1e-6)
    # and the lm loss is exactly the mean over real targets
    logits = model(ids)
    manual = torch.cat([torch.nn.functional.cross_entropy(logits[r, :n - 1], ids[r, 1:n], reduction="none")
                        for r, n in enumerate(num_tokens.tolist())]).mean()
    assert lm_loss(logits, ids, num_tokens).item() == pytest.approx(manual.item(), rel=1e-6)


def test_load_balance_loss_is_one_when_balanced_and_larger_when_collapsed():
    real = torch.ones(8, dtype=torch.bool)
    balanced = torch.eye(4).repeat(2, 1) * 5.0                      # each expert top-1 for 2 tokens
    collapsed = torch.tensor([[9.0, 8.0, 0.0, 0.0]]).repeat(8, 1)
    assert load_balance_loss([balanced], real, top_k=1).item() == pytest.approx(1.0, rel=0.05)
    assert load_balance_loss([collapsed], real, top_k=2).item() > 1.8


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = tiny_config(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(s, cfg, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(20, cfg, 20) == pytest.approx(0.1)
    assert lr_at(12, cfg, 20) == pytest.approx(0.55)


def test_data_cursor_wraps_into_a_new_epoch_with_a_new_order():
    cfg = tiny_config(batch_size=4)
    data, state = synthetic_samples(), TrainState()
    next_batch(data, state, cfg)
    ids, _ = next_batch(data, state, cfg)                           # 2 rows of epoch 0, 2 of epoch 1
    assert (state.epoch, state.cursor) == (1, 2) and ids.shape[0] == 4


def test_export_loads_with_load_model_and_gives_the_same_logits(tmp_path):
    cfg = tiny_config()
    model = build_model(cfg, EOS)
    ids = synthetic_samples().input_ids[:2]
    with torch.no_grad():
        expected = model(ids)                                       # [B, S, V]
        export(model, tmp_path / "out", tmp_path / "no_tokenizer")
        loaded = load_model(tmp_path / "out", dtype=torch.float32)
        got = loaded(ids)
        for p in model.parameters():                                # the same model, weights rounded as exported
            p.copy_(p.to(torch.bfloat16).float())
        rounded = model(ids)
    assert got.shape == (2, 16, 64)
    assert loaded.config.eos_token_ids == (EOS,) and loaded.config.tie_word_embeddings
    torch.testing.assert_close(got, rounded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


def test_time_budget_sets_the_step_count_from_the_measured_step_time(tmp_path):
    opts = RunOptions(tmp_path, time_budget_s=100.0, probe_steps=5, log_every=10)
    state = TrainState(step=6, total_steps=1000, train_seconds=12.0)
    fit_to_budget(state, opts, timed_from=(1, 2.0))                 # 2 s per timed step
    assert state.total_steps == 6 + 44
    state.step, state.train_seconds = 7, 14.0                       # not a log step: unchanged
    fit_to_budget(state, opts, timed_from=(1, 2.0))
    assert state.total_steps == 50
    state.step, state.train_seconds = 10, 42.0                      # slowed down to 4.4 s per step
    fit_to_budget(state, opts, timed_from=(1, 2.0))
    assert state.total_steps == 10 + 13


def test_eval_fim_prompt_keeps_whole_lines_and_most_of_the_budget_for_the_prefix():
    from pathlib import Path

    from tokenizers import Tokenizer

    from serve_app.train.evaluate import Budget, fim_prompt_parts
    tok_path = Path(__file__).resolve().parents[2] / "serve_app" / "default_model" / "tokenizer.json"
    if not tok_path.is_file():
        pytest.skip("default tokenizer not built")
    budget = Budget(Tokenizer.from_file(str(tok_path)))
    prefix = "".join(f"alpha_{i} = compute({i})\n" for i in range(200))
    suffix = "".join(f"beta_{i} = compute({i})\n" for i in range(200))
    kept_prefix, kept_suffix = fim_prompt_parts(budget, prefix, suffix, 100)
    assert prefix.endswith(kept_prefix) and suffix.startswith(kept_suffix)
    assert kept_prefix.startswith("alpha_") and kept_suffix.endswith("\n")
    assert budget.count(kept_prefix) + budget.count(kept_suffix) <= 100
    assert budget.count(kept_prefix) >= 70


def test_heldout_loss_per_character_counts_the_characters_of_the_predicted_tokens():
    from pathlib import Path

    from tokenizers import Tokenizer

    from serve_app.train.evaluate import heldout_metrics
    tok_path = Path(__file__).resolve().parents[2] / "serve_app" / "default_model" / "tokenizer.json"
    tok = Tokenizer.from_file(str(tok_path))
    texts = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n"]
    rows = [tok.encode(t).ids for t in texts]
    width = max(map(len, rows))
    data = SampleTensors(torch.tensor([r + [EOS] * (width - len(r)) for r in rows]),
                         torch.tensor([len(r) for r in rows]), torch.tensor([False, False]))
    model = build_model(tiny_config(vocab_size=tok.get_vocab_size(), max_len=width), EOS).eval()
    report = heldout_metrics(model, data, tok)
    predicted = sum(len(t) - len(tok.decode(r[:1])) for t, r in zip(texts, rows))   # all but the first token
    assert report["chars"] == predicted and report["tokens"] == sum(len(r) - 1 for r in rows)
    assert report["nats_per_char"] == pytest.approx(report["loss"] * report["tokens"] / predicted, rel=1e-3)


def test_edit_similarity_is_graded_between_miss_and_exact():
    from serve_app.train.evaluate import edit_similarity

    target = "return self._exception\n"
    assert edit_similarity(target, target) == 1.0
    assert edit_similarity(None, target) == 0.0 and edit_similarity("", target) == 0.0
    near, far = edit_similarity("return self.exception\n", target), edit_similarity("pass\n", target)
    assert 0.9 < near < 1.0 and 0.0 < far < near


def test_init_weights_starts_from_an_exported_model_with_a_fresh_optimizer(tmp_path):
    cfg = tiny_config(max_steps=12)
    trained, _, _ = run(cfg, tmp_path, "first")
    export(trained, tmp_path / "exported", tmp_path / "no_tokenizer")
    _, state, losses = run(replace(cfg, max_steps=2), tmp_path, "second", init_weights=tmp_path / "exported")
    _, _, cold = run(replace(cfg, max_steps=2), tmp_path, "cold")
    assert state.step == 2 and losses[0] < 0.7 * cold[0]         # it starts where the export ended
    with pytest.raises(SystemExit, match="shape differs"):
        run(replace(cfg, hidden_size=48, max_steps=1), tmp_path, "wrong", init_weights=tmp_path / "exported")


def test_bf16_autocast_trains_float32_weights_and_the_loss_tracks_float32():
    cfg = tiny_config()
    data = synthetic_samples()
    results = {}
    for autocast in ("", "bfloat16"):
        model = build_model(cfg, EOS)
        results[autocast] = compute_loss(model, data.input_ids, data.num_tokens, cfg.aux_loss_coef, autocast)
        results[autocast].total.backward()
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert results["bfloat16"].lm == pytest.approx(results[""].lm, rel=2e-2)
    assert results["bfloat16"].lm != results[""].lm               # autocast really ran in bf16


def test_auto_autocast_follows_the_cpus_bf16_units(monkeypatch):
    import serve_app.train.train as train_mod
    assert resolve_autocast("", "cpu") == "" and resolve_autocast("bfloat16", "cpu") == "bfloat16"
    monkeypatch.setattr(train_mod, "has_bf16_units", lambda: False)     # e.g. a Zen 3: AVX2 only
    assert resolve_autocast("auto", "cpu") == ""
    monkeypatch.setattr(train_mod, "has_bf16_units", lambda: True)      # AVX512-BF16 / AMX
    assert resolve_autocast("auto", "cpu") == "bfloat16"
    assert TrainConfig().autocast == "auto"


def test_export_declares_spm_in_the_tokenizer_config(tmp_path):
    import json
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    model = build_model(tiny_config(), EOS)
    export(model, tmp_path / "psm", tokenizer_dir)
    export(model, tmp_path / "spm", tokenizer_dir, fim_order="spm")
    assert "fim_order" not in json.loads((tmp_path / "psm" / "tokenizer_config.json").read_text())
    assert json.loads((tmp_path / "spm" / "tokenizer_config.json").read_text())["fim_order"] == "spm"
