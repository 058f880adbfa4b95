"""The command line: ``unnoise train | sample | eval | demo`` (parsing in parser.py, dispatch in main.py)."""

from unnoise.cli.main import main

__all__ = ["main"]
