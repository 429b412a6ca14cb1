"""``Lifetime``: what a module with actors shares about its end. Pure; no Ray."""

from __future__ import annotations

from typing import Any

__all__ = ["Lifetime"]


class Lifetime:
    """A context manager that calls ``close()`` on exit; ``_check_open`` refuses work once closed.
    Subclasses set ``_closed`` in ``__init__`` and say in ``_gone`` what closing released."""

    _closed: bool
    _gone = "its actors are gone"

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"this {type(self).__name__} is closed; {self._gone}")
