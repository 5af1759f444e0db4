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

import math

import torch

from pipeline.config import PretrainConfig


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


def build_scheduler(config: PretrainConfig, optimizer):
    s = config.schedule
    schedule = LearningRateSchedule(s.style, s.train_steps, s.warmup_steps, s.decay_fraction, s.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
