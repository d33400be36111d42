"""Restricted unpickler for Geneformer dictionaries (token ids, gene medians, gene names).

A pickle from a user is untrusted input: only plain containers, str keys and numpy scalars load.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

# Exactly what numpy needs to rebuild a scalar (np.float32(1.5), np.int64(3)) and nothing else.
_ALLOWED_GLOBALS = {
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class UnsafePickleError(ValueError):
    """A pickle asked for a Python object outside the allowed set."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self._source}: refused to load '{module}.{name}'. Gene dictionaries may hold only "
            "str keys and numbers; convert the file to a plain dict of str -> int/float "
            "(or a TSV) if it came from a trusted source."
        )


def load_restricted_pickle(path: str | Path) -> Any:
    """Load a pickle that may contain only builtin containers, strings and numpy scalars."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open("rb") as handle:
        try:
            return _RestrictedUnpickler(handle, str(path)).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as error:
            raise ValueError(f"{path}: not a readable pickle ({error}); is the file truncated?") from error
