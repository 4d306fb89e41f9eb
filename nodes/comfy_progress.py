"""The core's progress reports shown in ComfyUI: the node's progress bar (one per phase, carrying the training
previews), a line of text on the node (phase, count, ETA, loss) and ComfyUI's cancel checked at every report.
ComfyUI's pieces are passed in, so this is tested without ComfyUI."""

from __future__ import annotations

import time

PREVIEW_SIZE = 512  # the longest side ComfyUI shows for a progress preview


class ComfyProgress:
    """A core `Progress` for one node. `make_bar(total)` gives an object with update_absolute(value, total,
    preview) (ComfyUI's ProgressBar); `send_text(text)` shows text on the node; `check_cancel()` raises when the
    user pressed cancel."""

    def __init__(self, make_bar, send_text, check_cancel, clock=time.monotonic, text_every: float = 1.0):
        self.make_bar, self.send_text, self.check_cancel, self.clock = make_bar, send_text, check_cancel, clock
        self.text_every = text_every
        self.phase, self.bar, self.started, self.first_done, self.last_text = None, None, 0.0, 0, -1e9
        self.done, self.total = 0, 1

    def __call__(self, phase: str, done: int, total: int, **info) -> None:
        self.check_cancel()
        if phase != self.phase:
            self.phase, self.bar = phase, self.make_bar(total)
            self.started, self.first_done, self.last_text = self.clock(), done, -1e9
        self.done, self.total = done, total
        self.bar.update_absolute(done, total, None)
        now = self.clock()
        if now - self.last_text >= self.text_every or done >= total:
            self.last_text = now
            self.send_text(self.line(phase, done, total, now, info))

    def line(self, phase: str, done: int, total: int, now: float, info: dict) -> str:
        parts = [f"{phase}: {done}/{total}"]
        if self.first_done < done < total:
            remaining = (now - self.started) / (done - self.first_done) * (total - done)
            parts.append(f"ETA {format_seconds(remaining)}")
        parts += [f"{k} {v}" for k, v in info.items()]
        return "  ".join(parts)

    def show_preview(self, step: int, image) -> None:
        """A training preview in the node's progress bar (ComfyUI's preview format: JPEG, image, max size)."""
        if self.bar is not None:
            self.bar.update_absolute(self.done, self.total, ("JPEG", image.convert("RGB"), PREVIEW_SIZE))


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
