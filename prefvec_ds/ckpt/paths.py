"""Path containment: what a checkpoint's own metadata names must stay inside the checkpoint.

A folder's metadata chooses which files are read: `model.safetensors.index.json` maps tensors to
shard files, `latest` names the tag folder, and any file may be a symbolic link. Someone else's
checkpoint could point those at `../../other-model` or `/etc/passwd`: read silently, a foreign
file becomes part of a merge (or is copied into the output, for config files). Every such name
is resolved (links followed) and must land inside the folder. One exception: the Hugging Face hub
cache, where `snapshots/<rev>/model.safetensors` links to `../../blobs/<sha>` of the same model
repo by design.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefvec_ds import PrefvecError


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _hub_blob(real: Path, folder_real: Path) -> bool:
    """`real` is a blob of the hub-cache repo whose snapshot folder is `folder_real`."""
    snapshots = folder_real.parent
    return snapshots.name == "snapshots" and real.parent == snapshots.parent / "blobs"


def check_name(entry: str, where: Path, folder: Path, what: str) -> Path:
    """folder / entry, where `entry` (read from the file `where`) must be a plain name or a
    relative path that stays inside `folder`, and not a link leading out of it."""
    if not isinstance(entry, str) or not entry.strip() or os.path.isabs(entry) \
            or ".." in Path(entry).parts or "\0" in entry:
        raise PrefvecError(f"file {where}: {what} {entry!r} leads outside {folder}; expected a "
                           "name inside the folder")
    return contained(Path(folder) / entry, folder, f"file {where}: {what} {entry!r}")


def contained(path: Path, folder: Path, label: str | None = None) -> Path:
    """`path` with its links followed must be inside `folder` (itself resolved: a linked
    folder is fine); returns `path`, or raises naming the link's target."""
    folder_real = Path(os.path.realpath(folder))
    real = Path(os.path.realpath(path))
    if _inside(real, folder_real) or _hub_blob(real, folder_real):
        return Path(path)
    link = f"a link to {os.readlink(path)}" if Path(path).is_symlink() else f"resolves to {real}"
    raise PrefvecError(f"{label or f'file {path}'}: {link}, outside {folder}; checkpoint "
                       "files must be inside their folder (refusing to read it)")
