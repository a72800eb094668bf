"""What the examples share: running the `semdedup` command and showing what it prints."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path


def semdedup(*args: str) -> str:
    """Run `semdedup ARGS...` (this interpreter's copy), echo the command and its output, return stdout.

    Stops the example with the command's exit status when it fails.
    """
    command = [sys.executable, "-m", "semdedup_assets.cli", *args]
    print("$ semdedup " + " ".join(shlex.quote(a) for a in args), flush=True)
    proc = subprocess.run(command, capture_output=True, text=True)
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        print(proc.stderr, end="", file=sys.stderr)
        raise SystemExit(proc.returncode)
    return proc.stdout


def example_parser(doc: str) -> argparse.ArgumentParser:
    """An example's argument parser, with `--workdir` (where its input and storage go)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the input and storage folders go (default: a new temporary folder)",
    )
    return parser


def workdir(args: argparse.Namespace, name: str) -> Path:
    """The example's working folder: `--workdir`, else a new temporary one."""
    return args.workdir or Path(tempfile.mkdtemp(prefix=f"semdedup-{name}-"))
