"""What can go wrong, in four kinds, and the exit code each maps to in every CLI.

* ``InputError`` (exit 2): the user's data or arguments are wrong (a window, a parquet
  file, a checkpoint, a flag). The message names the row, column, series or file.
* ``BundleError`` (exit 3): the bundle is wrong (missing or corrupt file, another manifest
  version, a graph or engine it lacks). Re-export or rebuild.
* ``BackendUnavailable`` (exit 4): a backend cannot run on this machine (library missing,
  no GPU, engines for another GPU or TensorRT version). ``--backend auto`` falls back on
  this one, and only this one.
* ``WriteError`` (exit 5): an output or the embedding store cannot be written (disk full,
  read-only, LMDB map full). The message names the path and the cause; no partial output is
  left. Serving treats the store as a cache and goes on uncached instead.
"""

from __future__ import annotations

import sys
from typing import NoReturn

EXIT_INPUT, EXIT_BUNDLE, EXIT_UNAVAILABLE, EXIT_WRITE = 2, 3, 4, 5
EXIT_CODES_HELP = ("Exit status: 0 success; 2 bad input (data, arguments or checkpoint: the message names it; "
                   "nothing is written); 3 the bundle is wrong (missing, corrupt or another version: re-export or "
                   "rebuild); 4 a backend cannot run here (library, GPU or engine missing); 5 an output or the "
                   "store cannot be written (disk full, read-only: the path and cause are named).")


class InputError(ValueError):
    """The user's data or arguments are unusable; the message names the problem."""


class BundleError(ValueError):
    """The bundle is missing, incomplete, corrupt or from another manifest version."""


class BackendUnavailable(RuntimeError):
    """A backend cannot run on this machine (library missing, no GPU, engines for another GPU)."""


class WriteError(OSError):
    """An output or the embedding store cannot be written; the message names the path and the cause."""


def exit_code(exc: BaseException) -> int:
    """The documented exit code for an error of one of the four kinds (InputError otherwise)."""
    if isinstance(exc, WriteError):
        return EXIT_WRITE
    if isinstance(exc, BackendUnavailable):
        return EXIT_UNAVAILABLE
    if isinstance(exc, BundleError):
        return EXIT_BUNDLE
    return EXIT_INPUT


def fail(prog: str, error: BaseException | str, suffix: str = "") -> NoReturn:
    """Print ``prog: error: message`` on stderr and exit with the error kind's documented code."""
    import click

    code = exit_code(error) if isinstance(error, BaseException) else EXIT_INPUT
    click.echo(f"{prog}: error: {error}{suffix}", err=True)
    sys.exit(code)
