"""CPU benchmark: load_dimba against reading the same checkpoint raw, in one process.

    python -m benchmarks.load_cpu [--preset Dimba-L-2] [--dtype fp16] [--repeats 3]

Writes a full-size checkpoint with uninitialised weights (.safetensors with its config, and .pt) to a
temporary folder, then times the raw read (safetensors load_file / torch.load) and load_dimba, best of
--repeats with a warm page cache, and the loader's file checks alone (dtypes, shapes, config resolved
against the shapes) as a share of load_dimba. safetensors' raw read maps the file lazily, so its ratio is
mostly the model build on the meta device. Not a test (no timed assertions).
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dimba_core import PRESETS, Dimba, load_dimba
from dimba_core import loader
from dimba_core.loader import CONFIG_KEY
from dimba_core.weights import DTYPES, torch_dtype



def timed(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
        del out
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="Dimba-L-2", choices=sorted(PRESETS))
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    config = PRESETS[args.preset]()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Dimba(config).state_dict().items()}
    sd = {k: torch.empty(s, dtype=torch_dtype(args.dtype)) for k, s in shapes.items()}
    with tempfile.TemporaryDirectory() as tmp:
        st, pt = Path(tmp) / "m.safetensors", Path(tmp) / "m.pt"
        save_file(sd, str(st), metadata={CONFIG_KEY: config.to_json(), "format": "pt"})
        torch.save({"state_dict": sd}, pt)
        del sd
        size = st.stat().st_size / 2 ** 30
        print(f"{args.preset} {args.dtype}: {size:.2f} GiB, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, best of {args.repeats}")
        rows = [(".safetensors", lambda: load_file(str(st)), lambda: load_dimba(st)),
                (".pt", lambda: torch.load(pt, map_location="cpu", weights_only=True), lambda: load_dimba(pt))]
        for name, raw, dimba in rows:
            t_raw, t_dimba = timed(raw, args.repeats), timed(dimba, args.repeats)
            sd = loader.read_state_dict(st if name == ".safetensors" else pt)[0]
            def checks(sd=sd, name=name):
                return loader._check_tensors(sd, name, True), loader.resolve_config(sd, None, {}, name)

            t_checks = timed(checks, args.repeats)
            print(f"{name:13s} raw read {t_raw:6.2f} s   load_dimba {t_dimba:6.2f} s   ratio {t_dimba / t_raw:5.2f}"
                  f"   checks {1e3 * t_checks:5.2f} ms = {100 * t_checks / t_dimba:.2f} % of load_dimba")
            del sd


if __name__ == "__main__":
    main()
