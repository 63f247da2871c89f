"""GPU check: scan backends against the naive reference at Dimba-L-2 mixer size; capture without host syncs.

    python -m benchmarks.gpu_check [--out gpu_check.json]

Needs a CUDA device; mamba-ssm (and causal-conv1d) are used when installed. Rows:
- scan: `cuda` (mamba-ssm) and `parallel` against `torch` (float32 state), L = 1024 and 4096, fp32 and bf16;
- mixer: whole bidirectional mixers with shared weights, `cuda` / `parallel` against `ref`;
- sync: a Dimba-L-2 forward (fixed caption mask) under torch.cuda.set_sync_debug_mode("error"), per backend
  (`parallel`, `cuda` and `triton` when they run);
- graph: the same forward captured in a CUDA graph and replayed on new inputs, against eager;
- compile: torch.compile(fullgraph=True) of a tiny Dimba per backend (custom ops for mamba-ssm / triton), inductor,
  against eager.
"""
import argparse
import json

import torch

from dimba_core import Dimba, DimbaConfig, dimba_l_2
from dimba_core.mamba import BiMambaMixer
from dimba_core.ops import has_causal_conv1d, has_mamba_ssm, has_triton, selective_scan_cuda, selective_scan_parallel, \
    selective_scan_torch
from benchmarks._common import rel_err


def scan_and_mixer_rows(dev):
    rows = []
    for L in (1024, 4096):
        g = torch.Generator(device="cpu").manual_seed(L)
        b, d, n = 2, 2304, 16
        kw = dict(u=torch.randn(b, d, L, generator=g), delta=0.5 * torch.randn(b, d, L, generator=g),
                  A=-torch.exp(torch.randn(d, n, generator=g)), B=torch.randn(b, n, L, generator=g),
                  C=torch.randn(b, n, L, generator=g), D=torch.randn(d, generator=g),
                  z=torch.randn(b, d, L, generator=g), delta_bias=0.5 * torch.randn(d, generator=g))
        for dtype in (torch.float32, torch.bfloat16):
            k = {name: (v.to(dev, dtype) if name in ("u", "delta", "B", "C", "z") else v.to(dev))
                 for name, v in kw.items()}
            with torch.inference_mode():
                ref = selective_scan_torch(**k, delta_softplus=True)
                scans = {"parallel": selective_scan_parallel}
                if has_mamba_ssm():
                    scans["cuda"] = selective_scan_cuda
                for name, scan in scans.items():
                    rows.append(dict(what="scan", backend=name, L=L, dtype=str(dtype),
                                     rel_err=rel_err(scan(**k, delta_softplus=True), ref)))
            torch.manual_seed(0)
            mixer = BiMambaMixer(1152, backend="ref").to(dev, dtype)
            with torch.no_grad():
                for prm in mixer.parameters():
                    prm.add_(0.02 * torch.randn_like(prm))
            x = torch.randn(b, L, 1152, device=dev, dtype=dtype)
            with torch.inference_mode():
                y_ref = mixer(x)
                for name in ["parallel"] + ["cuda"] * has_mamba_ssm():
                    mixer.backend = name
                    rows.append(dict(what="mixer", backend=name, L=L, dtype=str(dtype), rel_err=rel_err(mixer(x), y_ref)))
                mixer.backend = "ref"
    return rows


def capture_rows(dev, px=512, dtype=torch.float16):
    torch.manual_seed(0)
    with torch.device(dev):
        model = Dimba(dimba_l_2()).to(dtype).eval()
    x = torch.randn(2, 4, px // 8, px // 8, device=dev, dtype=dtype)
    y = torch.randn(2, 1, 300, 4096, device=dev, dtype=dtype)
    t = torch.tensor([500.0, 500.0], device=dev)
    mask = torch.zeros(2, 300, dtype=torch.long, device=dev)
    mask[:, :120] = 1
    rows = []
    for backend in ["parallel"] + ["cuda"] * has_mamba_ssm() + ["triton"] * has_triton():
        model.set_scan_backend(backend)
        with torch.inference_mode():
            eager = model(x, t, y, mask)
            row = dict(what="sync", backend=backend, px=px)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                model(x, t, y, mask)
                row["ok"] = True
            except RuntimeError as e:
                row.update(ok=False, error=str(e)[:300])
            finally:
                torch.cuda.set_sync_debug_mode("default")
            rows.append(row)
            row = dict(what="graph", backend=backend, px=px)
            try:
                sx, st, sy, sm = x.clone(), t.clone(), y.clone(), mask.clone()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    model(sx, st, sy, sm)  # warm-up on a side stream, as CUDA graphs want
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = model(sx, st, sy, sm)
                sx.copy_(x)
                graph.replay()
                torch.cuda.synchronize()
                row.update(ok=True, rel_err=rel_err(out, eager))
                sx.copy_(x.flip(-1))
                graph.replay()
                row["rel_err_new_input"] = rel_err(out, model(x.flip(-1), t, y, mask))
            except Exception as e:  # report, do not stop the other checks
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            rows.append(row)
    return rows


def compile_rows(dev):
    """A tiny Dimba compiled fullgraph with inductor on each backend (mamba-ssm's and the Triton kernels enter the
    graph as dimba:: custom ops), against eager."""
    cfg = DimbaConfig(hidden_size=64, depth=4, num_heads=4, caption_channels=32, model_max_length=16, base_size=8)
    x, y = torch.randn(2, 4, 16, 16, device=dev), torch.randn(2, 1, 16, 32, device=dev)
    t, mask = torch.tensor([10.0, 700.0], device=dev), torch.ones(2, 16, dtype=torch.long, device=dev)
    mask[0, 5:] = 0
    rows = []
    for backend in ["parallel"] + ["cuda"] * has_mamba_ssm() + ["triton"] * has_triton():
        torch.manual_seed(0)
        model = Dimba(cfg, scan_backend=backend).to(dev).eval()
        row = dict(what="compile", backend=backend, inductor=True)
        try:
            torch._dynamo.reset()
            with torch.no_grad():
                eager = model(x, t, y, mask)
                out = torch.compile(model, fullgraph=True)(x, t, y, mask)
            row.update(ok=True, rel_err=rel_err(out, eager))
        except Exception as e:
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
        rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu_check.json")
    a = p.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} mamba_ssm={has_mamba_ssm()} "
          f"causal_conv1d={has_causal_conv1d()}")
    rows = []
    for part in (scan_and_mixer_rows, capture_rows, compile_rows):
        new = part(dev)
        for r in new:
            print(json.dumps(r), flush=True)
        rows += new
    json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
