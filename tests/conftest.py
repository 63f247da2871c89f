"""Shared pytest fixtures: the read-only assets in ../shared beside the checkout (tests skip without them)."""
import json
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_dir():
    """The shared assets folder (fixtures/, t5/); skips the test when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"shared assets folder not found: {SHARED}")
    return SHARED


def _fixture_file(shared_dir, name):
    path = shared_dir / "fixtures" / name
    if not path.is_file():
        pytest.skip(f"fixture not found: {path}")
    return path


@pytest.fixture(scope="session")
def golden(shared_dir):
    """Golden tensors of the published code (dimba_reference_tiny.safetensors) and their metadata."""
    from safetensors import safe_open

    with safe_open(str(_fixture_file(shared_dir, "dimba_reference_tiny.safetensors")), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="session")
def golden_model(golden):
    """golden_model(name, backend="torch", dtype=float32): model_a / model_b of the golden file, loaded."""
    import torch

    from dimba_core import Dimba, DimbaConfig

    def build(name, backend="torch", dtype=torch.float32):
        tensors, meta = golden
        model = Dimba(DimbaConfig.from_reference(**json.loads(meta[name])), scan_backend=backend)
        model.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
        return model.to(dtype).eval()

    return build


@pytest.fixture(scope="session")
def manifest(shared_dir):
    """{preset: {"keys": {key: shape}, "params": n}} of the published checkpoints."""
    return json.loads(_fixture_file(shared_dir, "dimba_official_keys.json").read_text())
