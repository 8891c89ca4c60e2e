"""The device the tests run models on, and comparisons that work across devices.

Set ``CIRCUITKIT_TEST_DEVICE=cuda`` to run the model fixtures on a GPU; the default is the CPU.
"""

from __future__ import annotations

import os

import torch

DEVICE = os.environ.get("CIRCUITKIT_TEST_DEVICE", "cpu")


def _cpu(x):
    return x.detach().cpu() if isinstance(x, torch.Tensor) else x


def assert_close(actual, expected, **kwargs) -> None:
    """``torch.testing.assert_close`` on the CPU copies of both sides."""
    torch.testing.assert_close(_cpu(actual), _cpu(expected), **kwargs)


def equal(a, b) -> bool:
    return torch.equal(_cpu(a), _cpu(b))


def allclose(a, b, **kwargs) -> bool:
    return torch.allclose(_cpu(a), _cpu(b), **kwargs)
