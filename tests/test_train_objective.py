"""training_losses against the reference objective's golden terms and gradients (fixtures/dimba_reference_train_tiny)."""
import json

import pytest
import torch

from dimba_core import Dimba, ops, training_losses
from dimba_test_helpers import reference_config, rel_err

FIXTURE = "fixtures/dimba_reference_train_tiny.safetensors"


@pytest.fixture(scope="module")
def golden(shared_dir):
    from safetensors import safe_open

    path = shared_dir / FIXTURE
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with safe_open(str(path), framework="pt") as f:
        config = reference_config(**json.loads(f.metadata()["model"]))
        groups = {}
        for key in f.keys():
            group, name = key.split(".", 1)
            groups.setdefault(group, {})[name] = f.get_tensor(key)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster than two on a busy 2-core box
    yield config, groups
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-5), (torch.float32, 1e-3)])
def test_terms_and_gradients_match_the_reference(golden, dtype, tol):
    config, g = golden
    model = Dimba(config).to(dtype)
    model.load_state_dict(g["model"])
    model.set_scan_backend("parallel" if "parallel" in ops.BACKENDS else "ref")  # differentiable scans
    out = {}
    model.register_forward_hook(lambda m, args, result: out.setdefault("y", result))
    inp = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in g["in"].items()}
    terms = training_losses(model, inp["x_start"], inp["t"], inp["y"], inp["mask"], inp["noise"])
    for name in ("loss", "mse", "vb"):
        assert terms[name].shape == (3,) and terms[name].dtype == dtype
        assert rel_err(terms[name].detach(), g["out"][name]) < tol, name
    (vb_grad,) = torch.autograd.grad(terms["vb"].sum(), out["y"], retain_graph=True)
    assert vb_grad[:, :4].abs().max() == 0 and vb_grad[:, 4:].abs().max() > 0  # vb trains the variance only
    terms["loss"].mean().backward()
    params = dict(model.named_parameters())
    assert set(g["grad"]) == set(params)
    names = sorted(g["grad"])
    ours = torch.cat([params[n].grad.flatten() for n in names])
    ref = torch.cat([g["grad"][n].flatten() for n in names])
    assert rel_err(ours, ref) < tol


def test_bad_timesteps_are_a_clear_error(golden):
    config, g = golden
    model = Dimba(config).double()
    with pytest.raises(ValueError, match=r"one integer timestep in \[0, 1000\)"):
        training_losses(model, g["in"]["x_start"], torch.tensor([0, 5, 1000]), g["in"]["y"])
