"""`make run` and the image start `gunicorn -c gunicorn.conf.py` here, once the variables gunicorn reads are checked.

gunicorn reads WEB_CONCURRENCY (which platforms such as Heroku set) as it imports its own settings,
before it runs gunicorn.conf.py: a value it cannot take (``abc``, ``2.5``, empty) ended the start in a
traceback and exit code 1, and no file of this service could say which variable was wrong. Here a bad
value stops the start with exit code 2 and one line naming it, as every other setting does. The
process then becomes gunicorn (same pid: a container's PID 1 stays gunicorn, and ``kill -USR2``
runs gunicorn's own command line again), with this script's arguments after ``-c gunicorn.conf.py``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import config

CONFIG_FILE = Path(__file__).resolve().parent / "gunicorn.conf.py"


def gunicorn_script() -> str:
    """The ``gunicorn`` script installed beside this interpreter (the venv's, the image's), else the PATH's."""
    script = shutil.which("gunicorn", path=os.path.dirname(sys.executable)) or shutil.which("gunicorn")
    if script is None:
        config.exit_on_error(config.ConfigError("gunicorn is not installed (pip install -r requirements.txt)"))
    return script


def main(argv: list[str]) -> None:
    try:
        config.check_gunicorn_environment(os.environ)
    except config.ConfigError as error:
        config.exit_on_error(error)
    script = gunicorn_script()
    os.execv(script, [script, "-c", str(CONFIG_FILE), *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
