"""Progress of long phases. The core reports `progress(phase, done, total, **info)` (info: short values worth
showing, such as the loss); the command line shows it as tqdm bars with rate and ETA; a ComfyUI node can forward
it to its progress bar; the default shows nothing."""

from __future__ import annotations

from typing import Callable

from tqdm import tqdm

Progress = Callable[..., None]


def no_progress(phase: str, done: int, total: int, **info) -> None:
    """The default reporter: says nothing."""


class ProgressBars:
    """One tqdm bar per phase (a new phase name closes the previous bar); `quiet` shows none.

    `log` writes a line above the bars (tqdm.write), or nothing when quiet.
    """

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.bar: tqdm | None = None
        self.phase: str | None = None

    def __call__(self, phase: str, done: int, total: int, **info) -> None:
        if self.quiet:
            return
        if phase != self.phase or self.bar is None:
            self.close()
            self.phase = phase
            self.bar = tqdm(total=total, initial=done, desc=phase, dynamic_ncols=True, disable=False)
        self.bar.total = total
        if info:
            self.bar.set_postfix(info, refresh=False)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def __enter__(self) -> "ProgressBars":
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # before an error is printed, so it starts on a line of its own

    def log(self, line: str) -> None:
        if not self.quiet:
            tqdm.write(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.phase = None, None
