"""Atomic file writes, checkpoint-directory rotation and moving damaged files aside: data.files, the
lowest layer's, which every layer writes through."""
from data.files import atomic_path, atomic_write, move_aside, rotate_directories, write_json

__all__ = ["atomic_path", "atomic_write", "move_aside", "rotate_directories", "write_json"]
