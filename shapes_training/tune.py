"""Grid search over edit settings on a shapes model, scored by the shapes eval.

    python -m shapes_training.tune --model shapes --cases 40 \\
        --grid '{"lr": [0.05, 0.1], "guidance": [7.5, 15]}' --methods dds,sds --out tune.jsonl

Every combination of the grid's values is applied over the model's and each method's defaults
(``Editor.config(method, ...)``, as ``ddsedit eval-shapes`` does) and scored on the same fresh
recolour cases (seeded apart from `ddsedit eval-shapes`' cases, so the settings chosen here are not
judged on the cases they were chosen on). One JSON line per setting and method goes to stdout and to
``--out``, with every case's IoU (``case_iou``) for paired comparisons between lines.
The defaults a model ships are chosen from these lines and confirmed with ``ddsedit eval-shapes``.
``--start-at-target`` starts every edit at the right answer instead: where a
setting then ends bounds what it can reach (the drift it adds by itself).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

from ddsedit.methods import get_method, method_names

TUNE_SEED = 123  # eval-shapes uses seed 0 by default: keep tuning cases apart from the reported ones


def grid_settings(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, as a list of override dicts (in a stable order)."""
    keys = sorted(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def method_settings(methods: list[str], grid: dict[str, list[Any]]) -> list[tuple[str, dict[str, Any]]] | str:
    """The runs: each method over the combinations of only the grid keys it reads (a key no method reads, or a
    method that reads none while the grid has keys, is a mistake: the message, as a string)."""
    readers = {key: [m for m in methods if key in get_method(m).reads({key: None})] for key in grid}
    unread = [key for key, who in readers.items() if not who]
    if unread:
        return f"no method of {', '.join(methods)} reads the grid key {unread[0]!r}"
    plan: list[tuple[str, dict[str, Any]]] = []
    for method in methods:
        own = {key: values for key, values in grid.items() if method in readers[key]}
        plan += [(method, overrides) for overrides in grid_settings(own)]
    return plan


def _own_options(config: Any) -> dict[str, Any]:
    from ddsedit.settings import option_names

    return {key: value for key, value in config.settings().items() if key in option_names(config.options)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shapes_training.tune", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--seed", type=int, default=TUNE_SEED)
    parser.add_argument("--grid", required=True, help='JSON object: setting -> list of values, e.g. {"lr": [0.1]}')
    parser.add_argument("--methods", default="dds", help="comma-separated, from: " + ", ".join(method_names()))
    parser.add_argument("--start-at-target", action="store_true", help="start at the right answer (a bound)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file too")
    args = parser.parse_args(argv)

    from ddsedit.loading import quiet_third_party_output

    quiet_third_party_output()
    from ddsedit.editor import Editor
    from ddsedit.shapes import evaluate

    methods = args.methods.split(",")
    unknown = [method for method in methods if method not in method_names()]
    if unknown:
        parser.error(f"unknown method {', '.join(unknown)}; choose from {', '.join(method_names())}")
    try:
        grid = json.loads(args.grid)
    except json.JSONDecodeError as error:
        parser.error(f"--grid is not JSON: {error}")
    if not isinstance(grid, dict) or not all(isinstance(values, list) for values in grid.values()):
        parser.error("--grid must be a JSON object of lists")
    plan = method_settings(methods, grid)
    if isinstance(plan, str):
        parser.error(plan)
    editor = Editor.from_pretrained(args.model, device=args.device)
    cases = evaluate.recolour_cases(args.cases, seed=args.seed)
    for method, overrides in plan:
        # Each method over its own defaults: one shared config would give ids cds's CUT weight.
        config = editor.config(method, **overrides)
        config.validate(editor.components.num_train_timesteps)
        if problem := get_method(method).problem(config, editor.components.num_train_timesteps):
            parser.error(problem)
        start = time.time()
        images, masks = evaluate.run_edits(editor, cases, method, config, batch_size=args.batch_size,
                                           start_at_target=args.start_at_target)  # fmt: skip
        scores = [evaluate.score_edit(c, i, m) for c, i, m in zip(cases, images, masks, strict=True)]
        summary = evaluate.summarise(cases, scores)
        record = {
            "method": method, **_own_options(config), **overrides,
            "start_at_target": args.start_at_target, **{k: round(v, 4) for k, v in summary.items()},
            "seconds": round(time.time() - start, 1), "case_iou": [round(score.iou, 4) for score in scores],
        }  # fmt: skip
        line = json.dumps(record)
        print(line, flush=True)
        if args.out is not None:
            with args.out.open("a") as handle:
                handle.write(line + "\n")


if __name__ == "__main__":
    main()
