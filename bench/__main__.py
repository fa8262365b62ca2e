"""``python -m bench``: run every scenario, print the table, write the JSON results."""

from bench.run import main

if __name__ == "__main__":
    raise SystemExit(main())
