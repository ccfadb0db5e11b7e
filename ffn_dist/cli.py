"""The `ffn` command: parses arguments and calls one stage or tool; no logic of its own."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ffn_dist.errors import FFNError

STOPPED = 3  # exit status of a stage that checkpointed and stopped on request


def _config(args):
    from ffn_dist.config import load_config

    return load_config(args.config, args.overrides)


def cmd_run(args) -> int:
    from ffn_dist.stages.pipeline import run_pipeline

    run_pipeline(_config(args))
    return 0


def cmd_stage(args) -> int:
    from ffn_dist.run.history import load_run_config
    from ffn_dist.run.stages import run_stage

    run_stage(load_run_config(args.run_dir), args.name)
    return 0


def cmd_train_backbones(args) -> int:
    from ffn_dist.stages.backbones import train_backbones

    train_backbones(_config(args), only=args.branch, max_steps=args.max_steps)
    return 0


def cmd_cache_features(args) -> int:
    from ffn_dist.stages.cache import cache_features

    cache_features(_config(args), rebuild=args.rebuild)
    return 0


def cmd_train_classifier(args) -> int:
    from ffn_dist.drivers import parse_methods, parse_sweep, run_methods, run_sweep
    from ffn_dist.stages.classifier import train_classifier

    if args.sweep and args.methods:
        raise FFNError("--sweep and --methods: give one (--methods chooses the fusion on val itself)")
    if args.seeds != 1 and not args.methods:
        raise FFNError("--seeds: repeats --methods with other seeds; add --methods all (or a list)")
    if args.methods:
        run_methods(_config(args), parse_methods(args.methods), args.seeds)
    elif args.sweep:
        cfg = _config(args)
        run_sweep(cfg, parse_sweep(args.sweep, cfg.stage2.fusion))
    else:
        train_classifier(_config(args))
    return 0


def cmd_export(args) -> int:
    from ffn_dist.stages.export import export_run

    export_run(_config(args))
    return 0


PRIOR_HELP = (
    "the test label prior: a file of one frequency (or count) a line, line i for class i, or "
    "'uniform'; logits move by log(prior / training prior)"
)


def cmd_predict(args) -> int:
    from ffn_dist.predict import ExportedModel, predict_images, score_split
    from ffn_dist.stages.evaluate import accuracy_table

    if bool(args.split) == bool(args.images) or bool(args.split) != bool(args.root):
        raise FFNError("give IMAGE... or --split FILE --root DIR (not both)")
    model = ExportedModel(args.export_dir, args.runtime, args.prior)
    if args.images:
        results = predict_images(model, args.images, args.top_k)
        if args.json:
            print(json.dumps(results, indent=1))
        for result in [] if args.json else results:
            shown = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in result["top"])
            print(f"{result['image']}: {shown}")
        return 0
    report = score_split(model, args.split, args.root, args.batch_size, args.threads)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    name = f"{model.name}, {args.runtime}"
    name += f", prior {args.prior}" if args.prior else ""
    print(
        f"{accuracy_table({name: report})}\n{report['samples']} images in {report['seconds']:g} s "
        f"({report['images_per_s']:,.0f} img/s)"
    )
    return 0


def cmd_evaluate(args) -> int:
    from ffn_dist.predict import score_test_lists
    from ffn_dist.stages.evaluate import evaluate_run

    cfg = _config(args)
    lists = score_test_lists(cfg, args.test_split) if args.test_split else None
    evaluate_run(cfg, tsne=args.tsne, prior=args.prior, test_lists=lists)
    return 0


def _launch_overrides(args) -> list[str]:
    """`--partition P` etc. are shorthands for `launch.partition=P` overrides."""
    flags = {"partition": args.partition, "account": args.account, "qos": args.qos, "nodes": args.nodes}
    flags["gpus_per_node"] = args.gpus_per_node
    return [*args.overrides, *(f"launch.{k}={v}" for k, v in flags.items() if v is not None)]


def cmd_plan(args) -> int:
    from ffn_dist.plan import format_plan, plan

    result = plan(_config(args), args.nproc, args.steps, args.dp_efficiency)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def cmd_submit(args) -> int:
    from ffn_dist.config import load_config
    from ffn_dist.launchers.slurm import describe, submit

    cfg = load_config(args.config, _launch_overrides(args))
    if args.plan:  # the plan's time limits, as the launch.*_minutes they replace
        from ffn_dist.plan import read_plan, time_limits
        from ffn_dist.run.paths import plan_path

        limits = time_limits(read_plan(cfg), args.plan_margin, cfg.launch.signal_delay_s)
        print(f"time limits from {plan_path(cfg)} x {args.plan_margin:g}: {' '.join(limits)}")
        cfg = load_config(args.config, [*_launch_overrides(args), *limits])
    if args.dry_run:
        print(describe(cfg))
        return 0
    submit(cfg, args.executor, wait=args.wait)
    return 0


def cmd_status(args) -> int:
    from ffn_dist.launchers.slurm import job_states
    from ffn_dist.run.status import run_status

    cfg = _config(args)
    lines, failed = run_status(cfg, verify=args.verify)
    print("\n".join(lines))
    jobs, job_failed = job_states(cfg)
    if jobs:
        print("\nSLURM jobs of `ffn submit`:\n" + "\n".join(jobs))
    return 1 if failed or job_failed else 0


def cmd_show_config(args) -> int:
    import yaml

    from ffn_dist.config import config_to_dict, explain

    cfg = _config(args)
    print(explain(cfg) if args.explain else yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip())
    return 0


def cmd_splits_stats(args) -> int:
    from ffn_dist.data.splits import read_split, split_stats
    from ffn_dist.stages.prepare import format_stats_table

    split = read_split(args.file, Path(args.file).parent, args.num_classes, is_train=True)
    stats = split_stats(split)
    print(json.dumps(stats, indent=2) if args.json else format_stats_table({split.path.name: stats}))
    return 0


def cmd_splits_make_lt(args) -> int:
    from ffn_dist.data.longtail import make_lt

    result = make_lt(
        Path(args.image_root),
        Path(args.out),
        args.profile,
        args.imbalance_factor,
        args.seed,
        args.test_per_class,
        args.val_per_class,
    )
    _print_written(args.out, {**result, "classes": len(result["train_counts"])}, val=True)
    print("train counts per class:", " ".join(map(str, result["train_counts"])))
    return 0


def _print_written(out: str, result: dict, val: bool = False) -> None:
    counts = result.get("train_counts")
    shape = f", {max(counts)}..{min(counts)} per class" if counts else ""
    train = sum(counts) if counts else result["train_size"]
    line = f"wrote {out}/train.txt ({train} images, {result['classes']} classes{shape}), "
    line += f"test.txt ({result['test_size']} images)"
    print(line + (f", val.txt ({result['val_size']} images)" if val and result.get("val_size") else ""))
    for name, moved in result.get("val_from_train", {}).items():
        print(
            f"val.txt: {moved} of class {name}'s images come from its training images (the long tail "
            "uses its whole pool), so its training count is that much below the profile's"
        )


def cmd_splits_cifar(args) -> int:
    from ffn_dist.data.cifar import write_cifar

    result = write_cifar(
        Path(args.archive), Path(args.out), args.imbalance_factor, args.seed, args.val_per_class
    )
    _print_written(args.out, result, val=True)
    print("train counts per class:", " ".join(map(str, result["train_counts"])))
    return 0


def cmd_splits_inat(args) -> int:
    from ffn_dist.data.inat import write_inat

    _print_written(args.out, write_inat(args.train_json, args.val_json, args.out))
    return 0


def cmd_splits_verify(args) -> int:
    from ffn_dist.data.splits import read_split
    from ffn_dist.data.verify import find_bad_images

    split = read_split(args.file, args.root)
    bad = find_bad_images(split, args.workers)
    for item in bad:
        print(f"{item.where}: {item.reason}")
    print(f"{len(split) - len(bad)} of {len(split)} images decode; {len(bad)} bad")
    return 1 if bad else 0


def cmd_demo_data(args) -> int:
    from ffn_dist.data.builtin import ensure_builtin

    written = ensure_builtin("digits", args.out)
    print(f"{'wrote' if written else 'already complete:'} {args.out} (train.txt, test.txt)")
    return 0


def _write_json(result: dict, path: str | None) -> None:
    """A benchmark's figures, when --json-out names a file."""
    from ffn_dist.files import write_json

    if path:
        write_json(path, result)


def cmd_bench_loader(args) -> int:
    from ffn_dist.bench.loader import bench_loader

    if bool(args.cifar_split) != bool(args.cifar_root):
        raise FFNError("--cifar-split and --cifar-root go together")
    result = bench_loader(
        args.cifar_split,
        args.cifar_root,
        args.threads,
        args.batch_size,
        args.images,
        args.rounds,
        args.large_images,
    )
    _write_json(result, args.json_out)
    return 0


def cmd_bench_train(args) -> int:
    from ffn_dist.bench.train import bench_train

    result = bench_train(_config(args), args.steps, args.rounds)
    _write_json(result, args.json_out)
    return 0


def cmd_bench_stage2(args) -> int:
    from ffn_dist.bench.stage2 import bench_stage2

    result = bench_stage2(
        _config(args), args.rows, args.dims, args.classes, args.rounds, args.backbone_steps, args.work_dir
    )
    _write_json(result, args.json_out)
    return 0


def cmd_bench_cache(args) -> int:
    from ffn_dist.bench.cache import bench_cache

    result = bench_cache(_config(args), args.rounds, args.work_dir)
    _write_json(result, args.json_out)
    return 0


def cmd_bench_freshness(args) -> int:
    from ffn_dist.bench.freshness import bench_freshness

    _write_json(bench_freshness(args.cache_gb, args.dims, args.rounds, args.work_dir), args.json_out)
    return 0


def cmd_bench_scale(args) -> int:
    from ffn_dist.bench.scale import bench_scale

    figures = bench_scale(_config(args), args.rows, args.dims, args.classes, args.work_dir, args.split_images)
    _write_json(figures, args.json_out)
    return 0


def cmd_bench_export(args) -> int:
    from ffn_dist.bench.export import SHAPES, bench_export

    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    if not archs or any(a not in SHAPES for a in archs):
        raise FFNError(f"--archs {args.archs!r}: expected a comma list of {', '.join(SHAPES)}")
    _write_json(bench_export(archs, args.batch_size, args.rounds, args.work_dir), args.json_out)
    return 0


def cmd_bench_all(args) -> int:
    from ffn_dist.bench.suite import bench_all, write

    if bool(args.cifar_split) != bool(args.cifar_root):
        raise FFNError("--cifar-split and --cifar-root go together")
    figures = bench_all(args.config, args.overrides, args.rounds, args.cifar_split, args.cifar_root)
    write(figures, args.json_out)
    return 0


def cmd_bench_gpu(args) -> int:
    from ffn_dist.bench.gpu import bench_gpu

    figures = bench_gpu(
        args.part,
        args.images,
        args.batch_size,
        args.steps,
        args.rounds,
        args.work_dir,
        args.stage2_rows,
        allow_cpu=args.allow_cpu,
    )
    _write_json(figures, args.json_out)
    return 0


def cmd_bench_accuracy(args) -> int:
    from ffn_dist.bench.accuracy import bench_accuracy
    from ffn_dist.bench.study import bench_study

    if args.study:
        bench_study(args.study, args.schedule, args.archive, args.work_dir, args.seeds or 3)
    else:
        bench_accuracy(args.schedule, args.archive, args.work_dir, args.seeds or 1)
    return 0


def _add_config_args(parser) -> None:
    parser.add_argument("config", help="YAML config, e.g. configs/demo.yaml, or a shipped one's name (demo)")
    parser.add_argument("overrides", nargs="*", metavar="a.b.c=value", help="config overrides")


def build_parser() -> argparse.ArgumentParser:
    from ffn_dist import __version__
    from ffn_dist.run.stages import STAGES

    parser = argparse.ArgumentParser(prog="ffn", description="Feature Fusion Network, distributed.")
    parser.add_argument("--version", action="version", version=f"ffn-dist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="the whole pipeline: data, stage 1, feature cache, classifier, report")
    _add_config_args(run)
    run.set_defaults(func=cmd_run)

    stage = sub.add_parser(
        "stage",
        help="one stage of a started run, from its frozen config (what `ffn run` and `ffn submit` start)",
    )
    stage.add_argument("name", choices=[s.name for s in STAGES])
    stage.add_argument("run_dir", help="the run directory (its config.yaml is the config)")
    stage.set_defaults(func=cmd_stage)

    stage1 = sub.add_parser("train-backbones", help="stage 1: the branches' backbones (under torchrun)")
    _add_config_args(stage1)
    stage1.add_argument(
        "--branch",
        metavar="NAME",
        help="train only this branch of `branches` (its ranks; the other groups' ranks idle): for ablations",
    )
    stage1.add_argument(
        "--max-steps",
        type=int,
        default=None,
        metavar="K",
        help="stop after K steps of each branch, checkpointed (exit 3; a rerun resumes): a smoke test",
    )
    stage1.set_defaults(func=cmd_train_backbones)

    cache = sub.add_parser(
        "cache-features", help="stage 2a: frozen backbones -> sharded embeddings (torchrun)"
    )
    _add_config_args(cache)
    cache.add_argument(
        "--rebuild",
        action="store_true",
        help="replace a cache made from other backbones or settings (default: refuse)",
    )
    cache.set_defaults(func=cmd_cache_features)

    classifier = sub.add_parser(
        "train-classifier", help="stage 2b: the configured classifier (stage2.method) on the cache"
    )
    _add_config_args(classifier)
    classifier.add_argument(
        "--sweep",
        default=None,
        metavar="BRANCH=START:STOP:STEP|grid=STEP",
        help="one classifier per fusion: one branch's weight over a range (two branches; the other "
        "takes 1 minus it), or every point of the simplex in steps of STEP",
    )
    classifier.add_argument(
        "--methods",
        default=None,
        metavar="all|M1,M2",
        help="compare classifier methods on every feature source: all, or a comma list (ffn, crt, "
        "weight_balancing, ...; a wrong name lists them all)",
    )
    classifier.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="with --methods: repeat with seeds SEED..SEED+N-1 of stage 2 (same cache) and report mean ± std",
    )
    classifier.set_defaults(func=cmd_train_classifier)

    export = sub.add_parser(
        "export",
        help="the run's classifier as one model: ONNX, torch.export (.pt2), model.json "
        "(another one: stage2.method=NAME stage2.fusion.BRANCH=X ...)",
    )
    _add_config_args(export)
    export.set_defaults(func=cmd_export)

    predict = sub.add_parser("predict", help="classify images, or score a split, with an exported model")
    predict.add_argument("export_dir", help="output_dir/export of a run")
    predict.add_argument("images", nargs="*", metavar="IMAGE")
    predict.add_argument("--split", default=None, help="a split file to score (top-1, top-5, shot groups)")
    predict.add_argument("--root", default=None, help="data root the split's paths are relative to")
    predict.add_argument("--runtime", choices=["onnx", "torch"], default="onnx")
    predict.add_argument("--top-k", type=int, default=5)
    predict.add_argument("--batch-size", type=int, default=64)
    predict.add_argument("--threads", type=int, default=2, help="image decoding threads")
    predict.add_argument("--json", action="store_true", help="print JSON")
    predict.add_argument("--prior", default=None, help=PRIOR_HELP)
    predict.set_defaults(func=cmd_predict)

    evaluate = sub.add_parser(
        "evaluate",
        help="each branch alone and the configured classifier: accuracy, calibration; JSON, Markdown, plots",
    )
    _add_config_args(evaluate)
    evaluate.add_argument("--tsne", action="store_true", help="also a t-SNE plot of test embeddings")
    evaluate.add_argument("--prior", default=None, help=PRIOR_HELP + "; measured against no adjustment")
    evaluate.add_argument(
        "--test-split",
        action="append",
        metavar="FILE",
        help="also score this split file (a published shifted test list; paths under data.root) "
        "with the configured classifier's export; repeatable",
    )
    evaluate.set_defaults(func=cmd_evaluate)

    submit = sub.add_parser("submit", help="the pipeline as 3 chained SLURM jobs (submitit)")
    _add_config_args(submit)
    submit.add_argument("--executor", choices=["slurm", "local"], default="slurm")
    submit.add_argument(
        "--plan",
        action="store_true",
        help="each job's time limit from `ffn plan`'s prediction (output_dir/plan.json) x --plan-margin",
    )
    submit.add_argument(
        "--plan-margin", type=float, default=1.5, help="the plan's times x this (default 1.5)"
    )
    submit.add_argument("--dry-run", action="store_true", help="print what would be submitted")
    submit.add_argument("--wait", action="store_true", help="block until the chain ends; exit 2 on failure")
    submit.add_argument("--partition", default=None)
    submit.add_argument("--account", default=None)
    submit.add_argument("--qos", default=None)
    submit.add_argument("--nodes", type=int, default=None)
    submit.add_argument("--gpus-per-node", type=int, default=None)
    submit.set_defaults(func=cmd_submit)

    plan = sub.add_parser(
        "plan", help="predict a run's wall time, GPU-hours, memory and disk from a few real steps here"
    )
    _add_config_args(plan)
    plan.add_argument("--json", action="store_true", help="print JSON (the whole run's time: total_seconds)")
    plan.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="processes to measure on (default: the run's, where they fit here)",
    )
    plan.add_argument("--steps", type=int, default=10, help="stage-1 steps timed a branch (default 10)")
    plan.add_argument(
        "--dp-efficiency",
        type=float,
        default=0.9,
        help="per-process speed on the run's process count as a share of --nproc's (default 0.9)",
    )
    plan.set_defaults(func=cmd_plan)

    status = sub.add_parser(
        "status", help="each stage of the run: complete, stale (what changed), failed (why); SLURM jobs"
    )
    _add_config_args(status)
    status.add_argument(
        "--verify",
        action="store_true",
        help="read every output whole (the cache's shards hashed), not only its size and time",
    )
    status.set_defaults(func=cmd_status)

    show = sub.add_parser("show-config", help="print the fully resolved config")
    _add_config_args(show)
    show.add_argument("--explain", action="store_true", help="with what each setting accepts and means")
    show.set_defaults(func=cmd_show_config)

    splits = sub.add_parser("splits", help="inspect, build and verify split files")
    splits_sub = splits.add_subparsers(dest="splits_command", required=True, metavar="ACTION")

    stats = splits_sub.add_parser("stats", help="class counts, imbalance factor, shot groups")
    stats.add_argument("file")
    stats.add_argument(
        "--num-classes", type=int, default=None, help="number of classes (default: largest label + 1)"
    )
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(func=cmd_splits_stats)

    make = splits_sub.add_parser("make-lt", help="long-tailed train.txt + balanced test.txt")
    make.add_argument("--image-root", required=True, help="ImageFolder root (or with train/ test/)")
    make.add_argument("--out", required=True, help="directory for the split files")
    make.add_argument("--profile", choices=["exp", "pareto"], required=True)
    make.add_argument("--imbalance-factor", type=float, required=True)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument(
        "--test-per-class",
        type=int,
        default=None,
        help="hold out this many test images per class (no train/ test/ folders)",
    )
    make.add_argument(
        "--val-per-class",
        type=int,
        default=None,
        help="also a balanced val.txt: this many per class from the training images the long tail left out",
    )
    make.set_defaults(func=cmd_splits_make_lt)

    cifar = splits_sub.add_parser(
        "cifar",
        help="CIFAR-10/100-LT from the python archive: lossless PNGs, the literature's subset (LDAM-DRW's)",
    )
    cifar.add_argument("archive", help="cifar-10-python.tar.gz or cifar-100-python.tar.gz")
    cifar.add_argument("--out", required=True, help="directory for the images and the split files")
    cifar.add_argument("--imbalance-factor", type=float, default=100.0, help="n_max / n_min (default 100)")
    cifar.add_argument("--seed", type=int, default=0, help="the seed of the subset (LDAM-DRW's rand_number)")
    cifar.add_argument(
        "--val-per-class", type=int, default=None, help="also a balanced val.txt, by make-lt's rule"
    )
    cifar.set_defaults(func=cmd_splits_cifar)

    inat = splits_sub.add_parser("inat", help="iNaturalist 2018 split files from its JSON annotations")
    inat.add_argument("train_json", help="train2018.json")
    inat.add_argument("val_json", help="val2018.json (the test split)")
    inat.add_argument("--out", required=True, help="directory for train.txt, test.txt, classes.txt")
    inat.set_defaults(func=cmd_splits_inat)

    verify = splits_sub.add_parser("verify", help="decode every image, list the bad ones")
    verify.add_argument("file")
    verify.add_argument("--root", required=True, help="data root the paths are relative to")
    verify.add_argument("--workers", type=int, default=2)
    verify.set_defaults(func=cmd_splits_verify)

    demo = sub.add_parser("demo-data", help="write the built-in default dataset (digits-LT)")
    demo.add_argument("--out", default="data/demo")
    demo.set_defaults(func=cmd_demo_data)

    bench = sub.add_parser(
        "bench",
        help="benchmarks that print figures; without BENCH: loader, train, cache, stage2 into one JSON",
    )
    bench.add_argument("--config", default="demo", help="config of the suite's runs (a path or shipped name)")
    bench.add_argument("--overrides", nargs="*", default=[], metavar="a.b.c=value")
    bench.add_argument("--rounds", type=int, default=3)
    bench.add_argument("--cifar-split", default=None, help="CIFAR split for the loader benchmark")
    bench.add_argument("--cifar-root", default=None)
    bench.add_argument("--json-out", default="runs/bench/bench.json")
    bench.set_defaults(func=cmd_bench_all)
    bench_sub = bench.add_subparsers(dest="bench_command", required=False, metavar="BENCH")
    loader = bench_sub.add_parser("loader", help="DALI CPU vs torchvision DataLoader, img/s")
    loader.add_argument(
        "--cifar-split", default=None, help="a CIFAR split file (default: the built-in digits)"
    )
    loader.add_argument("--cifar-root", default=None, help="data root of --cifar-split")
    loader.add_argument("--threads", type=int, default=2)
    loader.add_argument("--batch-size", type=int, default=64)
    loader.add_argument("--images", type=int, default=6400, help="images timed per CIFAR round")
    loader.add_argument("--rounds", type=int, default=3)
    loader.add_argument("--large-images", type=int, default=512, help="generated 400x350 JPEGs")
    loader.add_argument("--json-out", default=None)
    loader.set_defaults(func=cmd_bench_loader)
    train = bench_sub.add_parser("train", help="stage-1 step vs a bare PyTorch loop, and with the loader")
    train.add_argument("config", nargs="?", default="demo")
    train.add_argument("overrides", nargs="*", metavar="a.b.c=value")
    train.add_argument("--steps", type=int, default=10, help="timed steps per round")
    train.add_argument("--rounds", type=int, default=3)
    train.add_argument("--json-out", default=None)
    train.set_defaults(func=cmd_bench_train)
    stage2 = bench_sub.add_parser(
        "stage2", help="classifier epoch on the cache vs matmul bound and backbones"
    )
    stage2.add_argument("config", nargs="?", default="demo")
    stage2.add_argument("overrides", nargs="*", metavar="a.b.c=value")
    stage2.add_argument(
        "--rows", type=int, default=115846, help="synthetic cache rows (ImageNet-LT train); 0 skips"
    )
    stage2.add_argument("--dims", type=int, default=2048, help="embedding size (ResNet-50)")
    stage2.add_argument("--classes", type=int, default=1000)
    stage2.add_argument("--rounds", type=int, default=3)
    stage2.add_argument("--backbone-steps", type=int, default=20, help="timed steps of the authors' way")
    stage2.add_argument("--work-dir", default=None, help="where the synthetic caches go (default: temp)")
    stage2.add_argument("--json-out", default=None)
    stage2.set_defaults(func=cmd_bench_stage2)
    cache_bench = bench_sub.add_parser("cache", help="cache extraction vs a plain forward of both backbones")
    cache_bench.add_argument("config", nargs="?", default="demo")
    cache_bench.add_argument("overrides", nargs="*", metavar="a.b.c=value")
    cache_bench.add_argument("--rounds", type=int, default=3)
    cache_bench.add_argument("--work-dir", default=None, help="where the scratch caches go (default: temp)")
    cache_bench.add_argument("--json-out", default=None)
    cache_bench.set_defaults(func=cmd_bench_cache)
    gpu = bench_sub.add_parser(
        "gpu", help="the GPU paths, one part at a time: ResNet-50 bf16 step, cache, stage 2 (CUDA only)"
    )
    gpu.add_argument("--part", choices=["jpegs", "stage1", "cache", "stage2"], required=True)
    gpu.add_argument("--work-dir", default="runs/gpu_check/work", help="generated JPEGs, scratch caches")
    gpu.add_argument("--stage2-rows", type=int, default=115846, help="synthetic cache rows (ImageNet-LT)")
    gpu.add_argument("--images", type=int, default=2048, help="generated 400x350 JPEGs")
    gpu.add_argument("--batch-size", type=int, default=256)
    gpu.add_argument("--steps", type=int, default=30)
    gpu.add_argument("--rounds", type=int, default=3)
    gpu.add_argument("--json-out", default=None)
    gpu.add_argument(
        "--allow-cpu",
        action="store_true",
        help="run on the CPU (meaningless figures: tests the check itself)",
    )
    gpu.set_defaults(func=cmd_bench_gpu)
    freshness = bench_sub.add_parser(
        "freshness", help="`ffn status` and a rerun of a complete run, on a run with a large cache"
    )
    freshness.add_argument("--cache-gb", type=float, default=2.0, help="size of the synthetic cache")
    freshness.add_argument("--dims", type=int, default=2048, help="embedding size (ResNet-50)")
    freshness.add_argument("--rounds", type=int, default=3)
    freshness.add_argument(
        "--work-dir", default="runs/bench_freshness", help="the run (built once, reused by later calls)"
    )
    freshness.add_argument("--json-out", default=None)
    freshness.set_defaults(func=cmd_bench_freshness)
    scale = bench_sub.add_parser(
        "scale",
        help="iNaturalist 2018's scale: its split converted and read, stage 2 on a cache of its shape",
    )
    scale.add_argument("config", nargs="?", default="inat2018_r50")
    scale.add_argument("overrides", nargs="*", metavar="a.b.c=value")
    scale.add_argument(
        "--rows", type=int, default=437513, help="synthetic cache rows (iNaturalist 2018 train)"
    )
    scale.add_argument("--dims", type=int, default=2048)
    scale.add_argument("--classes", type=int, default=8142)
    scale.add_argument("--split-images", type=int, default=437513, help="training images of the split")
    scale.add_argument("--work-dir", default=None, help="where the synthetic files go (default: temp)")
    scale.add_argument("--json-out", default=None)
    scale.set_defaults(func=cmd_bench_scale)
    export_bench = bench_sub.add_parser(
        "export", help="exported model: file sizes, predict img/s (ONNX Runtime, torch.export, eager)"
    )
    export_bench.add_argument("--archs", default="resnet32,resnet50", help="comma list: resnet32, resnet50")
    export_bench.add_argument("--batch-size", type=int, default=32)
    export_bench.add_argument("--rounds", type=int, default=3)
    export_bench.add_argument("--work-dir", default=None, help="where the exports go (default: temp)")
    export_bench.add_argument("--json-out", default=None)
    export_bench.set_defaults(func=cmd_bench_export)
    accuracy = bench_sub.add_parser(
        "accuracy", help="FFN on CIFAR-10-LT from the real JPEGs, with the fusion sweep"
    )
    accuracy.add_argument("--schedule", choices=["cpu", "paper"], default="cpu")
    accuracy.add_argument(
        "--archive",
        default=None,
        help="cifar10-jpeg.tar.gz (default: $FFN_CIFAR10_ARCHIVE, else ../shared/data/ beside the checkout)",
    )
    accuracy.add_argument("--work-dir", default="runs/bench_accuracy")
    accuracy.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="run the schedule with seeds 0..N-1 (each draws its own long-tailed subset) and report "
        "mean ± std (default: 1; with --study, 3)",
    )
    accuracy.add_argument(
        "--study",
        default=None,
        metavar="NAME|FILE",
        help="instead: which branches to fuse, a study file's branches trained once a seed and its "
        "fusions compared, each chosen on val (shipped: branches, configs/studies/branches.yaml)",
    )
    accuracy.set_defaults(func=cmd_bench_accuracy)
    return parser


def parse(argv=None) -> argparse.Namespace:
    """Like parse_args, but `a.b.c=value` overrides may also follow an option (`CONFIG
    --sweep kps=0:1:0.1 seed=1`), which argparse alone refuses after its positional list."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    stray = [token for token in rest if token.startswith("-") or "=" not in token]
    if stray or (rest and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or rest)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    return args


def _lost_peer(exc: Exception) -> bool:
    """A collective failed because another process of the job ended (its own error says why)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and isinstance(exc, dist.DistError)


def main(argv=None) -> int:
    from ffn_dist.stopping import StopRequested, Terminated, terminate_on

    args = parse(argv)
    terminate_on()  # SIGTERM / SIGINT: clean up (holds, child processes), then exit 128 + signal
    try:
        return args.func(args)
    except FFNError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_status", 2)
    except StopRequested:
        print("stopped on request (SIGUSR2 or SIGTERM) after a checkpoint; rerun to resume", file=sys.stderr)
        return STOPPED
    except Terminated as stop:
        print(f"stopped by {stop}; rerun the same command to resume", file=sys.stderr)
        return 128 + stop.signum
    except BrokenPipeError:  # the reader stopped reading (`| head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        if not _lost_peer(exc):
            raise
        print(
            f"error: another process of this job ended ({type(exc).__name__}); its error says why",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
