"""The run's folder: what it holds, the checks before anything is written, clearing an old run, trimming the log."""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

from .options import TrainOptions

WEIGHT_FILES = ("dimba_lora.safetensors", "dimba_lora_ema.safetensors", "dimba_finetuned.safetensors",
                "dimba_finetuned_ema.safetensors")
LOG_FILE = "log.jsonl"
STEP_FILE = re.compile(r"step-(\d+)\.pt")
INPUTS = ("checkpoint", "data", "t5", "vae", "tokenizer")


def cache_folder(opts: TrainOptions) -> Path:
    """--cache-dir, or OUT/cache."""
    return Path(opts.cache_dir) if opts.cache_dir else Path(opts.out) / "cache"


def step_path(out: Path, step: int) -> Path:
    """OUT/checkpoints/step-NNNNNNN.pt, the resumable checkpoint after `step` steps."""
    return Path(out) / "checkpoints" / f"step-{step:07d}.pt"


def step_files(out: Path) -> dict[int, Path]:
    """{step: path} of the resumable checkpoints OUT/checkpoints/step-NNNNNNN.pt."""
    folder = Path(out) / "checkpoints"
    found = {}
    for path in folder.glob("step-*.pt") if folder.is_dir() else ():
        m = STEP_FILE.fullmatch(path.name)
        if m:
            found[int(m.group(1))] = path
    return found


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint of the latest step in OUT/checkpoints, if any."""
    found = step_files(out)
    return found[max(found)] if found else None


def check_paths(opts: TrainOptions) -> None:
    """Before anything loads: the inputs exist, --out is a folder that the run may use, and no file the run
    writes (or removes with --overwrite) is one of its inputs. Reads only; the same on every process."""
    from ..loader import _same_file

    out, cache = Path(opts.out), cache_folder(opts)
    for path, flag in ((out, "--out"), (cache, "--cache-dir" if opts.cache_dir else "the cache folder")):
        if path.exists() and not path.is_dir():
            raise ValueError(f"{flag} {path} is a file; give a folder for the run's outputs (weights, "
                             "checkpoints/, cache/, log.jsonl)")
    inputs = {}
    for flag in INPUTS:
        value = getattr(opts, flag)
        if value is not None:
            if not Path(value).exists():
                raise ValueError(f"--{flag} {value}: no such file or folder")
            inputs[flag] = Path(value)
    outputs = [out / name for name in (*WEIGHT_FILES, LOG_FILE)] + [cache / "cache.safetensors"]
    for flag, path in inputs.items():
        if path.is_dir():
            for folder, what in ((out, "--out"), (cache, "the cache folder")):
                if _same_file(folder, path):
                    raise ValueError(f"{what} {folder} is the --{flag} folder; give the run a folder of its own "
                                     "(a new one, or one that holds only an earlier run)")
            continue
        clash = next((o for o in outputs if _same_file(o, path)), None)
        if clash is None and STEP_FILE.fullmatch(path.name) and _same_file(path.parent, out / "checkpoints"):
            clash = path
        if clash is not None:
            raise ValueError(f"--{flag} {path} is the file {clash} that this run writes: it would replace its own "
                             "input; choose another --out (or --cache-dir), or move the input elsewhere first")
    _check_resume_path(opts, out)
    _check_out_is_free(opts, out, cache)


def _check_resume_path(opts: TrainOptions, out: Path) -> None:
    """--resume names a checkpoint file, or "latest" finds one in --out."""
    if opts.resume is None:
        return
    if opts.resume == "latest":
        if not step_files(out):
            raise ValueError(f"--resume: no checkpoint to continue from in {out / 'checkpoints'} (step-*.pt); "
                             "leave out --resume to start a run, or give --resume FILE")
    elif not Path(opts.resume).is_file():
        raise ValueError(f"--resume {opts.resume}: no such file; give a checkpoint OUT/checkpoints/step-*.pt "
                         "(or --resume alone for the latest in --out)")


def _check_out_is_free(opts: TrainOptions, out: Path, cache: Path) -> None:
    """A --out that holds more than a latent cache takes --resume (of its own run) or --overwrite."""
    from ..loader import _same_file

    keep = [out / "cache", cache, cache / "cache.safetensors"]  # a latent cache is checked, and reused
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()
                   if not any(p == k or _same_file(p, k) for k in keep)) if out.is_dir() else []
    held = f"--out {out} already holds {', '.join(found[:4])}{' ...' if len(found) > 4 else ''}"
    if found and opts.resume is None and not opts.overwrite:
        raise ValueError(f"{held}: pass --resume to continue the run there, --overwrite to start a new run in its "
                         "place (its log.jsonl, checkpoints/ and weights are removed first), or give an empty or "
                         "new folder")
    if found and opts.resume not in (None, "latest") and not _same_file(Path(opts.resume).parent, out / "checkpoints"):
        raise ValueError(f"{held}, and --resume {opts.resume} is not one of its checkpoints: continue a run in its "
                         "own --out, or into an empty or new folder")


def make_out(opts: TrainOptions) -> None:
    """Create --out and the cache folder (ValueError naming the flag when that fails)."""
    for path, flag in ((Path(opts.out), "--out"), (cache_folder(opts), "--cache-dir")):
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"{flag} {path}: cannot create this folder ({e.strerror}); give a writable "
                             "folder") from None


def clear_previous_run(opts: TrainOptions) -> None:
    """--overwrite: remove what an earlier run wrote to --out (weights, log, checkpoints), never anything else; the
    latent cache stays (it is checked against the data before it is used)."""
    out = Path(opts.out)
    doomed = [out / name for name in (*WEIGHT_FILES, LOG_FILE)] + list(step_files(out).values())
    for name in (*WEIGHT_FILES, LOG_FILE):  # leftovers of interrupted atomic writes
        doomed += out.glob(f".{name}.*.tmp")
    doomed += (out / "checkpoints").glob(".step-*.pt.*.tmp")
    for path in doomed:
        if path.is_file() or path.is_symlink():
            path.unlink()
    with contextlib.suppress(OSError):
        (out / "checkpoints").rmdir()  # only when empty


def trim_log(out: Path, step: int) -> None:
    """Resuming at `step`: drop the log records of later steps (a run interrupted after its last checkpoint)."""
    from ..loader import write_atomically

    path = out / LOG_FILE
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            later = json.loads(line)["step"] > step
        except (ValueError, KeyError, TypeError):
            later = False
        kept += [] if later else [line]
        dropped += later
    if dropped:
        text = "".join(line + "\n" for line in kept)
        write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
