"""The `medplib` command line as a user runs it: every verb and flag, `predict`, `model summary`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _medplib(*args: str, cwd=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "workflows.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)


def test_predict_writes_answer_and_mask_png(tmp_path):
    image = tmp_path / "scan.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 90), dtype=np.uint8)).save(image)
    out = tmp_path / "out" / "result.json"
    r = _medplib(
        "predict",
        "--model",
        "tiny",
        "--image",
        str(image),
        "--question",
        "What is in <region>?",
        "--box",
        "10,10,40,30",
        "--segment",
        "--max-new-tokens",
        "4",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert isinstance(result["answer"], str) and result["timings"]["total_s"] > 0
    (mask,) = result["masks"]
    assert (mask["height"], mask["width"]) == (50, 90)
    assert Image.open(mask["png"]).size == (90, 50)
    assert "wrote" in r.stdout


def test_predict_reports_bad_input_in_one_line(tmp_path):
    image = tmp_path / "scan.png"
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(image)
    r = _medplib("predict", "--model", "tiny", "--image", str(image), "--question", "?", "--box", "0,0,50,50")
    assert r.returncode == 2 and "outside the 20x20 image" in r.stderr and "Traceback" not in r.stderr
    r = _medplib("predict", "--model", "nonexistent", "--image", str(image), "--question", "?")
    assert r.returncode == 2 and "unknown model preset 'nonexistent'" in r.stderr


def test_model_summary_counts_components():
    r = _medplib("model", "summary", "--preset", "tiny")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = dict(line.rsplit(None, 1) for line in r.stdout.strip().splitlines())
    total = int(rows["total"].replace(",", ""))
    parts = [
        "llm (all)",
        "vision_tower",
        "mm_projector",
        "region_fea_adapter",
        "text_hidden_fcs",
        "sam.image_encoder",
        "sam.prompt_encoder",
        "sam.mask_decoder",
    ]
    assert sum(int(rows[p].replace(",", "")) for p in parts) == total


def test_model_weights_makes_the_small_presets_packaged_weights_ready():
    """`make install` runs it: every packaged reference of `small` resolves to a local file or folder."""
    r = _medplib("model", "weights", "--preset", "small")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = dict(line.split(None, 1) for line in r.stdout.strip().splitlines())
    assert set(lines) == {"llm.weights", "llm.tokenizer", "sam.weights"}
    for line in lines.values():
        ref, path = line.split("  ->  ")
        assert ref.strip().startswith("pkg:") and Path(path.strip()).exists()
    assert _medplib("model", "weights", "--preset", "tiny").stdout == ""  # random init: nothing to prepare


# Every command path of `medplib`: its sub-commands, long flags (besides --help) and positionals, as they were
# before the CLI moved into one file per verb; scripts and docs rely on them.
COMMANDS = {
    "": "data predict model eval eval-compare serve infra convert-upstream pipeline train sweep submit jobs --verbose --version",
    "data": "build-mini synth show prepare",
    "data build-mini": "--output --seed --max-samples",
    "data synth": "--rows --output --seed --pool-size --image-px",
    "data show": "--n --out --seed --task --split path",
    "data prepare": "--input --output --config --model-preset --data-root --max-rows --splits --window --force",
    "predict": "--model --endpoint --image --question --point --box --mask --segment --slice --axis --window "
    "--max-new-tokens --temperature --out --answer-slices --batch-size",
    "model": "summary weights",
    "model summary": "--preset",
    "model weights": "--preset",
    "eval": "--model --data --split --out --max-rows --max-new-tokens --max-new-tokens-by --budget-split --batch-size --concurrency --gpus "
    "--cpus-per-actor --dtype --seed --model-id --engine --gallery-size --mlflow-run-id --tracking-uri --compare-with "
    "--volumes",
    "eval-compare": "--before --after --out --labels",
    "serve": "run config",
    "serve run": "--config --model --port --set",
    "serve config": "--config --model --port --set",
    "infra": "render",
    "infra render": "--root --serve-config --check",
    "convert-upstream": "--preset --tokenizer src dst",
    "pipeline": "run",
    "pipeline run": "--config --workdir --input --tracking-uri --from-stage --max-steps",
    "train": "--stage --config --workdir --input --tracking-uri --max-steps",
    "sweep": "--config --stage --workdir",
    "submit": "--address --working-dir --submission-id --no-wait medplib_args",
    "jobs": "--address action job_id",
}


def _command_tree(parser, path=()) -> dict[str, str]:
    """{command path: its sub-commands, long flags and positionals} of an argparse parser, recursively."""
    import argparse

    flags, positionals, subs = [], [], {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            subs = action.choices
        elif action.option_strings:
            flags += [o for o in action.option_strings if o.startswith("--") and o != "--help"]
        else:
            positionals.append(action.dest)
    tree = {" ".join(path): " ".join([*subs, *flags, *positionals])}
    for name, sub in subs.items():
        tree.update(_command_tree(sub, (*path, name)))
    return tree


def test_verbs_and_flags_are_unchanged():
    from workflows.cli import VERBS, build_parser

    assert _command_tree(build_parser()) == COMMANDS
    assert list(VERBS) == [w for w in COMMANDS[""].split() if not w.startswith("--")]


def test_every_verb_prints_its_help(capsys):
    """`medplib --help` through the installed entry point, then each command's --help, lists what it takes."""
    import shutil
    from importlib.metadata import entry_points
    from pathlib import Path

    from workflows.cli import main

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "medplib"]
    assert script.value == "workflows.cli:main"
    medplib = shutil.which("medplib") or str(Path(sys.executable).with_name("medplib"))
    top = subprocess.run([medplib, "--help"], capture_output=True, text=True, timeout=120)
    assert top.returncode == 0, top.stderr[-2000:]
    for verb in [w for w in COMMANDS[""].split() if not w.startswith("--")]:
        assert verb in top.stdout, verb
    for path, items in COMMANDS.items():
        if not path:
            continue
        with pytest.raises(SystemExit) as done:
            main([*path.split(), "--help"])
        assert done.value.code == 0, path
        text = capsys.readouterr().out
        assert text.startswith(f"usage: medplib {path}"), text[:200]
        for item in items.split():
            if item.startswith("--") or f"{path} {item}" in COMMANDS:
                assert item in text, f"`medplib {path} --help` does not mention {item}"


def test_version_and_python_dash_m_medplib(tmp_path):
    """`python -m medplib` is the `medplib` command; `--version` prints the package's version."""
    import medplib

    out = subprocess.run(
        [sys.executable, "-m", "medplib", "--version"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == f"medplib {medplib.__version__}", out.stderr[-2000:]


def test_configs_paths_resolve_outside_a_checkout(tmp_path, monkeypatch):
    """`--config configs/pipeline/tiny.yaml` from a folder without configs/ reads the shipped copy."""
    from medplib.model.config import configs_dir, find_config

    monkeypatch.chdir(tmp_path)
    found = find_config("configs/pipeline/tiny.yaml")
    assert found == configs_dir() / "pipeline" / "tiny.yaml" and found.is_file()
    (tmp_path / "mine.yaml").write_text("name: mine\n")
    assert find_config("mine.yaml") == tmp_path.joinpath("mine.yaml").relative_to(tmp_path)
