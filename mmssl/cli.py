"""The `mmssl` console script: a thin dispatcher to each subcommand's `main(argv)`.

Subcommand modules are imported only when called, so `mmssl --help` stays instant and
`import mmssl` never pulls in DeepSpeed or WebDataset.
"""

from __future__ import annotations

import difflib
import importlib
import sys

from mmssl.cliargs import tolerant_streams

# name -> (module with `main(argv: list[str] | None) -> int`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "smoke": ("mmssl.smoke", "build a registry model and run one forward/backward pass"),
    "tokenizer": ("mmssl.tokenizer.train", "train a tokenizer: mmssl tokenizer train ..."),
    "shards": ("mmssl.data.shards", "write WebDataset shards from folders, CSV/JSONL or text"),
    "demo-data": ("mmssl.data.demo", "write the built-in demo shards (coloured digits, text)"),
    "train": ("mmssl.train.cli", "train from a recipe: mmssl train RECIPE.yaml key=value ..."),
    "export": (
        "mmssl.train.export",
        "export a run's checkpoint to model.safetensors + config.json",
    ),
    "plan": ("mmssl.train.plan", "estimate memory and step time of a recipe on a cluster"),
    "eval": ("mmssl.eval.cli", "evaluate a model: zeroshot, retrieval, fewshot, linear, lm ..."),
    "features": ("mmssl.eval.features", "extract features from shards to safetensors"),
    "demo": ("mmssl.demo", "the end-to-end demo: data, pretraining, export, evaluation"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: mmssl COMMAND [ARGS ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`mmssl COMMAND ...`: runs the subcommand's `main(rest)` and returns its exit code (2 for an
    unknown or missing command, 0 for --help)."""
    tolerant_streams()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # a mistake, as argparse treats a missing subcommand: the usage on stderr, 2
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        # one line, as every other bad argument (mmssl.cliargs); `mmssl --help` lists them all
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        print(
            f"mmssl: error: unknown command {name!r}; {hint}choose from {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
