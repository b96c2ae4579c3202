"""Evaluation weights: the EMA callback installs its weight swap on the module at setup (and
keeps it after fit); the module evaluates inside that swap without looking the callback up (the
export of these weights: tests/callbacks/test_export.py).
"""

from __future__ import annotations

import torch
from module_helpers import make_dm, make_module, make_trainer

from lit_dp.callbacks.ema import EMAWeights


def _token_mean_nll(model: torch.nn.Module, loader) -> float:
    """Independent reference: summed shifted cross-entropy over label tokens / label tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            labels = batch["labels"][:, 1:]
            total += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                    labels.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
            )
            count += int((labels != -100).sum())
    return total / count


def test_after_loss_uses_the_ema_weights_the_callback_swaps_in(tmp_path):
    dm = make_dm()
    module = make_module(eval_before_fit=True, lr=5e-2)
    ema = EMAWeights(decay=0.5)
    trainer = make_trainer(tmp_path, max_steps=4)
    trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, EMAWeights)] + [ema]
    trainer.fit(module, datamodule=dm)
    after = module.val_history[-1]
    loader = dm.val_dataloader()
    raw = _token_mean_nll(module.model, loader)
    with torch.no_grad():  # load the EMA shadow by hand, not through the callback's swap
        for n, p in module.model.named_parameters():
            if p.requires_grad:
                p.copy_(ema.shadow[n])
    ema_loss = _token_mean_nll(module.model, loader)
    assert abs(ema_loss - raw) > 1e-4, "the EMA and raw weights should differ after 4 steps"
    assert abs(after["loss_raw"] - raw) < 1e-5
    assert abs(after["loss_ema"] - ema_loss) < 1e-5
    # The swap is the callback's, installed at setup and kept after fit: evaluating after
    # trainer.fit still sees the EMA weights (and the raw ones come back on exit).
    assert module._evaluation_weights is not None
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.mul_(0.5)  # any raw weights: the swap must load the shadow over them
    with module.evaluation_weights():
        for n, p in module.model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p, ema.shadow[n])


def test_without_ema_the_evaluated_weights_are_the_raw_ones(tmp_path):
    dm = make_dm()
    module = make_module(eval_before_fit=True, lr=5e-2)
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, EMAWeights)]
    trainer.fit(module, datamodule=dm)
    after = module.val_history[-1]
    assert after["loss_ema"] == after["loss_raw"]
    assert abs(after["loss_raw"] - _token_mean_nll(module.model, dm.val_dataloader())) < 1e-5


def test_after_fit_the_module_still_evaluates_its_ema_weights(tmp_path):
    """evaluation_weights() and evaluate_loss() after trainer.fit use the EMA weights the run
    evaluated and exported, not silently the raw ones."""
    from module_helpers import make_dm, make_trainer, trainable

    from lit_dp.callbacks.ema import EMAWeights

    module, dm = make_module(), make_dm(num_train=32, expected=8.0)
    trainer = make_trainer(tmp_path, max_steps=4)
    trainer.fit(module, datamodule=dm)
    ema = next(c for c in trainer.callbacks if isinstance(c, EMAWeights))
    raw = trainable(module)
    with module.evaluation_weights():
        inside = trainable(module)
        loss_ema = module.evaluate_loss(dm.val_dataloader())
    assert all(torch.equal(inside[n], ema.shadow[n].to(inside[n].dtype)) for n in inside)
    assert any(not torch.equal(inside[n], raw[n]) for n in raw)
    assert all(torch.equal(p, raw[n]) for n, p in trainable(module).items())  # restored
    assert loss_ema != module.evaluate_loss(dm.val_dataloader())
