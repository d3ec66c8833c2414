"""Shared fixtures."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and lose a lot to them on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def user_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str, str], None]]:
    """Write a module (e.g. a user task for 'module:function' specs) into a temporary dir on sys.path."""
    root = tmp_path_factory.mktemp("usermodules")
    names: list[str] = []

    def install(name: str, source: str) -> None:
        (root / f"{name}.py").write_text(source)
        names.append(name)

    sys.path.insert(0, str(root))
    yield install
    sys.path.remove(str(root))
    for name in names:
        sys.modules.pop(name, None)
