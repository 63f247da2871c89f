"""T5 memory and precision on the CPU: peak RSS while loading + encoding, per dtype, and bf16 vs float32 embeddings.

    python -m benchmarks.t5_memory [--layers 24 --d-model 1024 --d-ff 2816 --heads 16]

Writes a random T5 v1.1-shaped encoder (default: T5 v1.1 large, 0.34 B encoder parameters; XXL is 4.76 B with
d_model 4096, d_ff 10240, 64 heads) as an fp16 single file, an fp16 Hugging Face folder and a scaled-fp8 single file
(t5xxl_fp8_e4m3fn_scaled's layout: block linear weights float8 with a per-tensor scale) into a temporary folder,
then loads each with `T5TextEncoder.from_pretrained(dtype=...)` in a fresh process and encodes two prompts.
Prints peak RSS growth as a multiple of the weights' 16-bit size (it counts library code paged in on first use, such
as the float8 kernels, too), the growth of anonymous memory after the encode, and the relative difference of the
embeddings from the fp16 file's float32 ones (valid tokens). Nothing is asserted.
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["a photograph of an astronaut riding a horse on the moon, highly detailed, 8k", "a red cube"]


def rss_mb(field="VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident memory of this process in MiB (Linux)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(path, tokenizer, dtype, out):
    """In a fresh process: load, encode, report peak RSS growth and save the embeddings."""
    import torch

    from dimba_core.text import T5TextEncoder

    before, anon = rss_mb("VmRSS"), rss_mb("RssAnon")
    t0 = time.perf_counter()
    enc = T5TextEncoder.from_pretrained(path, tokenizer=tokenizer, dtype=dtype)
    loaded = time.perf_counter() - t0
    t0 = time.perf_counter()
    emb, mask = enc.encode(PROMPTS)
    encoded = time.perf_counter() - t0
    stored = sum(t.numel() * t.element_size() for t in {id(p): p for p in enc.model.parameters()}.values())
    torch.save({"emb": emb.float(), "mask": mask}, out)
    print(json.dumps({"peak_growth_mb": rss_mb() - before, "anon_growth_mb": rss_mb("RssAnon") - anon,
                      "before_mb": before, "stored_mb": stored / 2**20, "load_s": loaded, "encode_s": encoded}))


def write_model(folder: Path, args) -> tuple[Path, Path, int]:
    """The fp16 single file and Hugging Face folder of a random encoder and its scaled-fp8 file; returns (file,
    folder, fp8 file, parameters)."""
    import torch
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=32128, d_model=args.d_model, d_kv=args.d_model // args.heads, d_ff=args.d_ff,
                      num_layers=args.layers, num_heads=args.heads, feed_forward_proj="gated-gelu",
                      is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = T5EncoderModel(config).half()
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    single = folder / "t5_fp16.safetensors"
    save_file(sd, str(single))
    hf = folder / "t5_hf"
    model.save_pretrained(hf, safe_serialization=True)
    fp8 = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, w in sd.items():
        if key.startswith("encoder.block.") and w.ndim == 2 and "relative_attention_bias" not in key:
            scale = w.float().abs().max().reshape(1) / 448.0
            fp8[key], fp8[key[: -len("weight")] + "scale_weight"] = (w.float() / scale).to(torch.float8_e4m3fn), scale
        else:
            fp8[key] = w
    scaled = folder / "t5_fp8_e4m3fn_scaled.safetensors"
    save_file(fp8, str(scaled))
    return single, hf, scaled, sum(v.numel() for v in sd.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--d-ff", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[2] / "shared" / "t5"))
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    with tempfile.TemporaryDirectory(prefix="t5_memory_") as tmp:
        tmp = Path(tmp)
        single, hf, scaled, params = write_model(tmp, args)
        half_mb = 2 * params / 2**20
        print(f"random T5 encoder: {params / 1e6:.0f} M parameters, {half_mb:.0f} MiB in 16 bits")
        results = {}
        runs = [("single file", single, d) for d in ("bf16", "fp16", "fp32")] + [("HF folder", hf, "bf16")] + [
            ("fp8 scaled", scaled, d) for d in ("bf16", "fp32")]
        for kind, path, dtype in runs:
            out = tmp / f"{kind}_{dtype}.pt".replace(" ", "_")
            run = subprocess.run([sys.executable, "-m", "benchmarks.t5_memory", "--child", str(path),
                                  args.tokenizer, dtype, str(out)], capture_output=True, text=True, check=True)
            r = json.loads(run.stdout.strip().splitlines()[-1])
            results[kind, dtype] = out
            print(f"{kind:11s} {dtype}: stored {r['stored_mb']:.0f} MiB ({r['stored_mb'] / half_mb:.2f}x the "
                  f"16-bit weights), peak RSS growth {r['peak_growth_mb']:.0f} MiB "
                  f"({r['peak_growth_mb'] / half_mb:.2f}x; anonymous memory after the encode "
                  f"{r['anon_growth_mb'] / half_mb:.2f}x), load {r['load_s']:.1f} s, encode {r['encode_s']:.2f} s")
        import torch

        ref = torch.load(results["single file", "fp32"])
        valid = ref["mask"].bool()
        for kind, dtype in (("single file", "bf16"), ("single file", "fp16"), ("HF folder", "bf16"),
                            ("fp8 scaled", "bf16"), ("fp8 scaled", "fp32")):
            emb = torch.load(results[kind, dtype])["emb"]
            err = float((emb - ref["emb"])[valid].norm() / ref["emb"][valid].norm())
            print(f"{kind:11s} {dtype} vs the fp16 file's fp32 embeddings (valid tokens): relative L2 {err:.2e}")


if __name__ == "__main__":
    main()
