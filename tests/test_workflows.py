"""Headless tier for workflows/: every file parses and uses only existing nodes, inputs and outputs.

workflows/*.json are UI-format graphs, each with a <name>.jpg thumbnail (ComfyUI's Templates browser lists
them); workflows/api/ holds the API-format twins for scripts (ComfyUI does not list sub-folders).
"""
import json
from pathlib import Path

import pytest

import nodes
from dimba_core import tiny_assets

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
API_FILES = sorted((WORKFLOWS / "api").glob("*.json"))
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
PAIRS = {"dimba_txt2img.json": "dimba_txt2img_api.json", "dimba_ksampler.json": "dimba_ksampler_api.json",
         "dimba_train_lora.json": "dimba_train_lora_api.json", "dimba_hires_fix.json": "dimba_hires_fix_api.json"}

# The core ComfyUI nodes the workflows use: inputs (name -> type, widgets in UI order) and outputs.
# Checked against a real ComfyUI's /object_info by tests/test_comfy_host.py.
CORE_NODES = {
    "EmptyLatentImage": ({"width": "INT", "height": "INT", "batch_size": "INT"}, ("LATENT",)),
    "VAELoader": ({"vae_name": "COMBO"}, ("VAE",)),
    "VAEDecode": ({"samples": "LATENT", "vae": "VAE"}, ("IMAGE",)),
    "SaveImage": ({"images": "IMAGE", "filename_prefix": "STRING"}, ()),
    "KSampler": ({"model": "MODEL", "seed": "INT", "steps": "INT", "cfg": "FLOAT", "sampler_name": "COMBO",
                  "scheduler": "COMBO", "positive": "CONDITIONING", "negative": "CONDITIONING",
                  "latent_image": "LATENT", "denoise": "FLOAT"}, ("LATENT",)),
    # dimba_hires_fix: the 512 px result's latent upscaled 1.5x, then refined by KSampler at denoise 0.5
    "LatentUpscaleBy": ({"samples": "LATENT", "upscale_method": "COMBO", "scale_by": "FLOAT"}, ("LATENT",)),
    # dimba_train_lora: ComfyUI's own training nodes (comfy_extras/nodes_train.py) on the Dimba MODEL
    "LoadImageSetFromFolderNode": ({"folder": "COMBO", "resize_method": "COMBO"}, ("IMAGE",)),
    "ImageScale": ({"image": "IMAGE", "upscale_method": "COMBO", "width": "INT", "height": "INT", "crop": "COMBO"},
                   ("IMAGE",)),
    "VAEEncode": ({"pixels": "IMAGE", "vae": "VAE"}, ("LATENT",)),
    "TrainLoraNode": ({"model": "MODEL", "latents": "LATENT", "positive": "CONDITIONING", "batch_size": "INT",
                       "grad_accumulation_steps": "INT", "steps": "INT", "learning_rate": "FLOAT", "rank": "INT",
                       "optimizer": "COMBO", "loss_function": "COMBO", "seed": "INT", "training_dtype": "COMBO",
                       "lora_dtype": "COMBO", "algorithm": "COMBO", "gradient_checkpointing": "BOOLEAN",
                       "existing_lora": "COMBO"}, ("MODEL", "LORA_MODEL", "LOSS_MAP", "INT")),
    "SaveLoRANode": ({"lora": "LORA_MODEL", "prefix": "STRING", "steps": "INT"}, ()),
    "LossGraphNode": ({"loss": "LOSS_MAP", "filename_prefix": "STRING"}, ()),
}
NOTES = ("Note", "MarkdownNote")  # frontend-only nodes: not part of the API graph
SAVERS = ("SaveImage", "SaveLoRANode")  # every graph saves something
WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def node_types(class_type):
    """(inputs {name: type}, required names, outputs, control_after_generate names) of a pack or core node."""
    if class_type in nodes.NODE_CLASS_MAPPINGS:
        cls = nodes.NODE_CLASS_MAPPINGS[class_type]
        spec = cls.INPUT_TYPES()
        merged = {**spec["required"], **spec.get("optional", {})}
        inputs = {k: "COMBO" if isinstance(v[0], list) else v[0] for k, v in merged.items()}
        control = {k for k, v in merged.items() if len(v) > 1 and v[1].get("control_after_generate")}
        return inputs, set(spec["required"]), cls.RETURN_TYPES, control
    if class_type in CORE_NODES:
        inputs, outputs = CORE_NODES[class_type]
        return inputs, set(inputs), outputs, {"seed"} & set(inputs)
    raise AssertionError(f"unknown node type {class_type}: neither a pack node nor in CORE_NODES")


def check_api_graph(graph):
    assert any(n["class_type"] in SAVERS for n in graph.values()), "the graph saves nothing"
    for node_id, node in graph.items():
        inputs, required, _, _ = node_types(node["class_type"])
        given = node["inputs"]
        assert set(given) <= set(inputs), f"node {node_id}: unknown inputs {set(given) - set(inputs)}"
        assert required <= set(given), f"node {node_id}: missing inputs {required - set(given)}"
        for name, value in given.items():
            if isinstance(value, list):  # a link [source id, output index]
                source = graph[value[0]]
                out_type = node_types(source["class_type"])[2][value[1]]
                assert out_type == inputs[name], f"node {node_id}.{name}: {out_type} linked to {inputs[name]}"
            else:
                assert inputs[name] in WIDGETS, f"node {node_id}.{name} needs a link, got {value!r}"
        cls = nodes.NODE_CLASS_MAPPINGS.get(node["class_type"])
        if cls is not None:  # static choices must be valid (model file names are checked by the host tier)
            spec = {**cls.INPUT_TYPES()["required"], **cls.INPUT_TYPES().get("optional", {})}
            for name, value in given.items():
                choices = spec[name][0]
                if isinstance(choices, list) and choices and not isinstance(value, list):
                    assert value in choices, f"node {node_id}.{name}: {value!r} not in {choices}"


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.name)
def test_api_workflow(path):
    check_api_graph(json.loads(path.read_text()))


def test_expected_files():
    assert {p.name for p in UI_FILES} == set(PAIRS) and {p.name for p in API_FILES} == set(PAIRS.values())
    samplers = {n: {v["class_type"] for v in json.loads((WORKFLOWS / "api" / n).read_text()).values()}
                for n in PAIRS.values()}
    assert "DimbaSampler" in samplers["dimba_txt2img_api.json"] and "KSampler" in samplers["dimba_ksampler_api.json"]
    assert {"TrainLoraNode", "SaveLoRANode", "DimbaSampler"} <= samplers["dimba_train_lora_api.json"]
    assert {"DimbaSampler", "LatentUpscaleBy", "KSampler"} <= samplers["dimba_hires_fix_api.json"]
    for found in samplers.values():
        assert {"VAELoader", "VAEDecode", "SaveImage", "DimbaCheckpointLoader", "DimbaT5Loader"} <= found


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_templates_are_ui_format_with_thumbnails(path):
    """What the Templates browser lists opens there: a top-level "version", and a small JPEG beside it."""
    assert "version" in json.loads(path.read_text()), f"{path.name} is not UI format; API files go in api/"
    thumb = path.with_suffix(".jpg")
    assert thumb.is_file(), f"{path.name} has no thumbnail {thumb.name}"
    data = thumb.read_bytes()
    assert data[:3] == b"\xff\xd8\xff" and len(data) < 100_000, "thumbnails are small JPEGs"


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.name)
def test_workflows_name_the_tiny_assets(path):
    """The shipped graphs run as they are on `python -m dimba_core.tiny_assets ComfyUI/models`."""
    files = {k: v for n in json.loads(path.read_text()).values() for k, v in n["inputs"].items()
             if k in ("ckpt_name", "t5_name", "vae_name")}
    assert files == {"ckpt_name": tiny_assets.CHECKPOINT, "t5_name": tiny_assets.T5_FOLDER,
                     "vae_name": tiny_assets.VAE_FILE}


PREVIEW_ROOM = 540  # a sampler's widgets plus its live preview (512 px wide at most), measured in the frontend


def test_nodes_do_not_overlap():
    """No node overlaps another in the UI files, counting room below each sampler's widgets for its live preview."""
    for path in UI_FILES:
        boxes = {}
        for n in json.loads(path.read_text())["nodes"]:
            height = max(n["size"][1], PREVIEW_ROOM if n["type"] in ("DimbaSampler", "KSampler") else 0)
            boxes[n["id"]] = (*n["pos"], n["pos"][0] + n["size"][0], n["pos"][1] + height + 30)  # + title
        for a, (x0, y0, x1, y1) in boxes.items():
            for b, (u0, v0, u1, v1) in boxes.items():
                assert a == b or x1 <= u0 or u1 <= x0 or y1 <= v0 or v1 <= y0, f"{path.name}: nodes {a} and {b} overlap"


def ui_to_api(ui):
    """Convert a UI-format workflow to API format, as the ComfyUI frontend does for the nodes used here."""
    links = {link[0]: link for link in ui["links"]}
    graph = {}
    for node in ui["nodes"]:
        if node["type"] in NOTES:
            continue
        inputs, _, _, control = node_types(node["type"])
        values = list(node.get("widgets_values", []))
        api_inputs = {}
        for name, kind in inputs.items():
            if kind in WIDGETS and values:
                api_inputs[name] = values.pop(0)
                if name in control:
                    values.pop(0)  # "fixed" / "randomize" control value
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                assert link[3] == node["id"], f"link {link} does not end at node {node['id']}"
                api_inputs[slot["name"]] = [str(link[1]), link[2]]  # a linked widget: the link wins
        assert not values, f"node {node['id']} ({node['type']}) has unused widget values {values}"
        graph[str(node["id"])] = {"class_type": node["type"], "inputs": api_inputs}
    return graph


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_workflow(path):
    ui = json.loads(path.read_text())
    assert {"nodes", "links", "last_node_id", "last_link_id", "version"} <= set(ui)
    ids = {n["id"] for n in ui["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        assert src in ids and dst in ids
        src_node = next(n for n in ui["nodes"] if n["id"] == src)
        assert link_id in src_node["outputs"][src_slot]["links"] and src_node["outputs"][src_slot]["type"] == kind
    check_api_graph(ui_to_api(ui))


@pytest.mark.parametrize("ui_name", sorted(PAIRS))
def test_ui_matches_api(ui_name):
    """Each UI workflow is the same graph as its API twin in workflows/api/."""
    ui = ui_to_api(json.loads((WORKFLOWS / ui_name).read_text()))
    api = json.loads((WORKFLOWS / "api" / PAIRS[ui_name]).read_text())
    strip = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert ui == strip
