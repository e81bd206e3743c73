"""Run an example script's main(argv) inside the test process, answered as subprocess.run answers.

A process start and its imports cost seconds, so each script runs once as a command (what a user
runs) and its other cases run here through the same main().
"""

import contextlib
import importlib
import io
import subprocess
import sys
import traceback
from pathlib import Path


def run_main(script: Path, *args) -> subprocess.CompletedProcess:
    if str(script.parent) not in sys.path:
        sys.path.insert(0, str(script.parent))  # the scripts import their neighbours, as sys.path[0] lets them
    module = importlib.import_module(script.stem)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            module.main([str(arg) for arg in args])
            code = 0
        except SystemExit as exit_:  # as the interpreter turns it into an exit status
            code = exit_.code if isinstance(exit_.code, int) or exit_.code is None else 1
            if isinstance(exit_.code, str):
                print(exit_.code, file=sys.stderr)
        except Exception:
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess([str(script), *map(str, args)], code or 0, stdout.getvalue(), stderr.getvalue())
