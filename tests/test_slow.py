"""Long cases, excluded from the default run: `pytest -m slow`."""
import pytest

from backend_cases import backend_params
from test_model import check_fused_model

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[1] == "cpu"])
def test_whole_model_through_every_cpu_tensor_backend(backend, device):
    """B0 through the Triton interpreter and the CUDA emulation too. 64x64 is the
    smallest input whose last BatchNorms still see more than one value per sample;
    below it float32 rounding alone makes the reference disagree with itself."""
    check_fused_model(backend, device, size=64)
