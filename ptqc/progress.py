"""Progress bars (tqdm) for long steps: shown with an ETA on a terminal, silent in logs and pipes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")

#: None: show on a TTY only (tqdm's rule); True: never; False: always.
DISABLE: bool | None = None


def batches(items: Iterable[T], desc: str, total: int | None = None, unit: str = "img") -> Iterator[T]:
    """Yield the batches of ``items`` and advance the bar by each batch's length."""
    bar = tqdm(total=total, desc=desc, unit=unit, disable=DISABLE, leave=False, dynamic_ncols=True)
    try:
        for item in items:
            yield item
            bar.update(len(item[0]) if isinstance(item, tuple) else len(item))
    finally:
        bar.close()


def steps(items: Iterable[T], desc: str, total: int | None = None, unit: str = "step") -> Iterator[T]:
    """Yield ``items``, one bar step each."""
    yield from tqdm(items, desc=desc, total=total, unit=unit, disable=DISABLE, leave=False, dynamic_ncols=True)


def counter(desc: str, total: int | None = None, unit: str = "step") -> tqdm:
    """A bar advanced by hand (``.update(1)``), for loops whose steps are not an iterable; close it after."""
    return tqdm(total=total, desc=desc, unit=unit, disable=DISABLE, leave=False, dynamic_ncols=True)
