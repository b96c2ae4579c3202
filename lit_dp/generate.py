"""``lit-dp generate``: responses from an exported (EMA, DP) model for prompts in a JSONL file.

    lit-dp generate --model runs/lit_dp/version_0/export --prompts prompts.jsonl --out out.jsonl

Each input line is {"prompt": ...} (other fields are kept); each output line adds "response".
Generation is post-processing of the private weights: it costs no privacy budget.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm


def read_prompts(path: Path, field: str) -> list[dict]:
    """JSON objects of a JSONL file, each with a string ``field``; ValueError names a bad line."""
    if not path.is_file():
        raise ValueError(f"--prompts file {str(path)!r} does not exist")
    from lit_dp.data.jsonl import jsonl_lines

    rows = []
    for lineno, line in jsonl_lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno} is not valid JSON ({err.msg})") from err
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise ValueError(f"{path}:{lineno} has no string field {field!r}")
        rows.append(obj)
    if not rows:
        raise ValueError(f"--prompts file {str(path)!r} is empty")
    return rows


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``lit-dp generate``: parse ``argv`` and write a response for each prompt."""
    parser = argparse.ArgumentParser(prog="lit-dp generate", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", required=True, help="exported model directory (or any model source)"
    )
    parser.add_argument(
        "--prompts", required=True, type=Path, help="JSONL file with a prompt field"
    )
    parser.add_argument("--out", required=True, type=Path, help="JSONL file to write")
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: the free cores)"
    )
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or args.batch_size < 1:
        parser.error("--max-new-tokens and --batch-size must be >= 1")
    from lit_dp.threads import set_torch_threads

    note = set_torch_threads(args.threads)
    if note:
        print(note)

    from lit_dp import models
    from lit_dp.export import generate

    rows = read_prompts(args.prompts, args.prompt_field)
    model = models.load_model(args.model)
    model.eval()
    tokenizer = models.load_tokenizer(args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as fh:
        for start in tqdm(range(0, len(rows), args.batch_size), desc="generate", unit="batch"):
            chunk = rows[start : start + args.batch_size]
            outs = generate(
                model,
                tokenizer,
                [r[args.prompt_field] for r in chunk],
                max_new_tokens=args.max_new_tokens,
            )
            for row, text in zip(chunk, outs, strict=True):
                fh.write(json.dumps({**row, "response": text}) + "\n")
    print(f"wrote {len(rows)} responses to {args.out}")
