"""A run's state: gathered whole, saved to and restored from checkpoints, and written out as weights."""
from __future__ import annotations

import dataclasses
import functools
import json
import pickle
import re
from pathlib import Path

import torch

from ..dtypes import torch_dtype
from ..loader import CONFIG_KEY
from .files import latest_checkpoint, step_files
from .options import TrainOptions, _whole
from .parallel import all_finite, sharded_like, whole

# arguments a resumed run must share with the run that wrote the checkpoint
RESUME_KEYS = ("seed", "batch_size", "lora_rank", "lora_alpha", "resolution", "image_size", "optimizer",
               "class_dropout_prob", "fsdp")


# --- gather: whole tensors on the CPU of rank 0, which alone writes ---------------------------------------

def gather(tensors: dict, rank: int) -> dict | None:
    """The tensors whole and on the CPU on rank 0, None elsewhere; a sharded (FSDP) one is gathered, a collective
    that every rank joins. They may share memory with the live ones (on the CPU)."""
    out = {}
    for k, v in tensors.items():
        v = whole(v).detach()
        if rank == 0:
            out[k] = v.cpu()
    return out if rank == 0 else None


def gather_trained(model, lora, optimizer, fsdp: bool, rank: int) -> tuple[dict, dict]:
    """(trained tensors, optimizer state), whole and on the CPU, on rank 0 (empty elsewhere); under FSDP a
    collective that every rank joins. Without FSDP the tensors may share memory with the live ones (on the
    CPU): save them before the next step."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return {}, {}
    trained = lora.state_dict() if lora is not None else model.state_dict()
    return {k: v.detach().cpu() for k, v in trained.items()}, optimizer.state_dict()


def gather_model(model, fsdp: bool, rank: int) -> dict:
    """The model's whole state dict on the CPU, on rank 0 (empty elsewhere); under FSDP a collective that every
    rank joins."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()} if rank == 0 else {}


def gather_ema(ema: dict | None, lora, rank: int) -> dict | None:
    """The EMA keyed like the trained module's state dict (without the Trainee's model./lora. prefix), whole and
    on the CPU on rank 0 (None elsewhere; under FSDP a collective)."""
    if ema is None:
        return None
    prefix = "lora." if lora is not None else "model."
    return gather({n[len(prefix):]: v for n, v in ema.items()}, rank)


# --- checkpoints out and in -------------------------------------------------------------------------------

def save_checkpoint(path: Path, step: int, opts: TrainOptions, trained: dict, optimizer: dict, scheduler, scaler,
                    ema: dict | None) -> None:
    """Write the resumable checkpoint of `step` atomically (rank 0): gathered state, schedule, scaler, EMA and the
    torch random state."""
    from ..loader import write_atomically

    path.parent.mkdir(exist_ok=True)
    saved = dict(step=step, options=dataclasses.asdict(opts), trained=trained, optimizer=optimizer,
                 scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), ema=ema,
                 rng={"torch": torch.get_rng_state()})
    write_atomically(path, functools.partial(torch.save, saved))


CHECKPOINT_KEYS = ("step", "options", "trained", "optimizer", "scheduler", "scaler", "rng")
RESUME_WANTS = ("--resume takes a training checkpoint that `python -m dimba_core train` writes "
                "(OUT/checkpoints/step-NNNNNNN.pt)")


def read_checkpoint_file(path: Path) -> dict:
    """A training checkpoint's contents, structure checked; never runs pickled code (torch.load weights_only).
    Anything else (a model or LoRA file, a damaged or hostile file) is one DimbaLoadError saying what it is."""
    from ..loader import SAFE_PICKLE_TORCH, torch_version
    from ..weights import DimbaLoadError

    what = f"--resume {path}"
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) == 9 and int.from_bytes(head[:8], "little") < 1 << 30 and head[8:9] == b"{":
        kind = "a LoRA" if _is_lora(path) else "a model"
        raise DimbaLoadError(f"{what} is a .safetensors weights file ({kind}), not a training checkpoint; "
                             f"{RESUME_WANTS}. To train on from a fine-tuned model, give it as --checkpoint")
    if torch_version() < SAFE_PICKLE_TORCH:
        raise DimbaLoadError(f"{what}: refused: torch {torch.__version__} can run code hidden in a pickle even with "
                             "weights_only=True (CVE-2025-32434); upgrade torch to 2.6 or later to resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or ["unsafe pickle"])[0]
        if "weights only" in first.lower():
            raise DimbaLoadError(f"{what}: refused to load: the pickle holds objects other than tensors and plain "
                                 "containers, and loading them could run code; it is not a checkpoint of this "
                                 f"trainer. {RESUME_WANTS}") from None
        raise DimbaLoadError(f"{what}: not a torch checkpoint ({first}); {RESUME_WANTS}") from None
    except Exception as e:
        first = re.split(r"(?<=\w)\. ", (str(e).strip().splitlines() or [""])[0])[0][:160]  # its first sentence
        raise DimbaLoadError(f"{what}: cannot read this checkpoint ({type(e).__name__}: {first}); it is truncated "
                             f"or damaged: resume from an earlier step-*.pt. {RESUME_WANTS}") from None
    if not isinstance(state, dict):
        raise DimbaLoadError(f"{what} holds a {type(state).__name__}, not a training checkpoint; {RESUME_WANTS}")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        tensors = all(isinstance(v, torch.Tensor) for v in state.values())
        if state and (tensors or "state_dict" in state):
            kind = "a LoRA's" if any(str(k).endswith("lora_down.weight") for k in state) else "a model's"
            raise DimbaLoadError(f"{what} holds {kind} weights, not a training checkpoint (no optimizer state or "
                                 f"step); {RESUME_WANTS}. To train on from a fine-tuned model, give it as "
                                 "--checkpoint")
        raise DimbaLoadError(f"{what} is not a training checkpoint (no {', '.join(missing)}); {RESUME_WANTS}")
    problem = None
    if not _whole(state["step"]) or state["step"] < 0:
        problem = f"step {state['step']!r}"
    elif not isinstance(state["options"], dict):
        problem = "options"
    elif not isinstance(state["trained"], dict) or not all(isinstance(v, torch.Tensor)
                                                            for v in state["trained"].values()):
        problem = "trained tensors"
    elif not (state.get("ema") is None or isinstance(state["ema"], dict)):
        problem = "EMA"
    elif not all(isinstance(state[k], dict) for k in ("optimizer", "scheduler", "scaler", "rng")):
        problem = "optimizer, scheduler, scaler or random state"
    elif not (isinstance(state["rng"].get("torch"), torch.Tensor) and state["rng"]["torch"].dtype == torch.uint8):
        problem = "random state"
    if problem:
        raise DimbaLoadError(f"{what}: its {problem} is malformed; the file is damaged or not written by this "
                             f"trainer. {RESUME_WANTS}")
    return state


def _is_lora(path: Path) -> bool:
    """Whether a .safetensors file holds LoRA weights (False when it cannot be read)."""
    try:
        from ..weights import open_safetensors

        with open_safetensors(path) as f:
            return any(k.endswith(("lora_down.weight", "lora_A.weight", ".diff")) for k in f.keys())
    except Exception:
        return False


def load_checkpoint(opts: TrainOptions) -> tuple[Path, dict]:
    """(path, contents) of the checkpoint --resume names (or the latest in --out), checked to come from a run
    with the same options; a later step already in --out would be picked by a later --resume, so it is refused."""
    out = Path(opts.out)
    path = latest_checkpoint(out) if opts.resume == "latest" else Path(opts.resume)
    if path is None or not path.is_file():
        raise ValueError(f"--resume: no checkpoint found ({opts.resume if opts.resume != 'latest' else opts.out})")
    state = read_checkpoint_file(path)
    differ = {k: (state["options"].get(k), getattr(opts, k)) for k in RESUME_KEYS
              if state["options"].get(k) != getattr(opts, k)}
    if differ:
        raise ValueError(f"--resume {path}: these options differ from the run that wrote it (was, now): {differ}")
    later = sorted(p.name for step, p in step_files(out).items() if step > state["step"])
    if later:
        raise ValueError(f"--resume {path} continues step {state['step']}, but {out / 'checkpoints'} already holds "
                         f"later steps ({', '.join(later[:3])}) that a later --resume would pick: move them away "
                         "first, or resume into another --out")
    return path, state


def check_resume_fits(path: Path, state: dict, expected: dict, opts: TrainOptions) -> None:
    """The checkpoint's trained tensors must be this run's (the same model and LoRA rank), names and shapes."""
    from ..weights import DimbaLoadError, show

    found = {k: tuple(v.shape) for k, v in state["trained"].items()}
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    wrong = [f"{k} {found[k]} (this run: {expected[k]})" for k in expected if k in found and found[k] != expected[k]]
    if missing or extra or wrong:
        was = state["options"]
        report = "; ".join(f"{label}: {show(items, 3)}" for label, items in
                           (("wrong shapes", wrong), ("missing", missing), ("unexpected", extra)) if items)
        raise DimbaLoadError(f"--resume {path} was written for another model or LoRA rank (it trained "
                             f"{was.get('checkpoint')!s} with --lora-rank {was.get('lora_rank')}): its trained tensors "
                             f"do not fit this run ({report}); resume with the --checkpoint of the run that wrote it")


def trained_shapes(opts: TrainOptions, model) -> dict:
    """{name: shape} of what this run trains and checkpoints: the model's state dict, or the LoRA's."""
    if not opts.lora_rank:
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}
    from .lora import LoRANetwork

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        lora = LoRANetwork(model, opts.lora_rank, opts.lora_alpha)
    return {k: tuple(v.shape) for k, v in lora.state_dict().items()}


def restore_state(model, lora, optimizer, state: dict, fsdp: bool, path=None) -> None:
    """Load the trained tensors and the optimizer state of a checkpoint (each rank reads the whole file)."""
    from ..weights import DimbaLoadError

    try:
        _restore(model, lora, optimizer, state, fsdp)
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise DimbaLoadError(f"--resume {path}: its optimizer or model state does not fit this run "
                             f"({type(e).__name__}: {first}); the file is damaged or from another run") from None


def _restore(model, lora, optimizer, state: dict, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=state["trained"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
        return
    (lora if lora is not None else model).load_state_dict(state["trained"])
    optimizer.load_state_dict(state["optimizer"])

def restore_progress(state: dict, scheduler, scaler, ema: dict | None, names, params, path=None) -> dict | None:
    """Load a checkpoint's schedule, gradient scaler and torch random state; returns its EMA placed like the
    parameters (or `ema` as it is when the run or the checkpoint keeps none)."""
    from ..weights import DimbaLoadError

    try:
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema = {n: sharded_like(state["ema"][n], p) for n, p in zip(names, params)}
        torch.set_rng_state(state["rng"]["torch"])
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as e:
        raise DimbaLoadError(f"--resume {path}: its schedule, scaler, EMA or random state does not fit this run "
                             f"({type(e).__name__}: {e}); the file is damaged or from another run") from None
    return ema


# --- outputs ----------------------------------------------------------------------------------------------

class TrainingDiverged(ValueError):
    """The loss or the trained weights went NaN or infinite; nothing non-finite was written."""


def _check_finite(params, ema, device, world: int, out: Path, step: int) -> None:
    """Refuse to write trained weights (or their EMA) that hold NaN or infinite values: a collective."""
    if not all_finite([*params, *(ema.values() if ema else ())], device, world):
        raise TrainingDiverged(f"training diverged: the trained weights hold NaN or infinite values at step {step}, "
                               f"so they are not written; lower the learning rate. {_last_good(out)}")


def _last_good(out: Path) -> str:
    """The sentence that ends a divergence error: nothing non-finite was written, and the last checkpoint."""
    last = latest_checkpoint(out)
    return (f"Nothing non-finite was written; the last checkpoint is {last}." if last else
            "Nothing non-finite was written.")


def _check_fits(sd: dict, dtype, name: str) -> None:
    """Weights that turn infinite in the output dtype (beyond fp16's 65504) are refused, not written."""
    for key, v in sd.items():
        if v.is_floating_point() and not bool(torch.isfinite(v.to(dtype)).all()):
            raise TrainingDiverged(f"the trained weight {key} does not fit in --save-dtype {name} (it would hold "
                                   "infinite values), so nothing was written; save in fp32 or bf16, or train with a "
                                   "lower learning rate")


def write_outputs(opts: TrainOptions, model, lora, ema: dict | None, rank: int, model_sd: dict) -> dict:
    """OUT/dimba_lora.safetensors (LoRA) or OUT/dimba_finetuned.safetensors (full), plus *_ema with EMA."""
    from safetensors.torch import save_file

    from ..loader import save_state_dict, write_atomically

    if rank != 0:
        return {}
    out, dtype = Path(opts.out), torch_dtype(opts.save_dtype)
    writes = {}  # kind -> (path, write); every file is checked before the first is written
    for suffix, weights in (("", None), ("_ema", ema)):
        if suffix and weights is None:
            continue
        if lora is not None:
            saved = {k: v.detach().clone() for k, v in lora.state_dict().items()}
            if weights is not None:
                lora.load_state_dict(weights)
            sd = lora.to_comfy_state_dict(dtype)
            lora.load_state_dict(saved)
            _check_fits(sd, dtype, opts.save_dtype)
            path = out / f"dimba_lora{suffix}.safetensors"
            meta = {"format": "pt", CONFIG_KEY: model.config.to_json(), "rank": str(opts.lora_rank)}
            if lora.reduced_ranks():  # layers with fewer inputs or outputs than the rank: their (full) rank
                meta["layer_ranks"] = json.dumps(lora.reduced_ranks())
            write = functools.partial(write_atomically, path, functools.partial(save_file, sd, metadata=meta))
        else:  # each tensor in the dtype a model of save_dtype keeps it in (the Mamba SSM parameters stay float32)
            path = out / f"dimba_finetuned{suffix}.safetensors"
            sd = {**model_sd, **(weights or {})}
            _check_fits(sd, dtype, opts.save_dtype)
            write = functools.partial(save_state_dict, sd, model.config, path, dtype)
        writes["ema" if suffix else "weights"] = (path, write)
    for path, write in writes.values():
        write()
    return {kind: path for kind, (path, _) in writes.items()}
