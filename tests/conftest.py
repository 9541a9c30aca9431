import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter;
# it must be chosen before the kernels are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: they gain nothing from a second
    thread, and on a busy machine two threads of one process mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
