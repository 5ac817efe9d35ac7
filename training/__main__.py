"""python -m training <command> --help

`trust`, formerly the dermoscopy check's command, still runs `dermoscopy-check` (ALIASES; not listed in --help).
"""
from __future__ import annotations

import argparse
import json
import sys

COMMANDS = {
    "split": ("training.common.split", "write the lesion-grouped 60/20/20 splits.csv and print its hash"),
    "train": ("training.network.train", "train one model (add --teacher to distil)"),
    "grid": ("training.study.grid", "distillation grid search over alpha x T, selected on validation"),
    "evaluate": ("training.evaluation.evaluate", "checkpoints on the test split: table, confusion matrices, report"),
    "evaluate-release": ("training.evaluation.evaluate_release", "a release as served, on any labelled set"),
    "export": ("training.release.export", "write the release state_dict + meta.json pair"),
    "calibrate": ("training.release.calibrate",
                  "fit the softmax temperature on validation, report test ECE, then run concern"),
    "concern": ("training.release.concern", "choose on validation when an answer urges an examination; test figures"),
    "dermoscopy-check": ("training.dermoscopy.check",
                         "fit the dermoscopy check ('uncertain' / 'not_dermoscopy'); refusals per class and shift"),
    "compare-releases": ("training.evaluation.compare_releases",
                         "releases scored on validation (plain + shifted): which one serves by default"),
    "model-card": ("training.release.model_card", "render model_card.md from meta.json + results.json"),
    "quantize": ("training.release.quantize", "int8 ResNet18 + fp32 vs int8 size/speed/metrics comparison"),
    "all": ("training.study.pipeline", "the whole study end to end (resumable: --resume)"),
    "status": ("training.study.status", "where a study stands: runs, epochs, steps after training, time left"),
    "accelerator": ("training.study.accelerator", "the whole study inside a time budget, packed into <= 8 small files"),
    "unpack": ("training.study.unpack", "rebuild a release folder from what an accelerator run packed"),
}
ALIASES = {"trust": "dermoscopy-check"}  # former names: run as the command they name, under its name


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    argv = [ALIASES.get(argv[0], argv[0]), *argv[1:]] if argv else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = argparse.ArgumentParser(prog="python -m training", description="HAM10000 training pipeline.")
        sub = parser.add_subparsers(dest="command", metavar="COMMAND")
        for name, (_, help_text) in COMMANDS.items():
            sub.add_parser(name, help=help_text)
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}")
        parser.print_help()
        return 0 if argv else 2
    import importlib

    from skinmodel.release import ReleaseError
    from training.common.checkpoint import StudyError
    from training.common.data import DataError

    module = importlib.import_module(COMMANDS[argv[0]][0])
    parser = module.get_args_parser()
    parser.prog = f"python -m training {argv[0]}"
    args = parser.parse_args(argv[1:])
    try:
        module.main(args)
    except (DataError, StudyError, ReleaseError, FileNotFoundError, json.JSONDecodeError) as exc:
        # The project's own refusals, phrased for people; anything else (a torch shape bug) keeps its traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: the last completed epoch is in last.pt; rerun with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
