"""``python -m protocol.schema`` writes the contract's files; ``--check``
exits 1 when they differ from what the models give."""

from __future__ import annotations

import sys

from protocol.schema import HERE, render, written


def main() -> int:
    files = render()
    if "--check" in sys.argv:
        return 0 if written() == files else 1
    for stale in set(written()) - set(files):  # a method or event no longer declared
        (HERE / stale).unlink()
    for path, text in files.items():
        target = HERE / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    print(f"wrote {len(files)} files under {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
