"""Host tier: the pack inside a real ComfyUI on the CPU (runs only when COMFYUI_PATH points to a checkout).

COMFYUI_PYTHON is the python that runs ComfyUI (default: this one). The models are the tiny random ones from
`python -m dimba_core.tiny_assets`, VAE included; DIMBA_TEST_VAE names another SDXL-architecture VAE
.safetensors to use instead.
"""
import copy
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import safetensors.torch
from PIL import Image, ImageChops, ImageDraw

import nodes
from dimba_core import tiny_assets
from test_workflows import CORE_NODES, PAIRS

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
TRAIN_API = "dimba_train_lora_api.json"  # trains, so the host tier runs it at test size (test_train_lora_workflow)
HIRES_API = "dimba_hires_fix_api.json"  # 512 -> 768 px, 2 x 20 steps: minutes on a small CPU, so test_api_workflow
# runs it at 256 -> 384 px, 10 + 10 steps (the shipped size ran from the frontend: 768 x 768 in 71 s on 2 cores)
pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="set COMFYUI_PATH to a ComfyUI checkout for the host tier")

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
    (root / "models" / "diffusion_models").mkdir(exist_ok=True)  # for Load Diffusion Model (UNETLoader)
    (root / "models" / "diffusion_models" / "dimba_tiny_unet.safetensors").symlink_to(
        root / "models" / "checkpoints" / "dimba_tiny.safetensors")
    vae = root / "models" / "vae" / tiny_assets.VAE_FILE
    assert vae.is_file(), "dimba_core.tiny_assets wrote no VAE"
    if os.environ.get("DIMBA_TEST_VAE"):  # another SDXL-architecture VAE under the name the workflows use
        vae.unlink()
        vae.symlink_to(Path(os.environ["DIMBA_TEST_VAE"]).resolve())
    # dimba_train_lora's image folder (ComfyUI/input/<folder>): three small images of different colours
    folder = next(n for n in json.loads((WORKFLOWS / "api" / TRAIN_API).read_text()).values()
                  if n["class_type"] == "LoadImageSetFromFolderNode")["inputs"]["folder"]
    (root / "input" / folder).mkdir(parents=True)
    for i, colour in enumerate([(200, 40, 40), (40, 160, 60), (30, 60, 200)]):
        image = Image.new("RGB", (64, 64), colour)
        ImageDraw.Draw(image).ellipse((8 + 8 * i, 12, 52, 56), fill=(240, 220, 60))
        image.save(root / "input" / folder / f"train_{i}.png")
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
    """(width, height) of every PNG the graph saved to output/ (not previews in temp/), from the PNG headers."""
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"]["messages"])[-3000:]
    sizes = []
    for output in entry["outputs"].values():
        for image in output.get("images", []):
            if image.get("type", "output") != "output":
                continue
            path = base / "output" / image["subfolder"] / image["filename"]
            sizes.append(struct.unpack(">II", path.read_bytes()[16:24]))
    return sizes


def expected_size(graph):
    """(width, height) of an API graph's EmptyLatentImage, following links to DimbaResolutionSelect, times the
    scale_by of a LatentUpscaleBy (applied to the 8x smaller latent and rounded, as ComfyUI does)."""
    latent = next(n for n in graph.values() if n["class_type"] == "EmptyLatentImage")["inputs"]
    width = latent["width"]
    if isinstance(width, list):
        select = graph[width[0]]["inputs"]
        size = nodes.DimbaResolutionSelect().select(select["base_resolution"], select["aspect_ratio"])
    else:
        size = width, latent["height"]
    for upscale in (n["inputs"] for n in graph.values() if n["class_type"] == "LatentUpscaleBy"):
        size = tuple(8 * round(side // 8 * upscale["scale_by"]) for side in size)
    return tuple(size)


def test_pack_registered(server, base):
    info = get(f"{server}/object_info")
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        assert name in info, f"{name} missing from /object_info"
        assert info[name]["input_order"]["required"] == list(cls.INPUT_TYPES()["required"])
    assert info["DimbaCheckpointLoader"]["input"]["required"]["ckpt_name"][0] == [  # checkpoints, then diffusion_models
        "dimba_tiny.safetensors", "dimba_tiny_unet.safetensors"]
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


@pytest.mark.parametrize("name", sorted(set(PAIRS.values()) - {TRAIN_API}))
def test_api_workflow(server, base, name):
    graph = json.loads((WORKFLOWS / "api" / name).read_text())
    if name == HIRES_API:
        node = {v["class_type"]: v["inputs"] for v in graph.values()}  # each of these types occurs once
        node["EmptyLatentImage"].update(width=256, height=256)  # DimbaResolutionSelect is left unconnected
        node["DimbaSampler"]["steps"] = node["KSampler"]["steps"] = 10
    t0 = time.time()
    sizes = saved_sizes(base, run_graph(server, graph))
    print(f"{name}: {time.time() - t0:.1f} s")
    assert sizes == [expected_size(graph)]


def saved_image(base, entry, node_id):
    """The image a SaveImage node of a finished graph wrote to output/."""
    image = entry["outputs"][node_id]["images"][0]
    return Image.open(base / "output" / image["subfolder"] / image["filename"]).convert("RGB")


def with_base_model_preview(graph, sampler, model, prefix):
    """Adds a copy of `sampler` that samples `model` instead, decoded and saved as `prefix`; returns its save node."""
    decode = next(k for k, v in graph.items() if v["class_type"] == "VAEDecode" and v["inputs"]["samples"][0] == sampler)
    graph["90"] = copy.deepcopy(graph[sampler])
    graph["90"]["inputs"]["model"] = model
    graph["91"] = {"class_type": "VAEDecode", "inputs": {"samples": ["90", 0], "vae": graph[decode]["inputs"]["vae"]}}
    graph["92"] = {"class_type": "SaveImage", "inputs": {"images": ["91", 0], "filename_prefix": prefix}}
    return "92"


def test_train_lora_workflow(server, base):
    """workflows/dimba_train_lora at test size (2 steps, 64 px): ComfyUI's TrainLoraNode trains a LoRA on the Dimba
    MODEL, SaveLoRANode writes it, LossGraphNode plots the loss, and the trained model's preview differs from the
    base model's; then the saved file loads through LoraLoaderModelOnly as the workflow's note says, every key
    matched, and changes the image too."""
    graph = json.loads((WORKFLOWS / "api" / TRAIN_API).read_text())
    node = {v["class_type"]: v["inputs"] for v in graph.values()}  # the types changed here occur once
    node["TrainLoraNode"].update(steps=2, learning_rate=0.02)  # a large rate, so that 2 steps show in the images
    node["ImageScale"].update(width=64, height=64)
    node["EmptyLatentImage"].update(width=64, height=64)
    node["DimbaSampler"]["steps"] = 2
    sampler = next(k for k, v in graph.items() if v["class_type"] == "DimbaSampler")
    checkpoint = next(k for k, v in graph.items() if v["class_type"] == "DimbaCheckpointLoader")
    save, loss_plot = (next(k for k, v in graph.items() if v["class_type"] == t) for t in ("SaveImage", "LossGraphNode"))
    no_lora = with_base_model_preview(graph, sampler, [checkpoint, 0], "dimba_lora_test_base")
    t0 = time.time()
    entry = run_graph(server, graph)
    print(f"{TRAIN_API} at 2 steps, 64 px: {time.time() - t0:.1f} s")
    assert saved_sizes(base, entry) == [(64, 64)] * 2
    assert ImageChops.difference(saved_image(base, entry, save), saved_image(base, entry, no_lora)).getbbox(), \
        "the preview of the trained model_with_lora is the base model's image"
    assert entry["outputs"][loss_plot]["images"][0]["type"] == "temp"
    prefix = Path(node["SaveLoRANode"]["prefix"])
    saved = sorted((base / "output" / prefix.parent).glob(f"{prefix.name}_2_steps_*.safetensors"))
    assert saved, f"no LoRA file {prefix}_2_steps_*.safetensors in output/"
    lora = safetensors.torch.load_file(saved[-1])
    down = [v for k, v in lora.items() if k.endswith(".lora_down.weight")]
    assert down and len(down) == sum(k.endswith(".lora_up.weight") for k in lora)
    assert all(v.abs().sum() > 0 for v in down), "a lora_down stayed at its zero start: the optimizer did not train it"

    # as the note says: the file in models/loras, Load Dimba Checkpoint -> LoraLoaderModelOnly -> Dimba Sampler
    (base / "models" / "loras").mkdir(exist_ok=True)
    lora_name = "dimba_train_lora_test.safetensors"
    (base / "models" / "loras" / lora_name).write_bytes(saved[-1].read_bytes())
    use = json.loads((WORKFLOWS / "api" / "dimba_txt2img_api.json").read_text())
    use = {k: v for k, v in use.items() if v["class_type"] != "DimbaResolutionSelect"}
    use["6"]["inputs"].update(width=64, height=64)
    use["7"]["inputs"].update(steps=2, model=["11", 0])
    use["10"]["inputs"]["filename_prefix"] = "dimba_lora_loaded"
    use["11"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora_name,
                                                                   "strength_model": 1.0}}
    no_lora = with_base_model_preview(use, "7", ["1", 0], "dimba_lora_loaded_base")
    log_start = len((base / "comfyui.log").read_text())
    entry = run_graph(server, use)
    assert saved_sizes(base, entry) == [(64, 64)] * 2
    log = (base / "comfyui.log").read_text()[log_start:]
    assert "lora key not loaded" not in log, log[-3000:]
    assert ImageChops.difference(saved_image(base, entry, "10"), saved_image(base, entry, no_lora)).getbbox(), \
        "LoraLoaderModelOnly with the trained file leaves the image as it was"


def both_samplers_graph(width, height, steps, batch=1):
    """The txt2img API graph at a fixed size whose latent and prompts also feed a KSampler (euler, normal) on the
    same MODEL, decoded and saved by node "13" beside DimbaSampler's "10"."""
    graph = json.loads((WORKFLOWS / "api" / "dimba_txt2img_api.json").read_text())
    graph = {k: v for k, v in graph.items() if v["class_type"] != "DimbaResolutionSelect"}
    graph["6"]["inputs"].update(width=width, height=height, batch_size=batch)
    graph["7"]["inputs"]["steps"] = steps
    graph["11"] = {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "seed": 42, "steps": steps, "cfg": 4.5, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["6", 0], "denoise": 1.0}}
    graph["12"] = {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["8", 0]}}
    graph["13"] = copy.deepcopy(graph["10"])
    graph["13"]["inputs"]["images"] = ["12", 0]
    return graph


def test_done_when_graph(server, base):
    """Dimba loaders and T5 encode feed DimbaSampler and KSampler (euler) in one graph: four 320x192 images."""
    graph = both_samplers_graph(320, 192, 10, batch=2)
    graph["4"]["inputs"]["text"] = ""
    graph["13"]["inputs"]["filename_prefix"] = "dimba_done_ksampler"
    graph["10"]["inputs"]["filename_prefix"] = "dimba_done_dimbasampler"
    t0 = time.time()
    sizes = saved_sizes(base, run_graph(server, graph))
    print(f"done-when graph: {time.time() - t0:.1f} s")
    assert sizes == [(320, 192)] * 4


def test_load_diffusion_model_graph(server, base):
    """ComfyUI's own Load Diffusion Model (UNETLoader) on a Dimba file feeds DimbaSampler and KSampler: the images
    equal those of the same graph with Load Dimba Checkpoint."""
    graph = both_samplers_graph(128, 96, 4)
    images = {}
    for loader in ("DimbaCheckpointLoader", "UNETLoader"):
        if loader == "UNETLoader":
            graph["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "dimba_tiny_unet.safetensors",
                                                                  "weight_dtype": "default"}}
        graph["10"]["inputs"]["filename_prefix"] = f"dimba_{loader}_dimbasampler"
        graph["13"]["inputs"]["filename_prefix"] = f"dimba_{loader}_ksampler"
        entry = run_graph(server, graph)
        assert saved_sizes(base, entry) == [(128, 96)] * 2
        images[loader] = [saved_image(base, entry, n) for n in ("10", "13")]
    for ours, stock in zip(images["DimbaCheckpointLoader"], images["UNETLoader"]):
        assert ImageChops.difference(ours, stock).getbbox() is None, "Load Diffusion Model gave another image"


def test_easycache_graph(server, base):
    """ComfyUI's EasyCache node on the Dimba MODEL feeds DimbaSampler and KSampler (20 steps) in a real server:
    both images are saved and ComfyUI's own log reports the steps EasyCache skipped, once per sampler."""
    graph = both_samplers_graph(128, 96, 20)
    graph["14"] = {"class_type": "EasyCache", "inputs": {"model": ["1", 0], "reuse_threshold": 0.2,
                                                         "start_percent": 0.15, "end_percent": 0.95,
                                                         "verbose": False}}
    graph["7"]["inputs"]["model"] = graph["11"]["inputs"]["model"] = ["14", 0]
    graph["10"]["inputs"]["filename_prefix"] = "dimba_easycache_dimbasampler"
    graph["13"]["inputs"]["filename_prefix"] = "dimba_easycache_ksampler"
    log_start = len((base / "comfyui.log").read_text())
    assert saved_sizes(base, run_graph(server, graph)) == [(128, 96)] * 2
    log = (base / "comfyui.log").read_text()[log_start:]
    skipped = re.findall(r"EasyCache - skipped (\d+)/20 steps", log)
    print(f"EasyCache in a server graph: skipped {skipped} of 20 steps (DimbaSampler, KSampler)")
    assert len(skipped) == 2 and all(int(n) > 0 for n in skipped), log[-3000:]


def test_bad_size_is_reported(server):
    """A size that is not a multiple of 16 fails the prompt with a message that says what to change."""
    graph = json.loads((WORKFLOWS / "api" / "dimba_txt2img_api.json").read_text())
    graph = {k: v for k, v in graph.items() if v["class_type"] != "DimbaResolutionSelect"}
    graph["6"]["inputs"].update(width=328, height=192)
    entry = run_graph(server, graph)
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and "multiples of 16" in errors[0]["exception_message"]


def in_comfyui(base, *names, timeout=900):
    """Run the checks of tests/in_comfyui.py (all but the slow ones, or `names`) in ComfyUI's Python."""
    return subprocess.run([PYTHON, str(REPO / "tests" / "in_comfyui.py"), COMFYUI_PATH, str(REPO),
                           str(base / "models"), *names], cwd=COMFYUI_PATH, capture_output=True, text=True,
                          timeout=timeout)


def test_in_process(base):
    """Every check of tests/in_comfyui.py but the slow one: DimbaSampler == headless sample, KSampler, errors, and the
    native model (weight dtypes, partial loading, LoRA formats, TrainLoraNode round trip, saves, merges)."""
    result = in_comfyui(base)
    assert result.returncode == 0 and " 0 failed" in result.stdout, result.stdout[-4000:] + result.stderr[-2000:]
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


def test_torch_compile_model(base):
    """ComfyUI's TorchCompileModel (inductor) accepts the Dimba MODEL; KSampler through it matches eager."""
    result = in_comfyui(base, "test_torch_compile_model", timeout=1200)
    assert result.returncode == 0 and "PASSED test_torch_compile_model" in result.stdout, \
        result.stdout[-4000:] + result.stderr[-2000:]
    print(result.stdout)
