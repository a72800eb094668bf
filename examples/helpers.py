"""What the examples share: running the `semdedup` command and showing what it prints."""

from __future__ import annotations

import shlex
import subprocess
import sys


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
