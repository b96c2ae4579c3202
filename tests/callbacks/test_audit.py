"""AuditCanaries: canaries join N and the accounting, the bound reaches the report (bits and
scores operator side only), the summary and TensorBoard; a non-private run gives a large bound,
an untrained model none; a resumed run reuses its canaries; bad settings fail naming the field."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch
from module_helpers import Crash, CrashAt, json_keys, make_dm, make_module, quiet_trainer
from shipped_configs import TINY

from lit_dp.callbacks.accounting import PrivacyAccounting
from lit_dp.callbacks.audit import CANARY_FILE, AuditCanaries
from lit_dp.checkpoint import DPModelCheckpoint
from lit_dp.cli import LitDPCLI
from lit_dp.data import ConstantSampleRate
from lit_dp.models import tiny_tokenizer


def test_fit_with_canaries_prints_an_audit_line_and_reports_it(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    args = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]
    args += ["--audit.num_canaries", "16", "--audit.canary_length", "12"]
    cli = LitDPCLI(args=["fit", "--config", TINY, *args, "--trainer.enable_progress_bar", "false"])
    out, _ = capfd.readouterr()
    line = next(x for x in out.splitlines() if x.startswith("audit: "))
    assert "epsilon lower bound = " in line and "95% confidence" in line
    assert "16 random_tokens canaries" in line
    log_dir = Path(cli.trainer.log_dir)
    report = json.loads((log_dir / "privacy_report.json").read_text())
    audit = report["audit"]
    bits = audit["operator_side"]["included"]
    assert len(bits) == 16 and audit["operator_side"]["num_included"] == sum(bits)
    # the included canaries are privacy units: N and the accounted sample rate count them
    assert report["num_units"] == 256 + sum(bits)
    assert report["sample_rate"]["distinct_rates"] == pytest.approx(
        [32 / (256 + sum(bits))], rel=1e-12
    )
    assert report["operator_side"]["num_records"] == 256  # canaries are not records
    assert audit["num_canaries"] == 16 and audit["confidence"] == 0.95
    assert audit["delta"] == report["delta"] and audit["epsilon_lower_bound"] >= 0.0
    assert f"{audit['epsilon_lower_bound']:.3f}" in line
    assert len(audit["operator_side"]["scores"]) == 16
    # the shareable copy: the bound, m, confidence and kind; never the bits or the scores
    exported = json.loads((log_dir / "export" / "privacy_report.json").read_text())
    assert exported["audit"]["epsilon_lower_bound"] == audit["epsilon_lower_bound"]
    assert exported["audit"]["kind"] == "random_tokens" and exported["audit"]["num_canaries"] == 16
    assert not json_keys(exported) & {"operator_side", "included", "scores", "num_included"}
    # the operator-side canary file is private to its owner
    assert stat.S_IMODE((log_dir / CANARY_FILE).stat().st_mode) == 0o600
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    logged = events.Scalars("audit/epsilon_lower_bound")
    assert logged[-1].value == pytest.approx(audit["epsilon_lower_bound"], abs=1e-6)


def _audit_run(
    root,
    *,
    lr,
    steps=6,
    m=48,
    private=False,
    callbacks=(),
    ckpt_path=None,
    kind="random_tokens",
    crash_at=None,
):
    dm = make_dm(num_train=8)
    dm.batch_schedule = ConstantSampleRate(1.0)  # every unit every step: the most exposure
    module = make_module(private=private, noise_multiplier=0.0, lr=lr, max_physical_batch_size=64)
    if kind == "new_tokens":  # 41 embedding rows the byte tokenizer (259 ids) never produces
        module.model.resize_token_embeddings(300)
    audit = AuditCanaries(num_canaries=m, canary_length=12, kind=kind)
    accounting = PrivacyAccounting(target_epsilon=None)
    crash = [CrashAt(crash_at)] if crash_at is not None else []
    trainer = quiet_trainer(
        root, steps, [audit, accounting, *callbacks, *crash], limit_val_batches=0
    )
    if crash_at is None:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    else:  # a run that dies before step crash_at (a resume must continue the same run)
        with pytest.raises(Crash):
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return audit, dm


def test_nonprivate_run_gives_a_large_bound(tmp_path):
    """Non-private full-batch training memorizes the included canaries: the auditor has power."""
    audit, dm = _audit_run(tmp_path, lr=3e-2)
    section = audit.privacy_report_section()["audit"]
    side = section["operator_side"]
    assert dm.num_units == 8 + side["num_included"]
    # (observed 1.4-2.1: all guesses right; 48 canaries cannot show much more than ~2)
    assert section["epsilon_lower_bound"] > 0.5
    assert side["guesses"]["num_correct"] >= 0.9 * side["guesses"]["num_guesses"]


def test_untrained_weights_give_no_evidence(tmp_path):
    """lr = 0: the weights never move, every score is 0 and the bound is 0."""
    audit, _ = _audit_run(tmp_path, lr=0.0, steps=2)
    section = audit.privacy_report_section()["audit"]
    assert section["operator_side"]["scores"] == [0.0] * 48
    assert section["epsilon_lower_bound"] == 0.0


def test_a_resumed_run_reuses_its_canaries(tmp_path):
    # The 3-step run dies after its step-2 checkpoint (a resume must continue the same run).
    saver = DPModelCheckpoint(every_n_train_steps=2)
    first, dm1 = _audit_run(tmp_path, lr=1e-2, steps=3, m=8, callbacks=[saver], crash_at=2)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    again, dm2 = _audit_run(
        tmp_path, lr=1e-2, steps=3, m=8, callbacks=[DPModelCheckpoint()], ckpt_path=str(ckpt)
    )
    assert again.reused_from == str(tmp_path / CANARY_FILE)
    assert (again.rows, again.included) == (first.rows, first.included)
    assert dm2.num_units == dm1.num_units
    assert again.loss_before == first.loss_before  # from the checkpoint, not the resumed weights
    # Other canaries than the checkpoint's (its canary file gone): refused, not silently mixed.
    # The run fingerprint sees other training units (the planted canaries) before the audit does.
    (tmp_path / CANARY_FILE).unlink()
    with pytest.raises(ValueError, match=r"not of this run(.|\n)*training units"):
        _audit_run(tmp_path, lr=1e-2, steps=3, m=8, ckpt_path=str(ckpt))


def test_a_checkpoint_of_other_canaries_is_refused_by_the_audit():
    """The audit's own check (behind the run fingerprint): a checkpoint's canary fingerprint."""
    audit = AuditCanaries(num_canaries=2)
    audit.rows, audit.included = [([5, 6], [5, 6]), ([7, 8], [7, 8])], [True, False]
    saved = audit.state_dict()
    audit.included = [False, True]
    with pytest.raises(ValueError, match="other audit canaries"):
        audit.load_state_dict(saved)


def test_canary_rows_are_random_ordinary_tokens():
    from lit_dp.audit.canaries import ordinary_token_ids, random_token_canaries

    tok = tiny_tokenizer()
    ids = ordinary_token_ids(tok)
    assert not set(ids) & set(tok.all_special_ids) and len(ids) == len(tok) - len(
        set(tok.all_special_ids)
    )
    rows = random_token_canaries(num_canaries=200, canary_length=16, token_ids=ids)
    assert all(r[0] == r[1] and len(r[0]) == 16 and set(r[0]) <= set(ids) for r in rows)
    drawn = torch.tensor([t for r in rows for t in r[0]])
    assert len(set(drawn.tolist())) > 0.9 * len(ids)  # 3200 draws cover nearly every token


def test_added_units_are_sampled_and_refused_after_the_loader(tmp_path):
    dm = make_dm(num_train=16, expected=8.0)
    dm.setup("fit")
    assert dm.schedule.rate(0) == 8 / 16
    canary = ([5, 6, 7], [5, 6, 7])
    dm.add_training_units([canary] * 4)
    assert dm.num_units == 20 and dm.schedule.rate(0) == 8 / 20
    assert dm.data_report()["operator_side"]["num_records"] == 16
    loader = dm.train_dataloader()
    seen = [b for _, b in zip(range(30), loader, strict=False)]
    rows = [ids.tolist()[:3] for b in seen for ids in b["input_ids"]]
    assert [5, 6, 7] in rows  # the canaries are drawn like every unit
    with pytest.raises(RuntimeError, match="before the accountant"):
        dm.add_training_units([canary])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_canaries": -1}, "audit.num_canaries"),
        ({"kind": "gradient"}, "audit.kind"),
        ({"confidence": 1.0}, "audit.confidence"),
        ({"canary_length": 1}, "audit.canary_length"),
    ],
)
def test_bad_settings_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AuditCanaries(**kwargs)


def test_canaries_longer_than_max_length_and_audit_after_accounting_are_refused(tmp_path):
    dm = make_dm(num_train=8)
    trainer = quiet_trainer(
        tmp_path, 1, [AuditCanaries(num_canaries=4, canary_length=600), PrivacyAccounting()]
    )
    with pytest.raises(ValueError, match=r"audit\.canary_length=600 exceeds data\.max_length"):
        trainer.fit(make_module(), datamodule=dm)
    trainer = quiet_trainer(tmp_path, 1, [PrivacyAccounting(), AuditCanaries(num_canaries=4)])
    with pytest.raises(RuntimeError, match="must come before PrivacyAccounting"):
        trainer.fit(make_module(), datamodule=make_dm(num_train=8))


def test_audit_off_adds_nothing(tmp_path):
    audit = AuditCanaries()
    assert audit.privacy_report_section() == {} and audit.summary_line() is None
    assert audit.state_dict() == {}


def test_plan_says_the_canaries_will_change_n(capsys):
    from lit_dp.plan import main

    main(["--config", TINY, "--audit.num_canaries", "64"])
    out = capsys.readouterr().out
    assert "privacy units N               256" in out
    assert "audit: 64 canaries, each joins N with probability 1/2 at fit (about 32" in out
    main(["--config", TINY])
    assert "audit:" not in capsys.readouterr().out


def test_model_card_lines_state_the_bound_from_the_shareable_report():
    from lit_dp.audit.card import audit_card_lines

    assert audit_card_lines({"epsilon": 8.0}) == []
    audit = AuditCanaries(num_canaries=10, confidence=0.9)
    audit.result = {"epsilon_lower_bound": 0.4321, "delta": 1e-5}
    section = audit.privacy_report_section()["audit"]
    section.pop("operator_side")  # the exported report has none
    lines = audit_card_lines({"epsilon": 7.95, "audit": section})
    assert "epsilon lower bound 0.432 at 90% confidence" in lines[0]
    assert "accounted epsilon: 7.95" in lines[0] and "10 random_tokens canaries" in lines[0]


def test_a_non_finite_canary_loss_is_reported_not_raised(tmp_path, monkeypatch):
    import lit_dp.callbacks.audit as audit_module

    losses = iter([[1.0] * 8, [float("nan")] + [0.5] * 7])  # before, after
    monkeypatch.setattr(audit_module, "row_losses", lambda *a, **k: next(losses))
    audit, _ = _audit_run(tmp_path, lr=1e-2, steps=1, m=8)
    section = audit.privacy_report_section()["audit"]
    assert section["epsilon_lower_bound"] is None and "not finite" in section["status"]
    assert "no bound (not computed: a canary's loss is not finite)" in audit.summary_line()


def test_new_token_canaries_end_in_unused_embedding_rows():
    from lit_dp.audit.canaries import new_token_canaries, ordinary_token_ids, unused_token_ids

    tok = tiny_tokenizer()
    new_ids = unused_token_ids(tok, num_embeddings=300)
    assert new_ids == list(range(259, 300))
    rows = new_token_canaries(
        num_canaries=50, canary_length=16, token_ids=ordinary_token_ids(tok), new_ids=new_ids
    )
    for ids, labels in rows:  # 14 ordinary prefix tokens without loss, a 2-token new secret
        assert len(ids) == 16 and set(ids[:14]) <= set(ordinary_token_ids(tok))
        assert set(ids[14:]) <= set(new_ids) and labels == [-100] * 14 + ids[14:]
    # dealt from a shuffled pool: 41 new tokens serve 20 canaries x 2 without sharing
    firsts = [t for ids, _ in rows[:20] for t in ids[14:]]
    assert len(set(firsts)) == 40
    with pytest.raises(ValueError, match=r"audit\.kind=new_tokens needs embedding rows"):
        new_token_canaries(num_canaries=1, canary_length=8, token_ids=[3, 4], new_ids=[])


def test_new_token_canaries_have_power_and_need_unused_rows(tmp_path):
    # 40 canaries with one new token each, none shared (41 unused rows)
    audit, _ = _audit_run(tmp_path / "a", lr=3e-2, m=40, kind="new_tokens")
    section = audit.privacy_report_section()["audit"]
    assert section["kind"] == "new_tokens" and section["epsilon_lower_bound"] > 0.5
    dm = make_dm(num_train=8)
    trainer = quiet_trainer(tmp_path / "b", 1, [AuditCanaries(num_canaries=4, kind="new_tokens")])
    with pytest.raises(ValueError, match="this model has none"):  # tiny-qwen2: 259 rows, 259 ids
        trainer.fit(make_module(), datamodule=dm)


def test_the_privacy_plan_counts_the_canaries_and_the_model_card_states_the_audit(
    tmp_path, monkeypatch, capfd
):
    """N with the included canaries reaches the run's PrivacyPlan (built after the audit's
    setup); the summary's audit: line comes before the report path; the export's model card
    has the audit section, and a report without one gives a card without it."""
    from lit_dp.model_card import model_card

    monkeypatch.chdir(tmp_path)
    args = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]
    args += ["--audit.num_canaries", "16", "--audit.canary_length", "12"]
    cli = LitDPCLI(args=["fit", "--config", TINY, *args, "--trainer.enable_progress_bar", "false"])
    out, _ = capfd.readouterr()
    acct = next(cb for cb in cli.trainer.callbacks if isinstance(cb, PrivacyAccounting))
    log_dir = Path(cli.trainer.log_dir)
    report = json.loads((log_dir / "privacy_report.json").read_text())
    n = 256 + report["audit"]["operator_side"]["num_included"]
    assert acct.plan is not None and acct.plan.num_units == n == cli.datamodule.num_units
    assert acct.plan.schedule.rate(0) == pytest.approx(32 / n, rel=1e-12)
    assert acct.plan.delta == report["delta"] == report["audit"]["delta"]
    summary = out.splitlines()
    audit_at = next(i for i, x in enumerate(summary) if x.startswith("audit: "))
    assert summary[audit_at - 1].startswith("stopped: ")
    assert summary[audit_at + 1].startswith("privacy report: ")
    card = (log_dir / "export" / "README.md").read_text()
    bound = report["audit"]["epsilon_lower_bound"]
    assert "## Empirical privacy audit" in card
    assert f"epsilon lower bound {bound:.3f} at 95% confidence" in card
    assert "16 random_tokens canaries" in card
    exported = json.loads((log_dir / "export" / "privacy_report.json").read_text())
    exported.pop("audit")
    assert "audit" not in model_card(exported).lower()
