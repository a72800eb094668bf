"""The UI hint of a failed or finished run fits how the package was installed (issue 35, point 3).

A checkout (the package beside a Makefile with a `ui` target) gets `make ui` on the run's own storage;
a pip install, which has no Makefile and no dg project folder, gets `dagster dev` on the package's
code location with the environment that finds the run history.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
from pathlib import Path

import semdedup_assets
from semdedup_assets.ui import source_checkout, ui_command

CHECKOUT = Path(semdedup_assets.__file__).resolve().parents[1]


def test_checkout_gets_make_ui_on_the_runs_storage(tmp_path: Path) -> None:
    demo = str(CHECKOUT / ".demo" / "storage")
    assert source_checkout() == CHECKOUT
    assert ui_command(demo, os.path.join(demo, "dagster_home"), cwd=CHECKOUT) == "make ui"
    other = str(tmp_path / "storage")
    home = os.path.join(other, "dagster_home")
    assert ui_command(other, home, cwd=CHECKOUT) == f"make ui DEMO_STORAGE={shlex.quote(other)}"
    # From another folder the hint says where the Makefile is.
    assert ui_command(other, home, cwd=tmp_path) == (
        f"cd {shlex.quote(str(CHECKOUT))} && make ui DEMO_STORAGE={shlex.quote(other)}"
    )


def test_pip_install_gets_dagster_dev_on_the_code_location(tmp_path: Path) -> None:
    # The package as pip lays it out: a folder in site-packages, no Makefile beside it.
    installed = tmp_path / "site-packages" / "semdedup_assets"
    shutil.copytree(Path(semdedup_assets.__file__).parent, installed, ignore=shutil.ignore_patterns("__pycache__"))
    assert source_checkout(installed) is None
    storage = str(tmp_path / "my storage")
    home = os.path.join(storage, "dagster_home")
    hint = ui_command(storage, home, package_dir=installed, cwd=tmp_path)
    assert hint == (
        f"DAGSTER_HOME={shlex.quote(home)} SEMDEDUP_STORAGE={shlex.quote(storage)} "
        "dagster dev -m semdedup_assets.definitions"
    )
    assert "make" not in hint
    assert importlib.util.find_spec("semdedup_assets.definitions") is not None  # the module the hint names


def test_own_dagster_home_or_object_store_gets_the_environment_spelled_out(tmp_path: Path) -> None:
    # `make ui` opens <storage>/dagster_home only, so another DAGSTER_HOME needs the explicit command.
    storage = str(tmp_path / "storage")
    home = str(tmp_path / "elsewhere")
    assert ui_command(storage, home, cwd=CHECKOUT).startswith(f"DAGSTER_HOME={shlex.quote(home)} ")
    assert ui_command("s3://bucket/semdedup", home, cwd=CHECKOUT) == (
        f"DAGSTER_HOME={shlex.quote(home)} SEMDEDUP_STORAGE=s3://bucket/semdedup "
        "dagster dev -m semdedup_assets.definitions"
    )
