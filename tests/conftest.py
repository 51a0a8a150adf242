import os

import pytest
import torch

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the property tests skip themselves; everything else runs
    settings = None

if settings is not None:
    # Property tests (hypothesis): derandomized, so every run tries the same examples and CI cannot
    # flake; no example database, so runs leave no files behind. "bminf" keeps all property tests
    # together under a minute on 2 cores (about 10 s); HYPOTHESIS_PROFILE=thorough tries 1000 each.
    _COMMON = dict(derandomize=True, database=None, deadline=None, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    settings.register_profile("bminf", max_examples=25, **_COMMON)
    settings.register_profile("thorough", max_examples=1000, **_COMMON)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "bminf"))


def pytest_collection_modifyitems(config, items):
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_multi = pytest.mark.skip(reason="needs two CUDA devices")
    for item in items:
        if "gpu" in item.keywords and n_gpus == 0:
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and n_gpus < 2:
            item.add_marker(skip_multi)
