"""The ``masklab`` command line."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _tool(command: str, name: str):
    """``masklab.tools.NAME``: this repository's tools, present in a source checkout only.

    Raises:
        ImportError: saying so, when masklab runs from an installed wheel.
    """
    try:
        return importlib.import_module(f"masklab.tools.{name}")
    except ModuleNotFoundError as error:
        if error.name not in ("masklab.tools", f"masklab.tools.{name}"):
            raise
        raise ImportError(
            f"{command} is a tool of masklab's source checkout (masklab/tools/, with benchmarks/ and the README), "
            "not of the installed package: git clone the repository, pip install -e it, and run this from there"
        ) from None


def _write_dataset(args: argparse.Namespace) -> int:
    from masklab.pipeline import builtin_dataset, write_dataset

    if (args.src is None) == (args.builtin is None):
        raise SystemExit(
            "write-dataset: give either SRC (images: a folder, a list, shards) or --builtin NAME, not both"
        )
    if args.builtin is not None:
        kwargs = {"size": args.size, "seed": args.seed, "split": args.split}
        if args.builtin.startswith("shapes"):
            kwargs["length"] = args.length
        source = builtin_dataset(args.builtin, **kwargs)
    else:
        source = args.src
    report = write_dataset(
        source,
        args.out,
        max_resolution=args.max_resolution,
        jpeg_quality=args.jpeg_quality,
        overwrite=args.overwrite,
        strict=args.strict,
        num_workers=args.workers,
        labels=args.labels,
        image_column=args.image_column,
        label_column=None if args.label_column == "none" else args.label_column,
    )
    kind = f"{len(report.classes)} classes" if report.classes else "unlabelled"
    print(f"wrote {report.count} images to {report.path} ({kind})")
    if report.skipped:
        print(f"skipped {len(report.skipped)} unreadable image(s):")
        for path, reason in report.skipped:
            print(f"  {path}: {reason}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from masklab.pipeline import read_info

    print(read_info(args.file))
    return 0


def recipes_table() -> str:
    """Every shipped recipe with its task, objective, mask stage and backbone, as a Markdown table."""
    from masklab.recipes.config import CONFIG_DIR, load_config

    lines = ["| recipe | task | objective | mask | backbone |", "|---|---|---|---|---|"]
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        cfg = load_config(path)
        if cfg.task == "pretrain":
            objective, mask = cfg.objective.name, cfg.mask.name
        elif cfg.task in ("supervised", "finetune"):
            objective, mask = "cross-entropy", "mixmask" if cfg.objective.mixmask else "none"
        else:
            objective, mask = "(evaluates a checkpoint)", "none"
        lines.append(f"| `{path.stem}` | {cfg.task} | {objective} | {mask} | {cfg.model.backbone} |")
    return "\n".join(lines)


def _list(args: argparse.Namespace) -> int:
    from masklab.objectives import compatibility_table, mask_table

    print("Supported (objective x backbone family x mask stage), derived from the registries")
    print("(masklab.objectives.OBJECTIVES, masklab.transforms.MASKS):\n")
    print(compatibility_table())
    print("\nMask stages (mask.name) and their options (mask.*):\n")
    print(mask_table())
    print("\nRecipes (masklab train NAME):\n")
    print(recipes_table())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from masklab.recipes.demo import README_FIGURES, demo_markdown, run_demo

    readme = _tool("demo --readme", "readme") if args.readme else None  # before minutes of training
    out = Path(args.out)
    for i, seed in enumerate(args.seeds):
        result = run_demo(out_dir=out, device=args.device, epochs=args.epochs, seed=seed, pictures=i == 0)
    if readme is not None:
        readme.update_readme(Path(args.readme), "demo", demo_markdown(result), {out / "demo.json": README_FIGURES})
        print(
            f"updated the demo section of {args.readme} ({README_FIGURES}, seeds {', '.join(sorted(result.runs['mae'], key=int))})"
        )
    return 0


def _train(args: argparse.Namespace) -> int:
    from masklab.recipes.config import load_config
    from masklab.recipes.train import train

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"run.resume={args.resume}")
    if args.overwrite:
        overrides.append("run.overwrite=true")
    if args.trust_checkpoint:
        overrides.append("run.trust_checkpoint=true")
    result = train(load_config(args.config, overrides))
    if result.knn is not None:
        print(f"kNN accuracy of the trained encoder: {result.knn:.4f}")
    print(f"{result.updates} updates; outputs in {result.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from masklab.recipes.train import evaluate_checkpoint

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"eval.data={args.data}")
    if args.test:
        overrides.append(f"data.test={args.test}")
    for name, value in evaluate_checkpoint(args.checkpoint, args.kind, overrides, args.trust_checkpoint).items():
        print(f"{name} accuracy: {value:.4f}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from masklab.recipes.export import export_encoder

    folder = export_encoder(
        args.checkpoint, args.out_dir, args.include, args.overrides, args.trust_checkpoint, args.overwrite
    )
    print(f"wrote the {args.include} as a timm model: {folder} (model.safetensors, config.json, README.md)")
    print(f'load it without masklab: timm.create_model("local-dir:{folder}", pretrained=True)')
    return 0


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise SystemExit(f"show-masks: {option} takes comma-separated numbers, got {text!r}") from None


def _show_masks(args: argparse.Namespace) -> int:
    from masklab.recipes.show_masks import show_masks

    if args.data is not None and args.builtin is not None:
        raise SystemExit("show-masks: give --builtin or --data, not both")
    path = show_masks(
        args.mask,
        Path(args.out),
        data=args.data,
        n=args.n,
        size=args.size,
        patch_size=args.patch_size,
        ratio=args.ratio,
        seed=args.seed,
        checkpoint=args.checkpoint,
        progress=_floats(args.progress, "--progress"),
        trust_checkpoint=args.trust_checkpoint,
        options=_mask_options(args.option),
    )
    print(f"wrote {path}")
    return 0


def _mask_options(pairs: list[str] | None) -> dict[str, object]:
    """``KEY=VALUE`` pairs, each value read as YAML (``16``, ``null``, ``hint``, ``[2, 4]``)."""
    import yaml

    options = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"show-masks: --option takes KEY=VALUE (a mask.* config key), got {pair!r}")
        options[key.strip()] = yaml.safe_load(value)
    return options


def _show_recon(args: argparse.Namespace) -> int:
    from masklab.recipes.show_recon import show_recon

    path = show_recon(args.checkpoint, Path(args.out), args.data, args.n, args.seed, args.trust_checkpoint)
    print(f"wrote {path}")
    return 0


def _study(args: argparse.Namespace) -> int:
    study, readme = _tool("study", "study"), _tool("study", "readme")
    out = Path(args.out)
    start = time.perf_counter()
    if args.curves:
        arms = args.arms or study.CURVE_ARMS
        epochs = args.epochs or study.CURVE_EPOCHS
        start_from = Path(args.start_from) if args.start_from else None
        study.run_curves(
            arms, args.seeds[0], out, list(args.overrides), epochs=epochs, quick=args.quick, start_from=start_from
        )
        print(f"budget curves took {(time.perf_counter() - start) / 60:.1f} min: {out / 'curves.png'}")
        return 0
    if args.from_results:  # a report of the runs so far: nothing trained
        if not (out / "results.json").is_file():
            raise FileNotFoundError(f"--from-results: no {out / 'results.json'}; run the study first")
        result = study.RunScores.load(out / "results.json")
        study.write_report(result, out)
    else:
        result = study.run_study(
            args.arms,
            args.seeds,
            out,
            list(args.overrides),
            epochs=args.epochs,
            quick=args.quick,
            preset=args.preset,
            jobs_at_once=args.jobs,
            start_from=Path(args.start_from) if args.start_from else None,
        )
    print((out / "results.md").read_text())
    if args.readme:
        copies = {out / "results.png": study.README_PLOT, out / "results.json": study.README_FIGURES}
        if (out / "curves.json").exists():
            curves = study.RunScores.load(out / "curves.json")
            copies.update({out / "curves.png": study.README_CURVES, out / "curves.json": study.README_CURVE_FIGURES})
        else:  # no curves drawn in --out (a fresh clone's study): the README keeps the committed ones
            committed = Path(args.readme).parent / study.README_CURVE_FIGURES
            curves = study.RunScores.load(committed) if committed.exists() else None
        markdown = study.study_markdown(result, plot=study.README_PLOT, curves=curves)
        readme.update_readme(Path(args.readme), "study", markdown, copies)
        print(f"updated the study section of {args.readme} ({study.README_PLOT}, {study.README_FIGURES})")
    print(
        f"study took {(time.perf_counter() - start) / 60:.1f} min; table {out / 'results.md'}, plot {out / 'results.png'}"
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    bench, readme = _tool("bench", "bench"), _tool("bench", "readme")
    folder = bench.find_benchmarks(args.dir)
    report = bench.run_bench(folder, quick=args.quick, only=args.only, timeout=args.timeout)
    markdown, chart = bench.write_report(report, Path(args.out))
    print(f"\nreport: {markdown}" + (f", chart: {chart}" if chart else ""))
    if args.readme:
        if chart is None:
            raise ValueError("no benchmark ran to the end: the README keeps its report")
        copies = {chart: bench.README_CHART, Path(args.out) / "bench.json": bench.README_FIGURES}
        readme.update_readme(Path(args.readme), "bench", bench.report_markdown(report, bench.README_CHART), copies)
        print(f"updated the performance section of {args.readme} ({bench.README_CHART}, {bench.README_FIGURES})")
    if report.failed:
        print(f"failed: {', '.join(report.failed)}", file=sys.stderr)
        return 1
    return 0


def _mask_picture(name: str) -> str:
    """``--mask``'s check, run only when show-masks is parsed: its names come with torch."""
    from masklab.recipes.show_masks import MASK_PICTURES

    if name not in MASK_PICTURES:
        raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from {', '.join(MASK_PICTURES)})")
    return name


TRUST_HELP = (
    "unpickle a checkpoint that does not load as plain tensors and values (an older single-file .pt): "
    "this runs any code the file carries, so only for files you made or trust"
)


def build_parser() -> argparse.ArgumentParser:
    """The ``masklab`` command's parser, every subcommand with its options."""
    parser = argparse.ArgumentParser(
        prog="masklab", description="masked self-supervised learning with on-device mask stages"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    write = sub.add_parser(
        "write-dataset",
        help="write images (a folder, a path list, WebDataset shards, a saved HF dataset, a built-in) to a .beton",
        description="Write images and labels to one FFCV .beton file (fields: image, label, index). "
        "Images without labels (a flat folder, a list or shards without labels) get label -1.",
    )
    write.add_argument(
        "src",
        nargs="?",
        help="an image folder (class subfolders, or any images below it), a .txt list of image paths "
        "(optionally 'path label'), WebDataset shards (a .tar, a glob, or shard-{000..009}.tar), "
        "or a folder saved by a Hugging Face Dataset's save_to_disk",
    )
    write.add_argument("out", help="output .beton file")
    write.add_argument(
        "--builtin",
        choices=["shapes", "shapes-plain", "shapes-grey", "digits"],
        help="write a built-in dataset instead of SRC",
    )
    write.add_argument(
        "--labels",
        choices=["auto", "folders", "none"],
        default="auto",
        help="a folder's labels: its class subfolders, none (every image below it, label -1), or auto "
        "(subfolders when the folder has no image of its own; the default)",
    )
    write.add_argument("--image-column", default="image", help="a Hugging Face dataset's image column (default image)")
    write.add_argument(
        "--label-column", default="label", help="a Hugging Face dataset's label column, or none (default label)"
    )
    write.add_argument("--split", default="train", help="built-in split: train or test (digits also: all)")
    write.add_argument("--size", type=int, default=32, help="built-in image side in pixels (default 32)")
    write.add_argument("--length", type=int, default=4000, help="number of shapes images (default 4000)")
    write.add_argument("--seed", type=int, default=0, help="built-in dataset seed (default 0)")
    write.add_argument("--max-resolution", type=int, default=None, help="downscale images whose longest side is larger")
    write.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1-100 (default 90)")
    write.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    write.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of skipping it")
    write.add_argument("--workers", type=int, default=-1, help="writer processes (default: all cores)")
    write.set_defaults(func=_write_dataset)

    info = sub.add_parser(
        "info", help="describe a .beton file", description="Count, fields, resolution and classes of a .beton file."
    )
    info.add_argument("file", help="a .beton file")
    info.set_defaults(func=_info)

    listing = sub.add_parser(
        "list",
        help="print the supported (objective x backbone family x mask) matrix and the recipes",
        description="Print which objectives take which backbone families and mask stages, and the shipped recipes.",
    )
    listing.set_defaults(func=_list)

    show = sub.add_parser(
        "show-masks",
        help="draw masks over images to a PNG",
        description="Draw a mask stage's masks over images: masked cells red, thrown blue; mixed images for mixmask; each level for feature.",
    )
    show.add_argument(
        "--mask", required=True, type=_mask_picture, metavar="MASK", help="which mask stage to draw (masklab list)"
    )
    show.add_argument("--builtin", choices=["shapes"], default=None, help="draw over the built-in shapes (the default)")
    show.add_argument("--data", default=None, help="draw over the first images of this .beton file")
    show.add_argument("--out", default="masks.png", help="output PNG (default masks.png)")
    show.add_argument("-n", type=int, default=8, help="images to draw (default 8)")
    show.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    show.add_argument("--patch-size", type=int, default=8, help="patch size in pixels (default 8)")
    show.add_argument("--ratio", type=float, default=None, help="mask ratio (default: the stage's)")
    show.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    show.add_argument(
        "--checkpoint",
        default=None,
        help="amt / ehm / hpm: a trained checkpoint whose saliency / affinity / difficulty drives the masks",
    )
    show.add_argument(
        "--progress", default="0.1,0.5,0.9", help="ehm / hpm: training progress values to draw, comma-separated"
    )
    show.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="another of the mask's options, by its mask.* config name (repeatable), e.g. mask_patch_size=16",
    )
    show.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    show.set_defaults(func=_show_masks)

    recon = sub.add_parser(
        "show-recon",
        help="draw a MAE / SimMIM checkpoint's reconstructions to a PNG",
        description="Draw input, masked input and reconstruction for a few images, with the checkpoint's own mask.",
    )
    recon.add_argument("checkpoint", help="a mae or simmim checkpoint (a ckpt-UPDATE folder)")
    recon.add_argument("--data", default=None, help="draw the first images of this .beton (default: built-in shapes)")
    recon.add_argument("--out", default="recon.png", help="output PNG (default recon.png)")
    recon.add_argument("-n", type=int, default=8, help="images to draw (default 8)")
    recon.add_argument("--seed", type=int, default=0, help="seed of the mask draw (default 0)")
    recon.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    recon.set_defaults(func=_show_recon)

    demo = sub.add_parser(
        "demo",
        help="run the demo on the built-in shapes data",
        description="Write the built-in shapes data, pretrain a tiny ViT with MAE on it, and compare its encoder "
        "with the same encoder at random init by a linear probe and kNN. Figures go to OUT/demo.json.",
    )
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--device", default="cpu", help="torch device (default cpu)")
    demo.add_argument("--epochs", type=int, default=None, help="pretraining epochs (default: the demo's)")
    demo.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed (default 0)")
    demo.add_argument(
        "--readme", default=None, help="rewrite this README's demo section from OUT/demo.json (copied to docs/)"
    )
    demo.set_defaults(func=_demo)

    train = sub.add_parser(
        "train",
        help="train from a config (a YAML path or a recipe name) with key=value overrides",
        description="Train any (loader stages, backbone, objective) from a config. Recipes: mae, simmim, supervised, finetune.",
    )
    train.add_argument("config", help="a YAML file, or a recipe name from masklab/recipes/configs (mae, simmim, ...)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 run.epochs=5")
    train.add_argument("--resume", default=None, help="a checkpoint, or 'auto' for the latest in run.out that loads")
    train.add_argument(
        "--overwrite", action="store_true", help="delete a previous run's metrics and checkpoints in run.out first"
    )
    train.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP + " (--resume, model.init)")
    train.set_defaults(func=_train)

    evaluate = sub.add_parser(
        "eval",
        help="kNN or linear-probe accuracy of a checkpoint's encoder",
        description="Evaluate a checkpoint's frozen encoder: kNN (cosine, k=20, temperature) or a linear probe.",
    )
    evaluate.add_argument("kind", choices=["knn", "linear"], help="which evaluation")
    evaluate.add_argument(
        "checkpoint", help="a checkpoint (a ckpt-UPDATE folder), or 'random' for the config's encoder at random init"
    )
    evaluate.add_argument(
        "--data",
        default=None,
        help="labelled images for the kNN bank and the probe's training: a .beton or builtin:NAME "
        "(eval.data; default: the run's)",
    )
    evaluate.add_argument(
        "--test", default=None, help="test images: a .beton or builtin:NAME:test (default: the run's)"
    )
    evaluate.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    evaluate.add_argument("overrides", nargs="*", help="dotted config overrides")
    evaluate.set_defaults(func=_eval)

    export = sub.add_parser(
        "export",
        help="write a checkpoint's encoder as a timm model folder (model.safetensors + config.json)",
        description="Export the trained encoder alone, in timm's folder layout: plain timm loads it with "
        "timm.create_model('local-dir:OUT_DIR', pretrained=True), no masklab needed.",
    )
    export.add_argument("checkpoint", help="a checkpoint (a ckpt-UPDATE folder)")
    export.add_argument("out_dir", help="the folder to write")
    export.add_argument(
        "--include",
        choices=["encoder", "teacher"],
        default="encoder",
        help="the online encoder (default: what the evaluations measure) or the EMA teacher's copy",
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    export.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    export.add_argument("overrides", nargs="*", help="dotted config overrides")
    export.set_defaults(func=_export)

    study = sub.add_parser(
        "study",
        help="every method against its baseline on shapes: equal steps, 3 seeds, kNN and linear probe",
        description="Train each arm (by default every one of masklab.tools.study.STUDY_ARMS) with each seed "
        "on the study's shapes for the same number of updates, evaluate kNN and a linear probe (and "
        "fine-tuning on a labelled tenth for the masked-image arms), and write results.json, results.md "
        "(mean and spread) and results.png. Runs already done are kept, so a stopped study resumes. "
        "A tool of the source checkout (masklab/tools/study.py).",
    )
    study.add_argument("--recipes", dest="arms", nargs="+", default=None, help="arms or recipes (default: all arms)")
    study.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default 0 1 2)")
    study.add_argument(
        "--epochs", type=int, default=None, help="epochs per run, the same for all (default: the study's STUDY_EPOCHS)"
    )
    study.add_argument("--quick", action="store_true", help="512 images, one epoch, one seed: a smoke run")
    study.add_argument(
        "--preset",
        choices=["cpu", "gpu"],
        default="cpu",
        help="cpu: the study's 8000 images, 3 seeds (default); gpu: 50000 images drawn by loader workers, "
        "batch 256, one seed, sized for one GPU (make gpu-check runs it)",
    )
    study.add_argument(
        "--curves",
        action="store_true",
        help="budget curves instead: each of --recipes (default mae simmim moco byol) trained once "
        "(--epochs, default 20), its checkpoint every 5 epochs evaluated; curves.json and curves.png in --out",
    )
    study.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once, each in its own process with its share of the CPU cores (default 1: one "
        "after another); stopping the study stops them",
    )
    study.add_argument("--out", default="runs/study", help="output folder (default runs/study)")
    study.add_argument("--readme", default=None, help="also replace this README's study section with the table")
    study.add_argument(
        "--start-from",
        default=None,
        metavar="RESULTS_JSON",
        help="when --out has no results.json yet, start from this saved study's runs (e.g. docs/study.json on a "
        "fresh clone): those recorded as they are now are kept, the rest trained; its settings must be the study's. "
        "With --curves: saved curves (e.g. docs/study_curves.json), when --out has no curves.json yet",
    )
    study.add_argument(
        "--from-results",
        action="store_true",
        help="train nothing: write the table, the plot (and with --readme the README's section) from the runs "
        "recorded so far in --out's results.json (a study in progress says which arms are still to run)",
    )
    study.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    study.set_defaults(func=_study)

    bench = sub.add_parser(
        "bench",
        help="run every benchmark script; one Markdown report and a PNG chart of the ratios",
        description="Run each script in benchmarks/ (a source checkout's) in a fresh process and gather "
        "its figures into bench.md, bench.json and bench.png. A tool of the source checkout (masklab/tools/bench.py).",
    )
    bench.add_argument("--quick", action="store_true", help="each script's --quick mode (under 3 min on 2 cores)")
    bench.add_argument("--only", nargs="+", default=None, metavar="NAME", help="these scripts only (e.g. masks)")
    bench.add_argument("--out", default="runs/bench", help="report folder (default runs/bench)")
    bench.add_argument("--dir", default=None, help="the benchmarks folder (default: the source checkout's)")
    bench.add_argument("--timeout", type=float, default=None, help="seconds a script may run (default: no limit)")
    bench.add_argument("--readme", default=None, help="also replace this README's bench section with the report")
    bench.set_defaults(func=_bench)
    return parser


def _ignore_numba_finalizer_noise() -> None:
    """numba's dispatcher finalizer raises a harmless KeyError at exit once FFCV has compiled
    several pipelines in one process; keep it off the user's terminal, pass anything else on."""
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        tb = unraisable.exc_traceback
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if isinstance(unraisable.exc_value, KeyError) and tb is not None and "numba" in tb.tb_frame.f_code.co_filename:
            return
        previous(unraisable)

    sys.unraisablehook = hook


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv`` with ``key=value`` overrides allowed before, between and after the options.

    argparse fills a ``nargs="*"`` positional from the tokens before the first option only; the
    overrides that follow an option come back unrecognised and join the others, in order.
    """
    args, rest = parser.parse_known_args(argv)
    if rest and hasattr(args, "overrides") and not any(token.startswith("-") for token in rest):
        args.overrides = [*args.overrides, *rest]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``masklab ARGV`` (``sys.argv[1:]`` when ``None``); returns the exit status."""
    _ignore_numba_finalizer_noise()
    parser = build_parser()
    args = _parse(parser, argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (OSError, ValueError, ImportError) as error:
        print(f"masklab {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
