"""The fault trials other than random SIGKILLs; each returns a harness.Result (one table row)."""

from __future__ import annotations

from collections.abc import Callable

from tests.faults.harness import Context, Result

OTHER: dict[str, Callable[[Context], Result]] = {}
