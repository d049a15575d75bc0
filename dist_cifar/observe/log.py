"""The main-process log seam: prints and run-folder files on the main process, nothing on the others."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm


class MainLog:
    """(only on the main process) Prints and writes the run's files; other ranks get a NullLog."""

    def __init__(self, run_dir: Path | None = None):
        self.run_dir = run_dir
        self._warned: set[str] = set()

    def print(self, *args) -> None:
        tqdm.write(" ".join(str(a) for a in args))  # above the progress bar, not through it

    def warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            print(f"dist_cifar: warning: {message}", file=sys.stderr, flush=True)

    def append_jsonl(self, name: str, record: dict) -> None:
        with open(self.run_dir / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_json(self, name: str, data: dict) -> None:
        tmp = self.run_dir / f".{name}.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.run_dir / name)

    def write_text(self, name: str, text: str) -> None:
        tmp = self.run_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.run_dir / name)


class NullLog(MainLog):
    """Does nothing: what non-main ranks log through."""

    def print(self, *args) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    def append_jsonl(self, name: str, record: dict) -> None:
        pass

    def write_json(self, name: str, data: dict) -> None:
        pass

    def write_text(self, name: str, text: str) -> None:
        pass
