"""DPCausalLM's training step against independent references: the sigma=0 gradient, the noise
std, the non-private loop, DP-SGD and DP-AdamW on the same clipped gradient, and bf16-mixed
against fp32."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from module_helpers import make_dm, make_module, make_trainer, trainable
from torch.utils.data import DataLoader

from lit_dp.callbacks.accounting import PrivacyAccounting
from lit_dp.callbacks.clip_lr import ClipDrivenLR
from lit_dp.callbacks.ema import EMAWeights
from lit_dp.optim import DPAdamW
from lit_dp.privacy.per_sample import per_example_losses


def test_sigma0_gradient_is_summed_per_unit_gradient_over_expected_batch(tmp_path):
    """sigma=0, C=inf: the privatized gradient is sum_i grad(loss_i) / (q N) (the expected batch
    size, never the realized one), compared with plain autograd on an independent model copy."""
    torch.manual_seed(0)
    dm = make_dm(num_train=16, expected=6.0)
    module = make_module(noise_multiplier=0.0, max_grad_norm=1e9, weight_decay=0.0)
    ref_model = make_module(noise_multiplier=0.0).model
    ref_model.load_state_dict(module.model.state_dict())
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["step"] == 0 and batch["input_ids"].shape[0] > 0
    seen = {}

    class Capture(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.update({n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()})

    trainer = make_trainer(tmp_path, max_steps=1, callbacks=[Capture()])
    trainer.fit(module, datamodule=dm)

    logits = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses = per_example_losses(logits, batch["labels"])
    losses = torch.where(torch.isfinite(losses), losses, 0.0)
    (losses.sum() / (batch["sample_rate"] * 16)).backward()
    for n, p in ref_model.named_parameters():
        scale = float(p.grad.abs().max()) + 1e-12
        torch.testing.assert_close(seen[n], p.grad, rtol=1e-4, atol=1e-5 * scale)


def test_noise_std_is_sigma_c_over_expected_batch(tmp_path):
    """With no label tokens every clipped sum is 0, so p.grad is pure noise:
    std = sigma C / (qN)."""
    module = make_module(noise_multiplier=2.0, max_grad_norm=0.5)
    dm = make_dm(num_train=16, expected=4.0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    batch["labels"][:] = -100
    seen = {}

    class Capture(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen["g"] = torch.cat([p.grad.flatten() for p in pl_module.model.parameters()])

    trainer = make_trainer(tmp_path, max_steps=1, callbacks=[Capture()])
    trainer.fit(module, datamodule=_FixedBatchDM(dm, batch))
    expected_std = 2.0 * 0.5 / (batch["sample_rate"] * 16)
    assert seen["g"].std().item() == pytest.approx(expected_std, rel=0.02)
    assert seen["g"].mean().abs().item() < 5 * expected_std / seen["g"].numel() ** 0.5


class _FixedBatchDM(L.LightningDataModule):
    """Serves one prepared batch (same privacy metadata as the wrapped DataModule)."""

    def __init__(self, dm, batch):
        super().__init__()
        self.dm, self.batch = dm, batch
        self.num_units, self.schedule = dm.num_units, dm.schedule

    def train_dataloader(self):
        return DataLoader([self.batch], batch_size=None, collate_fn=lambda b: b)

    def data_report(self):
        return self.dm.data_report()


def _first_batch(dm):
    """The step-0 batch as the training loop will draw it (the Poisson sampler is a function of
    sampling_seed and step), taken from the DataModule before any trainer is attached."""
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["step"] == 0 and batch["input_ids"].shape[0] > 1
    assert "unit_ids" not in batch  # example-level units: one row per unit
    return batch


def _row_losses(model, batch):
    """{row: mean shifted token cross-entropy over the row's label tokens} for the rows that have
    label tokens, written out with F.cross_entropy, independently of lit_dp's loss code."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    return {
        i: F.cross_entropy(logits[i, :-1].float(), labels[i, 1:], ignore_index=-100)
        for i in range(labels.shape[0])
        if (labels[i, 1:] != -100).any()
    }


def _median_abs(grads):
    return float(torch.cat([g.flatten() for g in grads.values()]).abs().median())


class _StepCapture(L.Callback):
    """Per step: the batch the module trained on, its p.grad before the optimizer step and the
    trainable weights after it."""

    def __init__(self):
        self.batches, self.grads, self.weights = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(
            {
                n: p.grad.detach().clone()
                for n, p in pl_module.model.named_parameters()
                if p.grad is not None
            }
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(trainable(pl_module))


def _assert_same_batch(seen, batch):
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(seen[key], batch[key]), key
    assert seen["step"] == batch["step"] and seen["sample_rate"] == batch["sample_rate"]


# Tolerances of one step against a reference computed on an independent model copy. The module
# works in micro-batches (the DP step through its clipping engine), the reference row by row:
# float32 summation order makes gradients differ by ~1e-6 of a tensor's largest entry (measured
# 1.3e-6 on CPU).
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5  # atol in units of the tensor's largest reference entry
# An Adam step is at most lr per coordinate; its measured error is <= 6e-6 lr. SGD weights are
# compared to 1e-5 of the tensor's largest step plus 2 float32 ulps of the weight (rounding).
ADAM_ATOL, SGD_ATOL, ULPS = 5e-5, 1e-5, 2.4e-7


def _close(actual, expected, name, **tol):
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{name}: {m}", **tol)


def _assert_grads_close(seen, reference):
    assert seen.keys() == reference.keys(), "the step produced no gradient for some parameters"
    for n, ref_g in reference.items():
        atol = GRAD_ATOL * float(ref_g.abs().max())
        _close(seen[n], ref_g, n, rtol=GRAD_RTOL, atol=atol)


@pytest.mark.parametrize("clipping", ["fixed", "private_quantile", "history_percentile"])
def test_nonprivate_runs_same_loop_without_noise(tmp_path, clipping):
    """private=False accepts any clipping (the default included) and never clips or noises:
    its first step equals torch.optim.AdamW on the autograd gradient of the non-private loss,
    sum over the rows with label tokens of the row's mean token loss over the number of rows
    (one row of the sampled batch has its labels removed, so that divisor is checked), computed
    on an independent model copy; and a different noise_seed changes no bit of the weights over
    two steps. eps is the median |gradient entry|, so Adam's first step, lr * g / (|g| + eps),
    depends on the gradient's magnitude and not only on its sign."""
    dm = make_dm()
    batch = _first_batch(dm)
    batch["labels"][-1] = -100
    ref = make_module(private=False).model  # an independent instance: the reference copy
    init = {n: t.clone() for n, t in ref.state_dict().items()}
    losses, rows = _row_losses(ref, batch), batch["input_ids"].shape[0]
    assert len(losses) == rows - 1
    (sum(losses.values()) / rows).backward()
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    hp = dict(lr=1e-2, betas=(0.8, 0.95), eps=_median_abs(grads), weight_decay=0.1)
    torch.optim.AdamW(ref.parameters(), **hp).step()

    runs = {}
    for noise_seed in (123, 456):
        module = make_module(private=False, clipping=clipping, noise_seed=noise_seed, **hp)
        module.model.load_state_dict(init)
        assert module.clip.max_grad_norm == 1.0 and type(module.clip).__name__ == "FixedClip"
        runs[noise_seed] = capture = _StepCapture()
        trainer = make_trainer(tmp_path / str(noise_seed), max_steps=2, callbacks=[capture])
        trainer.fit(module, datamodule=_FixedBatchDM(dm, batch))
        report = json.loads((tmp_path / str(noise_seed) / "privacy_report.json").read_text())
        assert report["private"] is False and report["epsilon"] is None
        assert "nothing" in report["covers"]

    capture = runs[123]
    _assert_same_batch(capture.batches[0], batch)
    _assert_grads_close(capture.grads[0], grads)
    for n, p in ref.named_parameters():
        _close(capture.weights[0][n], p.detach(), n, rtol=ULPS, atol=ADAM_ATOL * hp["lr"])
    assert len(capture.weights) == len(runs[456].weights) == 2
    for step in range(2):  # no noise: the seed changes nothing, to the bit
        for n, w in runs[123].weights[step].items():
            assert torch.equal(w, runs[456].weights[step][n]), (step, n)


def _clipped_reference_gradient(model, batch, num_units):
    """Per-unit gradients by plain autograd (one backward per unit, here one row), a clip bound
    C halfway between the smallest and largest unit norm, and the sigma=0 privatized gradient
    sum_u g_u min(1, C / ||g_u||) / (q N). Returns (gradient, C, norms, unclipped gradient)."""
    per_unit = []
    for i in range(batch["input_ids"].shape[0]):
        row = {k: batch[k][i : i + 1] for k in ("input_ids", "attention_mask", "labels")}
        model.zero_grad(set_to_none=True)
        _row_losses(model, row)[0].backward()  # KeyError: a sampled row without label tokens
        per_unit.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    norms = torch.stack([torch.cat([g.flatten() for g in u.values()]).norm() for u in per_unit])
    clip = float(norms.min() + norms.max()) / 2
    expected = batch["sample_rate"] * num_units  # q N, never the realized batch size
    factors = (clip / norms).clamp(max=1.0)
    grad = {
        n: sum(f * u[n] for f, u in zip(factors, per_unit, strict=True)) / expected
        for n in per_unit[0]
    }
    unclipped = {n: sum(u[n] for u in per_unit) / expected for n in per_unit[0]}
    return grad, clip, norms, unclipped


def test_sgd_baseline_takes_the_same_privatized_gradient(tmp_path):
    """optimizer=sgd (DP-SGD) and optimizer=adamw (DP-AdamW) step on the same privatized
    gradient g: at sigma=0, sum_u clip_C(g_u) / (q N), with per-unit gradients g_u from plain
    autograd on an independent model copy for the exact step-0 Poisson batch and a finite C that
    clips some units and not others. One SGD step is theta - lr * g (momentum 0, weight decay 0);
    one DP-AdamW step equals torch.optim.AdamW stepped on g (eps = the median |g| entry, so the
    step depends on g's magnitude, not only on its sign)."""
    dm = make_dm(num_train=16, expected=6.0)
    batch = _first_batch(dm)
    ref = make_module(noise_multiplier=0.0).model  # an independent instance: the reference copy
    init = {n: t.clone() for n, t in ref.state_dict().items()}
    g, clip, norms, unclipped = _clipped_reference_gradient(ref, batch, dm.num_units)
    # The checks below can fail for the reasons they name: C clips some units but not all, and
    # the clipped gradient differs from the unclipped one by far more than the tolerance ...
    assert (norms > clip).any() and (norms < clip).any()
    assert max(float((unclipped[n] - g[n]).abs().max() / g[n].abs().max()) for n in g) > 1e-3
    # ... and dividing by the realized batch size instead of q N would be far off too.
    assert abs(batch["input_ids"].shape[0] / (batch["sample_rate"] * dm.num_units) - 1) > 0.1

    def one_step(optimizer, **kw):
        module = make_module(optimizer=optimizer, noise_multiplier=0.0, max_grad_norm=clip, **kw)
        module.model.load_state_dict(init)
        before = trainable(module)
        capture = _StepCapture()
        trainer = make_trainer(tmp_path / optimizer, max_steps=1, callbacks=[capture])
        trainer.fit(module, datamodule=make_dm(num_train=16, expected=6.0))
        _assert_same_batch(capture.batches[0], batch)
        _assert_grads_close(capture.grads[0], g)
        return module, before, capture.weights[0]

    module, before, after = one_step("sgd", lr=0.5)
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.0
    assert opt.param_groups[0]["weight_decay"] == 0.0
    for n, ref_g in g.items():
        step = 0.5 * ref_g
        _close(after[n], before[n] - step, n, rtol=ULPS, atol=SGD_ATOL * float(step.abs().max()))

    hp = dict(lr=1e-2, betas=(0.8, 0.95), eps=_median_abs(g), weight_decay=0.1)
    module, _, after = one_step("adamw", **hp)
    assert isinstance(module.configure_optimizers(), DPAdamW)
    ref.load_state_dict(init)
    for n, p in ref.named_parameters():
        p.grad = g[n].clone()
    torch.optim.AdamW(ref.parameters(), **hp).step()
    for n, p in ref.named_parameters():
        _close(after[n], p.detach(), n, rtol=ULPS, atol=ADAM_ATOL * hp["lr"])


class _GradCapture(L.Callback):
    def __init__(self):
        self.grads = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {
            n: p.grad.detach().clone()
            for n, p in pl_module.model.named_parameters()
            if p.grad is not None
        }


def _run_precision(precision: str, accelerator: str, steps: int = 4):
    """sigma=0 DP-SGD (linear in the gradient, so weight errors are gradient errors) on a fixed
    Poisson draw; returns the privatized gradients, step losses and the total weight change."""
    torch.manual_seed(0)
    dm = make_dm(num_train=32, expected=8.0, seed=1)
    module = make_module(noise_multiplier=0.0, optimizer="sgd", lr=0.5, max_physical_batch_size=8)
    start = trainable(module)
    losses: list[float] = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            losses.append(pl_module.last_record.loss)

    class AllGrads(_GradCapture):
        def __init__(self):
            super().__init__()
            self.steps = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
            self.steps.append(torch.cat([g.flatten().float().cpu() for g in self.grads.values()]))

    grads = AllGrads()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        limit_val_batches=0,
        precision=precision,
        callbacks=[
            EMAWeights(decay=0.9),
            ClipDrivenLR(adaptive=False),
            PrivacyAccounting(target_epsilon=None),
            grads,
            Losses(),
        ],
    )
    trainer.fit(module, datamodule=dm)
    end = trainable(module)
    change = torch.cat([(end[n] - start[n].to(end[n].device)).flatten().float().cpu() for n in end])
    assert all(p.dtype == torch.float32 for p in module.model.parameters())  # fp32 master weights
    return grads.steps, losses, change


@pytest.mark.parametrize(
    "accelerator",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
            ],
        ),
    ],
)
def test_bf16_mixed_trains_and_matches_fp32(accelerator):
    """bf16-mixed needs no GradScaler: the DP step under autocast matches fp32. Tolerances:
    bf16 keeps 8 significant bits (relative spacing 2^-8 = 3.9e-3); the tiny model's gradients
    pass through a few bf16 matmuls, measured at 0.3-0.5 % relative L2 error on CPU, so 2 %
    bounds them with margin while a broken step (zeros, NaN, a scaled gradient) is far off."""
    g32, l32, w32 = _run_precision("32-true", accelerator)
    gbf, lbf, wbf = _run_precision("bf16-mixed", accelerator)
    assert len(g32) == len(gbf) == 4
    for a, b in zip(g32, gbf, strict=True):
        rel = ((a - b).norm() / a.norm()).item()
        assert 1e-6 < rel < 2e-2  # > 1e-6: autocast really ran the step in bf16
    for a, b in zip(l32, lbf, strict=True):
        assert b == pytest.approx(a, rel=2e-3)  # losses are fp32 reductions of bf16 logits
    assert lbf[-1] < lbf[0]  # it trains
    assert ((w32 - wbf).norm() / w32.norm()).item() < 2e-2
