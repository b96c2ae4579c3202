"""A run's fingerprint: what a checkpoint may only be resumed with.

A checkpoint holds the noise generator's state, which is right for crash-and-resume: the resumed
run draws exactly the noise the uninterrupted run would have drawn. Resumed with anything else
(other data, another N, batch schedule, privacy setting, model, optimizer or length), two models
released from one checkpoint would share every later noise draw, and their difference would be
the removed unit's clipped gradient, unprotected. So every checkpoint carries the fingerprint of
its run, and a resume whose fingerprint differs is refused, naming what changed. Forking (fresh
noise, the ledger keeps the checkpoint's steps) is explicit: ``lit-dp fit --fork``.

The components are hashed separately so that a refusal can name each one that changed:

- ``data``: the training units in order (their tokenized records), the privacy unit, group key;
- ``num_units``: N;
- ``batch_schedule``: the configured batch schedule and the sample rates it resolves to;
- ``privacy``: model.private, the configured noise multiplier (``auto`` or a number) and noise
  settings, the clip-bound estimator and its parameters, a correlated noise mechanism (banded MF:
  its bands and coefficients), privacy.target_epsilon, privacy.delta, privacy.accountant;
- ``model``: the model source, dtype, BitNet, LoRA settings;
- ``optimizer``: the optimizer class and its settings;
- ``max_steps``: trainer.max_steps (``auto`` noise is calibrated over it).

Seeds are not part of it: a resume restores the checkpoint's generator states whatever the config
says.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

FINGERPRINT_KEY = "lit_dp_fingerprint"  # top-level key of a checkpoint
_VERSION = 1

# What a refusal calls each component (and which config fields set it).
COMPONENTS: dict[str, str] = {
    "data": "the training units or their order (data: records, privacy_unit, tokenization)",
    "num_units": "N, the number of privacy units",
    "batch_schedule": "the batch schedule (data.batch_schedule)",
    "privacy": "the privacy settings (model.private, model.noise_multiplier, model.clipping, "
    "model.noise_mechanism, privacy.target_epsilon, privacy.delta, privacy.accountant)",
    "model": "the model (model.model, dtype, bitnet, lora_*)",
    "optimizer": "the optimizer settings (model.optimizer)",
    "max_steps": "trainer.max_steps",
}
# Module hyperparameters of the privacy and model components.
_NOISE_HPARAMS = ("private", "noise_multiplier", "secure_noise")
_MODEL_HPARAMS = ("model", "dtype", "bitnet", "lora_rank", "lora_alpha", "lora_target_modules")
_SHOWN = 160  # longest value a refusal prints in full; longer ones by their hash


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _hash(value: Any) -> str:
    return hashlib.sha256(_canonical(value).encode()).hexdigest()


def units_digest(rows: Sequence[tuple[list[int], list[int]]], units: Iterable[list[int]]) -> str:
    """SHA-256 of the training units in order: each unit's tokenized records (ids and labels).

    Any added, removed, changed or reordered record, or a record moved to another unit, changes it.
    """
    h = hashlib.sha256()
    for unit in units:
        h.update(b"U")
        for index in unit:
            for tokens in rows[index]:  # ids, then labels: each length-prefixed, int64
                h.update(len(tokens).to_bytes(8, "little"))
                h.update(array("q", tokens).tobytes())
    return h.hexdigest()


def optimizer_settings(factory: Any) -> dict[str, Any]:
    """The optimizer a factory builds: its class and its settings (``defaults``).

    Built once on a throw-away parameter, so every way of giving the factory (a class, a
    ``functools.partial``, the CLI's callable) is described the same way.
    """
    try:
        opt = factory([torch.nn.Parameter(torch.zeros(1))])
    except ValueError as err:  # the optimizer names its argument; say where it is set
        raise ValueError(f"model.optimizer.init_args: {err}") from err
    cls = type(opt)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "settings": dict(opt.defaults)}


def run_fingerprint(trainer: Any, module: Any, datamodule: Any, accounting: Any) -> dict[str, Any]:
    """The readable value of every component (module docstring) for this run.

    Args:
        trainer: the Lightning trainer (its max_steps).
        module: the DPCausalLM (its hyperparameters, clip-bound estimator, optimizer factory).
        datamodule: the set-up lit_dp DataModule (its units, N and schedule).
        accounting: the PrivacyAccounting callback (target, delta, accountant).
    """
    hp = module.hparams
    data: dict[str, Any] = {  # the content, not where it is read from (a moved file is fine)
        "privacy_unit": getattr(datamodule, "privacy_unit", None),
        "group_key": getattr(datamodule, "group_key", None),
    }
    digest = getattr(datamodule, "training_units_digest", None)
    data["units_sha256"] = digest() if digest is not None else None
    schedule = getattr(datamodule, "schedule", None)
    batch = getattr(datamodule, "batch_schedule", None)
    clip = module.clip
    privacy: dict[str, Any] = {
        **{k: hp[k] for k in _NOISE_HPARAMS if k in hp},
        "clipping": {"name": clip.name, "parameters": clip.describe()["parameters"]},
        "target_epsilon": accounting.target_epsilon,
        "delta": accounting.delta_arg,
        "accountant": accounting.accountant_name,
    }
    mechanism = getattr(module, "noise_mechanism", None)
    if mechanism is not None and mechanism.bands > 1:
        # Correlated noise: its buffers and sampling groups continue only under the same
        # strategy. (Independent noise adds no key, so its checkpoints keep their fingerprint.)
        described = mechanism.describe()
        privacy["noise_mechanism"] = {
            k: described[k] for k in ("class_path", "bands", "coefficients")
        }
    return {
        "data": data,
        "num_units": int(datamodule.num_units),
        "batch_schedule": {
            "config": batch.describe() if batch is not None else None,
            "sample_rates": schedule.describe() if schedule is not None else None,
        },
        "privacy": privacy,
        "model": {k: hp[k] for k in _MODEL_HPARAMS if k in hp},
        "optimizer": optimizer_settings(module._optimizer_factory),  # the configured factory
        "max_steps": int(trainer.max_steps),
    }


def to_state(values: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint stores: the values and one hash per component."""
    return {
        "version": _VERSION,
        "values": json.loads(_canonical(values)),
        "hashes": {name: _hash(value) for name, value in values.items()},
    }


def short_id(state: dict[str, Any]) -> str:
    """A 16-hex-digit id of a whole fingerprint (what a fork's report names its parent by)."""
    return _hash(sorted(state["hashes"].items()))[:16]


def changed(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Names of the components whose hash differs (a component missing on one side differs)."""
    old, new = saved.get("hashes", {}), to_state(current)["hashes"]
    return [name for name in COMPONENTS if old.get(name) != new.get(name)]


def _show(value: Any) -> str:
    text = _canonical(value)
    return text if len(text) <= _SHOWN else f"sha256 {_hash(value)[:16]}"


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _differences(old: Any, new: Any) -> str:
    """``field old -> new`` for each differing leaf of two JSON values (hashes shortened)."""
    a, b = _flat(json.loads(_canonical(old))), _flat(json.loads(_canonical(new)))
    parts = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "(absent)") != b.get(key, "(absent)"):
            x, y = a.get(key, "(absent)"), b.get(key, "(absent)")
            if key.endswith("sha256"):
                x, y = str(x)[:16], str(y)[:16]
            parts.append(f"{key or 'value'} {_show(x)} -> {_show(y)}")
    return "; ".join(parts)


def describe_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per changed component: what it covers, then each field, checkpoint -> this run.

    A private/non-private mismatch comes first, in words.
    """
    old = saved.get("values", {})
    lines = []
    was_private = old.get("privacy", {}).get("private")
    if was_private != current["privacy"].get("private"):
        lines.append(
            f"model.private: {was_private} in the checkpoint, {current['privacy'].get('private')} "
            "in this run (a private run never continues non-private weights, nor the other way "
            "round)"
        )
    for name in changed(saved, current):
        was = old.get(name, "(not recorded)")
        lines.append(f"{name}: {COMPONENTS[name]}: {_differences(was, current[name])}")
    return lines


def read_checkpoint_run(path: str | Path) -> dict[str, Any]:
    """The run parts of a checkpoint file, without reading its tensors into memory.

    Returns:
        ``{"fingerprint": state or None, "global_step": int, "accounting": the
        PrivacyAccounting state or None}``.
    """
    ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    accounting = next(
        (v for k, v in ckpt.get("callbacks", {}).items() if str(k).startswith("PrivacyAccounting")),
        None,
    )
    return {
        "fingerprint": ckpt.get(FINGERPRINT_KEY),
        "global_step": int(ckpt.get("global_step", 0)),
        "accounting": accounting,
    }


def matching_runs(checkpoint: str | Path, current: dict[str, Any]) -> list[Path]:
    """Sibling runs' ``last.ckpt`` (``<runs>/<version>/checkpoints/last.ckpt``) of this run.

    Used to point a refused ``--ckpt_path last`` to the run its config belongs to.
    """
    path = Path(checkpoint)
    if path.parent.name != "checkpoints":
        return []
    found = []
    for other in sorted(path.parent.parent.parent.glob(f"*/checkpoints/{path.name}")):
        if other == path:
            continue
        try:
            saved = read_checkpoint_run(other)["fingerprint"]
        except Exception:  # an unreadable file is simply not a match
            continue
        if saved is not None and not changed(saved, current):
            found.append(other)
    return found


def refuse_resume(
    saved: dict[str, Any] | None,
    current: dict[str, Any],
    *,
    checkpoint: str | Path,
    checkpoint_step: int,
) -> None:
    """Raise ValueError unless ``saved`` (a checkpoint's fingerprint) is this run's.

    The message names every changed component, says plainly when the checkpoint's run had
    already taken all its steps (a longer run needs a new plan from the start), and points to a
    sibling run this config belongs to, if there is one.
    """
    if saved is not None and not changed(saved, current):
        return
    head = (
        f"ckpt_path={checkpoint}: refused, this checkpoint is not of this run. A resume must "
        "continue the same run (it restores the checkpoint's noise generator: a changed run would "
        "reuse its noise draws)."
    )
    if saved is None:
        lines = ["the checkpoint has no run fingerprint (written by an older lit_dp)"]
    else:
        lines = describe_changes(saved, current)
        old_steps = saved.get("values", {}).get("max_steps")
        if "max_steps" in changed(saved, current) and old_steps is not None:
            privacy = saved.get("values", {}).get("privacy", {})
            lines.insert(
                0, _longer_run_note(old_steps, current["max_steps"], checkpoint_step, privacy)
            )
    text = [head, "Changed since the checkpoint:", *(f"  - {line}" for line in lines)]
    siblings = matching_runs(checkpoint, current)
    if siblings:
        run = siblings[-1].parent.parent
        text.append(
            f"This config's own run is {run}: resume it with --trainer.logger.init_args.version "
            f"{run.name} --ckpt_path last (or give --ckpt_path {siblings[-1]})."
        )
    private_changed = saved is not None and saved.get("values", {}).get("privacy", {}).get(
        "private"
    ) != current["privacy"].get("private")
    text.append(
        "Otherwise start a new run without --ckpt_path"
        + (
            "."
            if private_changed
            else ", or fork this checkpoint explicitly with --fork (fresh noise, a new run "
            "directory; its epsilon includes the checkpoint's steps)."
        )
    )
    raise ValueError("\n".join(text))


def _longer_run_note(old: int, new: int, step: int, privacy: dict[str, Any]) -> str:
    calibrated = privacy.get("noise_multiplier") == "auto" and privacy.get("target_epsilon")
    if step >= old:
        spent = (
            f" and its noise was calibrated so that they spend the whole budget (target_epsilon="
            f"{privacy.get('target_epsilon')}): the budget is spent, nothing is left for more steps"
            if calibrated
            else ""
        )
        return (
            f"the checkpoint's run is finished: it took all {old} planned steps{spent}. A run of "
            f"{new} steps needs a new plan from the start: run without --ckpt_path"
            + (f" (the noise is then calibrated for {new} steps)" if calibrated else "")
        )
    return (
        f"the checkpoint's run was planned for trainer.max_steps={old}"
        + (" (its noise calibrated over them)" if calibrated else "")
        + f" and is at step {step}: resume it with trainer.max_steps={old}, or plan a run of "
        f"{new} steps from the start"
    )
