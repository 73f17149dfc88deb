"""The `wanx` command line. Subcommands map to functions; torch is imported only inside them
so that `wanx --help` answers at once."""

from __future__ import annotations

import argparse
import sys


def cmd_info(args: argparse.Namespace) -> int:
    from .loading import inspect_checkpoint

    for i, path in enumerate(args.paths):
        if i:
            print()
        print(inspect_checkpoint(path).summary())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.workdir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wanx", description="Run and fine-tune Wan2.1 video models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="say what a checkpoint file or model folder is",
                          description="Print network, layout (official/diffusers/comfyui), config, dtype and "
                                      "parameter count of Wan2.1 checkpoints, reading only their headers where possible.")
    info.add_argument("paths", nargs="+", metavar="PATH", help=".safetensors, shard index, .pth/.pt, or model folder")
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser("demo", help="write a tiny random-weight model set, load it and run it (offline, seconds)",
                          description="Writes tiny DiT and VAE checkpoints in the official layout, loads them back "
                                      "with wanx.load_model, and runs a DiT forward and a VAE round trip.")
    demo.add_argument("--workdir", default=None, help="where to write the tiny checkpoints (default: a temp folder)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as err:  # user errors: one line, no stack trace
        from .loading.files import CheckpointError

        if isinstance(err, (CheckpointError, ValueError, FileNotFoundError)):
            print(f"wanx: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
