"""Optimizers and learning-rate schedules for pre-training.

- ``adamw``: torch.optim.AdamW as a DeepSpeed client optimizer (no JIT build, works everywhere).
- ``stable_adamw``: AdamW with StableAdamW's update clipping (Wortsman et al. 2023, used by
  ModernBERT): the step of each tensor is scaled by 1 / max(1, RMS(g^2 / v)), which removes the need
  for gradient clipping. Under ZeRO the optimizer sees flattened partitions, so "each tensor" is
  each partition there: StableAdamW-like, not bit-for-bit the paper's.
- schedules: ``linear`` (BERT: warm-up then linear decay to ``min_lr_ratio``) and ``wsd``
  (ModernBERT: warm-up, stable at the peak, linear decay over the last ``decay_fraction``).
"""

from __future__ import annotations

import logging
import math

import torch

from pipeline.config import PretrainConfig

log = logging.getLogger("pretrain")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and norm weights (1-D) are not decayed.

    Under deepspeed.zero.Init parameters are already partitioned (``p.shape`` is empty); their real
    shape is ``p.ds_shape``.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)
        (decay if len(shape) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class StableAdamW(torch.optim.Optimizer):
    """AdamW with per-tensor update clipping (StableAdamW)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                m_hat = m / (1 - beta1**t)
                v_hat = v / (1 - beta2**t)
                rms = torch.sqrt(torch.mean(grad * grad / torch.clamp(v_hat, min=group["eps"] ** 2))).item()
                lr = group["lr"] / max(1.0, rms)
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                p.add_((m_hat / (v_hat.sqrt() + group["eps"])).to(p.dtype), alpha=-lr)
        return loss


def build_optimizer(config: PretrainConfig, model: torch.nn.Module):
    """The client optimizer, or None when DeepSpeed builds its own (optimizer.name=deepspeed_adamw)."""
    o = config.optimizer
    groups = parameter_groups(model, o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "stable_adamw":
        return StableAdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    return None


class LearningRateSchedule:
    """Multiplier of the peak learning rate at a given step (a picklable LambdaLR function)."""

    def __init__(self, style: str, train_steps: int, warmup_steps: int, decay_fraction: float, min_lr_ratio: float):
        self.style, self.train_steps, self.warmup_steps = style, train_steps, warmup_steps
        self.decay_fraction, self.min_lr_ratio = decay_fraction, min_lr_ratio

    def __call__(self, step: int) -> float:
        # LambdaLR calls this with the number of completed optimizer steps; step s trains at f(s).
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.style == "linear":
            decay_start, decay_steps = self.warmup_steps, self.train_steps - self.warmup_steps
        else:  # wsd
            decay_steps = int(math.ceil(self.decay_fraction * self.train_steps))
            decay_start = max(self.warmup_steps, self.train_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, decay_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * (1.0 - progress)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


class ScheduleLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose schedule and peak learning rate always come from the current config.

    Plain LambdaLR saves a callable object's fields and its base learning rates and restores them on
    load: a run resumed with a larger ``schedule.train_steps`` (what "nothing to train" tells the user
    to do) silently kept the old schedule and trained its extra steps at learning rate 0. Here a
    checkpoint restores only the step count; a schedule or learning rate that differs from the
    checkpoint's is logged, and the new one is followed from the resumed step on.
    """

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        saved = state.pop("lr_lambdas", None) or []
        current_base = list(self.base_lrs)
        super().load_state_dict({**state, "lr_lambdas": [None] * len(self.lr_lambdas)})
        schedule = self.lr_lambdas[0]
        old = saved[0] if saved and isinstance(saved[0], dict) else None
        if old is not None and old != vars(schedule) and _rank() == 0:  # (the same on every rank: said once)
            changed = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in vars(schedule).items() if old.get(k) != v)
            log.warning("schedule changed since the checkpoint (%s): the learning rate follows the new schedule "
                        "from step %d on", changed, self.last_epoch + 1)
        if list(self.base_lrs) != current_base:
            if _rank() == 0:
                log.warning("optimizer.lr changed since the checkpoint (%s -> %s): the new peak learning rate is used",
                            self.base_lrs[0], current_base[0])
            self.base_lrs = current_base
        self._last_lr = [base * fn(self.last_epoch) for base, fn in zip(self.base_lrs, self.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr


def sync_learning_rate(scheduler) -> None:
    """Give the optimizer the scheduler's learning rate for the next step (after a checkpoint load:
    ZeRO loads its optimizer state after the scheduler's, with the saved schedule's learning rate)."""
    if isinstance(scheduler, ScheduleLR):
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr


def build_scheduler(config: PretrainConfig, optimizer):
    s = config.schedule
    schedule = LearningRateSchedule(s.style, s.train_steps, s.warmup_steps, s.decay_fraction, s.min_lr_ratio)
    return ScheduleLR(optimizer, schedule)
