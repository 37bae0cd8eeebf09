"""Workdir paths that may be local or remote (gs://, s3://, ...).

`pathlib.Path("gs://b/run").absolute()` becomes `/cwd/gs:/b/run`, silently writing a
"bucket" under the current directory. Remote URIs therefore stay `etils.epath.Path`
(what orbax uses for gs://), and only local paths are made absolute.
"""

from __future__ import annotations

from pathlib import Path

from etils import epath


def is_remote(path) -> bool:
    """True for a URI with a scheme (gs://bucket/run), false for a local path."""
    return "://" in str(path)


def resolve_dir(path):
    """A remote URI as an `epath.Path` (kept exactly), a local path as an absolute `Path`.

    Both support `/`, `str()` and `os.fspath()`, which is all orbax and the loop need."""
    if is_remote(path):
        return epath.Path(str(path))
    return Path(path).absolute()


def copy_tree(local_dir: Path, target) -> None:
    """Copy every file under local_dir to the same relative path under target (an
    epath.Path or local Path): how files written by local-only code reach a remote workdir."""
    target = resolve_dir(target)
    for path in sorted(Path(local_dir).rglob("*")):
        if path.is_file():
            dest = target / path.relative_to(local_dir).as_posix()
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(path.read_bytes())
