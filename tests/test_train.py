"""Training loop, samplers and baselines on tiny models: schedule, param groups, accumulation, stopping,
exact resume, precision paths. Kill -9 and multi-process runs of the real stage are in test_pretrain_stage.py."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llmcore.common import LLMCoreError
from llmcore.data.tokens import RandomWindows, SequentialWindows, load_tokens
from llmcore.eval.baselines import bigram_loss, unigram_entropy, unigram_loss
from llmcore.models.config import ModelConfig
from llmcore.models.gpt import GPT
from llmcore.params import ParamsError, from_dict
from llmcore.training.config import HardwareConfig, TrainConfig
from llmcore.training.loop import fit, get_lr, lm_loss, make_optimizer, param_groups, plan_steps
from llmcore.training.state import checkpoints, join_tensors, split_tensors

V, T = 32, 16
CPU = HardwareConfig(device="cpu")
# A learnable stream: one random 97-token phrase repeated.
TOKENS = np.tile(np.random.default_rng(0).integers(0, V, 97).astype(np.uint16), 60)


def tiny_model(preset: str = "llama3-tiny", seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(
        ModelConfig.from_preset(
            preset, vocab_size=V, context_length=T, emb_dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64
        )
    )


def train_cfg(**overrides) -> TrainConfig:
    base = dict(
        batch_size=4,
        lr=1e-2,
        min_lr=1e-3,
        warmup_steps=2,
        max_steps=6,
        eval_every=3,
        eval_batches=2,
        checkpoint_every=3,
        log_every=1,
        seed=7,
    )
    return TrainConfig(**{**base, **overrides})


def data(batch_size: int = 4, seed: int = 1, **kw):
    return RandomWindows(TOKENS, batch_size, T, seed=seed, **kw), RandomWindows(TOKENS, batch_size, T, seed=99, **kw)


class FakeLive:
    """Records what fit logs, like dvclive.Live (no plots folder on disk)."""

    def __init__(self, tmp: Path):
        self.plots_dir, self.step, self.rows = str(tmp / "no-plots"), 0, {}

    def log_metric(self, name, value):
        self.rows.setdefault(name, []).append((self.step, value))


def run(tmp, cfg, model=None, loss_fn=lm_loss, hw=CPU, batch_size=None, **kw):
    live = FakeLive(tmp)
    model = model or tiny_model()
    train, val = data(batch_size or cfg.batch_size)
    result = fit(model, train, val, loss_fn, cfg, hw, tmp / "ckpt", live=live, **kw)
    return model, result, live


def losses(live) -> list[float]:
    return [v for _, v in live.rows["train/loss"]]


# --- schedule, parameter groups, optimizer ---------------------------------------------------------


def test_lr_warms_up_linearly_then_cosine_decays_to_min_lr():
    cfg = train_cfg(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=20)
    lrs = [get_lr(s, cfg, 20) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))  # monotone decay
    mid = 4 + (19 - 4) / 2  # half way through the cosine: half way between lr and min_lr
    assert get_lr(int(mid), cfg, 20) == pytest.approx(0.55, abs=0.06)


@pytest.mark.parametrize("preset", ["llama3-tiny", "gpt2-tiny"])
def test_no_weight_decay_on_norms_biases_and_embeddings(preset):
    model = tiny_model(preset)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert not decayed & kept and decayed | kept == set(names.values())  # every parameter exactly once
    assert all(n.endswith("weight") and "norm" not in n and "emb" not in n for n in decayed)
    assert "tok_emb.weight" in kept and any("norm" in n for n in kept)
    if preset == "gpt2-tiny":
        assert "pos_emb.weight" in kept and any(n.endswith("bias") for n in kept)
    assert "blocks.0.attn.qkv.weight" in decayed and "blocks.0.mlp.fc.weight" in decayed


def test_adamw_is_fused_on_cpu_when_torch_has_it():
    opt = make_optimizer(tiny_model(), train_cfg(), torch.device("cpu"))
    assert opt.defaults["fused"] is True  # torch >= 2.4 has a fused CPU AdamW


def test_config_errors_name_the_key():
    with pytest.raises(ParamsError, match="set max_steps or epochs"):
        from_dict(TrainConfig, {"lr": 0.1}, "pretrain.train")
    with pytest.raises(ParamsError, match=r"pretrain\.train\.batch_size: expected a positive int"):
        from_dict(TrainConfig, {"max_steps": 3, "batch_size": 0}, "pretrain.train")
    with pytest.raises(ParamsError, match=r"hardware\.nproc: expected"):
        from_dict(HardwareConfig, {"nproc": 0}, "hardware")


# --- gradient accumulation and stopping ------------------------------------------------------------


def test_grad_accumulation_matches_the_big_batch(tmp_path):
    # 2 x 4 sequences == 8 at once: the samplers draw the same 8 windows, the gradient is the same mean.
    cfg = dict(max_steps=1, grad_clip=0.0, weight_decay=0.0, checkpoint_every=1)
    _, r8, live8 = run(tmp_path / "b8", train_cfg(batch_size=8, **cfg))
    _, r4, live4 = run(tmp_path / "b4", train_cfg(batch_size=4, grad_accum=2, **cfg))
    assert losses(live4) == pytest.approx(losses(live8), rel=1e-6)
    assert r4.items_seen == r8.items_seen == 8 * T
    m8 = load_file(str(checkpoints(tmp_path / "b8" / "ckpt")[-1] / "state.safetensors"))
    m4 = load_file(str(checkpoints(tmp_path / "b4" / "ckpt")[-1] / "state.safetensors"))
    moments = [k for k in m8 if k.endswith("exp_avg")]  # (1 - beta1) * gradient after one step
    assert len(moments) == len(list(tiny_model().parameters()))
    for k in moments:
        torch.testing.assert_close(m4[k], m8[k], rtol=1e-4, atol=1e-8)
    # and over several steps the loss curves agree
    _, _, live8 = run(tmp_path / "c8", train_cfg(batch_size=8, max_steps=4))
    _, _, live4 = run(tmp_path / "c4", train_cfg(batch_size=4, grad_accum=2, max_steps=4))
    assert losses(live4) == pytest.approx(losses(live8), rel=1e-4)


def test_loss_weighting_by_item_count(tmp_path):
    # Micro-batches with different numbers of scored tokens: the step's gradient is the per-token mean.
    def masked(model, batch):
        idx, targets = batch
        return lm_loss(model, (idx, targets.masked_fill(targets < 12, -100)))  # about a third unscored

    cfg = dict(max_steps=1, grad_clip=0.0, weight_decay=0.0, checkpoint_every=1)
    run(tmp_path / "b8", train_cfg(batch_size=8, **cfg), loss_fn=masked)
    run(tmp_path / "b4", train_cfg(batch_size=4, grad_accum=2, **cfg), loss_fn=masked)
    m8 = load_file(str(checkpoints(tmp_path / "b8" / "ckpt")[-1] / "state.safetensors"))
    m4 = load_file(str(checkpoints(tmp_path / "b4" / "ckpt")[-1] / "state.safetensors"))
    for k in (k for k in m8 if k.endswith("exp_avg")):
        torch.testing.assert_close(m4[k], m8[k], rtol=1e-4, atol=1e-8)


def test_stops_at_max_steps_when_fewer_than_epochs(tmp_path):
    _, r, live = run(tmp_path, train_cfg(max_steps=5, epochs=100.0))
    assert (r.step, r.stop_reason) == (5, "max_steps")
    assert [s for s, _ in live.rows["val/loss"]] == [0, 3, 5]  # step 0, every eval_every, the end
    assert r.val_loss < live.rows["val/loss"][0][1] and math.isfinite(r.train_loss)


def test_stops_after_epochs(tmp_path):
    train = SequentialWindows(TOKENS, 4, T, stride=T, seed=1)  # 363 windows -> 90 batches per epoch
    val = SequentialWindows(TOKENS[:300], 4, T, shuffle=False)  # eval_batches=None: one pass, 4 batches
    assert len(train) == 90
    cfg = train_cfg(max_steps=None, epochs=0.2, grad_accum=2, eval_batches=None, eval_every=100)
    r = fit(tiny_model(), train, val, lm_loss, cfg, CPU, tmp_path)
    assert plan_steps(cfg, len(train)) == (9, "epochs")  # ceil(0.2 * 90 / 2)
    assert (r.step, r.stop_reason) == (9, "epochs") and r.epochs == pytest.approx(18 / 90)


def test_stops_at_time_budget(tmp_path):
    _, r, _ = run(tmp_path, train_cfg(max_steps=100_000, time_budget_s=0.5, eval_every=1000))
    assert r.stop_reason == "time_budget" and 0 < r.step < 100_000 and r.train_time_s >= 0.5
    assert checkpoints(tmp_path / "ckpt")[-1].name == f"step_{r.step:08d}"  # the end is checkpointed


def test_trainable_subset_leaves_the_rest_untouched(tmp_path):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head = list(model.blocks[-1].parameters()) + list(model.final_norm.parameters())
    run(tmp_path, train_cfg(max_steps=2), model=model, trainable=head)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("blocks.1.", "final_norm.")) for k in changed)


# --- host-device syncs -----------------------------------------------------------------------------

# Every way a tensor's value reaches Python: on CUDA each one waits for the device to catch up.
CONVERSIONS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


class FixedBatches:
    """Batches drawn up front, so the sampler's own index lists do not count as conversions."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next_batch(self):
        self.i += 1
        return self.batches[(self.i - 1) % len(self.batches)]

    def __len__(self):
        return len(self.batches)

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def count_conversions(tmp, monkeypatch, **overrides) -> int:
    sampler = RandomWindows(TOKENS, 4, T, seed=1)
    batches = [sampler.next_batch() for _ in range(8)]
    counts = {"n": 0}
    for name in CONVERSIONS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counts["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    cfg = train_cfg(**{"eval_every": 1000, "checkpoint_every": 1000, "log_every": 1000, **overrides})
    fit(tiny_model(), FixedBatches(batches), FixedBatches(batches[:2]), lm_loss, cfg, CPU, tmp, live=FakeLive(tmp))
    monkeypatch.undo()
    return counts["n"]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_steps_between_log_intervals_never_sync(tmp_path, monkeypatch, grad_accum):
    """A step reads nothing back from the device: its loss, item count and gradient norm stay there until the
    next log, evaluation or checkpoint, which reads every pending step in one go."""
    short = count_conversions(tmp_path / "a", monkeypatch, max_steps=4, grad_accum=grad_accum)
    long = count_conversions(tmp_path / "b", monkeypatch, max_steps=12, grad_accum=grad_accum)
    assert long == short  # 8 more steps, not one more conversion
    logged = count_conversions(tmp_path / "c", monkeypatch, max_steps=12, grad_accum=grad_accum, log_every=4)
    assert logged - long == 2  # one read-back each at steps 4 and 8 (step 12 is read back in both runs)


def test_time_budget_and_read_back_keep_every_step(tmp_path):
    """Steps stopped by the time budget between read-backs still count: items and losses of each one."""
    _, r, live = run(
        tmp_path,
        train_cfg(max_steps=100_000, time_budget_s=0.3, eval_every=1000, log_every=1000, checkpoint_every=1000),
    )
    assert r.stop_reason == "time_budget" and r.items_seen == r.step * 4 * T
    assert math.isfinite(r.train_loss)


def test_divergence_is_reported_at_the_next_read_back(tmp_path):
    def exploding(model, batch):
        loss, n = lm_loss(model, batch)
        return loss * (math.nan if torch.is_grad_enabled() and state["calls"] >= 2 else 1.0), n

    state = {"calls": 0}

    def counting(model, batch):
        state["calls"] += torch.is_grad_enabled()
        return exploding(model, batch)

    with pytest.raises(LLMCoreError, match="training diverged: loss is nan at step 2"):
        run(tmp_path, train_cfg(max_steps=6, log_every=5, eval_every=100, checkpoint_every=100), loss_fn=counting)


# --- resume ----------------------------------------------------------------------------------------


class Crash(Exception):
    pass


def test_resume_after_a_crash_is_bitwise_identical(tmp_path):
    cfg = train_cfg(max_steps=8, checkpoint_every=3)
    ref, _, ref_live = run(tmp_path / "ref", cfg)

    calls = 0

    def crashing(model, batch):  # dies in step 5, after the checkpoint of step 3
        nonlocal calls
        calls += torch.is_grad_enabled()  # count training batches, not evaluation ones
        if calls == 5:
            raise Crash
        return lm_loss(model, batch)

    with pytest.raises(Crash):
        run(tmp_path / "run", cfg, loss_fn=crashing)
    assert [p.name for p in checkpoints(tmp_path / "run" / "ckpt")] == ["step_00000003"]
    model, r, live = run(tmp_path / "run", cfg, model=tiny_model(seed=123))  # other init: weights must load
    assert r.resumed_from == 3 and r.step == 8
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert losses(live) == losses(ref_live)[3:]  # the same batches, bit for bit
    # older ones removed once the next is complete; the one before the newest stays, in case the newest is unreadable
    assert [p.name for p in checkpoints(tmp_path / "run" / "ckpt")] == ["step_00000006", "step_00000008"]

    # rerunning a finished run only reloads it
    model2, r2, live2 = run(tmp_path / "run", cfg)
    assert (r2.resumed_from, r2.step, r2.val_loss) == (8, 8, r.val_loss) and "train/loss" not in live2.rows


def test_changed_params_start_fresh(tmp_path):
    run(tmp_path, train_cfg(max_steps=3))
    _, r, _ = run(tmp_path, train_cfg(max_steps=3, lr=5e-3))
    assert r.resumed_from is None
    _, r, _ = run(tmp_path, train_cfg(max_steps=3, lr=5e-3, eval_every=2, time_budget_s=100.0))
    assert r.resumed_from == 3  # bookkeeping fields do not change the weights: resumed


# --- precision -------------------------------------------------------------------------------------


def test_bf16_autocast_on_cpu(tmp_path):
    model, r, live = run(tmp_path, train_cfg(max_steps=3), hw=HardwareConfig(device="cpu", precision="bf16"))
    assert all(math.isfinite(v) for v in losses(live)) and math.isfinite(r.val_loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 + GradScaler is exercised on CUDA only")
def test_fp16_gradscaler_on_cuda(tmp_path):
    model, r, live = run(tmp_path, train_cfg(max_steps=5), hw=HardwareConfig(device="cuda", precision="fp16"))
    assert all(math.isfinite(v) for v in losses(live)) and math.isfinite(r.val_loss)
    state = json.loads((checkpoints(tmp_path / "ckpt")[-1] / "state.json").read_text())
    assert state["scaler"]["scale"] > 0  # GradScaler's state is checkpointed
    assert all(p.dtype == torch.float32 for p in model.parameters())


# --- checkpoint encoding ---------------------------------------------------------------------------


def test_training_state_round_trips_through_safetensors_and_json():
    model = tiny_model()
    opt = make_optimizer(model, train_cfg(), torch.device("cpu"))
    lm_loss(model, data()[0].next_batch())[0].backward()
    opt.step()
    tree = {"optimizer": opt.state_dict(), "python": random.getstate(), "gen": torch.Generator().get_state()}
    tensors = {}
    meta = split_tensors(tree, "state", tensors)
    back = join_tensors(meta, tensors)
    assert back["python"] == tree["python"] and torch.equal(back["gen"], tree["gen"])
    assert back["optimizer"]["param_groups"] == tree["optimizer"]["param_groups"]  # betas stay a tuple
    for k, st in tree["optimizer"]["state"].items():
        assert all(torch.equal(st[name], back["optimizer"]["state"][k][name]) for name in st)
    with pytest.raises(TypeError, match="cannot checkpoint"):
        split_tensors({"x": object()}, "state", {})


# --- samplers --------------------------------------------------------------------------------------


def test_random_windows_are_reproducible_and_resume_exactly():
    a, b = RandomWindows(TOKENS, 4, T, seed=3), RandomWindows(TOKENS, 4, T, seed=3)
    x, y = a.next_batch()
    assert x.shape == y.shape == (4, T) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    assert torch.equal(x, b.next_batch()[0])
    state = a.state_dict()
    expected = [a.next_batch()[0] for _ in range(3)]
    b.load_state_dict(state)
    assert all(torch.equal(e, b.next_batch()[0]) for e in expected)


def test_rank_slices_make_up_the_global_batch():
    whole = RandomWindows(TOKENS, 8, T, seed=5)
    ranks = [RandomWindows(TOKENS, 4, T, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        assert torch.equal(whole.next_batch()[0], torch.cat([r.next_batch()[0] for r in ranks]))
    # two draws of 4 are one draw of 8 (what makes accumulation equal to the big batch)
    small, big = RandomWindows(TOKENS, 4, T, seed=5), RandomWindows(TOKENS, 8, T, seed=5)
    assert torch.equal(torch.cat([small.next_batch()[0], small.next_batch()[0]]), big.next_batch()[0])
    seq = SequentialWindows(TOKENS, 8, T, seed=5)
    seq_ranks = [SequentialWindows(TOKENS, 4, T, seed=5, rank=r, world_size=2) for r in range(2)]
    assert len(seq) == len(seq_ranks[0])
    assert torch.equal(seq.next_batch()[0], torch.cat([r.next_batch()[0] for r in seq_ranks]))


def test_sequential_windows_cover_each_window_once_per_epoch_in_a_new_order():
    tokens = np.arange(2 + 10 * 4, dtype=np.uint16)  # stride 4, T 4: windows start at 0, 4, ..., 36
    s = SequentialWindows(tokens, 2, 4, stride=4, seed=0)
    assert s.n_windows == 10 and len(s) == 5
    epoch0 = torch.cat([s.next_batch()[0][:, 0] for _ in range(5)])
    epoch1 = torch.cat([s.next_batch()[0][:, 0] for _ in range(5)])
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(0, 40, 4))
    assert not torch.equal(epoch0, epoch1) and s.epoch == 1
    state = s.state_dict()  # mid-stream, then a fresh sampler continues identically
    rest = [s.next_batch()[0] for _ in range(7)]
    t = SequentialWindows(tokens, 2, 4, stride=4, seed=0)
    t.load_state_dict(state)
    assert all(torch.equal(r, t.next_batch()[0]) for r in rest)
    ordered = SequentialWindows(tokens, 2, 4, stride=2, shuffle=False)
    assert ordered.next_batch()[0][:, 0].tolist() == [0, 2]


def test_load_tokens_reads_the_dtype_from_meta(tmp_path):
    np.arange(70000, dtype=np.uint32).tofile(tmp_path / "train.bin")
    (tmp_path / "meta.json").write_text('{"dtype": "uint32", "vocab_size": 70000}')
    tokens = load_tokens(tmp_path, "train")
    assert tokens.dtype == np.uint32 and tokens[-1] == 69999
    (tmp_path / "meta.json").write_text('{"dtype": "int8", "vocab_size": 10}')
    with pytest.raises(LLMCoreError, match="dtype"):
        load_tokens(tmp_path, "train")
    with pytest.raises(LLMCoreError, match="too few"):
        RandomWindows(np.arange(5), 1, 8, seed=0)


# --- baselines -------------------------------------------------------------------------------------


def test_count_baselines_match_brute_force():
    rng = np.random.default_rng(1)
    train, val, k, n = rng.integers(0, 6, 500), rng.integers(0, 7, 80), 0.5, 8  # token 6 never seen in train
    c = np.bincount(train, minlength=n)
    uni = -np.mean([math.log((c[t] + k) / (len(train) + k * n)) for t in val])
    assert unigram_loss(train, val, n, k) == pytest.approx(uni)
    pairs = {}
    for a, b in zip(train[:-1], train[1:], strict=True):
        pairs[a, b] = pairs.get((a, b), 0) + 1
    ctx = np.bincount(train[:-1], minlength=n)
    bi = -np.mean(
        [math.log((pairs.get((a, b), 0) + k) / (ctx[a] + k * n)) for a, b in zip(val[:-1], val[1:], strict=True)]
    )
    assert bigram_loss(train, val, n, k) == pytest.approx(bi)
    p = c[c > 0] / len(train)
    assert unigram_entropy(train, n) == pytest.approx(-(p * np.log(p)).sum())
    assert unigram_entropy(np.zeros(10, dtype=np.int64), n) == 0.0
