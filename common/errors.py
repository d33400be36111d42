"""The errors a user can cause and fix, and the handler that ends a command-line tool on one of them in one line.

Every error of the recipe whose message says what happened and what to do derives from `RecipeError`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class RecipeError(RuntimeError):
    """An error whose message names the thing that went wrong and the fix; reported as one line, exit code 2."""


# ImportError: an optional package a setting needs (torchao, Transformer Engine); the message names the setting.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ImportError, RecipeError)


def run_cli(main: Callable[[], object]) -> None:
    """Run a plain command-line tool's `main`: a user error ends it with its one-line message and exit code 2,
    as in the training jobs (RECIPE_DEBUG=1 keeps the traceback). `main` itself still raises, for callers."""
    try:
        main()
    except USER_ERRORS as error:
        if os.environ.get("RECIPE_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
