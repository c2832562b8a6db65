"""End-to-end training throughput by model size: XLT vs Hugging Face Transformers, dense and MoE.

    python -m bench.throughput [--device cpu|cuda] [--presets xlt-tiny,xlt-small] [--archs dense,moe]
                               [--mixes xnli,qa,full] [--impls xlt,xlt-torch,hf] [--steps N] [--repeats R]
                               [--warmup W] [--precision auto|fp32|bf16] [--hf-attn sdpa] [--threads T]
                               [--peak-tflops X] [--[no-]repeat-batches] [--tiny] [--results PATH]

Arms, one per (architecture, implementation), all trained on the same sequences with the same optimizer
(`engine.trainer.make_optimizer`: fused AdamW, constant learning rate here), gradient clipping at 1.0 and the
same precision (bf16 autocast where the device computes bf16 natively, `--precision auto`):
- `xlt`: models.TaskModel, kernel backend "auto" (Triton on CUDA; on CPU "auto" resolves to the PyTorch paths,
  so there `xlt` and `xlt-torch` run the same code: an A/A pair that shows the noise);
- `xlt-torch`: the same model with kernel backend "torch" (SDPA attention on re-padded rows, PyTorch MoE twin);
- `hf`: the `transformers` model (`XLMRobertaFor*` / `BertFor*`) loaded from `models.hf.export` of the XLT
  model, so the weights and config are identical, with `--hf-attn` attention (default "sdpa"). Transformers has
  no BERT / XLM-R Mixture-of-Experts: MoE arms are XLT only, and the hf MoE rows say `skipped`.
- `xlt-unpadded-rows`, `xlt-unbucketed`, `xlt-fp32-scores` (ablations, not in the default list; CPU in bf16
  only, elsewhere they would equal `xlt` and their rows say `skipped`, as do `xlt-unpadded-rows` where no batch
  gets pad rows and `xlt-unbucketed` for dense models): `xlt` with the encoder's packed tokens
  not padded to a multiple of `kernels.dispatch.CPU_ROW_BUCKET` rows (`models.encoder.PAD_ROWS`), with the MoE
  twin's expert groups not padded to it (`kernels.moe.PAD_EXPERT_GROUPS`), or with attention's (S, S) tensors in
  autocast's fp32 softmax instead of bf16 (`kernels.attention.CPU_AUTOCAST_SCORES`);
- `xlt-unfused-bias`, `xlt-sliced-groups` (ablations of the CPU attention path on padded batches, any precision;
  skipped on CUDA and on the `full` mix, where they would equal `xlt`): `xlt` with the twin's key-padding bias
  added after a plain matmul and the scale instead of fused into one baddbmm (`kernels.attention.FUSED_BIAS`),
  or with the encoder's length groups taking q / k / v as slices instead of pieces of one split
  (`models.encoder.SPLIT_GROUPS`);
- `xlt-all-rows` (an ablation, not in the default list): `xlt` with `TaskModel.first_token_only` off, so the
  last layer computes every token's row although the classification head reads only the first token's;
- the MoE architecture is `<preset>-moe8` (8 experts, top-2, experts half as wide: matched on active
  parameters and FLOPs per token); each MoE row carries its step time relative to its dense twin's.

Mixes (seeded, the same batches for every arm; random order, each batch padded to its longest sequence, as
a Hugging Face Trainer without length grouping pads):
- `xnli`: sentence pairs, log-normal lengths (median 42 tokens, sigma 0.45, clipped to [6, 128]): about
  half of the padded tokens are padding; classification head, 3 labels;
- `qa`: SQuAD-like question + context (log-normal, median 160, sigma 0.5), cut into windows of 384 tokens
  with a stride (overlap) of 128 as `engine.data.featurize_qa` does; span head;
- `full`: every sequence 128 tokens (no padding): the implementations' quality on equal work.

Timing: within each repeat every arm runs one pass of `--steps` batches of the same sequences, arms interleaved
(A, B, C, A, B, C, ...) so that the ratios are side by side and robust to other load; after `--warmup` passes
per arm (Triton compiles and autotunes then). On CPU every pass draws new sequences, as training does: there
a GEMM shape seen before is cheaper (oneDNN builds a primitive per shape and caches it), so passes over the
same batches would pay for the packed path's variable shapes once only. Every arm trains on the same
sequences in a pass, batched in an order of its own: `xlt` and `xlt-torch` run the same code on CPU, and on
the same batches the second would find the first's shapes cached. On CUDA every pass trains on the same
batches (`--repeat-batches`, the default there, and the method everywhere before 2026-12-02): the warm-up
then meets every autotune key that the timed passes will. CUDA events on GPU, perf_counter on CPU (bench/timing.py).
Per row: step time (median over repeats of the pass time / steps, min, max), tokens/s counting real tokens
only (median over repeats of the pass's real tokens / its time), the ratios to the other arms per repeat
(median, min, max), exact training FLOPs of the full model (`EncoderConfig.flops_per_token` at each sequence's
own length: the encoder's matmuls, forward + backward) per real token, MFU against the device's peak bf16
dense TFLOP/s (a table of GPUs; null on CPU unless --peak-tflops). MFU counts the model's FLOPs, the same for
every arm: `xlt` with first-token heads skips most of the last layer's rows (TaskModel.first_token_only), so
its MFU is the full model's work per second, above what the chip executes (`xlt-all-rows` computes every row).
Then peak memory (weights + optimizer state, counted exactly, plus the step's own peak: CUDA allocator peak,
or on CPU the resident-set peak VmHWM over one more, untimed pass after malloc_trim; on CPU also the minor
page faults per step), and on NVIDIA GPUs average power and energy per real token from the board's energy
counter (nvidia-ml-py). Rows go to `bench/results/throughput_<device>.jsonl`, keyed by the device, its clocks,
versions, preset and git commit (bench/env.py). `python -m bench.report` turns them into tables and plots.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import math
import os
import random
import resource
import shlex
import statistics
import sys
import tempfile
import time
import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .env import append_row, environment
from .timing import CUDA_MEMORY_METHOD, cuda_peak_extra_bytes, timed_calls

IMPLS = ("xlt", "xlt-torch", "hf")
# xlt-all-rows: xlt with TaskModel.first_token_only off (every row of the last layer computed). The others are
# xlt with one choice of the CPU path undone during their steps (module, switch, value; see _switched): of its
# bf16 path (BF16_SWITCHES), or of its attention on padded batches, in any precision.
SWITCHES = {"xlt-unpadded-rows": ("models.encoder", "PAD_ROWS", False),  # packed tokens not padded to the bucket
            "xlt-unbucketed": ("kernels.moe", "PAD_EXPERT_GROUPS", False),  # MoE expert groups not padded
            "xlt-fp32-scores": ("kernels.attention", "CPU_AUTOCAST_SCORES", False),  # autocast's fp32 softmax
            "xlt-unfused-bias": ("kernels.attention", "FUSED_BIAS", False),  # matmul, then scale and mask
            "xlt-sliced-groups": ("models.encoder", "SPLIT_GROUPS", False)}  # length groups' q/k/v as slices
BF16_SWITCHES = ("xlt-unpadded-rows", "xlt-unbucketed", "xlt-fp32-scores")
ABLATIONS = ("xlt-all-rows",) + tuple(SWITCHES)
ARCHS = ("dense", "moe")
BACKEND = {"xlt": "auto", "xlt-torch": "torch", "xlt-all-rows": "auto"} | {a: "auto" for a in SWITCHES}
MOE_SUFFIX = "-moe8"  # models.config: E=8, top-2, matched on active parameters
# Peak dense bf16 tensor-core TFLOP/s by device name (first match wins; SXM figures unless named).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("GH200", 989.0), ("A100", 312.0))
KERNEL_OPS = ("attention_varlen", "cross_entropy", "moe_route", "moe_permute", "moe_expert_ffn", "moe_unpermute")
SHOW = ("preset", "arch", "mix", "impl", "step_ms", "tokens_per_s", "speedup_vs_hf", "step_time_vs_dense",
        "mfu", "peak_mem_mib")


@dataclass(frozen=True)
class Mix:
    name: str
    head: str  # models.make_head kind: "pair" or "qa"
    batch_size: int
    max_len: int
    stride: int = 0  # qa: overlap of consecutive windows of a long context
    median: float = 0.0  # log-normal length (pair: the pair; qa: question + context)
    sigma: float = 0.0
    min_len: int = 6

    def describe(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v or k == "name"}


def mixes(device: str, tiny: bool) -> dict[str, Mix]:
    if tiny:  # seconds-long smoke sizes (the "tiny" preset holds 128 positions)
        return {"xnli": Mix("xnli", "pair", 4, 32, median=14, sigma=0.45, min_len=4),
                "qa": Mix("qa", "qa", 2, 48, stride=16, median=40, sigma=0.5, min_len=8),
                "full": Mix("full", "pair", 4, 32)}
    gpu = device == "cuda"
    return {"xnli": Mix("xnli", "pair", 64 if gpu else 32, 128, median=42, sigma=0.45),
            "qa": Mix("qa", "qa", 32 if gpu else 8, 384, stride=128, median=160, sigma=0.5, min_len=24),
            "full": Mix("full", "pair", 64 if gpu else 32, 128)}


# ----- batches -----------------------------------------------------------------------------------------------
def _lognormal(rng: random.Random, mix: Mix) -> int:
    return int(round(math.exp(math.log(mix.median) + mix.sigma * rng.gauss(0.0, 1.0))))


def _qa_windows(total: int, mix: Mix, question: int) -> list[int]:
    """Feature lengths of one question + context of `total` tokens, windows as featurize_qa cuts them: each
    holds the question, 3 special tokens and up to max_len - question - 3 context tokens; consecutive windows
    overlap by `stride` context tokens."""
    room = mix.max_len - question - 3
    context = max(1, total - question - 3)
    out, start = [], 0
    while True:
        take = min(room, context - start)
        out.append(question + 3 + take)
        if start + take >= context:
            return out
        start += room - mix.stride


def sequence_lengths(mix: Mix, count: int, rng: random.Random) -> list[int]:
    if mix.name == "full":
        return [mix.max_len] * count
    out: list[int] = []
    while len(out) < count:
        n = max(mix.min_len, _lognormal(rng, mix))
        if mix.head == "qa":
            question = min(max(4, int(round(rng.gauss(mix.median * 0.1, mix.median * 0.03)))), mix.max_len // 4)
            out += _qa_windows(n, mix, question)
        else:
            out.append(min(n, mix.max_len))
    return out[:count]


def make_batches(mix: Mix, cfg, steps: int, seed: int, order_seed: int | None = None) -> list[dict]:
    """`steps` batches of `mix` for an encoder config: right-padded ids, lengths, the HF attention mask, token
    types (two segments where the config has them) and labels for the mix's head. With `order_seed`, the same
    sequences in a shuffled order (the same real tokens, other batch shapes)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    lengths = sequence_lengths(mix, steps * mix.batch_size, rng)
    if order_seed is not None:
        random.Random(order_seed).shuffle(lengths)
    out = []
    for s in range(steps):
        lens = torch.tensor(lengths[s * mix.batch_size:(s + 1) * mix.batch_size])
        B, S = len(lens), int(lens.max())
        mask = (torch.arange(S)[None, :] < lens[:, None]).long()
        ids = torch.randint(5, cfg.vocab_size, (B, S), generator=g).masked_fill(mask == 0, cfg.pad_token_id)
        batch = {"input_ids": ids, "lengths": lens, "attention_mask": mask}
        if cfg.type_vocab_size > 1:  # the second segment: the hypothesis, or the context
            cut = (lens.float() * (0.1 if mix.head == "qa" else 0.55)).long().clamp(min=1)
            batch["token_type_ids"] = ((torch.arange(S)[None, :] >= cut[:, None]) & (mask == 1)).long()
        if mix.head == "qa":
            start = (torch.rand(B, generator=g) * (lens - 1).float()).long()
            end = torch.minimum(start + torch.randint(0, 30, (B,), generator=g), lens - 1)
            batch |= {"start_positions": start, "end_positions": end}
        else:
            batch["labels"] = torch.randint(0, 3, (B,), generator=g)
        out.append(batch)
    return out


def batch_flops(cfg, batches: list[dict]) -> int:
    """Exact training FLOPs of the encoder over the real tokens: each sequence at its own length."""
    return sum(int(n) * cfg.flops_per_token(int(n)) for b in batches for n in b["lengths"].tolist())


# ----- arms --------------------------------------------------------------------------------------------------
@dataclass
class Arm:
    arch: str
    impl: str
    cfg: object
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    forward: object  # (model, batch) -> loss
    passes: list  # the batches of each pass (warm-up, timed, memory), on the device
    info: dict
    times: list
    mem: list
    energy: list
    faults: list = dataclasses.field(default_factory=list)


def _xlt_forward(model, batch):
    return model(batch)["loss"]


_HF_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels", "start_positions", "end_positions")


def _hf_forward(model, batch):
    return model(**{k: batch[k] for k in _HF_KEYS if k in batch}).loss


def build_xlt(cfg, mix: Mix, impl: str, seed: int, device: torch.device | str = "cpu"):
    """The XLT model of one arm, initialised on `device`: on the CPU initialisation draws from one random
    stream, serially, seconds per model at XLM-R sizes, and a GPU run builds a model for every arm of every
    group."""
    from models import Encoder, TaskModel, make_head

    cfg = replace(cfg, kernel_backend=BACKEND[impl])
    torch.manual_seed(seed)  # the same weights for every implementation of one config (on one device)
    with torch.device(device):
        encoder = Encoder(cfg)
        model = TaskModel(encoder, make_head(mix.head, cfg, encoder, num_labels=3))
    model.first_token_only = impl != "xlt-all-rows"
    return model


def build_hf(xlt_model, mix: Mix, attn: str, folder: Path):
    """The transformers model of `xlt_model`'s exported folder (identical weights and config)."""
    import transformers

    from models import hf

    hf.export(xlt_model, folder)
    auto = getattr(transformers, hf.AUTO_CLASSES[mix.head])
    return auto.from_pretrained(str(folder), attn_implementation=attn)


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return params + state


# ----- measuring ---------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Meter:
    """Time, peak memory and energy of one pass over an arm's batches."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.nvml = _nvml_handle() if self.cuda else None

    def energy_mj(self) -> int | None:
        if self.nvml is None:
            return None
        import pynvml
        try:
            return pynvml.nvmlDeviceGetTotalEnergyConsumption(self.nvml)
        except pynvml.NVMLError:
            return None

    def run(self, step, batches) -> tuple[float, int | None, float | None, int | None]:
        """(seconds, step peak bytes above the pass's start or None, joules or None, minor page faults or None)
        of one timed pass. On CPU no memory figure: see memory_pass."""
        def one_pass():
            for b in batches:
                step(b)
        if self.cuda:  # bench/timing.py: CUDA events; the allocator's peak above what was allocated before
            e0 = self.energy_mj()
            peak, (ms, _) = cuda_peak_extra_bytes(lambda: timed_calls(one_pass, self.device, repeats=1))
            e1 = self.energy_mj()
            joules = (e1 - e0) / 1e3 if e0 is not None and e1 is not None else None
            return ms[0] / 1e3, peak, joules, None
        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        one_pass()
        seconds = time.perf_counter() - t0
        return seconds, None, None, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0

    def memory_pass(self, step, batches) -> int | None:
        """CPU: the resident-set peak (VmHWM) rise over one untimed pass started after malloc_trim. Untimed
        because the trim hands freed memory back to the OS, and the pass then page-faults it in again."""
        _trim()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            rss0 = _status_kib("VmRSS")
        except OSError:
            return None
        for b in batches:
            step(b)
        return max(0, _status_kib("VmHWM") - rss0) * 1024


def _nvml_handle():
    try:
        import pynvml
        pynvml.nvmlInit()
        index = torch.cuda.current_device()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible and visible.split(",")[index].strip().isdigit():
            index = int(visible.split(",")[index])
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # no nvidia-ml-py, or no NVML: no power figures  # noqa: BLE001
        return None


def clocks(device: torch.device) -> dict:
    if device.type == "cuda":
        handle = _nvml_handle()
        if handle is None:
            return {}
        import pynvml
        out = {}
        for name, kind in (("sm", pynvml.NVML_CLOCK_SM), ("mem", pynvml.NVML_CLOCK_MEM)):
            with contextlib.suppress(pynvml.NVMLError):
                out[f"{name}_mhz"] = pynvml.nvmlDeviceGetClockInfo(handle, kind)
                out[f"{name}_max_mhz"] = pynvml.nvmlDeviceGetMaxClockInfo(handle, kind)
        with contextlib.suppress(pynvml.NVMLError):
            out["power_limit_w"] = pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1e3
        return out
    try:
        mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("cpu MHz")]
    except OSError:
        mhz = []
    return {"cpu_mhz": round(statistics.mean(mhz), 1)} if mhz else {}


def peak_tflops(device: torch.device, precision: str, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    from engine.trainer import bf16_supported
    return "bf16" if bf16_supported(device) else "fp32"


def _spread(values: list[float]) -> dict:
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values)}


def _ratio(num: list[float], den: list[float]) -> dict:
    r = [a / b for a, b in zip(num, den)]
    s = _spread(r)
    return {"median": round(s["median"], 4), "min": round(s["min"], 4), "max": round(s["max"], 4)}


# ----- one group: a preset and a mix, every arm interleaved -------------------------------------------------
def run_group(preset_name: str, mix: Mix, args, device: torch.device, precision: str, env: dict) -> list[dict]:
    from engine.trainer import LoopConfig, make_optimizer
    from kernels.dispatch import CPU_ROW_BUCKET
    from models import preset
    from models.config import PRESETS

    dense_cfg = preset(preset_name)
    configs = {"dense": dense_cfg}
    moe_name = preset_name + MOE_SUFFIX
    if "moe" in args.archs:
        configs["moe"] = PRESETS[moe_name] if moe_name in PRESETS else None
    base = {"bench": "throughput", **env, "device": device.type, "precision": precision, "mix": mix.name,
            "mix_spec": mix.describe(), "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
            "threads": torch.get_num_threads()}
    rows, arms = [], []
    autocast = precision == "bf16"
    meter = Meter(device)

    def row_for(arch, impl, cfg):
        r = base | {"preset": preset_name if arch == "dense" else moe_name, "arch": arch, "impl": impl,
                    "dense_twin": preset_name}
        if cfg is not None:
            r |= {"parameters": cfg.num_parameters(), "active_parameters": cfg.active_parameters()}
        return r

    if mix.max_len > dense_cfg.max_seq_len:
        reason = f"{preset_name} holds {dense_cfg.max_seq_len} positions; the {mix.name} mix needs {mix.max_len}"
        return [row_for(a, i, configs[a]) | {"skipped": reason} for a in configs for i in args.impls]
    # The batches of each pass (warm-up, timed, and on CPU the memory pass) for arm number `k`, on the device:
    # pass i's sequences (seeded), in arm k's own order; or every pass and arm on one list of batches.
    n_passes = args.warmup + args.repeats + (device.type == "cpu")

    def on_device(batches):
        return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]

    def arm_passes(k: int) -> list[list[dict]]:
        if args.repeat_batches:
            return [first] * n_passes
        return [on_device(make_batches(mix, dense_cfg, args.steps, seed=args.seed + i,
                                       order_seed=(args.seed + i) * 1000 + k)) for i in range(n_passes)]

    first = on_device(make_batches(mix, dense_cfg, args.steps, seed=args.seed)) if args.repeat_batches else None
    passes_0 = arm_passes(0)
    timed = passes_0[args.warmup:args.warmup + args.repeats]  # the same real tokens for every arm
    real = [sum(int(b["lengths"].sum()) for b in bs) for bs in timed]  # real tokens of each timed pass
    padded = sum(b["input_ids"].numel() for bs in timed for b in bs)  # as arm 0 batches them
    # whether the encoder pads any batch's packed tokens (CPU bf16; as arm 0 batches them: a mix whose every
    # batch holds a multiple of the bucket, such as full-length batches, does so in any order)
    has_pad_rows = any(int(b["lengths"].sum()) % CPU_ROW_BUCKET for bs in passes_0 for b in bs)
    batch_info = {"batch_size": mix.batch_size, "real_tokens_per_step": round(sum(real) / (args.steps * len(real)), 1),
                  "padded_tokens_per_step": round(padded / (args.steps * len(real)), 1),
                  "padding_share": round(1 - sum(real) / padded, 4), "repeat_batches": args.repeat_batches}
    with tempfile.TemporaryDirectory() as tmp:
        for arch, cfg in configs.items():
            for impl in args.impls:
                row = row_for(arch, impl, cfg) | batch_info
                if cfg is None:
                    rows.append(row | {"skipped": f"no preset {moe_name}"})
                    continue
                if impl == "hf" and arch == "moe":
                    rows.append(row | {"skipped": "transformers has no BERT / XLM-R Mixture-of-Experts class; MoE "
                                                  "is compared XLT vs XLT-torch and against its dense twin"})
                    continue
                if impl in BF16_SWITCHES and (device.type != "cpu" or precision != "bf16"):
                    rows.append(row | {"skipped": f"{impl} undoes a choice of the CPU bf16 path only: on {device.type} "
                                                  f"in {precision} it would be xlt"})
                    continue
                if impl in SWITCHES and impl not in BF16_SWITCHES and (device.type != "cpu" or padded == sum(real)):
                    where = (f"the {mix.name} mix has no padding (no key bias, no length groups)"
                             if device.type == "cpu" else f"on {device.type} attention runs in the Triton kernels")
                    rows.append(row | {"skipped": f"{impl} undoes a choice of the CPU attention path on padded "
                                                  f"batches: {where}, so it would be xlt"})
                    continue
                if impl == "xlt-unbucketed" and arch == "dense":
                    rows.append(row | {"skipped": "a dense model has no expert groups to pad: xlt-unbucketed is xlt"})
                    continue
                if impl == "xlt-unpadded-rows" and not has_pad_rows:
                    rows.append(row | {"skipped": f"every batch of the {mix.name} mix holds a multiple of "
                                                  f"{CPU_ROW_BUCKET} real tokens, so no pad rows: xlt-unpadded-rows "
                                                  "is xlt"})
                    continue
                try:
                    if impl == "hf":
                        model = build_hf(build_xlt(cfg, mix, "xlt", args.seed, device), mix, args.hf_attn,
                                         Path(tmp) / f"{arch}-{mix.name}")
                        info = {"hf_attn": args.hf_attn, "hf_class": type(model).__name__}
                        forward = _hf_forward
                    else:
                        model = build_xlt(cfg, mix, impl, args.seed, device)
                        from kernels import dispatch
                        info = {"kernel_backend": BACKEND[impl], "first_token_only": model.first_token_only,
                                "kernels": {op: dispatch.resolve(op, BACKEND[impl], device) for op in KERNEL_OPS}}
                        forward = _xlt_forward
                    model = model.to(device).train()
                    opt, _ = make_optimizer(model, LoopConfig(steps=1, lr=args.lr))
                    passes = passes_0 if not arms else arm_passes(len(arms))  # arm 0's are drawn above
                    arms.append(Arm(arch, impl, cfg, model, opt, forward, passes, row | info, [], [], []))
                except torch.cuda.OutOfMemoryError as e:  # a size that does not fit this device
                    rows.append(row | {"skipped": f"out of memory building the model: {str(e).splitlines()[0]}"})
                    _free(device)

        def make_step(arm: Arm):
            def step(batch):
                with _switched(arm.impl):
                    plain_step(batch)

            def plain_step(batch):
                arm.opt.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss = arm.forward(arm.model, batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(arm.model.parameters(), 1.0, foreach=True)
                arm.opt.step()
            return step

        load_before = os.getloadavg()
        live = []
        for arm in arms:
            try:
                for w in range(args.warmup):
                    meter.run(make_step(arm), arm.passes[w])
                live.append(arm)
            except torch.cuda.OutOfMemoryError as e:
                rows.append(arm.info | {"skipped": f"out of memory in a step: {str(e).splitlines()[0]}"})
                arm.model = arm.opt = None
                _free(device)
        for r in range(args.repeats):
            for arm in live:
                seconds, peak, joules, faults = meter.run(make_step(arm), arm.passes[args.warmup + r])
                arm.times.append(seconds)
                arm.mem.append(peak)
                arm.energy.append(joules)
                arm.faults.append(faults)
        load_after = os.getloadavg()
        if device.type == "cpu":
            for arm in live:
                arm.mem.append(meter.memory_pass(make_step(arm), arm.passes[-1]))
    peak_tf = peak_tflops(device, precision, args.peak_tflops)
    by_key = {(a.arch, a.impl): a for a in live}
    for arm in live:
        flops = [batch_flops(arm.cfg, bs) for bs in timed]
        t = _spread([s / args.steps for s in arm.times])
        tokens_per_s = statistics.median(n / s for n, s in zip(real, arm.times))
        tflops = statistics.median(f / s for f, s in zip(flops, arm.times)) / 1e12
        extra = max((m for m in arm.mem if m is not None), default=None)
        state = state_bytes(arm.model, arm.opt)
        row = arm.info | {
            "step_ms": round(t["median"] * 1e3, 3), "step_ms_min": round(t["min"] * 1e3, 3),
            "step_ms_max": round(t["max"] * 1e3, 3), "step_spread": round((t["max"] - t["min"]) / t["median"], 4),
            "tokens_per_s": round(tokens_per_s, 1), "flops_per_real_token": round(sum(flops) / sum(real)),
            "tflops": round(tflops, 4), "peak_tflops": peak_tf, "mfu": round(tflops / peak_tf, 4) if peak_tf else None,
            "state_mib": round(state / 2**20, 2),
            "step_peak_mib": round(extra / 2**20, 2) if extra is not None else None,
            "peak_mem_mib": round((state + extra) / 2**20, 2) if extra is not None else None,
            "mem_method": f"weights + optimizer state + {CUDA_MEMORY_METHOD}" if device.type == "cuda" else
                          "weights + optimizer state + VmHWM rise over an untimed pass (after malloc_trim)",
            "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
            "clocks": clocks(device)}
        if all(f is not None for f in arm.faults):
            row["minor_faults_per_step"] = round(statistics.median(arm.faults) / args.steps)
        joules = [j for j in arm.energy if j is not None]
        if len(joules) == len(arm.energy) and joules:
            row |= {"power_w": round(sum(joules) / sum(arm.times), 1),
                    "joules_per_token": sum(joules) / sum(real)}
        for other, field in (("hf", "speedup_vs_hf"), ("xlt-torch", "speedup_vs_xlt_torch"),
                             ("xlt-all-rows", "speedup_vs_xlt_all_rows")):
            ref = by_key.get(("dense", other)) if arm.arch == "dense" else None
            if ref is not None and ref is not arm:
                row[field] = _ratio(ref.times, arm.times)
        for ablation in SWITCHES:  # the same architecture with one kernel choice undone
            ref = by_key.get((arm.arch, ablation))
            if arm.impl == "xlt" and ref is not None:
                row["speedup_vs_" + ablation.replace("-", "_")] = _ratio(ref.times, arm.times)
        dense = by_key.get(("dense", arm.impl))
        if arm.arch == "moe" and dense is not None:
            row["step_time_vs_dense"] = _ratio(arm.times, dense.times)
        hf_dense = by_key.get(("dense", "hf"))
        if arm.arch == "moe" and hf_dense is not None:  # the MoE model against HF training its dense twin
            row["speedup_vs_hf_dense_twin"] = _ratio(hf_dense.times, arm.times)
        rows.append(row)
    for arm in arms:
        arm.model = arm.opt = None
    _free(device)
    order = {(a, i): n for n, (a, i) in enumerate((a, i) for a in ARCHS for i in IMPLS + ABLATIONS)}
    return sorted(rows, key=lambda r: order.get((r["arch"], r["impl"]), 99))


@contextlib.contextmanager
def _switched(impl: str):
    """For an ablation arm of SWITCHES: its module's switch set for the duration; otherwise nothing."""
    if impl not in SWITCHES:
        yield
        return
    import importlib

    name, switch, value = SWITCHES[impl]
    module = importlib.import_module(name)
    saved = getattr(module, switch)
    setattr(module, switch, value)
    try:
        yield
    finally:
        setattr(module, switch, saved)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _csv(value: str, known: tuple[str, ...] | None, option: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{option}: empty list")
    if known is not None:
        bad = [v for v in items if v not in known]
        if bad:
            raise argparse.ArgumentTypeError(f"{option}: unknown {', '.join(bad)}; expected some of {', '.join(known)}")
    return items


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--presets", default=None, help="dense presets (models.PRESETS), comma-separated; default "
                    "xlt-tiny,xlt-small on CPU, xlmr-base,xlmr-large,xlmr-xl on CUDA")
    ap.add_argument("--archs", default="dense,moe", help="dense,moe")
    ap.add_argument("--mixes", default="xnli,qa,full", help="xnli,qa,full")
    ap.add_argument("--impls", default=",".join(IMPLS), help="xlt,xlt-torch,hf")
    ap.add_argument("--steps", type=int, default=None, help="batches per pass (default 8; tiny 2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed passes per arm (default 5; tiny 2)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed passes per arm before the timed ones")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="auto: bf16 autocast where the device computes bf16 natively (engine.trainer.bf16_supported)")
    ap.add_argument("--hf-attn", default="sdpa", help="transformers attn_implementation (sdpa, eager, "
                    "flash_attention_2 where installed)")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak TFLOP/s for MFU (default: "
                    "the table of GPUs for bf16; none on CPU)")
    ap.add_argument("--repeat-batches", action=argparse.BooleanOptionalAction, default=None,
                    help="every pass and arm on the same batches (default on CUDA; on CPU the default draws new "
                    "sequences for each pass, the same for every arm, batched in each arm's own order; on CUDA "
                    "--no-repeat-batches can meet attention autotune keys first in a timed pass)")
    ap.add_argument("--label", default=None, help="a note recorded in every row (e.g. which models/ code ran)")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (the 'tiny' preset, short mixes)")
    ap.add_argument("--results", default=None,
                    help="JSONL to append to (default bench/results/throughput_<device>.jsonl)")
    args = ap.parse_args(argv)
    try:
        args.archs = _csv(args.archs, ARCHS, "--archs")
        args.impls = _csv(args.impls, IMPLS + ABLATIONS, "--impls")
        args.mixes = _csv(args.mixes, ("xnli", "qa", "full"), "--mixes")
        from models.config import PRESETS
        default = "tiny" if args.tiny else "xlt-tiny,xlt-small" if args.device == "cpu" else \
            "xlmr-base,xlmr-large,xlmr-xl"
        args.presets = _csv(args.presets or default, tuple(k for k in PRESETS if "-moe" not in k), "--presets")
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if args.repeat_batches is None:
        args.repeat_batches = args.device == "cuda"
    args.steps = (2 if args.tiny else 8) if args.steps is None else args.steps
    args.repeats = (2 if args.tiny else 5) if args.repeats is None else args.repeats
    for name in ("steps", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    return args


def main(argv=None) -> int:
    from engine.trainer import hold_freed_memory

    args = parse_args(argv)
    if args.threads or args.tiny:  # the smoke run: one thread, no waiting on a shared core's other thread
        torch.set_num_threads(args.threads or 1)
    device = torch.device(args.device)
    if device.type == "cpu":  # as engine.train runs on CPU; one process, so every arm runs with it
        hold_freed_memory()
    precision = resolve_precision(args.precision, device)
    env = environment() | {"command": shlex.join(["python", "-m", "bench.throughput",
                                                   *(sys.argv[1:] if argv is None else argv)])}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        if "hf" in args.impls:
            raise SystemExit("bench.throughput: --impls hf needs transformers (or leave hf out)") from None
    if args.label:
        env["label"] = args.label
    out = Path(args.results or f"bench/results/throughput_{device.type}.jsonl")
    all_mixes = mixes(device.type, args.tiny)
    for name in args.presets:
        for mix in args.mixes:
            for row in run_group(name, all_mixes[mix], args, device, precision, env):
                append_row(out, row, SHOW)
    return 0


if __name__ == "__main__":
    sys.exit(main())
