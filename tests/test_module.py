"""DPCausalLM: the DP step against independent references, empty batches, budget stop,
checkpoint -> resume equality, and the measured noise std."""

from __future__ import annotations

import functools
import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lit_dp.callbacks.accounting import PrivacyAccounting
from lit_dp.callbacks.clip_lr import ClipDrivenLR
from lit_dp.callbacks.ema import EMAWeights
from lit_dp.data import ConstantBatchSize, SyntheticDataModule
from lit_dp.models import tiny_tokenizer
from lit_dp.module import DPCausalLM
from lit_dp.optim import DPAdamW
from lit_dp.privacy.clipping import FixedClip, HistoryPercentile, PrivateQuantile
from lit_dp.privacy.mechanism import split_micro_batches
from lit_dp.privacy.per_sample import per_example_losses


def make_dm(num_train=32, expected=8.0, seed=1, **kw):
    return SyntheticDataModule(
        tokenizer=tiny_tokenizer(),
        num_train=num_train,
        num_val=4,
        num_test=4,
        max_length=512,
        batch_schedule=ConstantBatchSize(expected),
        sampling_seed=seed,
        **kw,
    )


def make_module(**kw):
    args = dict(
        model="tiny-qwen2",
        noise_multiplier=1.0,
        clipping="fixed",
        max_grad_norm=1.0,
        noise_seed=123,
        eval_before_fit=False,
        export_dir=None,
        lr=1e-2,
        max_physical_batch_size=4,
    )
    args.update(kw)
    return DPCausalLM(**components(args))


_CLIP_FIELDS = {
    "fixed": (FixedClip, ()),
    "private_quantile": (
        PrivateQuantile,
        ("target_clip_rate", "learning_rate", "count_noise_divisor", "min_clip", "max_clip"),
    ),
    "history_percentile": (
        HistoryPercentile,
        ("target_clip_rate", "history_size", "min_clip", "max_clip"),
    ),
}


def components(args: dict) -> dict:
    """Flat test settings -> DPCausalLM's components: the clip-bound estimator (``clipping`` kind,
    ``max_grad_norm`` as its C or C_0, its own fields) and the optimizer callable (``optimizer``
    "adamw" -> DPAdamW, "sgd" -> torch.optim.SGD, with ``lr`` and their own fields)."""
    args = dict(args)
    kind, c = args.pop("clipping"), args.pop("max_grad_norm", 1.0)
    cls, fields = _CLIP_FIELDS[kind]
    own = {f: args.pop(f) for f in fields if f in args}
    args["clipping"] = cls(c) if kind == "fixed" else cls(initial_clip=c, **own)
    name, lr = args.pop("optimizer", "adamw"), args.pop("lr", 5e-4)
    opt_fields = (
        ("momentum", "weight_decay")
        if name == "sgd"
        else ("betas", "eps", "weight_decay", "noise_correction", "variance_floor")
    )
    opt_kw = {f: args.pop(f) for f in opt_fields if f in args}
    args["optimizer"] = functools.partial(
        torch.optim.SGD if name == "sgd" else DPAdamW, lr=lr, **opt_kw
    )
    return args


def make_trainer(tmp_path, max_steps, callbacks=(), target_epsilon=None, accountant="pld", **kw):
    accounting = PrivacyAccounting(target_epsilon=target_epsilon, accountant=accountant)
    cbs = [EMAWeights(decay=0.9), ClipDrivenLR(), accounting, *callbacks]
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=cbs,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        **kw,
    )


def trainable(module):
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


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
    """With no label tokens every clipped sum is 0, so p.grad is pure noise: std = sigma C / (qN)."""
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


def test_empty_batches_are_noise_only_steps_that_are_accounted(tmp_path):
    dm = make_dm(num_train=64, expected=0.5)  # q = 1/128: most batches are empty
    module = make_module()
    trainer = make_trainer(tmp_path, max_steps=6)
    before = trainable(module)
    trainer.fit(module, datamodule=dm)
    acct = next(c for c in trainer.callbacks if isinstance(c, PrivacyAccounting))
    assert acct.accountant.total_steps == 6
    assert trainer.global_step == 6
    moved = any(not torch.equal(before[n], p) for n, p in trainable(module).items())
    assert moved  # noise moved the weights even with empty batches


def test_budget_stop_before_exceeding_target(tmp_path):
    dm = make_dm(num_train=32, expected=8.0)
    module = make_module(noise_multiplier=1.5)  # at delta = 1e-5: 6 steps fit in epsilon = 3
    trainer = make_trainer(tmp_path, max_steps=50, target_epsilon=3.0)
    trainer.fit(module, datamodule=dm)
    acct = next(c for c in trainer.callbacks if isinstance(c, PrivacyAccounting))
    eps = acct.epsilon()
    assert 0 < eps <= 3.0
    assert trainer.global_step < 50
    # one more step would have exceeded the budget
    assert (
        acct.accountant.peek_epsilon(delta=acct.delta, noise_multiplier=1.5, sample_rate=0.25) > 3.0
    )
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    assert report["stop_reason"].startswith("budget")
    assert report["epsilon"] == pytest.approx(eps)


def test_auto_noise_is_calibrated_to_target(tmp_path):
    dm = make_dm(num_train=32, expected=8.0)
    # sigma ~ 0.99 at delta = 1e-5: the count noise std 8 / 8 = 1 stays above sigma / 2.
    module = make_module(
        noise_multiplier="auto", clipping="private_quantile", count_noise_divisor=8.0
    )
    trainer = make_trainer(tmp_path, max_steps=4, target_epsilon=5.0)
    trainer.fit(module, datamodule=dm)
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    assert 0.99 * 5.0 <= report["epsilon"] <= 5.0
    assert report["steps"] == 4
    assert report["clipping"]["name"] == "private_quantile"
    for key in (
        "epsilon",
        "delta",
        "steps",
        "noise_multiplier",
        "sample_rate",
        "privacy_unit",
        "accountant",
        "clipping",
        "covers",
        "not_covered",
        "stop_reason",
    ):
        assert key in report


def test_auto_noise_under_each_accountant(tmp_path):
    """privacy.accountant picks the calibration and the report's epsilon; RDP is always beside."""
    reports, sigmas = {}, {}
    for name in ("pld", "rdp"):
        dm = make_dm(num_train=32, expected=8.0)
        module = make_module(noise_multiplier="auto", clipping="fixed")
        trainer = make_trainer(tmp_path / name, max_steps=3, target_epsilon=4.0, accountant=name)
        trainer.fit(module, datamodule=dm)
        reports[name] = json.loads((tmp_path / name / "privacy_report.json").read_text())
        sigmas[name] = module.noise_multiplier
    pld, rdp = reports["pld"], reports["rdp"]
    assert pld["accountant"] == "pld" and rdp["accountant"] == "rdp"
    assert 0.98 * 4.0 <= pld["epsilon"] <= 4.0 and 0.98 * 4.0 <= rdp["epsilon"] <= 4.0
    assert pld["epsilon_pld"] == pld["epsilon"] < pld["epsilon_rdp"]
    assert rdp["epsilon_rdp"] == rdp["epsilon"] and "epsilon_pld" not in rdp
    assert sigmas["pld"] < sigmas["rdp"]  # the tighter accountant needs less noise
    assert pld["calibrated_noise_multiplier"] == sigmas["pld"]


def _run(tmp_path, max_steps, ckpt_path=None, every=None):
    torch.manual_seed(0)
    dm = make_dm(num_train=48, expected=16.0, seed=7)
    module = make_module(clipping="private_quantile", noise_multiplier=1.0, noise_correction=True)
    cbs = (
        [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1)]
        if every
        else []
    )
    trainer = make_trainer(tmp_path, max_steps=max_steps, callbacks=cbs)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    acct = next(c for c in trainer.callbacks if isinstance(c, PrivacyAccounting))
    ema = next(c for c in trainer.callbacks if isinstance(c, EMAWeights))
    lr = next(c for c in trainer.callbacks if isinstance(c, ClipDrivenLR))
    return module, acct, ema, lr


def test_crash_resume_equals_uninterrupted(tmp_path):
    full, acct_full, ema_full, lr_full = _run(tmp_path / "a", 6)
    _run(tmp_path / "b", 3, every=3)  # "crash" after the step-3 checkpoint
    ckpt = next((tmp_path / "b" / "ckpt").glob("*step=3*.ckpt"))
    resumed, acct_res, ema_res, lr_res = _run(tmp_path / "c", 6, ckpt_path=str(ckpt))
    a, b = trainable(full), trainable(resumed)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-6)
    assert acct_res.accountant.total_steps == 6
    # PLD: resume recomposes the ledger run by run, the uninterrupted run composed step by step;
    # they agree to FFT round-off (~1e-10). The ledger itself is restored exactly.
    assert acct_res.accountant.history == acct_full.accountant.history
    assert acct_res.epsilon() == pytest.approx(acct_full.epsilon(), rel=1e-9)
    assert acct_res.rdp.get_epsilon(acct_res.delta) == pytest.approx(
        acct_full.rdp.get_epsilon(acct_full.delta), rel=1e-12
    )
    assert resumed.clip.max_grad_norm == pytest.approx(full.clip.max_grad_norm, rel=1e-9)
    assert lr_res.gamma == pytest.approx(lr_full.gamma)
    for n in ema_full.shadow:
        torch.testing.assert_close(ema_full.shadow[n], ema_res.shadow[n], rtol=0, atol=1e-6)


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


def test_optimizer_component_is_validated():
    """The module refuses what is not an optimizer factory (naming the field); the optimizer
    validates its own fields when it is built (DPAdamW's checks: tests/test_optim.py)."""
    with pytest.raises(TypeError, match=r"model\.optimizer"):
        DPCausalLM(model="tiny-qwen2", optimizer="lion")
    with pytest.raises(TypeError, match=r"model\.clipping"):
        DPCausalLM(model="tiny-qwen2", clipping="fixed")
    module = DPCausalLM(model="tiny-qwen2", optimizer=functools.partial(DPAdamW, lr=-1.0))
    with pytest.raises(ValueError, match=r"lr=-1\.0"):
        module.configure_optimizers()
    with pytest.raises(TypeError, match="momentum"):  # DPAdamW has no momentum field
        DPCausalLM(
            model="tiny-qwen2", optimizer=functools.partial(DPAdamW, momentum=0.9)
        ).configure_optimizers()


def test_components_have_no_shared_default_instance():
    """Two modules built with the defaults get their own clip-bound estimator."""
    a, b = DPCausalLM(model="tiny-qwen2"), DPCausalLM(model="tiny-qwen2")
    assert isinstance(a.clip, PrivateQuantile) and a.clip is not b.clip
    assert isinstance(a.configure_optimizers(), DPAdamW)


def test_variance_floor_reaches_the_optimizer():
    opt = make_module(noise_correction=True, variance_floor=1e-4).configure_optimizers()
    assert opt.param_groups[0]["variance_floor"] == 1e-4 and opt.param_groups[0]["noise_correction"]


def test_micro_batches_never_split_a_unit():
    ids = torch.tensor([0, 0, 0, 1, 2, 2, 3])
    batch = {
        "input_ids": torch.zeros(7, 3),
        "attention_mask": torch.zeros(7, 3),
        "labels": torch.zeros(7, 3),
        "unit_ids": ids,
    }
    parts = split_micro_batches(batch, 3)
    seen = [p["unit_ids"].tolist() for p in parts]
    assert sum(len(s) for s in seen) == 7
    for s in seen:
        assert len(s) <= 3 or len(set(s)) == 1
    flat = [set(s) for s in seen]
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            assert not flat[i] & flat[j]


def test_configure_optimizers_twice_never_wraps_or_hooks_the_model():
    """Lightning may call configure_optimizers more than once; it must never wrap or hook the model."""
    module = make_module()
    model_type = type(module.model)
    hooks_before = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.model.modules()
    )
    first, second = module.configure_optimizers(), module.configure_optimizers()
    assert type(module.model) is model_type
    hooks_after = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.model.modules()
    )
    assert hooks_after == hooks_before
    ids = lambda opt: [id(p) for g in opt.param_groups for p in g["params"]]  # noqa: E731
    assert (
        ids(first) == ids(second) == [id(p) for p in module.model.parameters() if p.requires_grad]
    )


def test_history_percentile_is_reported_as_not_covered(tmp_path):
    dm = make_dm(num_train=32, expected=8.0)
    module = make_module(clipping="history_percentile")
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(module, datamodule=dm)
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    assert report["covers"].startswith("nothing")
    assert any("raw" in item for item in report["not_covered"])
    assert report["clipping"]["covered_by_dp"] is False


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
