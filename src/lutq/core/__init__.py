"""Small shared pieces every stage uses: errors, paths, atomic writes, console, typed configs."""

from lutq.core.atomic import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file
from lutq.core.configs import ConfigBase
from lutq.core.console import console, progress
from lutq.core.errors import LutqError
from lutq.core.home import lutq_home

__all__ = [
    "ConfigBase",
    "LutqError",
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "console",
    "lutq_home",
    "progress",
    "sha256_file",
]
