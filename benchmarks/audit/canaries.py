"""Canary-exposure privacy audit (Carlini et al. 2019, "The Secret Sharer") + loss-threshold MIA.

Plants random 9-digit secrets ("My account number is XXXXXXXXX.") in a small synthetic
``emails`` training set, several canaries per repetition count (default 2 each at 1, 4, 16
copies), trains the same tiny model non-privately and with DP at several target epsilons (same
steps, lr, data, sampling seed), then measures for each canary

    exposure = log2(R + 1) - log2(rank)

where rank is the position of the true secret's log-likelihood among R random 9-digit
candidates plus the secret (rank 1 = most likely). Only the secret's tokens are scored (the
columns where candidates differ), given the canary's chat-formatted prompt and the template
prefix, exactly as the record was encoded for training (``encode_records``). Chance level:
E[exposure] = 1/ln 2 ~ 1.44 bits for a uniformly random rank; the maximum is log2(R + 1).

Also a loss-threshold membership-inference AUC: per-record mean response-token NLL of the
(non-canary) training records vs the held-out test records; AUC = P(member loss < non-member
loss) from ranks (0.5 = no leakage).

A user-level run (privacy_unit=group; each canary's copies are one user, every other email its own
user) shows what group-level DP adds for repeated secrets.

Both the raw final weights and the EMA weights (what ``EMAWeights`` evaluates/exports) are
audited; the table and plot show the EMA weights.

    python -m benchmarks.audit.canaries --out benchmarks/results   # full (~8 min on 2 cores)
    python -m benchmarks.audit.canaries --out /tmp/audit --quick   # smoke run (~1 min)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import build_trainer, provenance
from lit_dp import (
    ClipDrivenLR,
    DPAdamW,
    DPCausalLM,
    EMAWeights,
    PrivacyAccounting,
    SyntheticDataModule,
)
from lit_dp.data import ConstantBatchSize
from lit_dp.data.encoding import collate_rows, encode_records
from lit_dp.data.synthetic import plant_canaries
from lit_dp.privacy.clipping import PrivateQuantile


class AuditDataModule(SyntheticDataModule):
    """SyntheticDataModule whose training split holds canaries at several repetition counts.

    ``plan`` maps repetitions -> number of canaries; each group is planted with its own seed,
    users are renamed ``canary-r<reps>-<i>`` so they stay distinct across groups."""

    def __init__(self, plan: dict[int, int], **kwargs: Any) -> None:
        super().__init__(num_canaries=0, **kwargs)
        self.plan = dict(plan)

    def load_records(self) -> dict[str, list[dict[str, Any]]]:
        splits = super().load_records()
        train, self.canaries, seen = splits["train"], [], set()
        for reps, count in sorted(self.plan.items()):
            train, cans = plant_canaries(
                train, num_canaries=count, repetitions=reps, seed=self.data_seed * 1000 + reps
            )
            for i, c in enumerate(cans):
                if c["secret"] in seen:
                    raise ValueError(f"duplicate canary secret {c['secret']}")
                seen.add(c["secret"])
                new_user = f"canary-r{reps}-{i}"
                for rec in train:
                    if rec.get("user") == c["user"] and rec.get("response") == c["text"]:
                        rec["user"] = new_user
                c["user"] = new_user
            self.canaries.extend(cans)
        splits["train"] = train
        return splits


# --- scoring --------------------------------------------------------------------------------
@torch.no_grad()
def token_nll(
    model: torch.nn.Module, rows: list, pad_id: int, batch_size: int = 128
) -> list[torch.Tensor]:
    """Per-row (T-1,) NLL of each label token (0 where label is -100), row by row in batches."""
    out = []
    for s in range(0, len(rows), batch_size):
        b = collate_rows(rows[s : s + batch_size], pad_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        labels = b["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="none",
        ).view(labels.shape)
        out.extend(nll.masked_fill(labels == -100, 0.0))
    return out


def canary_exposure(
    model, tok, canary: dict[str, Any], num_candidates: int, seed: int, pad_id: int
) -> dict[str, Any]:
    rng = random.Random(f"audit:{seed}:{canary['secret']}")
    nd = canary["num_digits"]
    cands: set[str] = set()
    while len(cands) < num_candidates:
        c = f"{rng.randrange(10**nd):0{nd}d}"
        if c != canary["secret"]:
            cands.add(c)
    secrets = [canary["secret"], *sorted(cands)]
    suffix = canary["text"][len(canary["prefix"]) + nd :]
    recs = [
        {"prompt": canary["prompt"], "response": canary["prefix"] + s + suffix} for s in secrets
    ]
    rows = encode_records(tok, recs, loss_on="response")
    nll = token_nll(model, rows, pad_id)
    lengths = {len(ids) for ids, _ in rows}
    if len(lengths) == 1:  # score only the secret: the token columns where candidates differ
        ids = torch.tensor([r[0] for r in rows])
        differ = (ids != ids[0]).any(0)[1:]  # nll[t] scores token t + 1
        cols = differ.nonzero().flatten()
        span = slice(int(cols.min()), int(cols.max()) + 1)
        scores = torch.stack([n[span].sum() for n in nll])
        scored = "secret tokens"
    else:  # tokenizations differ in length: whole response (prefix/suffix common to all)
        scores = torch.stack([n.sum() for n in nll])
        scored = "whole response"
    true = float(scores[0])
    rank = 1 + int((scores[1:] < true).sum())
    return {
        "secret": canary["secret"],
        "repetitions": canary["repetitions"],
        "user": canary["user"],
        "rank": rank,
        "num_candidates": num_candidates,
        "exposure_bits": math.log2(num_candidates + 1) - math.log2(rank),
        "secret_nll": true,
        "median_candidate_nll": float(scores[1:].median()),
        "scored": scored,
    }


def auc_members_lower(member: np.ndarray, nonmember: np.ndarray) -> float:
    """P(member loss < non-member loss) + 0.5 P(tie), via average ranks (Mann-Whitney U)."""
    allv = np.concatenate([member, nonmember])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    ranks[order] = np.arange(1, len(allv) + 1)
    for v in np.unique(allv):  # average ties
        idx = allv == v
        if idx.sum() > 1:
            ranks[idx] = ranks[idx].mean()
    m, n = len(member), len(nonmember)
    u_nonmember = ranks[m:].sum() - n * (n + 1) / 2  # pairs where non-member loss > member loss
    return float(u_nonmember / (m * n))


def audit_model(model, dm, num_candidates: int, seed: int) -> dict[str, Any]:
    tok, pad_id = dm.tokenizer, dm._pad_id()
    was = model.training
    model.eval()
    try:
        exposures = [
            canary_exposure(model, tok, c, num_candidates, seed, pad_id) for c in dm.canaries
        ]
        train_rows = [
            row
            for rec, row in zip(dm.splits["train"], dm.encoded["train"], strict=True)
            if not str(rec.get("user", "")).startswith("canary-")
        ]
        test_rows = dm.encoded["test"]

        def mean_loss(rows):
            nll = token_nll(model, rows, pad_id, batch_size=16)
            return np.array(
                [
                    float(n.sum()) / max(1, sum(1 for x in lab if x != -100) - 0)
                    for n, (_, lab) in zip(nll, rows, strict=True)
                ]
            )

        tr, te = mean_loss(train_rows), mean_loss(test_rows)
    finally:
        model.train(was)
    by_rep: dict[int, list[float]] = {}
    for e in exposures:
        by_rep.setdefault(e["repetitions"], []).append(e["exposure_bits"])
    return {
        "canaries": exposures,
        "mean_exposure_by_repetitions": {
            str(r): float(np.mean(v)) for r, v in sorted(by_rep.items())
        },
        "mia_auc": auc_members_lower(tr, te),
        "train_loss": float(tr.mean()),
        "test_loss": float(te.mean()),
        "num_members": len(tr),
        "num_nonmembers": len(te),
    }


# --- one run ----------------------------------------------------------------------------------
def run_one(
    cfg: dict[str, Any], epsilon: float | None, args, unit: str = "example", untrained: bool = False
) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    # One mailbox owner per email: "example" and "group" (user-level, each canary's k copies are
    # one user) then train on the same text; only the privacy unit differs.
    dm = AuditDataModule(
        plan=cfg["plan"],
        tokenizer=args.model,
        dataset="emails",
        num_train=cfg["num_train"],
        num_val=0,
        num_test=cfg["num_test"],
        max_length=512,
        privacy_unit=unit,
        num_users=cfg["num_train"] + cfg["num_test"],
        batch_schedule=ConstantBatchSize(cfg["batch"]),
        sampling_seed=args.seed,
        data_seed=args.seed,
    )
    private = epsilon is not None
    module = DPCausalLM(
        model=args.model,
        private=private,
        noise_multiplier="auto" if private else 0.0,
        optimizer=partial(DPAdamW, lr=cfg["lr"]),
        eval_before_fit=False,
        # divisor 4 (default 20): the quantile count noise (std B/divisor) must
        # exceed sigma/2, which the small audit batches need (B = 16 here).
        # rho* 0.2 (the paper's example) and its clip-driven lr, as the committed results used
        clipping=PrivateQuantile(
            target_clip_rate=0.2, count_noise_divisor=args.count_noise_divisor
        ),
        noise_seed=args.seed,
        max_physical_batch_size=cfg["batch"] * 2,
    )
    ema = EMAWeights(decay=0.99)
    trainer = build_trainer(  # no validation: the audit scores the model itself afterwards
        max_steps=cfg["steps"],
        callbacks=[ema, ClipDrivenLR(adaptive=True), PrivacyAccounting(target_epsilon=epsilon)],
    )
    t0 = time.perf_counter()
    if untrained:  # the common starting point: what the attacks see before any training
        dm.setup("fit")
    else:
        trainer.fit(module, datamodule=dm)
    train_s = time.perf_counter() - t0
    desc = module.privacy_description() if private else {}
    raw = audit_model(module.model, dm, cfg["candidates"], args.seed)
    with ema.swapped(module):
        ema_res = audit_model(module.model, dm, cfg["candidates"], args.seed)
    label = "untrained" if untrained else "non-private" if epsilon is None else f"eps={epsilon:g}"
    if unit == "group":
        label += " user-level"
    return {
        "label": label,
        "target_epsilon": epsilon,
        "privacy_unit": unit,
        "steps": int(trainer.global_step),
        "noise_multiplier": float(module.noise_multiplier) if private else 0.0,
        "privacy": json.loads(json.dumps(desc, default=str)),
        "train_seconds": train_s,
        "num_train_units": dm.num_units,
        "ema": ema_res,
        "raw": raw,
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 5.4), gridspec_kw={"width_ratios": [2, 1]})
    R = results["config"]["candidates"]
    reps = sorted(results["config"]["plan"])
    for run in results["runs"]:
        m = run["ema"]["mean_exposure_by_repetitions"]
        ys = [m[str(r)] for r in reps]
        (line,) = ax.plot(
            reps, ys, marker="o", label=f"{run['label']} (sigma={run['noise_multiplier']:.2f})"
        )
        pts = [(c["repetitions"], c["exposure_bits"]) for c in run["ema"]["canaries"]]
        ax.scatter(
            [p[0] for p in pts], [p[1] for p in pts], color=line.get_color(), alpha=0.35, s=18
        )
    ax.axhline(1 / math.log(2), color="gray", ls="--", lw=1, label="chance (1/ln2 = 1.44 bits)")
    ax.axhline(math.log2(R + 1), color="black", ls=":", lw=1, label=f"max = log2({R}+1)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(reps, [str(r) for r in reps])
    ax.set_xlabel("canary repetitions in training set")
    ax.set_ylabel("exposure (bits; line = mean, dots = canaries)")
    ax.set_ylim(0, math.log2(R + 1) + 0.8)
    ax.set_title(
        f"Canary exposure, {results['config']['model']}, {results['config']['steps']} steps (EMA "
        "weights)"
    )
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    labels = [r["label"] for r in results["runs"]]
    ax2.bar(labels, [r["ema"]["mia_auc"] for r in results["runs"]], color="tab:gray")
    ax2.axhline(0.5, color="black", ls="--", lw=1)
    ax2.set_ylim(0.3, 1.0)
    ax2.set_ylabel("loss-threshold MIA AUC")
    ax2.set_title("Membership inference (train vs test)")
    ax2.tick_params(axis="x", labelsize=8, labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--quick", action="store_true", help="small smoke run (~1 min)")
    p.add_argument("--model", default="tiny-qwen2")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--num-train", type=int, default=None)
    p.add_argument("--candidates", type=int, default=None)
    p.add_argument("--epsilons", default="1,4,8", help="comma list; non-private is always run")
    p.add_argument(
        "--user-level-epsilons",
        default="8",
        help="comma list of epsilons also run with privacy_unit=group ('' for none)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count-noise-divisor", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        cfg = {
            "plan": {1: 1, 4: 1, 16: 1},
            "num_train": 32,
            "num_test": 16,
            "batch": 8,
            "steps": 20,
            "lr": 5e-3,
            "candidates": 200,
        }
    else:
        cfg = {
            "plan": {1: 2, 4: 2, 16: 2},
            "num_train": 64,
            "num_test": 64,
            "batch": 16,
            "steps": 150,
            "lr": 5e-3,
            "candidates": 1000,
        }
    for k in ("steps", "lr", "num_train", "candidates"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    plan = [(None, "example", True), (None, "example", False)]
    plan += [(float(e), "example", False) for e in args.epsilons.split(",") if e.strip()]
    plan += [(float(e), "group", False) for e in args.user_level_epsilons.split(",") if e.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "audit_quick" if args.quick else "audit"
    results = {
        "config": {
            **cfg,
            "model": args.model,
            "seed": args.seed,
            "dataset": "emails",
            "clipping": "private_quantile (DP runs)",
            "count_noise_divisor": args.count_noise_divisor,
            "ema_decay": 0.99,
            "threads": args.threads,
            "chance_exposure_bits": 1 / math.log(2),
            **provenance("lit_dp", "benchmarks/audit", "benchmarks/common"),
        },
        "runs": [],
    }
    t0 = time.perf_counter()
    for eps, unit, untrained in plan:
        r = run_one(cfg, eps, args, unit, untrained)
        results["runs"].append(r)
        print(
            f"[{time.perf_counter() - t0:6.0f}s] {r['label']}: sigma={r['noise_multiplier']:.3f} "
            f"train {r['train_seconds']:.0f}s "
            f"exposure(EMA)={r['ema']['mean_exposure_by_repetitions']} "
            f"raw={r['raw']['mean_exposure_by_repetitions']} AUC={r['ema']['mia_auc']:.3f}",
            flush=True,
        )
    results["config"]["total_seconds"] = time.perf_counter() - t0
    results["config"]["plan"] = {int(k): v for k, v in cfg["plan"].items()}
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str))
    plot(results, out / f"{stem}.png")
    reps = sorted(cfg["plan"])
    hdr = [
        "run",
        "sigma",
        *[f"exp r={r}" for r in reps],
        *[f"raw r={r}" for r in reps],
        "MIA AUC",
        "train/test loss",
    ]
    print("\n| " + " | ".join(hdr) + " |\n|" + "---|" * len(hdr))
    for r in results["runs"]:
        e, w = r["ema"]["mean_exposure_by_repetitions"], r["raw"]["mean_exposure_by_repetitions"]
        print(
            "| "
            + " | ".join(
                [
                    r["label"],
                    f"{r['noise_multiplier']:.2f}",
                    *[f"{e[str(x)]:.2f}" for x in reps],
                    *[f"{w[str(x)]:.2f}" for x in reps],
                    f"{r['ema']['mia_auc']:.3f}",
                    f"{r['ema']['train_loss']:.3f}/{r['ema']['test_loss']:.3f}",
                ]
            )
            + " |"
        )
    print(
        f"\nwrote {out / (stem + '.json')} and {out / (stem + '.png')} "
        f"({results['config']['total_seconds']:.0f}s)"
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
