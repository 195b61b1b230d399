"""Checks of the model folders and checkpoints the commands are given, before anything is loaded from them.

- A name that can only be a local path (absolute, ``./``, ``../``, ``~``, or more than one ``/``) and does not exist
  is reported as a missing path, not as the Hub's "repo id must be in the form ..." error.
- Every ``*.safetensors`` file of a local folder has its header read (a few bytes, no weights): a truncated or
  corrupt file is named, where safetensors alone says ``incomplete metadata`` without a file name.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CliError


def looks_like_local_path(name: str) -> bool:
    """Whether ``name`` can only mean a local path (a Hub id is ``name`` or ``owner/name``)."""
    return (
        os.path.isabs(name)
        or name.startswith(("./", "../", "~", ".\\", "..\\"))
        or name in (".", "..")
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def check_model_source(name: str | None, option: str) -> None:
    """Raise :class:`CliError` for a local ``name`` that does not exist or holds an unreadable safetensors file.

    ``option`` is the flag or key that gave ``name`` (named in the message). Hub ids are left to the loader.
    """
    if not name:
        return
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir():
            check_safetensors_files(path)
        return
    if looks_like_local_path(name):
        raise CliError(
            f"{option} {name!r}: no such file or folder (it is a local path, not a Hub id). Check the path, or give "
            "a Hub id such as GSAI-ML/LLaDA-8B-Instruct."
        )


def check_safetensors_files(folder: str | os.PathLike) -> None:
    """Read the header of every ``*.safetensors`` file directly in ``folder``; :class:`CliError` naming a bad one."""
    from safetensors import safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # SafetensorError, OSError: the file is truncated, corrupt or unreadable
            raise CliError(
                f"{path} cannot be read ({error}): the file is truncated or corrupt (an interrupted download or "
                "save?). Download or save it again."
            ) from None


def check_resume_checkpoint(resume_from_checkpoint) -> None:
    """:func:`check_safetensors_files` on a ``--resume_from_checkpoint`` folder (flags such as ``true`` pass)."""
    if isinstance(resume_from_checkpoint, (str, os.PathLike)) and Path(resume_from_checkpoint).is_dir():
        check_safetensors_files(resume_from_checkpoint)


def check_data_files(files, option: str) -> None:
    """Raise :class:`CliError` for a local data file that is missing or empty (``datasets`` would raise a bare
    ``StopIteration`` on an empty JSONL). ``files`` is a path, a list of paths or ``None``; ``option`` names the flag."""
    if not files:
        return
    for path in [files] if isinstance(files, str | os.PathLike) else files:
        if not os.path.isfile(path):
            raise CliError(f"{option} {str(path)!r}: no such file.")
        if os.path.getsize(path) == 0:
            raise CliError(f"{option} {str(path)!r} is empty: it holds no rows. Give a file with one example a line.")
