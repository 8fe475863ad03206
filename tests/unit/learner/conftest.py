"""Fixtures of the learner unit tests."""

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """These networks are tiny: intra-op threads only add synchronization (30x slower on a busy 2-core box).

    Used per module: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
