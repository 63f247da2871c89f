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

    from dimba_core import Dimba
    from dimba_test_helpers import reference_config

    def build(name, backend="torch", dtype=torch.float32):
        tensors, meta = golden
        model = Dimba(reference_config(**json.loads(meta[name])), scan_backend=backend)
        model.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
        return model.to(dtype).eval()

    return build


@pytest.fixture(scope="session")
def manifest(shared_dir):
    """{preset: {"keys": {key: shape}, "params": n}} of the published checkpoints."""
    return json.loads(_fixture_file(shared_dir, "dimba_official_keys.json").read_text())


# --- trainer fixtures: tests/test_train.py and tests/test_train_hostile.py --------------------------------

TRAIN_CAPTIONS = ("a red square", "a blue circle", "green stripes", "a yellow dot")


def _write_train_images(folder: Path, n: int = 4) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = np.zeros((80, 96, 3), np.uint8)
        a[..., i % 3] = 200
        a[:: 4 + 2 * i] = 255
        Image.fromarray(a).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(TRAIN_CAPTIONS[i % len(TRAIN_CAPTIONS)])
    return folder


@pytest.fixture(scope="session")
def write_images():
    """write_images(folder, n=4): n small RGB PNGs, each with a same-name .txt caption (TRAIN_CAPTIONS in turn)."""
    return _write_train_images


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The trainer's tiny assets (checkpoint, t5, vae), 4 captioned images and a cache folder, one set per module;
    torch on one thread meanwhile."""
    pytest.importorskip("diffusers")
    import torch

    from dimba_core.tiny_assets import write_tiny_assets

    root = tmp_path_factory.mktemp("train")
    paths = write_tiny_assets(root / "models")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is several times faster than two on a busy 2-core box
    yield dict(root=root, data=_write_train_images(root / "data"), cache=root / "cache", captions=TRAIN_CAPTIONS,
               **paths)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def train_cache(env):
    """env's latent cache (64 px crops, T5 in bf16), encoded once per module into env["cache"]; runs on it reuse
    it, and those without --t5/--vae need it."""
    import torch

    from dimba_core.train import TrainOptions
    from dimba_core.train.batches import prepare_cache

    opts = TrainOptions(checkpoint=str(env["checkpoint"]), data=str(env["data"]), out=str(env["root"] / "unused"),
                        t5=str(env["t5"]), vae=str(env["vae"]), cache_dir=str(env["cache"]), image_size=64,
                        progress=False)
    return prepare_cache(opts, 0, 1, torch.device("cpu"), 64)
