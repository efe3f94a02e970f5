"""One-line errors for the command lines: the message of an exception, without its traceback."""

from __future__ import annotations

import re
import sys

import yaml

# Errors that convmoe raises on purpose, their messages naming the problem and the fix: bad files, paths,
# YAML and values (OSError covers missing or unreadable files; huggingface_hub's network errors are
# OSErrors too), and missing optional packages (ImportError).
EXPECTED_ERRORS = (OSError, ValueError, ImportError, yaml.YAMLError)


def error_message(error: BaseException, debug_command: str) -> str:
    """The one-line message of an error: its text with newlines collapsed; an error convmoe did not
    anticipate also gets its type and how to see the traceback (it may be a bug, so it is not hidden).

    Args:
        error: The exception.
        debug_command: The command line that shows the traceback (``convmoe --debug train``).

    Example:
        >>> error_message(ValueError("bad value\\n  in line 2"), "convmoe --debug eval")
        'bad value in line 2'
        >>> error_message(AttributeError("'int' object has no attribute 'to'"), "convmoe --debug train")  # doctest: +ELLIPSIS
        "AttributeError: 'int' object has no attribute 'to' (unexpected error: check ... run `convmoe --debug train ...` for the traceback and report it)"
    """
    text = error.args[0] if isinstance(error, KeyError) and len(error.args) == 1 else error
    text = re.sub(r"\s*\n\s*", " ", str(text)).strip() or "(no message)"
    if isinstance(error, EXPECTED_ERRORS):
        return text
    return (f"{type(error).__name__}: {text} (unexpected error: check the files and values given on the command "
            f"line; if they are right this is a convmoe bug: run `{debug_command} ...` for the traceback "
            "and report it)")


def report_error(error: BaseException, program: str, debug_command: str) -> int:
    """Print ``<program>: error: <message>`` on stderr as one line and return the exit status 2.

    Example:
        >>> import contextlib, io
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     status = report_error(FileNotFoundError("no such file"), "convmoe eval", "convmoe --debug eval")
        >>> status, err.getvalue()
        (2, 'convmoe eval: error: no such file\\n')
    """
    print(f"{program}: error: {error_message(error, debug_command)}", file=sys.stderr)
    return 2
