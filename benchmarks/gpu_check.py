"""GPU check: the `cuda` (mamba-ssm) scan backend against `torch` at Dimba-L-2 mixer size, and the golden tests.

    python -m benchmarks.gpu_check [--out results.json]

Needs a CUDA device with mamba-ssm (and optionally causal-conv1d) installed. Compares full bidirectional
mixers (conv + scan + gating, both directions) with shared weights at L = 1024 and 4096, fp32 and bf16.
"""
import argparse
import json

import torch

from dimba_core.mamba import BiMambaMixer
from dimba_core.ops import has_causal_conv1d, has_mamba_ssm, selective_scan_cuda, selective_scan_torch


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu_check.json")
    a = p.parse_args()
    assert torch.cuda.is_available() and has_mamba_ssm(), "needs CUDA and mamba-ssm"
    dev, rows = torch.device("cuda"), []
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} causal_conv1d={has_causal_conv1d()}")
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
            ref = selective_scan_torch(**k, delta_softplus=True)
            out = selective_scan_cuda(**k, delta_softplus=True)
            rows.append(dict(what="scan", L=L, dtype=str(dtype), rel_err=rel(out, ref)))
            torch.manual_seed(0)
            mixer = BiMambaMixer(1152, backend="torch").to(dev, dtype)
            for prm in mixer.parameters():
                prm.data.add_(0.02 * torch.randn_like(prm))
            x = torch.randn(b, L, 1152, device=dev, dtype=dtype)
            with torch.no_grad():
                y_t = mixer(x)
                mixer.backend = "cuda"
                y_c = mixer(x)
            rows.append(dict(what="mixer", L=L, dtype=str(dtype), rel_err=rel(y_c, y_t)))
    for r in rows:
        print(f"{r['what']:6s} L={r['L']:5d} {r['dtype']:15s} cuda vs torch rel err {r['rel_err']:.2e}")
    json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
