"""``kd --help`` answers without the training stack: with torch, timm, ultralytics and
scikit-learn unimportable it lists the built-in commands and the installed plugins' ones; with
them installed it does not import them."""

from __future__ import annotations

import subprocess
import sys

BLOCKED = ("torch", "timm", "ultralytics", "sklearn")


def help_run(block: bool) -> subprocess.CompletedProcess:
    code = (
        "import sys\n"
        + (f"sys.modules.update(dict.fromkeys({BLOCKED!r}))\n" if block else "")
        + "from kdtoolkit.cli.app import main\n"
        "sys.argv = ['kd', '--help']\n"
        "code = 0\ntry:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print('imported:', sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{BLOCKED!r} and sys.modules[m] is not None))\n"
        "sys.exit(code)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_kd_help_needs_no_training_stack():
    for block in (True, False):
        done = help_run(block)
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert "imported: []" in done.stdout
        for command in ("run", "validate", "predict", "export", "tune", "data"):
            assert f" {command} " in done.stdout, command
        assert " sos " in done.stdout and " cvm " in done.stdout  # the plugins' commands
