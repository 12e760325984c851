"""Progress of the library's long calls (DF-RISE, DF-CAM, the insertion / deletion games).

Every long call takes ``progress=``: ``None`` or ``False`` (the default) is silent, so tests and
batch jobs print nothing; ``True`` draws a `tqdm` bar on stderr; a callable is told
``progress(done, total, description)`` after each batch, so a front end can move its own bar
(the Gradio app's, say) without knowing about tqdm.
"""

from __future__ import annotations

from typing import Callable, Union

Progress = Union[None, bool, Callable[[int, int, str], None]]


class Bar:
    """A count towards ``total`` that tells ``progress`` how far it got."""

    def __init__(self, progress: Progress, total: int, description: str):
        self.total = max(int(total), 0)
        self.description = description
        self.done = 0
        self._callback = progress if callable(progress) else None
        self._tqdm = None
        if progress is True:
            from tqdm.auto import tqdm

            self._tqdm = tqdm(total=self.total, desc=description, leave=False, dynamic_ncols=True)
        elif progress not in (None, False) and self._callback is None:
            raise TypeError(f"progress must be None, True or a callable(done, total, description), got {progress!r}")

    def update(self, count: int = 1) -> None:
        count = min(int(count), self.total - self.done) if self.total else int(count)
        self.done += count
        if self._tqdm is not None:
            self._tqdm.update(count)
        if self._callback is not None:
            self._callback(self.done, self.total, self.description)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(progress: Progress, total: int, description: str) -> Bar:
    return Bar(progress, total, description)
