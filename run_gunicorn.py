"""`make run` and the image start `gunicorn -c gunicorn.conf.py` here, once the variables gunicorn reads are checked.

gunicorn reads WEB_CONCURRENCY (which platforms such as Heroku set) as it imports its own settings,
before it runs gunicorn.conf.py: a value it cannot take (``abc``, ``2.5``, empty) ended the start in a
traceback and exit code 1, and no file of this service could say which variable was wrong. Here a bad
value stops the start with exit code 2 and one line naming it, as every other setting does. The
process then becomes gunicorn (same pid: a container's PID 1 stays gunicorn, and ``kill -USR2``
runs gunicorn's own command line again), with this script's arguments after ``-c gunicorn.conf.py``.

The signals gunicorn.conf.py handles while the server starts are held (blocked) from this script's first
lines until it has installed its handlers: the mask outlives the exec, so a Ctrl-C or a SIGTERM sent while
Python imports ``config`` here or gunicorn loads itself waits, and then ends the start in gunicorn.conf.py's
one line, exit code 0. It was a KeyboardInterrupt traceback and an exit by the signal, and to PID 1 (a
container) a SIGTERM then was dropped.
"""

from __future__ import annotations

import _signal  # the C half of `signal`, loaded with the interpreter: `signal` imports enum and more first

# gunicorn.conf.py's stop signals, then the running server's signals it ignores while the server starts.
HELD_UNTIL_CONFIGURED = (
    _signal.SIGTERM, _signal.SIGINT, _signal.SIGQUIT,
    _signal.SIGHUP, _signal.SIGUSR1, _signal.SIGUSR2, _signal.SIGTTIN, _signal.SIGTTOU,
)  # fmt: skip
if __name__ == "__main__":
    _signal.pthread_sigmask(_signal.SIG_BLOCK, HELD_UNTIL_CONFIGURED)

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


def names_another_config_file(argv: list[str]) -> bool:
    """Whether ``argv`` may name a configuration file for gunicorn to read instead of gunicorn.conf.py.

    ``-c``/``--config`` (or a prefix argparse takes for it); any short option with a ``c`` counts, as ``-Dc``
    would be ``-D -c``. An answer of True where there is none only leaves the signals unheld.
    """
    for arg in argv:
        if arg == "--":  # what follows is positional
            return False
        option = arg.split("=", 1)[0]
        if option.startswith("--"):
            if len(option) >= len("--conf") and "--config".startswith(option):
                return True
        elif option.startswith("-") and "c" in option:
            return True
    return False


def main(argv: list[str]) -> None:
    if names_another_config_file(argv):  # gunicorn.conf.py would not let them through: they would stay held
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, HELD_UNTIL_CONFIGURED)
    try:
        config.check_gunicorn_environment(os.environ)
    except config.ConfigError as error:
        config.exit_on_error(error)
    script = gunicorn_script()
    os.execv(script, [script, "-c", str(CONFIG_FILE), *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
