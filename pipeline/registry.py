"""Named implementations that lower layers look up and higher ones provide.

A layer that needs something only a higher layer can make (the toy world's pretrained weights, its generated
source, its taxonomy) keeps a :class:`Registry`; the provider is declared as an entry point of the registry's
group in its package's metadata (``[project.entry-points."saferclip_data.weights"]``). A name not registered in
this process is looked up there and loaded on first use, so a Ray worker finds it without anyone importing the
provider's module first, and the lower layer never imports the higher one.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str, group: str):
        self.what, self.group = what, group
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        self._items[name] = item
        return item

    def find(self, name: str | None) -> T | None:
        """The item of this name (loaded from its entry point on first use), or None."""
        if name is None:
            return None
        if name not in self._items:
            found = [ep for ep in entry_points(group=self.group) if ep.name == name]
            if not found:
                return None
            self._items[name] = found[0].load()
        return self._items[name]

    def names(self) -> list[str]:
        """Every name known: registered here or declared by an installed package."""
        return sorted({*self._items, *(ep.name for ep in entry_points(group=self.group))})

    def get(self, name: str) -> T:
        item = self.find(name)
        if item is None:
            raise KeyError(f"unknown {self.what} '{name}' (known: {', '.join(self.names()) or 'none'})")
        return item
