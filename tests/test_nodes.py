"""Headless tier for the ComfyUI nodes: the public node contract, the pack layout and the tiny assets."""
import ast
import importlib.util
import inspect
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import nodes
from dimba_core import load_dimba
from dimba_core.resolution import closest_bucket

REPO = Path(__file__).resolve().parents[1]
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")

# The public interface from the issue: required inputs (in order) and outputs of each node.
INTERFACE = {
    "DimbaCheckpointLoader": (["ckpt_name", "weight_dtype"], ("MODEL",)),
    "DimbaT5Loader": (["t5_name", "device", "dtype"], ("DIMBA_T5",)),
    "DimbaT5TextEncode": (["t5", "text"], ("CONDITIONING",)),
    "DimbaSampler": (["model", "positive", "negative", "latent_image", "seed", "steps", "cfg", "sampler_name"],
                     ("LATENT",)),
    "DimbaResolutionSelect": (["base_resolution", "aspect_ratio"], ("INT", "INT")),
}


def all_inputs(cls):
    spec = cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


def is_widget(spec):
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def test_mappings_name_every_node():
    assert set(nodes.NODE_CLASS_MAPPINGS) == set(INTERFACE)
    assert set(nodes.NODE_DISPLAY_NAME_MAPPINGS) == set(INTERFACE)


@pytest.mark.parametrize("name", sorted(INTERFACE))
def test_node_contract(name):
    cls = nodes.NODE_CLASS_MAPPINGS[name]
    required, outputs = INTERFACE[name]
    spec = cls.INPUT_TYPES()
    assert list(spec["required"]) == required
    assert set(spec) <= {"required", "optional", "hidden"}
    assert cls.RETURN_TYPES == outputs
    assert len(cls.OUTPUT_TOOLTIPS) == len(outputs) and all(cls.OUTPUT_TOOLTIPS)
    assert len(getattr(cls, "RETURN_NAMES", outputs)) == len(outputs)
    assert cls.CATEGORY.startswith("Dimba/") and cls.DESCRIPTION
    params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    for input_name, (kind, *rest) in all_inputs(cls).items():
        opts = rest[0] if rest else {}
        assert opts.get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert input_name in params, f"{name}.{cls.FUNCTION} does not take {input_name}"
        if is_widget((kind,)):
            assert "default" in opts, f"{name}.{input_name} has no default"
            if isinstance(kind, list) and kind:
                assert opts["default"] in kind
            if "min" in opts:
                assert opts["min"] <= opts["default"] <= opts["max"]
    for optional in spec.get("optional", {}):
        assert params[optional].default is not inspect.Parameter.empty


def test_sampler_inputs():
    spec = nodes.DimbaSampler.INPUT_TYPES()
    req = spec["required"]
    assert req["steps"][1]["default"] == 20 and req["cfg"][1]["default"] == 4.5
    assert req["sampler_name"][0][0] == "dpmpp_2m" and {"ddim", "iddpm"} <= set(req["sampler_name"][0])
    assert req["seed"][1]["control_after_generate"]
    assert spec["optional"]["denoise"][1]["default"] == 1.0
    assert nodes.DimbaT5TextEncode.INPUT_TYPES()["required"]["text"][1]["multiline"]


def test_choices():
    assert nodes.DimbaCheckpointLoader.INPUT_TYPES()["required"]["weight_dtype"][0] == [
        "default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2", "fp16", "bf16", "fp32"]  # Load Diffusion Model's
    t5 = nodes.DimbaT5Loader.INPUT_TYPES()["required"]
    assert t5["device"][0] == ["default", "cpu"] and t5["dtype"][0] == ["default", "fp16", "bf16", "fp32"]
    res = nodes.DimbaResolutionSelect.INPUT_TYPES()["required"]
    assert res["base_resolution"][0] == [512, 1024, 2048] and res["aspect_ratio"][1]["default"] == "1.0"


@pytest.mark.parametrize("base", [512, 1024, 2048])
def test_resolution_select(base):
    node = nodes.DimbaResolutionSelect()
    for ratio in nodes.DimbaResolutionSelect.INPUT_TYPES()["required"]["aspect_ratio"][0]:
        width, height = node.select(base, ratio)
        assert (height, width) == closest_bucket(float(ratio), base)
        assert width % 16 == 0 and height % 16 == 0
    assert node.select(base, "1.0") == (base, base)
    assert node.select(1024, "0.6") == (1280, 768)


def test_resolution_default_is_the_published_checkpoints():
    """dimba-l-512 is trained at 512 px: the node starts there."""
    assert nodes.DimbaResolutionSelect.INPUT_TYPES()["required"]["base_resolution"][1]["default"] == 512


@pytest.mark.parametrize("shape, words", [
    ((1, 16, 64, 64), ["16 channels", "EmptySD3LatentImage", "EmptyLatentImage", "VAEEncode", "SDXL VAE"]),
    ((1, 3, 64, 64), ["3 channels", "EmptyLatentImage"]),
    ((1, 16, 4, 64, 64), ["5-D", "EmptyLatentImage"]),
    ((1, 4, 25, 40), ["multiples of 16", "DimbaResolutionSelect"]),
])
def test_latent_errors_name_the_node_to_use(shape, words):
    from dimba_core import DimbaConfig
    from nodes.common import check_latent

    config = DimbaConfig()
    with pytest.raises(ValueError) as err:
        check_latent(shape, config)
    assert all(w in str(err.value) for w in words), str(err.value)
    check_latent((2, 4, 24, 40), config)


def test_no_comfy_outside_host():
    """Only nodes/host.py and nodes/integration.py import ComfyUI modules, and importing the nodes does not."""
    host_only = {"comfy", "folder_paths", "latent_preview"}
    for path in list((REPO / "nodes").glob("*.py")) + list((REPO / "dimba_core").rglob("*.py")):
        top = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                top.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                top.add(node.module.split(".")[0])
        if path.parent.name == "nodes" and path.name in ("host.py", "integration.py"):
            continue
        if path.parent.name == "nodes" and path.name == "loaders.py":
            top -= {"folder_paths"}  # imported inside a function, with a fallback
        assert not top & host_only, f"{path} imports {top & host_only}"
    code = "import nodes, sys; assert not {'comfy', 'folder_paths'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_pack_loads_like_comfyui():
    """ComfyUI imports the folder as a package named after it: relative imports must work, sys.path untouched."""
    before = list(sys.path)
    spec = importlib.util.spec_from_file_location("ComfyUI-Dimba-test", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert set(module.NODE_CLASS_MAPPINGS) == set(INTERFACE)
        assert module.NODE_CLASS_MAPPINGS["DimbaSampler"] is not nodes.DimbaSampler  # a separate, relative copy
    finally:
        for key in [k for k in sys.modules if k.startswith(spec.name)]:
            del sys.modules[key]
    assert sys.path == before


def test_model_lists_with_folder_paths(tmp_path, monkeypatch):
    """T5 folders and single files are listed; files inside a T5 folder are not; names resolve to paths."""
    te, ck = tmp_path / "text_encoders", tmp_path / "checkpoints"
    (te / "t5_tiny").mkdir(parents=True)
    (te / "t5_tiny" / "config.json").write_text("{}")
    (te / "t5_tiny" / "model.safetensors").write_bytes(b"")
    (te / "t5xxl_fp16.safetensors").write_bytes(b"")
    ck.mkdir()
    (ck / "dimba.safetensors").write_bytes(b"")
    dirs = {"text_encoders": [str(te)], "checkpoints": [str(ck)], "diffusion_models": []}

    def filenames(kind):
        return sorted(str(p.relative_to(d)) for d in map(Path, dirs[kind]) for p in d.rglob("*") if p.is_file())

    fake = types.SimpleNamespace(get_folder_paths=dirs.get, get_filename_list=filenames,
                                 get_full_path=lambda kind, name: next(
                                     (str(Path(d) / name) for d in dirs[kind] if (Path(d) / name).is_file()), None))
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    from nodes import loaders

    assert loaders.t5_names() == ["t5_tiny", "t5xxl_fp16.safetensors"]
    assert loaders.t5_path("t5_tiny") == str(te / "t5_tiny")
    assert loaders.checkpoint_names() == ["dimba.safetensors"]
    assert loaders.checkpoint_path("dimba.safetensors") == str(ck / "dimba.safetensors")
    with pytest.raises(ValueError, match="not found"):
        loaders.checkpoint_path("missing.safetensors")
    with pytest.raises(ValueError, match="text_encoders"):
        loaders.t5_path("t5xxl_missing.safetensors")


def test_tiny_assets(tmp_path, shared_dir):
    """`python -m dimba_core.tiny_assets` writes a Dimba and a T5 whose widths match, as ComfyUI folders."""
    subprocess.run([sys.executable, "-m", "dimba_core.tiny_assets", str(tmp_path), "--tokenizer",
                    str(shared_dir / "t5")], cwd=REPO, check=True, capture_output=True)
    from dimba_core.text import T5TextEncoder

    model = load_dimba(tmp_path / "checkpoints" / "dimba_tiny.safetensors")
    t5 = T5TextEncoder.from_pretrained(tmp_path / "text_encoders" / "t5_tiny")
    assert model.config.caption_channels == t5.hidden_size
    emb, mask = t5.encode(["a red bicycle"])
    with torch.no_grad():
        out = model(torch.randn(1, 4, 24, 40), torch.tensor([500.0]), emb, mask)
    assert out.shape == (1, 8, 24, 40) and torch.isfinite(out).all() and 0.01 < out.std() < 10


def test_pyproject_mirrors_requirements_without_torch():
    """pyproject.toml mirrors requirements.txt for the Comfy registry, and neither installs torch."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    reqs = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert project["project"]["name"] == "comfyui-dimba" and project["project"]["version"]
    assert project["project"]["dependencies"] == reqs
    assert not any(r.split("=")[0].split(">")[0].split("<")[0].strip().lower() == "torch" for r in reqs)
    assert {"PublisherId", "DisplayName", "Icon"} <= set(project["tool"]["comfy"])
    assert project["project"]["urls"]


def test_registry_security_scan_is_clean():
    """What `comfy node validate` flags (ruff S102 exec, S307 eval, E702 `;`) appears nowhere in the pack."""
    import io
    import tokenize

    skip = {"venv", "build", "dist", "node_modules", "site-packages", "__pycache__"}
    for path in REPO.rglob("*.py"):
        if skip & set(path.relative_to(REPO).parts) or any(p.startswith(".") for p in path.relative_to(REPO).parts):
            continue
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("exec", "eval"), f"{path}:{node.lineno} calls {node.func.id}"
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            assert tok.string != ";" or tok.type != tokenize.OP, f"{path}:{tok.start[0]}: two statements on a line"
