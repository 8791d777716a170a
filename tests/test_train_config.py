"""Fast tests of the training configs and the pieces of the stage loop that need no Ray: stage YAMLs (7b = the
upstream table), validation errors, fingerprints, the LR schedule, the deterministic data order and resume skip,
the step arithmetic, and the MoE starting model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medplib.cpu import has_bf16_kernels
from medplib.model.config import configs_dir, load_model_config
from medplib.model.medplib import MedPLIB
from workflows.data.prepared import RowInfo
from workflows.train.config import (
    REQUIRED_STAGES,
    STAGES,
    PipelineConfig,
    fingerprint,
    flatten,
    load_pipeline_config,
    load_stage_config,
)
from workflows.train.stage import (
    EPOCH_POSITION,
    GATHER_ROWS,
    _without_cpu_shm_comm,
    build_moe_init,
    copy_positions,
    deepspeed_config,
    epoch_cutoff,
    fail_hook_steps,
    group_factors,
    image_pool,
    lr_factor,
    parameter_anchor,
    plan_steps,
    repeat_count,
    resolve_precision,
    save_model_atomic,
    select_rows,
    window_shuffle,
)

CONFIGS = configs_dir()


@pytest.mark.parametrize("preset", ["tiny", "small", "7b"])
@pytest.mark.parametrize("stage", STAGES)
def test_stage_files_validate_and_show_their_command(preset: str, stage: str) -> None:
    path = CONFIGS / "stages" / preset / f"{stage}.yaml"
    cfg = load_stage_config(path)
    assert cfg.stage == stage and cfg.preset == preset
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    text = "\n".join(header)
    assert "medplib " in text and "Batch arithmetic" in text, (
        f"{path}: header must show the command and batch math"
    )


def test_7b_stages_are_the_upstream_table() -> None:
    align, vl, gr, moe = (load_stage_config(CONFIGS / "stages" / "7b" / f"{s}.yaml") for s in STAGES)
    # Stage I (optional): LLaVA-1.5's projector pretraining, the projector alone at 1e-3 and batch 256.
    assert (align.lora, align.sft_modules, align.lr, align.global_batch(4)) == (
        None,
        ["mm_projector"],
        1e-3,
        256,
    )
    assert (vl.micro_batch_size, vl.grad_accum, vl.lr, vl.epochs, vl.max_length) == (16, 2, 1e-4, 3, 2048)
    assert (vl.lora.r, vl.lora.alpha) == (16, 16)
    assert vl.lora.target_modules == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert {"lm_head", "embed_tokens", "input_layernorm", "post_attention_layernorm", "mm_projector"} <= set(
        vl.sft_modules
    )
    assert (gr.micro_batch_size, gr.grad_accum, gr.lr, gr.epochs, gr.max_length) == (32, 1, 3e-4, 10, 2048)
    assert (gr.lora.r, gr.lora.alpha, gr.lora.target_modules) == (
        8,
        16,
        ["gate_proj", "up_proj", "down_proj"],
    )
    assert gr.sft_modules == ["mask_decoder", "text_hidden_fcs"]
    w = gr.loss_weights
    assert (w.ce, w.dice, w.bce, w.iou, w.focal) == (1, 5, 1, 0, 1)
    assert (moe.micro_batch_size, moe.grad_accum, moe.lr, moe.epochs, moe.max_length) == (4, 8, 3e-4, 3, 1024)
    assert moe.lora.target_modules == ["gate_proj", "up_proj", "down_proj", "q_proj", "v_proj"]
    w = moe.loss_weights
    assert (w.ce, w.dice, w.bce, w.iou, w.focal, w.moe_aux) == (1, 0.5, 2, 0, 0, 0)
    assert (moe.moe.num_experts, moe.moe.top_k, moe.moe.layers, moe.moe.capacity_factor) == (
        2,
        1,
        "dense",
        1.5,
    )
    assert moe.expert_sources == ["grounding", "vl"]
    assert {vl.global_batch(4), gr.global_batch(4), moe.global_batch(4)} == {128}
    assert all(s.zero_stage == 2 and s.gradient_checkpointing for s in (vl, gr, moe))


def test_pipeline_configs_load() -> None:
    for preset in ("tiny", "small"):
        cfg = load_pipeline_config(CONFIGS / "pipeline" / f"{preset}.yaml", workdir="/tmp/x")
        assert cfg.preset == preset and cfg.stage_order == list(REQUIRED_STAGES) and cfg.workdir == "/tmp/x"
        assert cfg.stage_inputs("vl") == () and cfg.stage_inputs("moe") == ("vl", "grounding")
        assert cfg.resolved_tracking_uri().startswith("sqlite:////tmp/x/mlflow.db") or cfg.tracking_uri


def test_command_line_input_replaces_the_configs_rows() -> None:
    """`make run WORKDIR=...` builds MeCoVQA-mini under that folder and hands it to the pipeline with --input."""
    from workflows.cli import build_parser
    from workflows.cli.train import _load

    args = build_parser().parse_args(
        [
            "pipeline",
            "run",
            "--config",
            "configs/pipeline/small.yaml",
            "--input",
            "/tmp/rows",
            "--workdir",
            "/tmp/x",
        ]
    )
    cfg = _load(args)
    assert (cfg.data.input, cfg.data.prepared, cfg.workdir) == ("/tmp/rows", None, "/tmp/x")
    assert load_pipeline_config(CONFIGS / "pipeline" / "small.yaml").data.input == "work/mecovqa-mini"


def test_errors_name_the_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "vl.yaml"
    bad.write_text((CONFIGS / "stages" / "tiny" / "vl.yaml").read_text().replace("lr: 1.0e-3", "lr: -1"))
    with pytest.raises(ValueError, match=r"vl.yaml.*\n\s+lr:"):
        load_stage_config(bad)
    moe = tmp_path / "moe.yaml"
    moe.write_text(
        (CONFIGS / "stages" / "tiny" / "moe.yaml")
        .read_text()
        .replace("expert_sources: [grounding, vl]", "expert_sources: [vl]")
    )
    with pytest.raises(ValueError, match="expert_sources"):
        load_stage_config(moe)
    small_moe = (CONFIGS / "stages" / "small" / "moe.yaml").read_text()
    moe.write_text(small_moe.replace("moe_route: 5.0", "moe_route: 0.0"))
    with pytest.raises(ValueError, match="router would never learn"):
        load_stage_config(moe)
    pipe = tmp_path / "p.yaml"
    pipe.write_text(
        (CONFIGS / "pipeline" / "tiny.yaml").read_text().replace("stages/tiny/moe.yaml", "stages/7b/moe.yaml")
    )
    with pytest.raises(ValueError, match=r"stages.moe.preset"):
        load_pipeline_config(pipe)


def test_flatten_and_fingerprint() -> None:
    cfg = load_stage_config(CONFIGS / "stages" / "tiny" / "moe.yaml")
    flat = flatten(cfg)
    assert flat["lora.r"] == "4" and flat["moe.num_experts"] == "2" and flat["loss_weights.dice"] == "0.5"
    assert all(isinstance(v, str) for v in flat.values())
    assert fingerprint(cfg, "data") == fingerprint(cfg.model_copy(), "data")
    assert fingerprint(cfg, "data") != fingerprint(cfg.model_copy(update={"lr": 1.0}), "data")


def test_lr_schedule_and_deepspeed_config() -> None:
    assert [round(lr_factor(s, 10, 2), 3) for s in range(10)] == [
        0.5,
        1.0,
        1.0,
        0.875,
        0.75,
        0.625,
        0.5,
        0.375,
        0.25,
        0.125,
    ]
    assert lr_factor(0, 4, 0) == 1.0 and lr_factor(3, 4, 0) == 0.25
    stage = load_stage_config(CONFIGS / "stages" / "7b" / "moe.yaml")
    ds = deepspeed_config(stage, "bf16", use_gpu=True)
    assert (
        ds["zero_optimization"]["stage"] == 2
        and ds["bf16"]["enabled"]
        and ds["gradient_accumulation_steps"] == 8
    )
    cpu = deepspeed_config(stage, "fp32", use_gpu=False)
    assert "fp16" not in ds and not cpu["bf16"]["enabled"]
    # the contiguous gradient buffer (and the comm overlap) only where a GPU's allocator gains from them
    assert (
        ds["zero_optimization"]["contiguous_gradients"]
        and not cpu["zero_optimization"]["contiguous_gradients"]
    )


def test_auto_precision_follows_the_cpus_bf16_kernels(caplog) -> None:
    """`auto`: bf16 on a GPU, bf16 autocast on a CPU with oneDNN bf16 kernels, fp32 on one without (AVX2 only,
    where bf16 runs on PyTorch's slow fallback); an explicit bf16 there is kept, with a warning."""
    stage = load_stage_config(CONFIGS / "stages" / "tiny" / "vl.yaml")
    native = has_bf16_kernels()
    assert resolve_precision(stage, use_gpu=True) == "bf16"
    assert resolve_precision(stage, use_gpu=False) == ("bf16-mixed" if native else "fp32")
    with caplog.at_level("WARNING", logger="workflows.train.stage"):
        assert (
            resolve_precision(stage.model_copy(update={"precision": "bf16-mixed"}), use_gpu=False)
            == "bf16-mixed"
        )
        assert resolve_precision(stage.model_copy(update={"precision": "fp32"}), use_gpu=False) == "fp32"
    assert ("without bf16 kernels" in caplog.text) == (not native)


def test_window_shuffle_is_a_deterministic_permutation_and_resume_skips_exactly() -> None:
    rows = list(range(23))
    a = list(window_shuffle(iter(rows), seed=1, epoch=0, window=5))
    assert sorted(a) == rows and a != rows
    assert a == list(window_shuffle(iter(rows), seed=1, epoch=0, window=5))
    assert a != list(window_shuffle(iter(rows), seed=1, epoch=1, window=5))
    # A resume after 8 rows sees exactly the rows not yet consumed, in the same order.
    assert list(window_shuffle(iter(rows), 1, 0, 5))[8:] == a[8:]


def test_plan_steps_arithmetic_and_errors() -> None:
    stage = load_stage_config(CONFIGS / "stages" / "tiny" / "moe.yaml")  # micro 1 x accum 2
    rows = [RowInfo(f"v{i}", "vqa", 100) for i in range(10)] + [
        RowInfo(f"g{i}", "grounding", 100) for i in range(9)
    ]
    rows.append(RowInfo("long", "region_vqa", 9999))
    plan = plan_steps(stage, rows, world=2, max_steps=None)
    assert plan["rows"] == 19 and plan["rows_per_worker"] == 9 and plan["steps_per_epoch"] == 4
    assert plan_steps(stage, rows, world=2, max_steps=3)["total_steps"] == 3
    capped = stage.model_copy(update={"max_steps": 2})  # the stage's own cap and the pipeline's: the smaller
    assert plan_steps(capped, rows, world=2, max_steps=3)["total_steps"] == 2
    vl = load_stage_config(CONFIGS / "stages" / "tiny" / "vl.yaml")
    with pytest.raises(ValueError, match="micro_batch_size x grad_accum"):
        plan_steps(vl, [RowInfo(str(i), "vqa", 10) for i in range(3)], world=2, max_steps=None)


def test_balanced_rows_follow_the_group_shares() -> None:
    """balance_by/balance_alpha: a group of n rows gets a share proportional to n ** alpha, by deterministic
    repeats, and the epoch keeps (about) its length."""
    stage = load_stage_config(CONFIGS / "stages" / "tiny" / "grounding.yaml")
    rows = [RowInfo(f"s{i}", "grounding", 50, "structure") for i in range(900)]
    rows += [RowInfo(f"b{i}", "grounding", 50, "brain") for i in range(100)]
    natural = plan_steps(stage, rows, world=1, max_steps=None)["rows"]
    uniform = stage.model_copy(update={"balance_by": "question_type", "balance_alpha": 0.0})
    factors = group_factors(uniform, rows)
    assert factors == pytest.approx({"structure": 500 / 900, "brain": 5.0})
    counts = {
        k: sum(repeat_count(r.sample_id, factors[k]) for r in rows if r.question_type == k)
        for k in ("structure", "brain")
    }
    assert counts["brain"] == 500 and abs(counts["structure"] - 500) < 50
    assert abs(plan_steps(uniform, rows, world=1, max_steps=None)["rows"] - natural) < 50
    assert [repeat_count(r.sample_id, factors["structure"]) for r in rows[:50]] == [
        repeat_count(r.sample_id, factors["structure"]) for r in rows[:50]
    ]
    assert group_factors(stage, rows) is None  # no balance_by: the data's own mix


def _skewed_rows() -> list[RowInfo]:
    """MeCoVQA-mini's grounding mix: 3,869 structure rows, 8 of nuclei."""
    rows = [RowInfo(f"s{i}", "grounding", 50, "structure") for i in range(3869)]
    return rows + [RowInfo(f"n{i}", "grounding", 50, "all_nuclei") for i in range(8)]


def test_a_capped_balanced_stage_sees_every_rare_row_spread_out() -> None:
    """Balanced by kind, nuclei rows repeat ~242 times each; the first 100 rows of the epoch (a capped stage)
    hold every one of the 8 nuclei rows, each about 6 times, and about half of the rows are structures."""
    stage = load_stage_config(CONFIGS / "stages" / "tiny" / "grounding.yaml").model_copy(
        update={"balance_by": "question_type", "balance_alpha": 0.0}
    )
    rows = _skewed_rows()
    factors = group_factors(stage, rows)
    positions = copy_positions("n0", factors["all_nuclei"])
    assert len(positions) == repeat_count("n0", factors["all_nuclei"])
    gaps = np.diff(positions)
    assert all(0 <= p < 1 for p in positions) and np.allclose(gaps, 1 / factors["all_nuclei"])
    cutoff = epoch_cutoff(stage, rows, factors, 100)
    first = [
        (r.sample_id, p)
        for r in rows
        for p in copy_positions(r.sample_id, factors[r.question_type])
        if p <= cutoff
    ]
    assert len(first) == 101  # the 100 trained rows and one spare
    nuclei = Counter(sample_id for sample_id, _ in first if sample_id.startswith("n"))
    assert set(nuclei) == {f"n{i}" for i in range(8)} and max(nuclei.values()) <= 8
    assert 35 <= len(first) - sum(nuclei.values()) <= 65
    assert epoch_cutoff(stage, rows, factors, 10**6) is None  # the whole epoch: no cut


def test_image_pool_caps_the_images_keeps_every_group_and_is_shared_by_stages() -> None:
    """`image_pool: N`: the stage's rows come from at most N images (more only where a group needs its minimum),
    every balance group keeps rows of `image_pool_min_per_group` images (all of a group's images when it has
    fewer), the balance is computed within the pool, and two stages of other tasks with the same N draw from the
    same images (one encoder pass each)."""
    rows = [RowInfo(f"s{i}", "grounding", 50, "structure", image=f"atlas/{i % 200}.png") for i in range(4000)]
    rows += [RowInfo(f"n{i}", "grounding", 50, "all_nuclei", image=f"nuclei/{i % 3}.png") for i in range(9)]
    rows += [RowInfo(f"v{i}", "vqa", 50, "plane", image=f"atlas/{i % 200}.png") for i in range(400)]
    grounding = load_stage_config(CONFIGS / "stages" / "tiny" / "grounding.yaml").model_copy(
        update={"balance_by": "question_type", "balance_alpha": 0.0, "image_pool": 20}
    )
    minimum = grounding.image_pool_min_per_group
    chosen = image_pool([r for r in rows if r.task == "grounding"], 20, "question_type", minimum)
    assert len(chosen) == 20 and {f"nuclei/{k}.png" for k in range(3)} <= chosen
    steps = plan_steps(grounding, rows, world=1, max_steps=None)
    in_pool = [r for r in rows if r.task == "grounding" and r.image in chosen]
    assert steps["rows"] == pytest.approx(len(in_pool), abs=len(in_pool) // 10)
    # Balanced within the pool: 17 x 20 structure rows, 9 nuclei rows.
    factors = group_factors(grounding, rows)
    half = len(in_pool) / 2
    assert factors == pytest.approx({"structure": half / (len(in_pool) - 9), "all_nuclei": half / 9})
    vl = grounding.model_copy(update={"tasks": ["vqa"]})
    vl_images = image_pool([r for r in rows if r.task == "vqa"], 20, "question_type", 4)
    assert len(vl_images) == 20 and len(vl_images & chosen) == 17  # the 17 atlas images the hash ranks first
    assert plan_steps(vl, rows, world=1, max_steps=None)["rows"] == 40  # 2 plane rows on each of 20 images
    assert image_pool(rows, 10**6, "question_type", 4) == {r.image for r in rows}  # above the data: all
    backwards = list(reversed(rows))  # the order of the rows does not matter
    assert image_pool(rows, 20, "question_type", 4) == image_pool(backwards, 20, "question_type", 4)


def _write_split(directory: Path, rows: list[RowInfo]) -> Path:
    """A prepared folder whose `train` split holds `rows` (the columns `select_rows` reads), in two shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from medplib.data.prepared import MANIFEST_NAME
    from medplib.data.rows import SCHEMA_VERSION

    (directory / "train").mkdir(parents=True)
    half = len(rows) // 2
    for k, part in enumerate((rows[:half], rows[half:])):
        columns = {
            "sample_id": [r.sample_id for r in part],
            "task": [r.task for r in part],
            "question_type": [r.question_type for r in part],
            "input_ids": [[1] * r.length for r in part],
        }
        pq.write_table(pa.table(columns), directory / "train" / f"part-{k:07d}.parquet")
    manifest = {"schema_version": SCHEMA_VERSION, "splits": {"train": len(rows)}}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    return directory


@pytest.mark.parametrize("gather_rows", [GATHER_ROWS, 0], ids=["gathered-on-driver", "ray-data-sort"])
def test_select_rows_orders_the_balanced_copies_by_position(
    ray_local, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gather_rows: int
) -> None:
    """A balanced stage of 10 steps reads exactly the copies below its cutoff, sorted by epoch position; an
    unbalanced one reads each of the split's rows of its tasks once, in the split's order; the same whether the
    driver gathers the rows or Ray Data reads and sorts them."""
    import workflows.train.stage as stage_module

    monkeypatch.setattr(stage_module, "GATHER_ROWS", gather_rows)
    stage = load_stage_config(CONFIGS / "stages" / "tiny" / "grounding.yaml").model_copy(
        update={"balance_by": "question_type", "balance_alpha": 0.0}
    )
    rows = _skewed_rows() + [RowInfo("long", "grounding", stage.max_length + 1, "structure")]
    prepared = _write_split(tmp_path, rows)
    rows = rows[:-1]  # too long: never chosen
    factors = group_factors(stage, rows)
    trained = 10 * stage.micro_batch_size * stage.grad_accum
    cutoff = epoch_cutoff(stage, rows, factors, trained)
    out = select_rows(stage, prepared, "train", rows, world=1, total_steps=10).take_all()
    got = [(r["sample_id"], r[EPOCH_POSITION]) for r in out]
    expected = sorted(
        (
            (r.sample_id, p)
            for r in rows
            for p in copy_positions(r.sample_id, factors[r.question_type])
            if p <= cutoff
        ),
        key=lambda pair: pair[1],
    )
    assert got == expected and len(got) == trained + 1
    natural = stage.model_copy(update={"balance_by": None})
    plain = select_rows(natural, prepared, "train", rows, world=1, total_steps=10).take_all()
    assert [r["sample_id"] for r in plain] == [r.sample_id for r in rows]


def test_fail_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDPLIB_TEST_FAIL", "moe:3")
    assert fail_hook_steps("moe") == 3 and fail_hook_steps("vl") is None
    monkeypatch.setenv("MEDPLIB_TEST_FAIL", "moe")
    with pytest.raises(ValueError, match="MEDPLIB_TEST_FAIL"):
        fail_hook_steps("moe")


def test_moe_starting_model_takes_experts_from_grounding_and_vl(tmp_path: Path) -> None:
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    vl = MedPLIB(cfg)
    torch.manual_seed(1)
    grounding = MedPLIB(cfg)
    save_model_atomic(vl, tmp_path / "vl")
    save_model_atomic(grounding, tmp_path / "grounding")
    stage = load_stage_config(CONFIGS / "stages" / "tiny" / "moe.yaml")
    moe = build_moe_init(tmp_path / "vl", tmp_path / "grounding", stage)
    for i, layer in enumerate(moe.decoder_layers):
        experts = layer.mlp.experts
        for name, p in experts[0].named_parameters():
            assert torch.equal(p, dict(grounding.decoder_layers[i].mlp.named_parameters())[name])
        for name, p in experts[1].named_parameters():
            assert torch.equal(p, dict(vl.decoder_layers[i].mlp.named_parameters())[name])
        assert torch.equal(layer.self_attn.q_proj.weight, vl.decoder_layers[i].self_attn.q_proj.weight)
    assert torch.equal(moe.text_hidden_fcs[0].weight, grounding.text_hidden_fcs[0].weight)
    assert torch.equal(moe.region_fea_adapter.weight, vl.region_fea_adapter.weight)
    first = next(moe.sam.mask_decoder.parameters())
    assert torch.equal(first, next(grounding.sam.mask_decoder.parameters()))
    # It round-trips through save_pretrained (the stage's init_model/).
    again = MedPLIB.from_pretrained(save_model_atomic(moe, tmp_path / "moe"))
    assert torch.equal(
        again.decoder_layers[1].mlp.experts[0].down_proj.weight,
        grounding.decoder_layers[1].mlp.down_proj.weight,
    )


def test_parameter_anchor_makes_gradient_order_independent_of_usage() -> None:
    """DeepSpeed reduces gradients in hook order and needs the same order on every rank, even when a rank's
    micro-batch leaves a module unused (an expert without tokens)."""

    def hook_order(use_middle: bool) -> list[str]:
        torch.manual_seed(0)
        m = torch.nn.ModuleDict(
            {"a": torch.nn.Linear(4, 4), "b": torch.nn.Linear(4, 4), "c": torch.nn.Linear(4, 4)}
        )
        names = {id(p): n for n, p in m.named_parameters()}
        order: list[str] = []
        for p in m.parameters():
            p.register_post_accumulate_grad_hook(lambda p: order.append(names[id(p)]))
        anchor = parameter_anchor(list(m.parameters()))
        h = m["a"](torch.randn(2, 4))
        h = m["b"](h) if use_middle else h
        (m["c"](h).sum() + anchor).backward()
        assert all(p.grad is not None for p in m.parameters())
        return order

    assert hook_order(True) == hook_order(False)


def test_cpu_workers_never_build_deepspeeds_shm_comm_op(tmp_path: Path, monkeypatch) -> None:
    """A stale JIT lock (a worker killed mid-build) hangs every later stage in `build_shm_op`: with the op marked
    incompatible DeepSpeed's CPU backend never reaches the build, even with such a lock in place."""
    from deepspeed.comm.torch import build_shm_op

    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    _without_cpu_shm_comm()
    assert build_shm_op() is None


def test_deepspeed_set_up_leaves_muons_compiled_kernels_alone(tmp_path: Path) -> None:
    """DeepSpeed's ZeRO check imported its Muon optimiser, whose module runs `torch.compile` at import (Inductor
    loaded, 2.1 s of a `small` stage's set-up on CPU): `setup_training` now sets DeepSpeed up without it, AdamW
    still passes the check, and the module imports as usual afterwards. A fresh interpreter, so that no other
    test has imported either before."""
    script = f"""
import os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{29400 + os.getpid() % 500}", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
import torch, torch.distributed as dist
from medplib.model.config import load_model_config
from medplib.model.medplib import MedPLIB
from workflows.train.config import load_stage_config
from workflows.train.stage import setup_training
dist.init_process_group("gloo")
stage = load_stage_config({str(CONFIGS / "stages" / "tiny" / "vl.yaml")!r})
setup = setup_training(MedPLIB(load_model_config("tiny")), stage, "fp32", False, 4, 1)
print("optimizer", type(setup.engine.optimizer).__name__)
print("inductor", "torch._inductor.compile_fx" in sys.modules)
from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
print("muon", MuonWithAuxAdam.__name__)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.count(" ") == 1)
    assert lines == {"optimizer": "DeepSpeedZeroOptimizer", "inductor": "False", "muon": "MuonWithAuxAdam"}


def test_the_align_stage_is_optional_and_feeds_vl() -> None:
    data = yaml.safe_load((CONFIGS / "pipeline" / "tiny.yaml").read_text())
    data["stages"]["align"] = "stages/tiny/align.yaml"
    cfg = PipelineConfig.model_validate(
        {**data, "stages": {k: load_stage_config(CONFIGS / v) for k, v in data["stages"].items()}}
    )
    assert cfg.stage_order == ["align", "vl", "grounding", "moe"] and cfg.stage_inputs("vl") == ("align",)
    without = {k: v for k, v in cfg.stages.items() if k != "vl"}
    with pytest.raises(ValueError, match="missing"):
        PipelineConfig.model_validate({**data, "stages": without})


def test_the_first_stage_starts_dense_from_a_preset_that_enables_moe(tmp_path):
    """`7b` enables MoE (the released checkpoint has it), but vl and grounding train dense FFNs: the moe stage
    builds its experts from theirs and refuses a model that already has MoE layers (`build_moe_init`). The first
    stage's starting model, which the untrained evaluation also scores, is the preset without them, seeded."""
    from workflows.pipeline import preset_start

    cfg = load_model_config("tiny").model_dump(mode="json")
    cfg["moe"]["enabled"] = True
    preset = tmp_path / "tiny-moe.yaml"
    preset.write_text(yaml.safe_dump(cfg))
    assert MedPLIB(load_model_config(preset)).moe_ffns  # the preset itself has them
    stage = load_stage_config(configs_dir() / "stages" / "tiny" / "vl.yaml").model_copy(
        update={"preset": str(preset)}
    )
    first, again = preset_start(stage), preset_start(stage)
    assert not first.moe_ffns
    same = zip(first.state_dict().values(), again.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in same)
