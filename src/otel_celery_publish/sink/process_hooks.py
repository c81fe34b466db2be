"""Hooks at fork and at exit for the sink's long-lived objects, registered once per process.

``os.register_at_fork`` and ``atexit.register`` keep what they are given for the life of the
process: registering once per object would add another pair with every ``instrument()``, forever.
So a :class:`ProcessHooks` gives the interpreter one hook of each kind, the first time an object
is added, and runs it for every object added since that is still alive (held weakly: an object
that is gone needs nothing). One object's failing hook is reported and does not keep the others'
from running.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

from otel_celery_publish._guard import guard

T = TypeVar("T")


class ProcessHooks(Generic[T]):
    """Run ``after_fork`` (in the child) and ``at_exit`` for each live object added."""

    def __init__(
        self,
        where: str,
        *,
        after_fork: Callable[[T], None],
        at_exit: Callable[[T], None] | None = None,
    ) -> None:
        self._where = where
        self._after_fork = after_fork
        self._at_exit = at_exit
        self._objects: weakref.WeakSet[T] = weakref.WeakSet()
        self._lock = threading.Lock()
        #: Hooks handed to the interpreter so far: at most one at-fork and one atexit hook.
        self.registered = 0

    def add(self, obj: T) -> None:
        """Run the hooks for ``obj`` too, from now on, for as long as it lives."""
        with self._lock:
            if not self.registered:
                os.register_at_fork(after_in_child=self._forked)
                self.registered += 1
                if self._at_exit is not None:
                    atexit.register(self._exiting)
                    self.registered += 1
            self._objects.add(obj)

    def live(self) -> list[T]:
        """The objects the hooks will run for."""
        return list(self._objects)

    def _forked(self) -> None:
        self._lock = threading.Lock()  # a parent thread may have held it at fork time
        for obj in self.live():
            with guard(f"{self._where} after fork"):
                self._after_fork(obj)

    def _exiting(self) -> None:
        assert self._at_exit is not None
        for obj in self.live():
            with guard(f"{self._where} at exit"):
                self._at_exit(obj)
