"""Host tier: the pack inside a real ComfyUI on the CPU (runs only when COMFYUI_PATH points to a checkout).

COMFYUI_PYTHON is the python that runs ComfyUI (default: this one). The models are the tiny random ones from
`python -m dimba_core.tiny_assets`, VAE included; DIMBA_TEST_VAE names another SDXL-architecture VAE
.safetensors to use instead.
"""
import copy
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import nodes
from dimba_core import tiny_assets
from test_workflows import CORE_NODES, PAIRS

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="set COMFYUI_PATH to a ComfyUI checkout for the host tier")

IN_PROCESS = r"""
import importlib, importlib.util, os, sys, tempfile, torch
comfy_path, repo, models = sys.argv[1:4]
sys.path.insert(0, comfy_path)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_management as mm, comfy.sample, safetensors.torch
spec = importlib.util.spec_from_file_location("ComfyUI_Dimba", f"{repo}/__init__.py", submodule_search_locations=[repo])
pack = importlib.util.module_from_spec(spec); sys.modules[spec.name] = pack; spec.loader.exec_module(pack)
host, core = importlib.import_module("ComfyUI_Dimba.nodes.host"), importlib.import_module("ComfyUI_Dimba.dimba_core")
T5TextEncoder = importlib.import_module("ComfyUI_Dimba.dimba_core.text").T5TextEncoder
N = pack.NODE_CLASS_MAPPINGS
ckpt, t5_dir = f"{models}/checkpoints/dimba_tiny.safetensors", f"{models}/text_encoders/t5_tiny"
model, t5 = host.load_model(ckpt), host.load_t5(t5_dir, "cpu")
encode = N["DimbaT5TextEncode"]().encode
pos, neg = encode(t5, "a cat on a mat")[0], encode(t5, "")[0]
assert pos[0][0].shape == (1, 300, 64) and pos[0][1]["attention_mask"].shape == (1, 300)
latent = {"samples": torch.randn(2, 4, 24, 40, generator=torch.Generator().manual_seed(1))}

# DimbaSampler gives exactly the headless result: dimba_core.sample seeded as dimba_core.pipeline seeds it
ref, enc = core.load_dimba(ckpt), T5TextEncoder.from_pretrained(t5_dir)
(pe, pm), (ne, _) = enc.encode(["a cat on a mat"]), enc.encode([""])
assert torch.equal(pe, pos[0][0]) and torch.equal(pm, pos[0][1]["attention_mask"])
sampler = N["DimbaSampler"]()
for name in core.SAMPLERS:
    for denoise in (1.0, 0.6):
        got = sampler.sample(model, pos, neg, latent, 7, 4, 4.5, name, denoise)[0]["samples"]
        init = latent["samples"] * 0.13025 if denoise < 1 else None
        want = core.sample(ref, core.noise_like((2, 4, 24, 40), 7), pe.expand(2, -1, -1), ne.expand(2, -1, -1),
                           mask=pm.expand(2, -1), steps=4, cfg_scale=4.5, sampler=name, init_latent=init,
                           generator=torch.Generator("cpu").manual_seed(8), denoise=denoise) / 0.13025
        assert torch.equal(got, want), (name, denoise, float((got - want).abs().max()))

# KSampler: DimbaT5 conditioning (300 tokens + mask) equals CLIPLoader(pixart)-style conditioning (no mask)
noise = comfy.sample.prepare_noise(latent["samples"], 3)
run = lambda p, n, s="euler", sch="normal": comfy.sample.sample(model, noise, 4, 4.5, s, sch, p, n, latent["samples"],
                                                                seed=3, disable_pbar=True)
masked = run(pos, neg)
clip_pos, clip_neg = [[pe[:, :int(pm.sum())], {"pooled_output": None}]], [[ne[:, :1], {"pooled_output": None}]]
assert masked.shape == (2, 4, 24, 40) and torch.isfinite(masked).all()
assert torch.allclose(masked, run(clip_pos, clip_neg), atol=1e-3, rtol=1e-3)
assert torch.isfinite(sampler.sample(model, clip_pos, clip_neg, latent, 7, 4, 4.5, "dpmpp_2m")[0]["samples"]).all()
for s, sch in [("dpmpp_2m", "karras"), ("uni_pc", "simple"), ("ddim", "ddim_uniform")]:
    assert torch.isfinite(run(pos, neg, s, sch)).all(), (s, sch)

def error(fn):
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    raise AssertionError("no error")
wide = [[torch.zeros(1, 5, 32), {"pooled_output": None}]]
assert "caption_channels" in error(lambda: sampler.sample(model, wide, wide, latent, 0, 2, 4.5, "ddim"))
assert "caption_channels" in error(lambda: run(wide, wide))
assert "multiples of 16" in error(lambda: sampler.sample(model, pos, neg, {"samples": torch.zeros(1, 4, 25, 40)},
                                                         0, 2, 4.5, "ddim"))
bad = os.path.join(tempfile.mkdtemp(), "sd15.safetensors")
safetensors.torch.save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, bad)
assert "not a Dimba checkpoint" in error(lambda: host.load_model(bad))
fresh = host.load_model(ckpt)  # low-VRAM budgets still load every weight: the layers are plain torch modules
fresh.partially_load(torch.device("cpu"), 1)
assert not fresh.model.model_lowvram and fresh.loaded_size() == fresh.model_size()
assert fresh.partially_unload(torch.device("cpu"), 1) == 0
sd3 = {"samples": torch.randn(1, 16, 24, 40)}  # an SD3/Flux latent: both samplers say which node to use
for fail in (lambda: sampler.sample(model, pos, neg, sd3, 0, 2, 4.5, "ddim"),
             lambda: comfy.sample.sample(model, noise[:1, :1].repeat(1, 16, 1, 1), 2, 4.5, "euler", "normal", pos,
                                         neg, sd3["samples"], seed=3, disable_pbar=True)):
    message = error(fail)
    assert "16 channels" in message and "EmptyLatentImage" in message and "VAEEncode" in message, message
sys.stderr.write("console bar check\n")
sampler.sample(model, pos, neg, latent, 0, 3, 4.5, "euler")  # tqdm on stderr, as KSampler's console bar
mm.interrupt_current_processing(True)
assert "Interrupt" in error(lambda: sampler.sample(model, pos, neg, latent, 0, 2, 4.5, "ddim"))
mm.interrupt_current_processing(False)
print("in-process checks passed")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A throwaway ComfyUI base directory: the pack linked into custom_nodes, the tiny models and VAE."""
    root = tmp_path_factory.mktemp("comfybase")
    (root / "custom_nodes").mkdir()
    (root / "custom_nodes" / "ComfyUI-Dimba").symlink_to(REPO, target_is_directory=True)
    subprocess.run([PYTHON, "-m", "dimba_core.tiny_assets", str(root / "models")], cwd=REPO, check=True,
                   capture_output=True)
    vae = root / "models" / "vae" / tiny_assets.VAE_FILE
    assert vae.is_file(), "dimba_core.tiny_assets wrote no VAE"
    if os.environ.get("DIMBA_TEST_VAE"):  # another SDXL-architecture VAE under the name the workflows use
        vae.unlink()
        vae.symlink_to(Path(os.environ["DIMBA_TEST_VAE"]).resolve())
    return root


@pytest.fixture(scope="module")
def server(base):
    """ComfyUI on the CPU at 127.0.0.1:<free port>; yields its URL."""
    port = free_port()
    log = open(base / "comfyui.log", "w")
    proc = subprocess.Popen([PYTHON, str(Path(COMFYUI_PATH) / "main.py"), "--cpu", "--listen", "127.0.0.1",
                             "--port", str(port), "--base-directory", str(base), "--disable-auto-launch",
                             "--database-url", "sqlite:///:memory:"], cwd=base, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode}:\n{(base / 'comfyui.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/object_info/SaveImage", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.time() > deadline:
                    pytest.fail("ComfyUI did not start in 240 s")
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


def run_graph(url, graph, timeout=600):
    """Queue an API graph and wait for it; returns the history entry."""
    data = json.dumps({"prompt": graph, "client_id": "dimba-test"}).encode()
    request = urllib.request.Request(f"{url}/prompt", data=data, headers={"Content-Type": "application/json"})
    try:
        prompt_id = json.load(urllib.request.urlopen(request, timeout=30))["prompt_id"]
    except urllib.error.HTTPError as err:
        pytest.fail(f"ComfyUI rejected the graph: {err.read().decode()}")
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = get(f"{url}/history/{prompt_id}")
        if prompt_id in history:  # history holds a prompt once it has finished
            return history[prompt_id]
        time.sleep(0.5)
    pytest.fail(f"graph did not finish in {timeout} s")


def saved_sizes(base, entry):
    """(width, height) of every PNG the graph saved, read from the PNG headers."""
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"]["messages"])[-3000:]
    sizes = []
    for output in entry["outputs"].values():
        for image in output.get("images", []):
            path = base / "output" / image["subfolder"] / image["filename"]
            sizes.append(struct.unpack(">II", path.read_bytes()[16:24]))
    return sizes


def expected_size(graph):
    """(width, height) of an API graph's EmptyLatentImage, following links to DimbaResolutionSelect."""
    latent = next(n for n in graph.values() if n["class_type"] == "EmptyLatentImage")["inputs"]
    width = latent["width"]
    if isinstance(width, list):
        select = graph[width[0]]["inputs"]
        return nodes.DimbaResolutionSelect().select(select["base_resolution"], select["aspect_ratio"])
    return width, latent["height"]


def test_pack_registered(server, base):
    info = get(f"{server}/object_info")
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        assert name in info, f"{name} missing from /object_info"
        assert info[name]["input_order"]["required"] == list(cls.INPUT_TYPES()["required"])
    assert info["DimbaCheckpointLoader"]["input"]["required"]["ckpt_name"][0] == ["dimba_tiny.safetensors"]
    assert info["DimbaT5Loader"]["input"]["required"]["t5_name"][0] == ["t5_tiny"]
    assert "IMPORT FAILED" not in (base / "comfyui.log").read_text()


def test_core_node_table(server):
    """CORE_NODES (used by the headless workflow tests) matches this ComfyUI."""
    for name, (inputs, outputs) in CORE_NODES.items():
        info = get(f"{server}/object_info/{name}")[name]
        spec = {**info["input"]["required"], **info["input"].get("optional", {})}
        assert list(inputs) == [k for k in info["input_order"]["required"] + info["input_order"].get("optional", [])
                                if k in inputs]
        for key, kind in inputs.items():
            assert (spec[key][0] if isinstance(spec[key][0], str) else "COMBO") == kind, (name, key)
        assert tuple(info["output"]) == outputs


@pytest.mark.parametrize("name", sorted(PAIRS.values()))
def test_api_workflow(server, base, name):
    graph = json.loads((WORKFLOWS / "api" / name).read_text())
    t0 = time.time()
    sizes = saved_sizes(base, run_graph(server, graph))
    print(f"{name}: {time.time() - t0:.1f} s")
    assert sizes == [expected_size(graph)]


def test_done_when_graph(server, base):
    """Dimba loaders and T5 encode feed DimbaSampler and KSampler (euler) in one graph: four 320x192 images."""
    graph = json.loads((WORKFLOWS / "api" / "dimba_txt2img_api.json").read_text())
    graph = {k: v for k, v in graph.items() if v["class_type"] != "DimbaResolutionSelect"}
    graph["6"]["inputs"].update(width=320, height=192, batch_size=2)
    graph["4"]["inputs"]["text"] = ""
    graph["7"]["inputs"]["steps"] = 10
    graph["11"] = {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "seed": 42, "steps": 10, "cfg": 4.5, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["6", 0], "denoise": 1.0}}
    graph["12"] = {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["8", 0]}}
    graph["13"] = copy.deepcopy(graph["10"])
    graph["13"]["inputs"].update(images=["12", 0], filename_prefix="dimba_done_ksampler")
    graph["10"]["inputs"]["filename_prefix"] = "dimba_done_dimbasampler"
    t0 = time.time()
    sizes = saved_sizes(base, run_graph(server, graph))
    print(f"done-when graph: {time.time() - t0:.1f} s")
    assert sizes == [(320, 192)] * 4


def test_bad_size_is_reported(server):
    """A size that is not a multiple of 16 fails the prompt with a message that says what to change."""
    graph = json.loads((WORKFLOWS / "api" / "dimba_txt2img_api.json").read_text())
    graph = {k: v for k, v in graph.items() if v["class_type"] != "DimbaResolutionSelect"}
    graph["6"]["inputs"].update(width=328, height=192)
    entry = run_graph(server, graph)
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and "multiples of 16" in errors[0]["exception_message"]


def test_in_process(base):
    """DimbaSampler == headless dimba_core.sample; KSampler with masked and mask-less T5 conditioning; errors."""
    result = subprocess.run([PYTHON, "-c", IN_PROCESS, COMFYUI_PATH, str(REPO), str(base / "models")],
                            cwd=COMFYUI_PATH, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "in-process checks passed" in result.stdout
    assert "3/3" in result.stderr.split("console bar check")[-1], "DimbaSampler prints no console progress bar"


def test_workflow_templates(server):
    """Every entry of the Templates browser opens: UI format with a version, and its thumbnail is served."""
    listed = get(f"{server}/workflow_templates")["ComfyUI-Dimba"]
    assert sorted(listed) == sorted(Path(n).stem for n in PAIRS)  # not the API files in workflows/api/
    for name in listed:
        workflow = get(f"{server}/api/workflow_templates/ComfyUI-Dimba/{name}.json")
        assert "version" in workflow and workflow["nodes"], name
        with urllib.request.urlopen(f"{server}/api/workflow_templates/ComfyUI-Dimba/{name}.jpg", timeout=30) as r:
            assert r.status == 200 and r.read(3) == b"\xff\xd8\xff", name


COMPILE = r"""
import importlib, importlib.util, sys, time, torch
comfy_path, repo, models = sys.argv[1:4]
sys.path.insert(0, comfy_path)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.sample
from comfy_extras.nodes_torch_compile import TorchCompileModel
spec = importlib.util.spec_from_file_location("ComfyUI_Dimba", f"{repo}/__init__.py", submodule_search_locations=[repo])
pack = importlib.util.module_from_spec(spec); sys.modules[spec.name] = pack; spec.loader.exec_module(pack)
host = importlib.import_module("ComfyUI_Dimba.nodes.host")
model, t5 = host.load_model(f"{models}/checkpoints/dimba_tiny.safetensors"), host.load_t5(f"{models}/text_encoders/t5_tiny", "cpu")
encode = pack.NODE_CLASS_MAPPINGS["DimbaT5TextEncode"]().encode
pos, neg = encode(t5, "a cat on a mat")[0], encode(t5, "")[0]
latent = torch.zeros(1, 4, 16, 16)
noise = comfy.sample.prepare_noise(latent, 5)
run = lambda m: comfy.sample.sample(m, noise, 3, 4.5, "euler", "normal", pos, neg, latent, seed=5, disable_pbar=True)
eager = run(model)
compiled = TorchCompileModel.execute(model, "inductor").result[0]
t0 = time.time()
out = run(compiled)
from torch._dynamo.utils import counters
breaks = sum(counters["graph_break"].values())
print(f"compiled KSampler run: {time.time() - t0:.1f} s, {counters['stats']['unique_graphs']} graphs, {breaks} graph breaks")
for reason, n in list(counters["graph_break"].items())[:5]:
    print(f"  break x{n}: {reason[:200]}")
assert compiled.model_options.get("torch_compile_kwargs", {}).get("backend") == "inductor"
assert torch.isfinite(out).all() and torch.allclose(out, eager, atol=1e-3, rtol=1e-3), float((out - eager).abs().max())
print("compile checks passed")
"""


def test_torch_compile_model(base):
    """ComfyUI's TorchCompileModel (inductor) accepts the Dimba MODEL; KSampler through it matches eager."""
    result = subprocess.run([PYTHON, "-c", COMPILE, COMFYUI_PATH, str(REPO), str(base / "models")],
                            cwd=COMFYUI_PATH, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compile checks passed" in result.stdout
    print(result.stdout)
