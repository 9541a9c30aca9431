"""Command line: `python -m effnet_fast {info,summary,bench,train,predict,export}` (or `effnet-fast ...`).

Bad values are refused by the parser (exit code 2, a message naming the option). Each
command module adds its own subcommand with `add_command(subparsers)`, whose `check`
validates the options and returns what the command loaded (data, weights; or None) and
whose `func(args, inputs)` runs it."""
import argparse
import json
import os
import sys

from ..ops.backends import build_info
from . import bench, export, predict, summary, train
from .args import HelpFormatter

COMMANDS = (summary, bench, train, predict, export)
DESCRIPTION = ("EfficientNet B0-B7 with fused kernels: `effnet-fast COMMAND --help` for each command.\n"
               "Bad values are refused with exit code 2 and a message naming the option.")


def cmd_info(args, _inputs=None):
    print(json.dumps(build_info(), indent=2))


def build_parser():
    parser = argparse.ArgumentParser(prog="effnet-fast", description=DESCRIPTION, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="which backends are built, and whether a CUDA device is there",
                   formatter_class=HelpFormatter).set_defaults(func=cmd_info)
    for command in COMMANDS:
        command.add_command(sub)
    return parser


def parse(argv=None):
    """(options, inputs) of a command line: the checked options, and what the command's
    check loaded (the training data and weights, predict's model; None for the others).
    Exits with code 2 and a message naming the option on a bad value."""
    args = build_parser().parse_args(argv)
    check = getattr(args, "check", None)
    return args, check(args) if check is not None else None


def parse_args(argv=None):
    """The checked options of a command line (see `parse`)."""
    return parse(argv)[0]


def main(argv=None):
    args, inputs = parse(argv)
    try:
        args.func(args, inputs)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`effnet-fast info | head`): stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
