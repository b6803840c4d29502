"""Textual-inversion embedding files: safetensors only, written atomically (docs/privacy.md §3.4).

The file is what ComfyUI loads for ``embedding:NAME`` and diffusers for
``load_textual_inversion``: key ``emb_params`` of shape (k, d). Its metadata holds the
release's DpEvent and public parameters, never anything per image.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from .display import shown_path
from .errors import DpAdaptError, InvalidParameterError

SUFFIX = ".safetensors"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class EmbeddingExistsError(DpAdaptError):
    """An embedding with this name exists and overwriting was not asked for."""


class EmbeddingNotWrittenError(DpAdaptError):
    """A release was recorded but its file could not be written (re-queueing writes it)."""


HEADER_ALLOWANCE = 64 * 1024
"""Bytes allowed for a file's safetensors header: tensor names, shapes, offsets and the
metadata of public parameters (a few KiB in practice)."""

FREE_SPACE_MARGIN = 1024 * 1024
"""Free space kept on top of a file's size, so the write does not fill the disk to its
last byte (the fsync of the folder and the file system's own bookkeeping need some)."""


def embedding_file_bytes(rows: int, width: int) -> int:
    """Upper bound of the size of a token's file: ``rows`` x ``width`` float32 values (the
    (k, d) token, whatever its split into encoder parts) plus ``HEADER_ALLOWANCE``. Public:
    k and d are settings and the model's shape, nothing measured from the images."""
    return 4 * int(rows) * int(width) + HEADER_ALLOWANCE


def validate_embedding_name(name: str) -> str:
    """The name as given, if it is a plain file stem that cannot leave the embeddings folder.

    Allowed: 1-64 letters, digits, ``_``, ``-`` and ``.``, starting with a letter or digit,
    no ``..``. Anything else is refused rather than silently rewritten, so the token a user
    types in prompts is exactly the name they chose.
    """
    stem = name[: -len(SUFFIX)] if isinstance(name, str) and name.endswith(SUFFIX) else name
    if not isinstance(stem, str) or not _NAME.fullmatch(stem) or ".." in stem:
        raise InvalidParameterError(
            f"embedding name must be 1-64 letters, digits, '_', '-' or '.', starting with a letter "
            f"or digit and without '..' or path separators, got name={shown_path(repr(name))}."
        )
    return stem


def embedding_path(directory: Path, name: str) -> Path:
    """``directory / NAME.safetensors``, guaranteed to stay inside ``directory``."""
    stem = validate_embedding_name(name)
    directory = Path(directory).resolve()
    path = (directory / f"{stem}{SUFFIX}").resolve()
    if path.parent != directory:
        raise InvalidParameterError(
            f"embedding name {shown_path(repr(name))} would leave the embeddings folder."
        )
    return path


def prepare_directory(directory: Path) -> Path:
    """Create the embeddings folder if missing; a clear error if it cannot be one."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InvalidParameterError(
            f"the embeddings folder {shown_path(directory)} is a file, not a folder; move the file "
            "away or point ComfyUI's embeddings path elsewhere."
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InvalidParameterError(
            f"cannot create the embeddings folder {shown_path(directory)} "
            f"({shown_path(error.strerror or error)})."
        ) from error
    return directory


def check_writable(
    directory: Path,
    name: str,
    *,
    overwrite: bool,
    same_release: str | None = None,
    size_bytes: int | None = None,
) -> Path:
    """Fail early (before any training or budget is spent) if the file cannot be written.

    ``same_release``: an existing file whose metadata names this release id is accepted
    (re-publishing the same release writes nothing new). A folder or anything else that is
    not a plain file at the file's path is refused, overwrite or not (the final rename
    cannot replace it). ``size_bytes``: the file's size (``embedding_file_bytes``); the
    folder's file system must have that plus ``FREE_SPACE_MARGIN`` free.
    """
    path = embedding_path(directory, name)
    if not Path(directory).is_dir():
        what = "is not a folder" if Path(directory).exists() else "does not exist"
        raise InvalidParameterError(f"embeddings folder {shown_path(directory)} {what}.")
    if (path.exists() or path.is_symlink()) and not path.is_file():
        what = "a folder" if path.is_dir() else "not a regular file"
        raise InvalidParameterError(
            f"{path.name!r} in the embeddings folder {shown_path(directory)} is {what}, so the "
            "embedding cannot be saved under that name (overwrite replaces files only); move "
            "it away or choose another name."
        )
    if size_bytes is not None:
        free = shutil.disk_usage(directory).free
        if free < size_bytes + FREE_SPACE_MARGIN:
            raise InvalidParameterError(
                f"the embeddings folder {shown_path(directory)} has {free // 1024} KiB free; "
                f"the embedding file needs {(size_bytes + FREE_SPACE_MARGIN + 1023) // 1024} KiB "
                "(its size plus a margin). Free some space and queue the prompt again."
            )
    if path.exists() and not overwrite and not is_release_file(path, same_release):
        raise EmbeddingExistsError(
            f"an embedding named {path.stem!r} already exists in {shown_path(directory)}; choose "
            "another name or enable overwrite."
        )
    if not os.access(directory, os.W_OK):
        raise InvalidParameterError(f"embeddings folder {shown_path(directory)} is not writable.")
    return path


RELEASE_ID_KEY = "dp_adapt.release_id"


def is_release_file(path: Path, release_id: str | None) -> bool:
    """Whether ``path`` exists and is the file of release ``release_id``."""
    if release_id is None or not Path(path).is_file():
        return False
    try:
        _, metadata = read_embedding(path)
    except Exception:  # any unreadable file is simply "not this release"
        return False
    return metadata.get(RELEASE_ID_KEY) == release_id


def save_embedding(
    directory: Path,
    name: str,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    overwrite: bool,
) -> Path:
    """Write ``NAME.safetensors`` atomically: temp file, fsync, then link/rename into place.

    Without ``overwrite``, the final step is a hard link, which fails if the name appeared
    meanwhile, so an existing file is never replaced; either the whole file is there or none.
    """
    from safetensors.torch import save_file

    path = check_writable(directory, name, overwrite=overwrite)
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidParameterError(
                f"metadata must map str to str, got {key!r}: {type(value).__name__}."
            )
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
    try:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            str(tmp),
            metadata=dict(metadata),
        )
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError as error:
                raise EmbeddingExistsError(
                    f"an embedding named {path.stem!r} appeared while saving."
                ) from error
        _fsync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_embedding(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors embedding (no pickle is ever loaded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # directories cannot be opened on Windows; rename is durable enough there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
