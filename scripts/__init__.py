"""Command-line tools around training; each runs as `python scripts/NAME.py` or `python -m scripts.NAME`.

They import the installed packages (`pip install -e .`), so they run from any directory.
"""
