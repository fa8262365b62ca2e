"""omkd: a local state daemon serving one SQLite database over a Unix socket."""

__version__ = "0.1.0"
