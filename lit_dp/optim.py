"""DPAdamW: AdamW on privatized gradients, with optional DP-AdamBC second-moment correction.

The optimizer only post-processes ``p.grad``, which the DP step has already clipped, noised and
divided by the expected batch size; it therefore costs no privacy (post-processing).

Per parameter and step t (decoupled weight decay as in torch.optim.AdamW):

    theta <- theta * (1 - lr * weight_decay)
    m_t = beta1 * m_{t-1} + (1 - beta1) * g_t
    v_t = beta2 * v_{t-1} + (1 - beta2) * g_t^2
    m_hat = m_t / (1 - beta1^t),   v_hat = v_t / (1 - beta2^t)
    theta <- theta - lr * m_hat / (sqrt(v_hat) + eps)

Noise correction (DP-AdamBC, Tang et al. 2024): the noise in the averaged gradient adds s_t^2
(s_t = sigma_t * C_t / (q_t * N), per coordinate) to E[g_t^2], so v_hat overestimates the
gradient's second moment and shrinks every step towards SGD with a tiny learning rate. The
optimizer keeps phi_t = beta2 * phi_{t-1} + (1 - beta2) * s_t^2 (the same EMA as v, fed with the
known noise variance), phi_hat = phi_t / (1 - beta2^t), and uses

    theta <- theta - lr * m_hat / (sqrt(max(v_hat - phi_hat, variance_floor)) + eps)

phi is per-parameter optimizer state (key ``noise_var_avg``), so ``state_dict`` checkpoints it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

_NOISE_VAR_KEY = "noise_var_avg"


def _validate(
    *, lr: float, betas: tuple[float, ...], eps: float, weight_decay: float, variance_floor: float
) -> None:
    if not (math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"lr={lr} must be a finite number >= 0")
    if len(betas) != 2:
        raise ValueError(f"betas={betas} must be a pair (beta1, beta2)")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"betas[{i}]={beta} must be in [0, 1) (default betas=(0.9, 0.999))")
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"eps={eps} must be a finite number >= 0 (default 1e-8)")
    if not (math.isfinite(weight_decay) and weight_decay >= 0.0):
        raise ValueError(f"weight_decay={weight_decay} must be a finite number >= 0")
    if not (math.isfinite(variance_floor) and variance_floor > 0.0):
        raise ValueError(
            f"variance_floor={variance_floor} must be a finite number > 0 (default 1e-8)"
        )


class DPAdamW(torch.optim.Optimizer):
    """AdamW with decoupled weight decay, applied to already privatized gradients.

    With ``noise_correction=False`` it equals ``torch.optim.AdamW`` (amsgrad off) step for step.
    With ``noise_correction=True`` the caller must call ``set_noise_std`` before every ``step``.

    Args:
        params: parameters or parameter groups (groups may override every option below).
        lr: learning rate (>= 0). The default, 3.16e-3, is the best rate of the utility study's
            grid (``benchmarks/README.md`` section 5: a 3M-parameter decoder fully fine-tuned,
            expected batch 64, 300 steps, epsilon 8). Full fine-tuning of a model of hundreds of
            millions of weights usually wants a smaller rate.
        betas: (beta1, beta2), EMA coefficients of the first and second moments, each in [0, 1).
        eps: added to the denominator sqrt(.) for numerical stability (>= 0).
        weight_decay: decoupled weight decay coefficient lambda (theta *= 1 - lr * lambda).
        noise_correction: DP-AdamBC: subtract the bias-corrected EMA of the noise variance from
            v_hat before the square root.
        variance_floor: gamma > 0, the lower bound of the corrected second moment,
            max(v_hat - phi_hat, gamma), in squared gradient units. Where the noise dominates the
            signal, v_hat - phi_hat is near zero or negative; the floor caps the per-coordinate
            step at lr * |m_hat| / sqrt(gamma). Only used with ``noise_correction``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 3.16e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        noise_correction: bool = False,
        variance_floor: float = 1e-8,
    ) -> None:
        betas_t = tuple(float(b) for b in betas)  # a YAML list works too
        _validate(
            lr=lr, betas=betas_t, eps=eps, weight_decay=weight_decay, variance_floor=variance_floor
        )
        defaults = dict(
            lr=lr,
            betas=betas_t,
            eps=eps,
            weight_decay=weight_decay,
            noise_correction=bool(noise_correction),
            variance_floor=variance_floor,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:  # per-group overrides are validated too
            _validate(
                lr=group["lr"],
                betas=tuple(group["betas"]),
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                variance_floor=group["variance_floor"],
            )
        self._noise_std: float | None = None

    def set_noise_std(self, std: float) -> None:
        """Set s_t, the per-coordinate noise std in this step's averaged gradient.

        s_t = sigma_t * C_t / (q_t * N): the gradient noise multiplier applied to the sum, times
        the clip bound, over the expected batch size. It is consumed by the next ``step`` and
        must be set again before each step (it may change every step).

        Raises:
            ValueError: a negative or non-finite std.
        """
        std = float(std)
        if not (math.isfinite(std) and std >= 0.0):
            raise ValueError(f"std={std} must be a finite number >= 0")
        self._noise_std = std

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One AdamW step on every parameter with a gradient.

        Raises:
            RuntimeError: a group has ``noise_correction`` and ``set_noise_std`` was not called
                since the previous step; or a gradient is sparse.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        needs_std = any(g["noise_correction"] for g in self.param_groups)
        if needs_std and self._noise_std is None:
            raise RuntimeError(
                "DPAdamW(noise_correction=True) needs optimizer.set_noise_std(std) before every "
                "step, with std = sigma_t * C_t / (q_t * N) (the noise std of the averaged "
                "gradient)"
            )
        noise_var = (self._noise_std or 0.0) ** 2
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group, noise_var)
        self._noise_std = None  # consumed: the next step needs a fresh value
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any], noise_var: float) -> None:
        grad = p.grad
        assert grad is not None
        if grad.is_sparse:
            raise RuntimeError("DPAdamW does not support sparse gradients")
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        correct = group["noise_correction"]
        state = self.state[p]
        if len(state) == 0:
            # Same keys and types as torch.optim.AdamW (step is a float32 scalar tensor).
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if correct:
                state[_NOISE_VAR_KEY] = 0.0
        if correct and _NOISE_VAR_KEY not in state:
            raise RuntimeError(
                "noise_correction was switched on after this parameter took steps without it; "
                "its noise-variance EMA is unknown. Restart the optimizer state or keep it off."
            )
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        t = float(state["step"].item())

        p.mul_(1.0 - lr * wd)
        exp_avg.lerp_(grad, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        bias_correction1 = 1.0 - beta1**t
        bias_correction2 = 1.0 - beta2**t
        step_size = lr / bias_correction1
        if correct:
            # phi is a Python float (fp64): a scalar shared by all coordinates of p.
            state[_NOISE_VAR_KEY] = beta2 * float(state[_NOISE_VAR_KEY]) + (1.0 - beta2) * noise_var
            phi_hat = state[_NOISE_VAR_KEY] / bias_correction2
            # v_hat - phi_hat cancels most of v_hat: take the difference in fp32 even for bf16.
            wide = torch.promote_types(exp_avg_sq.dtype, torch.float32)
            denom = (exp_avg_sq.to(wide) / bias_correction2).sub_(phi_hat)
            denom = denom.clamp_(min=group["variance_floor"]).sqrt_().add_(eps)
        else:
            # Same operation order as torch.optim.AdamW's single-tensor path (bitwise parity).
            denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-step_size)
