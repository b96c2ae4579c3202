"""AuditCanaries: an empirical privacy audit of this training run, in this training run.

The one-run audit of Steinke, Nasr and Jagielski (2023): m canaries are made at setup, each
included in the training set with probability 1/2 (OS entropy). The included ones are ordinary
privacy units: they are Poisson-sampled, clipped, noised and accounted like every record, and
they count in N (so in the sample rate and the default delta). At the end of training every
canary is scored by how much training lowered its loss (starting weights minus the exported EMA
weights), and ``lit_dp.audit.estimator`` turns the guesses of the best- and worst-scored
canaries into an epsilon lower bound at the chosen confidence. A bound above the accounted
epsilon would mean the implementation leaks more than it claims; a bound far below it is
normal (the one-run audit with random-token canaries is loose, and DP bounds the worst case).

Operator side: the canaries' tokens and inclusion bits are written to
``<log_dir>/audit_canaries.json`` (a run resumed in its own directory reuses them) and the
per-canary scores and bits go into the report's ``audit.operator_side``; the exported report
keeps the bound, m, the confidence and the canary kind only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lit_dp.audit.canaries import (
    CANARY_KINDS,
    fair_coins,
    new_token_canaries,
    ordinary_token_ids,
    random_token_canaries,
    row_losses,
    unused_token_ids,
)
from lit_dp.audit.estimator import audit_lower_bound
from lit_dp.report import OPERATOR_SIDE_KEY

if TYPE_CHECKING:
    from lit_dp.module import DPCausalLM

CANARY_FILE = "audit_canaries.json"
_SCORE = "loss of the starting weights minus loss of the exported (EMA) weights, per canary"
_METHOD = "one-run audit (Steinke, Nasr and Jagielski 2023)"


def _fingerprint(rows: list[Any], bits: list[bool]) -> str:
    return hashlib.sha256(json.dumps([rows, bits]).encode()).hexdigest()


class AuditCanaries(L.Callback):
    """Plants audit canaries at setup and reports the one-run epsilon lower bound at the end.

    Args:
        num_canaries: m, the number of canaries (0 = no audit, the default). About m/2 are
            trained on and join N. Panda et al. (2025) audit LLMs with 1000.
        kind: the canary kind (``lit_dp.audit.canaries``): "random_tokens" (tokens drawn
            uniformly from the tokenizer's ordinary tokens, loss on every token) or "new_tokens"
            (a random prefix, then a secret of ids from embedding rows the tokenizer never
            produces, loss on the secret: stronger, for models with such rows, e.g. Qwen2.5).
        confidence: the bound's confidence 1 - beta, in (0, 1): it exceeds the run's true
            epsilon with probability at most beta.
        canary_length: tokens per canary; must fit data.max_length.
        eval_batch_size: rows per forward pass when the canaries are scored.
    """

    def __init__(
        self,
        num_canaries: int = 0,
        kind: Literal["random_tokens", "new_tokens"] = "random_tokens",
        confidence: float = 0.95,
        canary_length: int = 32,
        eval_batch_size: int = 64,
    ) -> None:
        if isinstance(num_canaries, bool) or not isinstance(num_canaries, int) or num_canaries < 0:
            raise ValueError(
                f"audit.num_canaries={num_canaries!r} must be an integer >= 0 (0 = off)"
            )
        if kind not in CANARY_KINDS:
            raise ValueError(f"audit.kind={kind!r} must be one of {list(CANARY_KINDS)}")
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"audit.confidence={confidence} must be in (0, 1), e.g. 0.95")
        if canary_length < 2:
            raise ValueError(f"audit.canary_length={canary_length} must be >= 2 tokens")
        if eval_batch_size < 1:
            raise ValueError(f"audit.eval_batch_size={eval_batch_size} must be >= 1")
        self.num_canaries, self.kind = num_canaries, kind
        self.confidence, self.canary_length = confidence, canary_length
        self.eval_batch_size = eval_batch_size
        self.rows: list[Any] = []
        self.included: list[bool] = []
        self.loss_before: list[float] | None = None
        self.loss_after: list[float] | None = None
        self.result: dict[str, Any] | None = None
        self.reused_from: str | None = None
        self.failure: str | None = None
        self._planted_in: Any = None

    @property
    def enabled(self) -> bool:
        return self.num_canaries > 0

    # --- setup: make and plant the canaries -------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled:
            return
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "add_training_units"):
            raise ValueError("audit.num_canaries > 0 needs a lit_dp DataModule to plant canaries")
        if self._planted_in is dm:
            return
        early = [
            cb
            for cb in trainer.callbacks  # type: ignore[attr-defined]
            if getattr(cb, "num_units", None) is not None
        ]  # an accounting callback that has already read N
        if early:
            raise RuntimeError(
                "AuditCanaries must come before PrivacyAccounting in trainer.callbacks: the "
                "accountant read N before the canaries were added"
            )
        if self.canary_length > dm.max_length:
            raise ValueError(
                f"audit.canary_length={self.canary_length} exceeds data.max_length="
                f"{dm.max_length}; shorten the canaries or raise max_length"
            )
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP
        state = None
        if trainer.global_rank == 0:
            embeddings = cast("DPCausalLM", pl_module).model.get_input_embeddings()
            state = self._load_or_draw(log_dir / CANARY_FILE, dm, embeddings.num_embeddings)
        if trainer.world_size > 1:  # every rank plants rank 0's canaries
            state = trainer.strategy.broadcast(state, src=0)
        assert state is not None
        self.rows = [(list(ids), list(labels)) for ids, labels in state["rows"]]
        self.included = [bool(b) for b in state["included"]]
        self.reused_from = state.get("reused_from")
        planted = [row for row, bit in zip(self.rows, self.included, strict=True) if bit]
        dm.add_training_units(planted)
        self._planted_in = dm
        rank_zero_info(
            f"lit_dp: audit: {self.num_canaries} canaries ({self.kind}), each trained on with "
            "probability 1/2; the included ones count in N"
        )

    def _load_or_draw(self, path: Path, dm: Any, vocab_limit: int) -> dict[str, Any]:
        """The canaries of this run directory if it has them (a resume), else fresh ones."""
        if path.is_file():
            state = json.loads(path.read_text())
            if (
                len(state["rows"]) != self.num_canaries
                or state["kind"] != self.kind
                or any(len(ids) != self.canary_length for ids, _ in state["rows"])
            ):
                raise ValueError(
                    f"{path} holds {len(state['rows'])} {state['kind']} canaries of another "
                    "shape than audit: asks; resume with the run's audit settings, or start the "
                    "run in a new directory"
                )
            return {**state, "reused_from": str(path)}
        tokenizer = dm._get_tokenizer()
        ordinary = ordinary_token_ids(tokenizer, vocab_limit=vocab_limit)
        if self.kind == "new_tokens":
            rows = new_token_canaries(
                num_canaries=self.num_canaries,
                canary_length=self.canary_length,
                token_ids=ordinary,
                new_ids=unused_token_ids(tokenizer, num_embeddings=vocab_limit),
            )
        else:
            rows = random_token_canaries(
                num_canaries=self.num_canaries, canary_length=self.canary_length, token_ids=ordinary
            )
        state = {"kind": self.kind, "rows": rows, "included": fair_coins(self.num_canaries)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        # 0600: the inclusion bits are the audit's secret (like a checkpoint's generator state)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(state, fh)
        os.replace(tmp, path)
        return state

    # --- scoring ------------------------------------------------------------------------------
    def _losses(self, trainer: L.Trainer, pl_module: DPCausalLM) -> list[float]:
        return row_losses(
            pl_module.model,
            self.rows,
            pad_id=trainer.datamodule._pad_id(),  # type: ignore[attr-defined]
            device=pl_module.device,
            batch_size=self.eval_batch_size,
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and self.loss_before is None:  # a resume keeps the checkpointed losses
            if trainer.global_step != 0:
                raise RuntimeError(
                    "audit: the starting losses of the canaries are missing after step 0 (a "
                    "checkpoint written without audit: settings); resume with the run's settings"
                )
            self.loss_before = self._losses(trainer, cast("DPCausalLM", pl_module))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or self.loss_before is None:
            return
        module = cast("DPCausalLM", pl_module)
        with module.evaluation_weights():  # the exported weights (EMA when it is on)
            self.loss_after = self._losses(trainer, module)
        scores = [b - a for b, a in zip(self.loss_before, self.loss_after, strict=True)]
        if not all(math.isfinite(x) for x in scores):  # report it; never fail a finished run
            self.failure = "not computed: a canary's loss is not finite"
            return
        delta = self._delta(trainer)
        res = audit_lower_bound(scores, self.included, confidence=self.confidence, delta=delta)
        self.result = res.to_dict()
        for logger in trainer.loggers:
            logger.log_metrics(
                {"audit/epsilon_lower_bound": res.epsilon_lower_bound}, step=trainer.global_step
            )

    @staticmethod
    def _delta(trainer: L.Trainer) -> float:
        """The run's accounted delta; a non-private run is audited at the default delta."""
        from lit_dp.callbacks.accounting import PrivacyAccounting, default_delta

        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        acct = next((cb for cb in callbacks if isinstance(cb, PrivacyAccounting)), None)
        if acct is not None and acct.delta is not None:
            return float(acct.delta)
        return default_delta(int(trainer.datamodule.num_units))  # type: ignore[attr-defined]

    # --- report -------------------------------------------------------------------------------
    def privacy_report_section(self) -> dict[str, Any]:
        """The report's ``audit`` entry ({} when the audit is off).

        The shareable part: the bound and how it was tested. ``operator_side`` (never
        exported): the inclusion bits, the scores, the losses and the guess counts.
        """
        if not self.enabled:
            return {}
        res = self.result or {}
        section: dict[str, Any] = {
            "method": _METHOD,
            "kind": self.kind,
            "num_canaries": self.num_canaries,
            "canary_length": self.canary_length,
            "confidence": self.confidence,
            "delta": res.get("delta"),
            "epsilon_lower_bound": res.get("epsilon_lower_bound"),
            "score": _SCORE,
            "note": (
                "canaries are extra privacy units, each included with probability 1/2 from OS "
                "entropy; the included ones count in num_units and in the accounting. The bound "
                "is the largest epsilon whose (epsilon, delta) claim the canary guesses reject "
                "at this confidence: evidence of at least this much leakage, not an upper bound"
            ),
        }
        if not res:
            section["status"] = self.failure or "not computed (training did not reach its end)"
        section[OPERATOR_SIDE_KEY] = {
            "included": self.included,
            "scores": (
                [b - a for b, a in zip(self.loss_before, self.loss_after, strict=True)]
                if self.loss_before is not None and self.loss_after is not None
                else None
            ),
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "num_included": sum(self.included),
            "guesses": {k: v for k, v in res.items() if k.startswith("num_")},
            "canaries_reused_from": self.reused_from,
        }
        return {"audit": section}

    def summary_line(self) -> str | None:
        """The run summary's ``audit:`` line (None when the audit is off)."""
        if not self.enabled:
            return None
        if self.result is None:
            why = self.failure or "training did not finish"
            return f"audit: {self.num_canaries} canaries, no bound ({why})"
        return (
            f"audit: epsilon lower bound = {self.result['epsilon_lower_bound']:.3f} at "
            f"{self.confidence:.0%} confidence ({self.num_canaries} {self.kind} canaries, "
            f"delta = {self.result['delta']:.3g})"
        )

    # --- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        return {
            "fingerprint": _fingerprint(self.rows, self.included),
            "loss_before": self.loss_before,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.enabled or not state_dict:
            return
        if state_dict["fingerprint"] != _fingerprint(self.rows, self.included):
            raise ValueError(
                "the checkpoint was trained with other audit canaries than this run planted: "
                f"resume in the run's own directory (its {CANARY_FILE}; --ckpt_path last does)"
            )
        self.loss_before = state_dict["loss_before"]
