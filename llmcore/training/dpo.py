"""Direct Preference Optimization (Rafailov et al., 2023) on the shared training loop.

DPO tunes a policy ``pi`` (initialised from the instruction model) to prefer the chosen answer ``y_c`` over
the rejected ``y_r`` of each prompt ``x``, relative to a frozen reference model ``ref`` (the same weights)::

    logit = beta * ((log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x)))
    loss  = -log sigmoid(logit)

where ``log pi(y|x)`` is the sum of the answer tokens' log-probabilities (prompt tokens masked; the
end-of-text that closes the answer included). The implicit rewards are ``beta * (log pi - log ref)``; a
pair is "won" when the chosen reward exceeds the rejected one (reward accuracy). At the start policy =
reference, so every logit is 0 and the loss is log 2 = 0.693.

The reference never changes, so its log-probabilities are computed once per pair before training
(``attach_reference_logps``) and carried in the batches: a training step costs one forward and one backward of
the policy over the chosen and rejected rows together, instead of a second, frozen model's forward as well.

    data = PreferenceBatches(pairs, 8, tok.eot_id)          # llmcore.data.preferences
    attach_reference_logps(model, data)                     # the instruction model, before training
    loss_fn = DPOLoss(beta=0.1)
    fit(model, data, val_data, loss_fn, cfg, hw, out_dir)   # logs train/val reward_accuracy, margin, ...

``average_logps=True`` divides each sequence's log-probability by its answer's token count (the book's
chapter 7 notebook does so); the default sum is the paper's and trl's.

References: Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward
Model" (2023); Raschka, *Build a Large Language Model (From Scratch)*, ch. 7 bonus material; trl ``DPOTrainer``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcore.data.preferences import PreferenceBatches
from llmcore.models.ops import IGNORE_INDEX


def sequence_logps(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, average: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row log-probability of the scored targets -> (logps (N,), scored token counts (N,)).

    ``targets`` of -100 (prompt, padding) are not scored; ``average`` divides by the count (a row with
    nothing scored gets 0). The log-softmax runs in fp32 whatever the autocast dtype.
    """
    logits = model(inputs).logits  # (N, T, V)
    token_logps = -F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)  # 0 where ignored
    counts = (targets != IGNORE_INDEX).sum(-1)
    logps = token_logps.sum(-1)
    return (logps / counts.clamp_min(1) if average else logps), counts


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and implicit rewards, all (B,): ``(loss, chosen_reward, rejected_reward)``.

    ``loss = -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``; rewards are ``beta * (pi - ref)``,
    detached (they are for logging).
    """
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    loss = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return loss, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


@dataclass
class DPOLoss:
    """``fit``'s loss function for ``PreferenceBatches``: (mean DPO loss, pairs, metrics).

    Metrics (means over the batch's pairs): ``reward_accuracy`` (share of pairs whose chosen reward is
    higher), ``reward_margin`` (chosen - rejected reward), ``chosen_reward``, ``rejected_reward``.
    Pairs with no scored token on either side (a stand-in evaluation batch) weigh nothing.
    """

    beta: float = 0.1
    average_logps: bool = False

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        logps, counts = sequence_logps(model, batch["inputs"], batch["targets"], self.average_logps)
        B = logps.shape[0] // 2
        ref = batch["ref_logps"].to(logps.dtype)
        loss, chosen, rejected = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], self.beta)
        valid = ((counts[:B] > 0) & (counts[B:] > 0)).to(loss.dtype)
        n = valid.sum()
        mean = lambda x: (x * valid).sum() / n.clamp_min(1)  # noqa: E731
        metrics = {
            "reward_accuracy": mean((chosen > rejected).to(loss.dtype)),
            "reward_margin": mean(chosen - rejected),
            "chosen_reward": mean(chosen),
            "rejected_reward": mean(rejected),
        }
        return mean(loss), n, metrics


@torch.no_grad()
def attach_reference_logps(
    model: nn.Module, data: PreferenceBatches, batch_size: int = 16, average: bool = False
) -> torch.Tensor:
    """Score every pair of ``data`` with the (frozen) reference ``model`` once; stores and returns
    ``data.ref_logps`` (n_pairs, 2): [chosen, rejected]. Pairs are batched by length (little padding); the
    model is left in its previous mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(
        range(len(data.pairs)), key=lambda i: max(len(data.pairs[i].chosen.ids), len(data.pairs[i].rejected.ids))
    )
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = data.batch_of(rows)
            logps, _ = sequence_logps(model, batch["inputs"].to(device), batch["targets"].to(device), average)
            B = len(rows)
            data.ref_logps[rows] = torch.stack([logps[:B], logps[B:]], dim=1).float().cpu()
    finally:
        model.train(was_training)
    return data.ref_logps
