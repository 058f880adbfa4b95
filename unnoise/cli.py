"""Command line: argument parsing only; the work lives in the package's modules."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit status 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="unnoise", description="Diffusion models: train, sample, evaluate.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    demo = sub.add_parser("demo", help="train a small model on built-in data; write pictures and figures")
    demo.add_argument("--steps", type=_positive_int, default=4000, help="training steps (default 4000, ~30 s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", type=Path, default=Path("unnoise-demo"), help="output folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from unnoise.demo import DemoConfig, run_demo

            run_demo(DemoConfig(steps=args.steps, seed=args.seed, out=args.out))
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"unnoise {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unnoise {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
