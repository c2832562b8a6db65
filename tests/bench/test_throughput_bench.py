"""Smoke runs of bench/throughput.py and bench/report.py at a tiny size: the rows carry their fields, the arms
train the same function on the same batches, and the report writes its tables and plots (no timing
assertions)."""
import json
import random
import tempfile
from pathlib import Path

import pytest
import torch

from bench import report as bench_report
from bench import throughput as tp
from models import preset


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput") / "throughput_cpu.jsonl"
    assert tp.main(["--device", "cpu", "--tiny", "--results", str(out)]) == 0
    return out, [json.loads(line) for line in out.read_text().splitlines()]


def test_tiny_run_writes_a_row_per_arm_and_mix(tiny_rows):
    _, rows = tiny_rows
    keys = {(r["arch"], r["mix"], r["impl"]) for r in rows}
    assert keys == {(a, m, i) for a in tp.ARCHS for m in ("xnli", "qa", "full") for i in tp.IMPLS}
    for r in rows:
        assert r["bench"] == "throughput" and r["device"] == "cpu" and r["commit"] and r["torch"]
        assert r["transformers"] and r["precision"] in ("fp32", "bf16") and r["threads"] == 1
        assert r["dense_twin"] == "tiny" and r["preset"] == ("tiny" if r["arch"] == "dense" else "tiny-moe8")
        assert "python -m bench.throughput" in r["command"] and isinstance(r["cpu_features"], list)
        if r["arch"] == "moe" and r["impl"] == "hf":
            assert "Mixture-of-Experts" in r["skipped"]
            continue
        assert "skipped" not in r, r
        assert r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"] and r["tokens_per_s"] > 0
        assert r["flops_per_real_token"] > 0 and r["tflops"] > 0 and r["mfu"] is None  # no peak known on CPU
        assert r["state_mib"] > 0 and (r["peak_mem_mib"] is None or r["peak_mem_mib"] >= r["state_mib"])
        assert len(r["loadavg_before"]) == 3 and len(r["loadavg_after"]) == 3
        assert r["minor_faults_per_step"] >= 0 and r["peak_mem_mib"] is not None  # Linux: /proc and getrusage
        assert r["active_parameters"] <= r["parameters"]
        assert (r["padding_share"] == 0) == (r["mix"] == "full") and 0 <= r["padding_share"] < 1
        if r["impl"] != "hf":
            assert r["kernels"]["attention_varlen"] == "torch"  # CPU: "auto" resolves to the PyTorch paths
        if r["arch"] == "dense" and r["impl"] != "hf":
            assert r["speedup_vs_hf"]["min"] <= r["speedup_vs_hf"]["median"] <= r["speedup_vs_hf"]["max"]
        if r["arch"] == "moe":
            assert r["step_time_vs_dense"]["median"] > 0 and r["speedup_vs_hf_dense_twin"]["median"] > 0
            assert r["active_parameters"] < r["parameters"]


def test_report_writes_tables_and_plots(tiny_rows, tmp_path):
    results, _ = tiny_rows
    assert bench_report.main(["--results", str(results), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| preset | arch | mix |" in text and "XLT / HF" in text and "| tiny | dense | xnli |" in text
    assert "Mixture-of-Experts" in text  # the skipped HF MoE arms are listed with their reason
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert any(p.endswith("_tokens_per_s.png") for p in pngs) and any(p.endswith("_peak_mem.png") for p in pngs)
    for name in pngs:
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in text


def test_report_without_rows_is_an_error(tmp_path):
    empty = tmp_path / "throughput_cpu.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit):
        bench_report.main(["--results", str(empty), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        bench_report.main(["--results", str(tmp_path / "missing.jsonl")])


def test_report_takes_several_commits_and_keeps_each_runs_method():
    base = {"bench": "throughput", "device": "cpu", "cpu": "X", "precision": "bf16", "threads": 2, "arch": "dense",
            "mix": "xnli", "impl": "xlt", "date": "2026-12-02T00:00:00"}
    rows = [base | {"preset": "xlt-small", "commit": "aaa1111", "command": "long", "steps": 8, "repeats": 5,
                    "warmup": 1},
            base | {"preset": "xlmr-base", "commit": "bbb2222", "command": "short", "steps": 2, "repeats": 3,
                    "warmup": 1},
            base | {"preset": "xlt-tiny", "commit": "ccc3333", "command": "other", "steps": 8, "repeats": 5,
                    "warmup": 1}]
    kept = bench_report.latest(rows, "aaa, bbb")
    assert sorted(r["preset"] for r in kept) == ["xlmr-base", "xlt-small"]
    assert [r["preset"] for r in bench_report.latest(rows, "ccc")] == ["xlt-tiny"]
    lines = bench_report.runs(kept)
    assert lines == ["- xlt-small at aaa1111: 8 steps per pass, 5 timed passes per arm after 1 warm-up, the same "
                     "batches every pass; `long`",
                     "- xlmr-base at bbb2222: 2 steps per pass, 3 timed passes per arm after 1 warm-up, the same "
                     "batches every pass; `short`"]
    kept[0]["repeat_batches"] = False
    assert "new sequences each pass" in "".join(bench_report.runs(kept))


def test_the_table_shows_energy_where_rows_have_it():
    def row(impl, **kw):
        return {"bench": "throughput", "device": "cuda", "gpu": "NVIDIA H200", "preset": "xlmr-base",
                "dense_twin": "xlmr-base", "arch": "dense", "mix": "xnli", "impl": impl, "tokens_per_s": 1e5,
                "step_ms": 10.0, "step_ms_min": 9.0, "step_ms_max": 11.0, "active_parameters": 2.8e8,
                "real_tokens_per_step": 4000, "padding_share": 0.5} | kw
    gpu = [row("xlt", joules_per_token=0.00123, power_w=612.4), row("hf", joules_per_token=0.0031, power_w=540.0)]
    text = "\n".join(bench_report.table(gpu))
    assert "mJ / real token XLT / HF | W XLT / HF |" in text and "| 1.23 / 3.1 | 612 / 540 |" in text
    cpu = [{k: v for k, v in r.items() if k not in ("joules_per_token", "power_w")} | {"device": "cpu"} for r in gpu]
    assert "mJ / real token" not in "\n".join(bench_report.table(cpu))  # no energy counter: no empty columns


def test_cost_exponent_is_the_slope_of_seconds_per_token():
    # 4x the parameters at a quarter of the tokens/s: cost grows as fast as the parameters
    (x, slope), = bench_report.cost_exponents([(1e6, 100.0), (4e6, 25.0)])
    assert x == pytest.approx(2e6) and slope == pytest.approx(1.0)


def test_the_xlt_and_hf_arms_train_the_same_function_on_the_same_batches():
    """fp32, no dropout: the same loss and gradients from the XLT model (packed, length-grouped attention, the
    last layer on first tokens only) and the transformers model exported from it, on an XNLI-like batch."""
    cfg = preset("tiny", hidden_dropout=0.0, attention_dropout=0.0)
    mix = tp.mixes("cpu", tiny=False)["xnli"]
    batches = tp.make_batches(mix, cfg, 2, seed=3)
    again = tp.make_batches(mix, cfg, 2, seed=3)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(batches, again) for k in a)  # seeded: the same batches
    batch = batches[0]
    assert 0.2 < 1 - batch["lengths"].sum() / batch["input_ids"].numel() < 0.9  # a mix with real padding
    ours = tp.build_xlt(cfg, mix, "xlt", seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        theirs = tp.build_hf(tp.build_xlt(cfg, mix, "xlt", seed=0), mix, "sdpa", Path(tmp) / "hf")
    loss_ours, loss_theirs = tp._xlt_forward(ours, batch), tp._hf_forward(theirs, batch)
    torch.testing.assert_close(loss_ours, loss_theirs, atol=1e-5, rtol=1e-5)
    loss_ours.backward()
    loss_theirs.backward()
    grads = dict(theirs.named_parameters())
    pairs = [(ours.encoder.embeddings.word.weight, "bert.embeddings.word_embeddings.weight"),
             (ours.encoder.layers[0].attn.q.weight, "bert.encoder.layer.0.attention.self.query.weight"),
             (ours.encoder.layers[-1].attn.v.weight, f"bert.encoder.layer.{cfg.num_layers - 1}.attention.self.value"
                                                     ".weight"),
             (ours.encoder.layers[-1].ffn.up.weight, f"bert.encoder.layer.{cfg.num_layers - 1}.intermediate.dense"
                                                     ".weight")]
    for p, name in pairs:
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_arms_are_initialised_on_the_device_they_train_on():
    """On a GPU every arm's model is built there (CPU initialisation is serial: seconds per model at XLM-R
    sizes); the meta device stands in for it here."""
    mix = tp.mixes("cpu", tiny=True)["xnli"]
    for name in ("tiny", "tiny-moe8"):
        model = tp.build_xlt(preset(name), mix, "xlt", seed=0, device="meta")
        tensors = [*model.parameters(), *model.buffers()]
        assert tensors and all(t.device.type == "meta" for t in tensors), name


def test_mixes_have_the_lengths_they_describe():
    rng = random.Random(0)
    mixes = tp.mixes("cpu", tiny=False)
    xnli = tp.sequence_lengths(mixes["xnli"], 2000, rng)
    assert min(xnli) >= mixes["xnli"].min_len and max(xnli) <= mixes["xnli"].max_len
    assert 35 < sum(xnli) / len(xnli) < 60  # median 42, a right tail
    qa = mixes["qa"]
    windows = tp._qa_windows(1000, qa, question=16)  # a long context: several windows of at most 384
    assert len(windows) > 2 and all(n <= qa.max_len for n in windows) and windows[0] == qa.max_len
    room = qa.max_len - 16 - 3
    assert sum(n - 19 for n in windows) - qa.stride * (len(windows) - 1) == 1000 - 19  # every token, overlaps
    assert tp._qa_windows(100, qa, question=16) == [100] and room > qa.stride
    assert set(tp.sequence_lengths(mixes["full"], 10, rng)) == {mixes["full"].max_len}


@pytest.mark.parametrize("argv", [["--impls", "xlt,vllm"], ["--presets", "no-such"], ["--mixes", "squad"],
                                  ["--steps", "0"], ["--archs", ""]])
def test_bad_options_are_errors(argv):
    with pytest.raises(SystemExit):
        tp.parse_args(["--device", "cpu", *argv])


def test_a_mix_longer_than_the_position_table_is_skipped():
    args = tp.parse_args(["--device", "cpu", "--tiny", "--impls", "xlt", "--archs", "dense"])
    long_mix = tp.Mix("qa", "qa", 1, 384, stride=128, median=160, sigma=0.5)
    rows = tp.run_group("tiny", long_mix, args, torch.device("cpu"), "fp32", {})
    assert len(rows) == 1 and "holds 128 positions" in rows[0]["skipped"]


def test_the_first_token_ablation_arm_computes_every_row(tmp_path):
    out = tmp_path / "ablation.jsonl"
    assert tp.main(["--device", "cpu", "--tiny", "--archs", "dense", "--mixes", "full", "--impls", "xlt,xlt-all-rows",
                    "--results", str(out)]) == 0
    rows = {r["impl"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["xlt"]["first_token_only"] is True and rows["xlt-all-rows"]["first_token_only"] is False
    assert rows["xlt"]["speedup_vs_xlt_all_rows"]["median"] > 0
    assert bench_report.main(["--results", str(out), "--out", str(tmp_path / "report")]) == 0
    assert "xlt-all-rows" in (tmp_path / "report" / "report.md").read_text()


def test_the_switch_ablations_undo_their_kernel_choice_during_their_steps(tmp_path, monkeypatch):
    import sys

    from kernels import moe

    attention = sys.modules["kernels.attention"]  # the module (kernels.attention is also the function's name)
    seen = []
    real_ffn, real_ref = moe.moe_expert_ffn_reference, attention.attention_reference

    def ffn_spy(*args):  # the bucket each expert-FFN call runs with
        seen.append(("bucket", moe.PAD_EXPERT_GROUPS))
        return real_ffn(*args)

    def attention_spy(*args, compute_dtype=None, **kw):  # the dtype the CPU dropout path asks for
        seen.append(("scores", compute_dtype))
        return real_ref(*args, compute_dtype=compute_dtype, **kw)

    from models import encoder
    real_packing = encoder.Packing.from_lengths.__func__

    def packing_spy(cls, *args, **kw):  # whether the encoder pads its packed rows in this step
        seen.append(("rows", encoder.PAD_ROWS))
        return real_packing(cls, *args, **kw)

    monkeypatch.setattr(encoder.Packing, "from_lengths", classmethod(packing_spy))
    monkeypatch.setattr(moe, "moe_expert_ffn_reference", ffn_spy)
    monkeypatch.setattr(attention, "attention_reference", attention_spy)
    out = tmp_path / "switches.jsonl"
    assert tp.main(["--device", "cpu", "--tiny", "--precision", "bf16", "--mixes", "xnli",
                    "--impls", "xlt,xlt-unpadded-rows,xlt-unbucketed,xlt-fp32-scores", "--results", str(out)]) == 0
    rows = {(r["arch"], r["impl"]): r for r in map(json.loads, out.read_text().splitlines())}
    assert "no expert groups" in rows[("dense", "xlt-unbucketed")]["skipped"]
    assert rows[("moe", "xlt")]["speedup_vs_xlt_unbucketed"]["median"] > 0
    for arch in ("dense", "moe"):
        assert rows[(arch, "xlt")]["speedup_vs_xlt_fp32_scores"]["median"] > 0
        assert rows[(arch, "xlt")]["speedup_vs_xlt_unpadded_rows"]["median"] > 0
    assert {b for kind, b in seen if kind == "bucket"} == {True, False}  # both arms ran
    assert {d for kind, d in seen if kind == "scores"} == {None, torch.bfloat16}
    assert {p for kind, p in seen if kind == "rows"} == {True, False}
    assert moe.PAD_EXPERT_GROUPS is True and attention.CPU_AUTOCAST_SCORES is True  # restored after the arms
    assert encoder.PAD_ROWS is True
    assert bench_report.main(["--results", str(out), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "xlt-unbucketed" in report and "xlt-fp32-scores" in report


def test_the_switch_ablations_are_skipped_where_they_would_equal_xlt(tmp_path):
    out = tmp_path / "fp32.jsonl"
    assert tp.main(["--device", "cpu", "--tiny", "--precision", "fp32", "--mixes", "full", "--archs", "moe",
                    "--impls", "xlt,xlt-unpadded-rows,xlt-unbucketed,xlt-fp32-scores", "--results", str(out)]) == 0
    rows = {r["impl"]: r for r in map(json.loads, out.read_text().splitlines())}
    for arm in ("xlt-unpadded-rows", "xlt-unbucketed", "xlt-fp32-scores"):
        assert "CPU bf16 path only" in rows[arm]["skipped"] and "fp32" in rows[arm]["skipped"]
    assert "skipped" not in rows["xlt"]


def test_the_attention_ablations_undo_their_choice_in_fp32_and_skip_full_length_batches(tmp_path, monkeypatch):
    import sys

    import kernels
    from models import encoder

    attention = sys.modules["kernels.attention"]  # the module (kernels.attention is also the function's name)
    seen = []
    real_core, real_varlen = attention._attention, kernels.attention_varlen

    def core_spy(*args):  # whether the twin fuses the key-padding bias in this call (args[3]: the lengths)
        if args[3] is not None:
            seen.append(("fused", attention.FUSED_BIAS))
        return real_core(*args)

    def varlen_spy(q, *args, **kw):  # a length group's q: a piece of the layer's split, or a slice of it
        if q.grad_fn is not None and "Backward" in q.grad_fn.name():
            seen.append(("piece", q.grad_fn.name()))
        return real_varlen(q, *args, **kw)

    monkeypatch.setattr(attention, "_attention", core_spy)
    monkeypatch.setattr(kernels, "attention_varlen", varlen_spy)
    monkeypatch.setattr(encoder, "GROUP_CALL_COST", 1)  # tiny batches: a group per distinct length
    out = tmp_path / "attention.jsonl"
    assert tp.main(["--device", "cpu", "--tiny", "--precision", "fp32", "--mixes", "xnli,full",
                    "--impls", "xlt,xlt-unfused-bias,xlt-sliced-groups", "--results", str(out)]) == 0
    rows = {(r["arch"], r["mix"], r["impl"]): r for r in map(json.loads, out.read_text().splitlines())}
    for arch in ("dense", "moe"):
        xnli = rows[(arch, "xnli", "xlt")]
        assert xnli["speedup_vs_xlt_unfused_bias"]["median"] > 0
        assert xnli["speedup_vs_xlt_sliced_groups"]["median"] > 0
        for arm in ("xlt-unfused-bias", "xlt-sliced-groups"):
            assert "skipped" not in rows[(arch, "xnli", arm)]
            assert "no padding" in rows[(arch, "full", arm)]["skipped"]
    assert {f for kind, f in seen if kind == "fused"} == {True, False}  # both ways ran
    pieces = {f for kind, f in seen if kind == "piece"}
    assert any("Split" in f for f in pieces) and any("Slice" in f for f in pieces)  # grouped calls, both ways
    assert attention.FUSED_BIAS is True and encoder.SPLIT_GROUPS is True  # restored after the arms
    assert bench_report.main(["--results", str(out), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "xlt-unfused-bias" in report and "xlt-sliced-groups" in report


def test_the_unpadded_rows_ablation_is_skipped_where_no_batch_has_pad_rows(tmp_path):
    """Full-length tiny batches hold 4 x 32 = 128 tokens, a multiple of the 64-row bucket: the encoder pads
    nothing, so the arm would be xlt itself."""
    out = tmp_path / "full.jsonl"
    assert tp.main(["--device", "cpu", "--tiny", "--precision", "bf16", "--mixes", "full", "--archs", "dense",
                    "--impls", "xlt,xlt-unpadded-rows", "--results", str(out)]) == 0
    rows = {r["impl"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert "no pad rows" in rows["xlt-unpadded-rows"]["skipped"] and "skipped" not in rows["xlt"]


@pytest.mark.parametrize("repeat", [False, True])
def test_every_pass_draws_new_sequences_the_same_for_every_arm(monkeypatch, repeat):
    """Two arms, run interleaved (warm-up A B, then A B per timed pass, then the memory pass A B). By default on
    CPU each pass draws new sequences, the same for both arms, batched in each arm's own order (so the second
    arm does not find the first's shapes cached); with --repeat-batches every pass and arm has the same batches."""
    seen = []  # the lengths of each pass's batches, in the order the passes ran
    real_run, real_memory = tp.Meter.run, tp.Meter.memory_pass

    def record(batches):
        seen.append(tuple(tuple(b["lengths"].tolist()) for b in batches))

    monkeypatch.setattr(tp.Meter, "run", lambda self, step, b: (record(b), real_run(self, step, b))[1])
    monkeypatch.setattr(tp.Meter, "memory_pass", lambda self, step, b: (record(b), real_memory(self, step, b))[1])
    argv = ["--device", "cpu", "--tiny", "--archs", "dense", "--impls", "xlt,hf", "--repeats", "3"]
    args = tp.parse_args(argv + (["--repeat-batches"] if repeat else []))
    assert args.repeat_batches is repeat  # the CPU default: new sequences
    rows = tp.run_group("tiny", tp.mixes("cpu", tiny=True)["xnli"], args, torch.device("cpu"), "fp32", {})
    assert all(r["repeat_batches"] is repeat for r in rows) and len(rows) == 2
    assert len(seen) == 2 * (1 + 3 + 1)

    def sequences(p):
        return sorted(n for batch in p for n in batch)

    first, second = seen[0::2], seen[1::2]
    assert [sequences(p) for p in first] == [sequences(p) for p in second]  # each pass: the same sequences
    assert len({tuple(sequences(p)) for p in first}) == (1 if repeat else 5)  # new ones for every pass
    assert (first == second) is repeat  # ... batched in each arm's own order
    assert tp.parse_args(["--device", "cpu", "--no-repeat-batches"]).repeat_batches is False
