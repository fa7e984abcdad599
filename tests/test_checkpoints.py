"""Checkpoint faults: a corrupt or foreign checkpoint, a crash while one is written, file modes, and which run a
checkpoint may resume (its fingerprint, `LLMCORE_FRESH`). The loop itself is in test_train.py."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch

import llmcore.training.state as state_module
from llmcore.common import LLMCoreError
from llmcore.training.config import HardwareConfig
from llmcore.training.state import FRESH_ENV, checkpoints
from tests.test_train import Crash, lm_loss, run, tiny_model, train_cfg

CFG = dict(max_steps=6, checkpoint_every=3, eval_every=3)  # checkpoints at steps 3 and 6


@pytest.fixture(autouse=True)
def no_fresh(monkeypatch):
    monkeypatch.delenv(FRESH_ENV, raising=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run's final weights and result; its checkpoints are copied by ``finished``."""
    folder = tmp_path_factory.mktemp("ref")
    model, result, _ = run(folder, train_cfg(**CFG))
    return {k: v.clone() for k, v in model.state_dict().items()}, result, folder / "ckpt"


def finished(tmp_path, reference):
    """``tmp_path/ckpt`` as the uninterrupted run left it (the same as running it here, without the time)."""
    shutil.copytree(reference[2], tmp_path / "ckpt")


def same_weights(model, weights) -> bool:
    return all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def names(folder) -> list[str]:
    return [p.name for p in checkpoints(folder)]


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "model-truncated": lambda ck: truncate(ck / "model.safetensors"),
    "state-tensors-garbage": lambda ck: (ck / "state.safetensors").write_bytes(b"not safetensors" * 4),
    "state-json-list": lambda ck: (ck / "state.json").write_text("[1, 2, 3]"),
    "state-json-truncated": lambda ck: truncate(ck / "state.json"),
    "state-json-no-optimizer": lambda ck: (ck / "state.json").write_text(
        json.dumps({k: v for k, v in json.loads((ck / "state.json").read_text()).items() if k != "optimizer"})
    ),
    "model-other-shapes": lambda ck: (ck / "model.safetensors").write_bytes(
        (ck.parent / "other.safetensors").read_bytes()
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, reference, corruption):
    weights, ref, _ = reference
    assert names(reference[2]) == ["step_00000003", "step_00000006"]  # the newest and the one before
    finished(tmp_path, reference)
    from safetensors.torch import save_model

    save_model(tiny_model("gpt2-tiny"), str(tmp_path / "ckpt" / "other.safetensors"))
    newest = tmp_path / "ckpt" / "step_00000006"
    CORRUPTIONS[corruption](newest)
    capsys.readouterr()

    model, r, _ = run(tmp_path, train_cfg(**CFG))  # once, and not again: the rerun resumes the repaired run
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(newest) in warnings[0], out
    assert r.resumed_from == 3 and r.step == 6 and r.val_loss == ref.val_loss
    assert same_weights(model, weights)
    assert names(tmp_path / "ckpt") == ["step_00000003", "step_00000006"]  # the corrupt one was rewritten
    _, again, _ = run(tmp_path, train_cfg(**CFG))
    assert again.resumed_from == 6 and "warning" not in capsys.readouterr().out


def test_no_readable_checkpoint_starts_fresh_with_a_warning(tmp_path, capsys, reference):
    weights, _, _ = reference
    finished(tmp_path, reference)
    for ck in checkpoints(tmp_path / "ckpt"):
        (ck / "state.json").write_text('"not an object"')
    capsys.readouterr()
    model, r, _ = run(tmp_path, train_cfg(**CFG))
    out = capsys.readouterr().out
    assert r.resumed_from is None and same_weights(model, weights)
    assert sum(line.startswith("warning:") for line in out.splitlines()) == 2, out
    assert "state.json: expected a JSON object" in out


def test_the_last_good_checkpoint_survives_until_the_next_is_complete(tmp_path, monkeypatch, reference):
    finished(tmp_path, reference)
    assert names(tmp_path / "ckpt") == ["step_00000003", "step_00000006"]

    def crash_at_first_step(model, batch):
        if torch.is_grad_enabled():
            raise Crash
        return lm_loss(model, batch)

    # other params: a fresh run, which fails (a bad lr, a bug) before it saves anything
    with pytest.raises(Crash):
        run(tmp_path, train_cfg(**CFG, lr=5e-3), loss_fn=crash_at_first_step)
    assert names(tmp_path / "ckpt") == ["step_00000003", "step_00000006"]
    _, r, _ = run(tmp_path, train_cfg(**CFG))  # the old params again: the old run is still there
    assert r.resumed_from == 6

    # a crash while a checkpoint is written leaves the previous ones as they were, and no temporary folder
    real_save_file = state_module.save_file

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state_module, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        run(tmp_path, train_cfg(**CFG, lr=5e-3))
    monkeypatch.setattr(state_module, "save_file", real_save_file)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_00000003", "step_00000006"]
    old_run = json.loads((tmp_path / "ckpt" / "step_00000006" / "state.json").read_text())["fingerprint"]

    # the new params' run, complete: the old run's checkpoints are gone, only its own two stay
    run(tmp_path, train_cfg(**CFG, lr=5e-3))
    kept = [json.loads((ck / "state.json").read_text())["fingerprint"] for ck in checkpoints(tmp_path / "ckpt")]
    assert len(kept) == 2 and old_run not in kept


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_checkpoint_files_follow_the_umask(tmp_path, mask, file_mode, dir_mode):
    old = os.umask(mask)
    try:
        run(tmp_path, train_cfg(max_steps=2, checkpoint_every=2, eval_every=2))
    finally:
        os.umask(old)
    (ck,) = checkpoints(tmp_path / "ckpt")
    assert stat.S_IMODE(ck.stat().st_mode) == dir_mode
    for path in ck.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (dir_mode if path.is_dir() else file_mode), path


# --- which run a checkpoint resumes ----------------------------------------------------------------------------


def test_fresh_env_trains_again_instead_of_resuming(tmp_path, capsys, monkeypatch, reference):
    weights, _, _ = reference
    finished(tmp_path, reference)
    _, r, _ = run(tmp_path, train_cfg(**CFG))
    assert r.resumed_from == 6  # a finished run only reloads: what `dvc repro -f` alone gives
    monkeypatch.setenv(FRESH_ENV, "1")
    capsys.readouterr()
    model, r, live = run(tmp_path, train_cfg(**CFG))
    out = capsys.readouterr().out
    assert r.resumed_from is None and len(live.rows["train/loss"]) == 6 and same_weights(model, weights)
    assert sum(FRESH_ENV in line for line in out.splitlines()) == 1 and "resuming" not in out
    monkeypatch.setenv(FRESH_ENV, "0")
    assert run(tmp_path, train_cfg(**CFG))[1].resumed_from == 6
    monkeypatch.setenv(FRESH_ENV, "sure")
    with pytest.raises(LLMCoreError, match=f"^{FRESH_ENV}: expected 1 or 0, got 'sure'$"):
        run(tmp_path, train_cfg(**CFG))


@pytest.mark.parametrize(
    "hw",
    [
        HardwareConfig(device="cpu", head_loss="full"),  # the chunked head is another sum order
        HardwareConfig(device="cpu", threads=1),  # another thread count (CPU's is auto): another reduction order
        HardwareConfig(device="cpu", precision="bf16"),
    ],
)
def test_hardware_params_that_change_the_weights_never_resume_a_stale_run(tmp_path, capsys, hw, reference):
    finished(tmp_path, reference)
    capsys.readouterr()
    _, r, _ = run(tmp_path, train_cfg(**CFG), hw=hw)
    out = capsys.readouterr().out
    assert r.resumed_from is None
    assert sum("starting fresh" in line for line in out.splitlines()) == 1, out


def test_hardware_params_that_keep_the_weights_resume(tmp_path, reference):
    finished(tmp_path, reference)
    _, r, _ = run(tmp_path, train_cfg(**CFG), hw=HardwareConfig(device="cpu", peak_tflops=1.0))
    assert r.resumed_from == 6
