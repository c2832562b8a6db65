"""Peak memory of loading a Hugging Face checkpoint, by model size, on CPU.

    python -m bench.load_memory [--sizes xlt-small,xlmr-base] [--out bench/results/load_memory_cpu.jsonl]

For each size a random checkpoint in the XLM-R layout (model.safetensors, fp32) is written to a temp
folder; then each loader runs in a fresh subprocess, which reports its peak resident memory (VmHWM, reset
through /proc/self/clear_refs just before loading; ru_maxrss would include the parent's peak, inherited
across fork) minus its resident memory just before loading (after imports). Loaders:
- `xlt`: models.hf.load_encoder (meta-device model, tensors assigned as they are read: one copy);
- `naive`: build the model in memory, then load_state_dict(safetensors.load_file(...)) (two copies);
- `transformers`: transformers.AutoModel.from_pretrained, the anchor a user would otherwise call (it
  memory-maps safetensors files, so its weights become resident only when first used).
Every weight is touched once after loading (as a first forward pass would) before the peak is read. A ratio
near 1.0 of the weight bytes means one copy of the weights; small models add a fixed ~70 MiB of runtime.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from .env import append_row, environment

LOADERS = ("xlt", "naive", "transformers")


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # "5" resets the peak RSS (VmHWM) to the current RSS


def _child(loader: str, folder: str) -> None:
    """Runs in the subprocess: import everything first, then load once, then print the peak."""
    import safetensors.torch
    import torch
    import transformers

    from models import Encoder, hf

    _reset_peak()
    before = _status_bytes("VmRSS")
    if loader == "xlt":
        model = hf.load_encoder(folder)
    elif loader == "naive":
        cfg = hf.config_from_hf(json.loads((Path(folder) / "config.json").read_text()))
        model = Encoder(cfg)
        state = safetensors.torch.load_file(str(Path(folder) / "model.safetensors"))
        model.load_state_dict({k: state[v] for k, v in hf.encoder_key_map(cfg).items()})
        del state
    else:
        model = transformers.AutoModel.from_pretrained(folder)
    with torch.no_grad():  # touch every weight, as a first forward pass would: memory-mapped pages come in
        for p in model.parameters():
            p.sum()
    peak = _status_bytes("VmHWM")
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"peak_extra_bytes": peak - before, "parameters": params}))


def measure(size: str, loaders=LOADERS) -> list[dict]:
    import torch

    from models import Encoder, hf, preset

    cfg = preset(size)
    with tempfile.TemporaryDirectory() as tmp:
        with torch.device("cpu"):
            hf.export(Encoder(cfg), Path(tmp) / "model")
        weight_bytes = (Path(tmp) / "model" / "model.safetensors").stat().st_size
        rows = []
        for loader in loaders:
            proc = subprocess.run([sys.executable, "-m", "bench.load_memory", "--child", loader, f"{tmp}/model"],
                                  capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
            if proc.returncode != 0:
                raise RuntimeError(f"{loader} on {size} failed:\n{proc.stderr[-2000:]}")
            child = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"bench": "load_memory", "size": size, "loader": loader, "weight_bytes": weight_bytes,
                         "parameters": child["parameters"], "peak_extra_bytes": child["peak_extra_bytes"],
                         "ratio_to_weights": round(child["peak_extra_bytes"] / weight_bytes, 3)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="xlt-tiny,xlt-small,xlmr-base,xlmr-large")
    ap.add_argument("--out", default="bench/results/load_memory_cpu.jsonl")
    ap.add_argument("--child", nargs=2, metavar=("LOADER", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0
    env = environment()
    for size in args.sizes.split(","):
        for row in measure(size):
            append_row(Path(args.out), env | row, ("size", "loader", "weight_bytes", "peak_extra_bytes",
                                                   "ratio_to_weights"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
