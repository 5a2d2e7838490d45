"""Progress of long steps on stderr: a tqdm bar on a terminal, one plain line per step elsewhere (logs, pipes, CI)."""

import sys
import time
from typing import IO, Any


class Progress:
    """`with Progress("training", total, "rounds") as p: p.update(1, "NDCG 5.2%")`; silent when not enabled."""

    def __init__(self, description: str, total: int | None = None, unit: str = "steps", enabled: bool = True,
                 stream: IO[str] | None = None) -> None:
        self.description, self.total, self.unit, self.enabled = description, total, unit, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.started = time.monotonic()
        self._bar: Any = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=description, unit=f" {unit}", file=self.stream, dynamic_ncols=True, leave=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, steps: int = 1, note: str = "") -> None:
        """`steps` more done; `note` says what the last one gave (a metric, a state)."""
        if not self.enabled:
            return
        self.done += steps
        if self._bar is not None:
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(steps)
            return
        of = f"/{self.total}" if self.total is not None else ""
        self.stream.write(f"{self.description}: {self.done}{of} {self.unit}, {time.monotonic() - self.started:.1f} s{'  ' + note if note else ''}\n")
        self.stream.flush()

    def write(self, line: str) -> None:
        """A line of output that does not break the bar (tqdm.write on a terminal)."""
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        """End the bar (a terminal keeps its last state)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def say(message: str, stream: IO[str] | None = None) -> None:
    """One status line on stderr (what a long step is about to do, a retry and how long it keeps trying)."""
    target = stream if stream is not None else sys.stderr
    target.write(message + "\n")
    target.flush()
