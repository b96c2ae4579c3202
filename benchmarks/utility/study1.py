"""Utility per epsilon: DP-Adam-AC, its parts and its baselines on runs long enough to separate.

Two model organisms (``organisms.py``): a ~3M-parameter Llama-style decoder with its own
BPE tokenizer, pretrained non-privately on public ``emails`` text, and its BitNet b1.58 twin
(ternary QAT from the first pretraining step). Each is then fine-tuned with DP on the private
``records`` data (a domain shift: a general model adapted to a clinic's registry), N = 4000
privacy units, expected batch 64, 300 steps, delta and accountant the library's defaults.

Phases (each derived from the results file, so rerunning the script continues the study):
  1. learning rates on seed 0 at epsilon 8: >= 3 per family (dp-adam-ac, dp-adamw, dp-sgd,
     nonprivate); a grid whose best point is at an edge grows by one point on that side
  2. each family's best learning rate on seeds 1, 2
  3. ablations at the tuned rates, seeds 0-2: dp-adam-ac-no-clip-lr, dp-adam-ac-fixed-clip,
     dp-adambc (dp-adam-ac-no-ema comes from every dp-adam-ac run: EMA is post-processing)
  4. epsilon curve: dp-adam-ac and dp-sgd at epsilon 1, 2, 4, seeds 0-2
  5. BitNet twin: dp-adam-ac, dp-sgd, nonprivate at epsilon 8, rates tuned on seed 0, 3 seeds

    python -m benchmarks.utility.study1 --plan       # the run list, count and estimated time
    python -m benchmarks.utility.study1              # run (or continue) the whole study
    python -m benchmarks.utility.study1 --phase 1 --max-runs 5   # a sitting: five runs of phase 1
    nohup python -m benchmarks.utility.study1 --threads 2 > utility.log 2>&1 &   # in the background
    python -m benchmarks.utility.study1 --report     # tables, the study's limits (limits.py), plots
    python -m benchmarks.utility.study1 --quick --out /tmp/u.json   # smoke test, tiny models, ~20 s
    python -m benchmarks.utility.study1 --recipe smollm2-lora       # GPU: SmolLM2-135M with LoRA

Results: benchmarks/results/utility.json (utility_gpu.json for the GPU recipe). Each finished
run is appended atomically; a run already in the file (same model, variant, epsilon, seed, lr)
is skipped. All runs of one file must come from one commit (--allow-mixed-commits to override).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from benchmarks.common import CODE_PATHS, RESULTS, git_commit
from benchmarks.common.results import load_results, write_atomic
from benchmarks.common.results import release_claim as release
from benchmarks.utility.organisms import OrganismConfig, cache_root, organism_dir
from benchmarks.utility.plan import (
    EPS_MAIN,
    Recipe,
    RunSpec,
    lr_grid,
    plan,
    record_key,
    spec_key,
    tuned_grid,
)
from benchmarks.utility.results import append_runs, check_or_create, claim_next, selected
from benchmarks.utility.train import VARIANTS

__all__ = [
    "RECIPES",
    "RunSpec",
    "append_runs",
    "check_or_create",
    "claim_next",
    "load_results",
    "main",
    "plan",
    "release",
    "spec_key",
    "tuned_grid",
    "write_atomic",
]

_ADAM = lr_grid(1e-3)  # 3.16e-4, 1e-3, 3.16e-3
RECIPES: dict[str, Recipe] = {
    "cpu": Recipe(
        name="cpu",
        results="utility.json",
        organisms={
            "slm": OrganismConfig(name="slm"),
            "bitnet": OrganismConfig(name="bitnet", bitnet=True),
        },
        # Centred by 100-step probes at epsilon 8 (slm): DP-SGD diverged at 1.0, was unstable at
        # 0.316 and fell fastest at 0.1; DP-Adam-AC learned steadily at 1e-3. Ternary latent
        # weights move by whole quantization steps, so the twin's Adam grids sit higher.
        grids={
            ("*", "dp-adam-ac"): _ADAM,
            ("*", "dp-adamw"): _ADAM,
            ("*", "nonprivate"): _ADAM,
            ("*", "dp-sgd"): lr_grid(0.1),
            ("bitnet", "dp-adam-ac"): lr_grid(3.16e-3),
            ("bitnet", "nonprivate"): lr_grid(3.16e-3),
        },
        # CPU seconds of one run with one thread (measured: slm dp-adam-ac 336 s)
        seconds_per_run={"slm": 340.0, "bitnet": 440.0},
    ),
    "smollm2-lora": Recipe(
        name="smollm2-lora",
        results="utility_gpu.json",
        accelerator="auto",
        organisms={
            "slm": OrganismConfig(
                name="smollm2",
                base="smollm2-135m-instruct",
                steps=1000,
                batch_size=64,
                lr=1e-4,
                warmup_steps=50,
                num_public=20000,
            ),
            "bitnet": OrganismConfig(
                name="smollm2-bitnet",
                base="smollm2-135m-instruct",
                bitnet=True,
                steps=3000,
                batch_size=64,
                lr=3e-4,
                warmup_steps=100,
                num_public=20000,
            ),
        },
        num_train=16000,
        num_val=1000,
        expected_batch_size=512.0,
        steps=1000,
        val_every=100,
        eval_batch_size=128,
        max_physical_batch_size=512,
        lora_rank=16,
        lora_alpha=32.0,
        ema_sweep=(0.9, 0.95, 0.99),  # the warm-up caps decays at 0.991 by step 1000
        grids={
            ("*", "dp-adam-ac"): lr_grid(3.16e-3),
            ("*", "dp-adamw"): lr_grid(3.16e-3),
            ("*", "nonprivate"): lr_grid(1e-3),
            ("*", "dp-sgd"): lr_grid(1.0),
        },
        seconds_per_run={"slm": 240.0, "bitnet": 300.0},
    ),
    "quick": Recipe(
        name="quick",
        results="utility_quick.json",
        organisms={
            "slm": OrganismConfig(
                name="quick-slm",
                vocab_size=320,
                hidden_size=32,
                intermediate_size=64,
                num_layers=2,
                num_heads=2,
                num_kv_heads=1,
                num_public=120,
                num_public_val=16,
                steps=8,
                batch_size=8,
                max_length=160,
                lr=3e-3,
                warmup_steps=2,
            ),
            "bitnet": OrganismConfig(
                name="quick-bitnet",
                bitnet=True,
                vocab_size=320,
                hidden_size=32,
                intermediate_size=64,
                num_layers=2,
                num_heads=2,
                num_kv_heads=1,
                num_public=120,
                num_public_val=16,
                steps=8,
                batch_size=8,
                max_length=160,
                lr=3e-3,
                warmup_steps=2,
            ),
        },
        num_train=96,
        num_val=8,
        expected_batch_size=16.0,
        steps=3,
        val_every=2,
        max_length=160,
        eval_batch_size=8,
        trace_every=1,
        ema_sweep=(0.9,),
        seeds=(0,),
        ablations=("dp-adambc",),
        curve_epsilons=(),
        bitnet_families=("dp-adam-ac",),
        grids={("*", f): (3e-3,) for f in ("dp-adam-ac", "dp-adamw", "nonprivate")}
        | {("*", "dp-sgd"): (0.3,)},
        max_extensions=0,
        seconds_per_run={"slm": 2.0, "bitnet": 2.0},
    ),
}


def make_setup(
    recipe: Recipe, organisms: dict[str, Path], *, device: str = "cpu"
) -> dict[str, Any]:
    """Models, private data, run length, delta, and each organism's pretrained losses."""
    from benchmarks.utility.organisms import mean_token_nll, organism_fingerprint, organism_info
    from lit_dp.callbacks.accounting import default_delta
    from lit_dp.data.encoding import encode_records
    from lit_dp.data.synthetic import make_splits
    from lit_dp.models import load_model, load_tokenizer

    val = make_splits(
        "records",
        num_train=recipe.num_train,
        num_val=recipe.num_val,
        num_test=0,
        seed=recipe.data_seed,
    )["validation"]
    models = {}
    for name, path in organisms.items():
        info = organism_info(path)
        tok = load_tokenizer(str(path))
        model = load_model(str(path), dtype="float32", device=device)
        rows = encode_records(tok, val, loss_on="response")
        models[name] = {
            "organism": info["key"],
            "config": info["config"],
            "parameters": info["parameters"],
            "vocab_size": info["vocab_size"],
            "pretrain_seconds": info["pretrain_seconds"],
            "pretrain_device": info["device"],
            "pretrained_val_loss_public_emails": info["public_val_loss"],
            "weights_sha256": organism_fingerprint(path),
            "pretrained_val_loss": mean_token_nll(
                model, rows, pad_id=tok.pad_token_id, device=device
            ),
        }
    return {
        "recipe": recipe.name,
        "models": models,
        "private_data": "synthetic records",
        "num_train": recipe.num_train,
        "num_val": recipe.num_val,
        "data_seed": recipe.data_seed,
        "privacy_unit": "example",
        "expected_batch_size": recipe.expected_batch_size,
        "sample_rate": recipe.expected_batch_size / recipe.num_train,
        "steps": recipe.steps,
        "val_every": recipe.val_every,
        "delta": default_delta(recipe.num_train),
        "max_grad_norm": recipe.max_grad_norm,
        "target_clip_rate": recipe.target_clip_rate,
        "lora_rank": recipe.lora_rank,
        "ema_decay": "library default",
        "epsilon_main": EPS_MAIN,
        "seeds": list(recipe.seeds),
    }


# --- running ------------------------------------------------------------------------------------
def _estimate(recipe: Recipe, runs: list[dict[str, Any]], model: str) -> float:
    """Seconds per training of ``model``: the mean of finished ones, else the recipe's guess."""
    done = [r["seconds"] for r in runs if r["model"] == model and not r.get("derived_from")]
    return sum(done) / len(done) if done else recipe.seconds_per_run.get(model, 120.0)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def print_plan(recipe: Recipe, runs: list[dict[str, Any]], args: argparse.Namespace) -> None:
    done = {record_key(r) for r in runs}
    specs = [s for s in plan(recipe, runs) if selected(s, args)]
    todo = [s for s in specs if spec_key(s) not in done]
    print(
        f"recipe {recipe.name}: N={recipe.num_train}, E[B]={recipe.expected_batch_size:g}, "
        f"{recipe.steps} steps, validation every {recipe.val_every}; models "
        + ", ".join(f"{m}={c.key()}" for m, c in recipe.organisms.items())
    )
    print("phase | model | variant | epsilon | seed | lr | status")
    for s in specs:
        lr = "tuned (pending)" if s.lr is None else f"{s.lr:g}"
        status = "done" if spec_key(s) in done else "todo"
        print(f"{s.phase} | {s.model} | {s.variant} | {s.epsilon} | {s.seed} | {lr} | {status}")
    seconds = sum(_estimate(recipe, runs, s.model) for s in todo)
    print(
        f"{len(specs)} trainings ({len(specs) - len(todo)} done, {len(todo)} to run; "
        f"dp-adam-ac-no-ema is recorded from every dp-adam-ac run).\nEstimated time to run: "
        f"{_hms(seconds)} in one process, {_hms(seconds / 2)} in two processes sharing the "
        "file (per run: the mean of the finished runs, else the recipe's one-thread guess; "
        "each grid that grows at an edge adds a run)"
    )
    missing = [
        m
        for m, c in recipe.organisms.items()
        if not (organism_dir(c, cache_root(args.cache_dir)) / "organism.json").exists()
    ]
    if missing:
        print(f"organisms to pretrain first: {', '.join(missing)}")


def run_study(recipe: Recipe, out: Path, args: argparse.Namespace) -> None:
    import torch

    from benchmarks.utility.organisms import build_organism, organism_fingerprint
    from benchmarks.utility.train import train_one

    device = "cuda" if recipe.accelerator != "cpu" and torch.cuda.is_available() else "cpu"
    root = cache_root(args.cache_dir)
    start = time.time()
    organisms = {m: build_organism(c, root, device=device) for m, c in recipe.organisms.items()}
    print(f"organisms ready ({time.time() - start:.0f} s)", flush=True)
    check_or_create(
        out,
        recipe,
        lambda: make_setup(recipe, organisms, device=device),
        fingerprints={m: organism_fingerprint(p) for m, p in organisms.items()},
        allow_mixed=args.allow_mixed_commits,
    )
    commit = git_commit(*CODE_PATHS)
    ran, session = 0, time.time()
    while args.max_runs is None or ran < args.max_runs:
        spec, todo, others = claim_next(out, recipe, args)
        if spec is None:
            if others and todo:  # other processes run what the remaining runs wait for
                time.sleep(30)
                continue
            waiting = f" ({len(todo)} wait for rates of unselected runs)" if todo else ""
            print(f"nothing left to run{waiting}", flush=True)
            break
        try:
            records = train_one(spec, recipe, organisms[spec.model])
            for r in records:
                r["commit"] = commit
            append_runs(out, records)
        finally:
            release(out, spec_key(spec))
        ran += 1
        runs = load_results(out)["runs"]
        left = sum(_estimate(recipe, runs, s.model) for s in todo[1:])
        r = records[0]
        spent = r["epsilon_spent"]
        print(
            f"[{ran}{'' if args.max_runs is None else f'/{args.max_runs}'}, {len(todo) - 1} left] "
            f"phase {spec.phase} {spec.model} {spec.variant} eps={spec.epsilon} seed={spec.seed} "
            f"lr={spec.lr:g}: val {r['val_loss_curve'][0]['loss']:.3f} -> {r['val_loss']:.3f} "
            f"({r['weights']}; sigma={r['noise_multiplier']:.3f}, eps spent="
            f"{'-' if spent is None else f'{spent:.3f}'}) in {r['seconds']:.0f} s "
            f"({r['cpu_seconds']:.0f} CPU s); session {_hms(time.time() - session)}, "
            f"ETA {_hms(left / max(1, others + 1))}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="cpu")
    ap.add_argument("--quick", action="store_true", help="= --recipe quick (smoke test)")
    ap.add_argument("--gpu", action="store_true", help="= --recipe smollm2-lora")
    ap.add_argument("--out", default=None, help="results JSON (default results/<recipe file>)")
    ap.add_argument(
        "--cache-dir",
        default=None,
        help="organism cache (default $LIT_DP_CACHE/utility, i.e. ~/.cache/lit_dp/utility)",
    )
    ap.add_argument("--plan", action="store_true", help="print the runs and time, run nothing")
    ap.add_argument("--report", action="store_true", help="tables and plots from --out")
    ap.add_argument("--phase", type=int, action="append", help="only this phase (repeatable)")
    ap.add_argument("--only", action="append", help="only this variant (repeatable)")
    ap.add_argument("--model", action="append", choices=["slm", "bitnet"])
    ap.add_argument("--max-runs", type=int, default=None, help="stop after this many trainings")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--allow-mixed-commits", action="store_true")
    args = ap.parse_args(argv)
    name = "quick" if args.quick else "smollm2-lora" if args.gpu else args.recipe
    recipe = RECIPES[name]
    out = Path(args.out) if args.out else RESULTS / recipe.results
    bad = sorted(set(args.only or []) - set(VARIANTS))
    if bad:
        ap.error(f"--only: unknown variants {bad}; choose from {sorted(VARIANTS)}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.report:
        from benchmarks.utility.report import report

        print(report(out))
        return
    runs = load_results(out).get("runs", [])
    if args.plan:
        print_plan(recipe, runs, args)
        return
    run_study(recipe, out, args)


if __name__ == "__main__":
    main()
