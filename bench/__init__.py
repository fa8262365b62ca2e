"""omkd's benchmark suite: the daemon side by side with a bare IPC floor and direct SQLite.

Run ``python -m bench`` (``--quick`` for small counts); see bench/README.md. Importing this
package imports nothing else, so writer subprocesses start fast.
"""
