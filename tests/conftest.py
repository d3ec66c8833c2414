"""Shared fixtures, and the tiny user tasks every test module shares (defined once, here)."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator

import pytest
import torch

TINY_TASKS = textwrap.dedent('''
    """Tiny user tasks for the tests, importable as 'l3rs_tiny_tasks:<function>'."""
    import torch
    from l3rs.tasks import Task, TaskFamily

    def _data(n, seed):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
        x = torch.randn(n, 6, generator=g)
        return x, (x @ w + 0.5 * torch.randn(n, 3, generator=g)).argmax(-1)

    def _model(seed):
        torch.manual_seed(0)  # the "pretrained" backbone
        m = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
        with torch.no_grad():
            m[2].weight.copy_(0.1 * torch.randn(3, 12, generator=torch.Generator().manual_seed(seed)))
        return m

    def make_task():
        return Task("tiny", _model, _data(64, 1), _data(48, 2), _data(48, 3), batch_size=16, horizon=6,
                    head=("2.weight", "2.bias"))

    def make_family():
        return TaskFamily.of(make_task())

    def not_a_task():
        return 42
''')


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and lose a lot to them on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tasks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The name of a module holding TINY_TASKS, in a temporary dir on sys.path (specs 'NAME:make_task')."""
    root = tmp_path_factory.mktemp("usermodules")
    name = "l3rs_tiny_tasks"
    (root / f"{name}.py").write_text(TINY_TASKS)
    sys.path.insert(0, str(root))
    yield name
    sys.path.remove(str(root))
    sys.modules.pop(name, None)


@pytest.fixture(scope="session")
def tiny(tiny_tasks: str) -> str:
    """The tiny classification task as a 'module:function' spec (a user task)."""
    return f"{tiny_tasks}:make_task"
