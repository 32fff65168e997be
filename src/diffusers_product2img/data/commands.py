"""``product2img dataset-*`` subcommands: generate EPBD-synth, export to the Hub-native form, push.

The main CLI calls :func:`register_commands` with its ``add_subparsers()`` object; each command's
``func(args)`` returns the exit code (0 ok, 2 on a data error, printed without a traceback).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from .layout import EPBDLayoutError

__all__ = ["register_commands", "cmd_dataset_synth", "cmd_dataset_export", "cmd_dataset_push"]


def _fail(command: str, err: BaseException) -> int:
    print(f"product2img {command}: error: {err}", file=sys.stderr)
    return 2


def cmd_dataset_synth(args: argparse.Namespace) -> int:
    import time

    from .synth import SynthConfig, generate_epbd_synth

    overrides = {f.name: getattr(args, f.name) for f in fields(SynthConfig)
                 if getattr(args, f.name, None) is not None}
    start = time.perf_counter()
    try:
        root = generate_epbd_synth(args.output_dir, SynthConfig(**overrides), overwrite=args.overwrite)
    except (ValueError, FileExistsError) as err:
        return _fail("dataset-synth", err)
    config = SynthConfig(**overrides)
    total = config.num_train + config.num_validation + config.num_test + config.num_test_unseen
    elapsed = time.perf_counter() - start
    print(f"wrote EPBD-synth ({total} samples, {config.resolution}px) to {root} in {elapsed:.1f} s")
    return 0


def cmd_dataset_export(args: argparse.Namespace) -> int:
    from .export import add_round_config, export_epbd

    try:
        if args.add_round is not None:
            name = add_round_config(args.output_dir, args.raw_root, args.add_round, threshold=args.threshold,
                                    overwrite=args.overwrite, max_shard_size=args.max_shard_size)
            print(f"added config {name!r} to {args.output_dir}")
        else:
            if args.threshold is not None:
                raise ValueError("--threshold makes a custom round config: use it with --add-round K")
            out = export_epbd(args.raw_root, args.output_dir, rounds=args.rounds, overwrite=args.overwrite,
                              max_shard_size=args.max_shard_size, license=args.license, repo_id=args.repo_id)
            print(f"exported {args.raw_root} to {out}")
    except (EPBDLayoutError, ValueError, FileExistsError) as err:
        return _fail("dataset-export", err)
    return 0


def cmd_dataset_push(args: argparse.Namespace) -> int:
    from .export import push_epbd_to_hub

    try:
        result = push_epbd_to_hub(args.exported_dir, args.repo_id, private=args.private, configs=args.configs,
                                  revision=args.revision, commit_message=args.commit_message)
    except (EPBDLayoutError, ValueError) as err:
        return _fail("dataset-push", err)
    url = getattr(result, "commit_url", None) or getattr(result, "repo_url", None) or result
    print(f"pushed {args.exported_dir} to dataset repo {args.repo_id}: {url}")
    return 0


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``dataset-synth``, ``dataset-export`` and ``dataset-push`` to the ``product2img`` CLI."""
    synth = subparsers.add_parser(
        "dataset-synth", help="generate EPBD-synth, a procedural EPBD with ground-truth quality labels",
        description="Write EPBD-synth in the raw EPBD layout (deterministic from --seed).")
    synth.add_argument("output_dir")
    synth.add_argument("--seed", type=int)
    synth.add_argument("--resolution", type=int, help="image side, 16..512 (default 64)")
    synth.add_argument("--num-train", dest="num_train", type=int)
    synth.add_argument("--num-validation", dest="num_validation", type=int)
    synth.add_argument("--num-test", dest="num_test", type=int)
    synth.add_argument("--num-test-unseen", dest="num_test_unseen", type=int)
    synth.add_argument("--low-quality-rate", dest="low_quality_rate", type=float,
                       help="share of planted low-quality train samples (default 0.3)")
    synth.add_argument("--num-train-categories", dest="num_train_categories", type=int)
    synth.add_argument("--num-unseen-categories", dest="num_unseen_categories", type=int)
    synth.add_argument("--write-masks", dest="write_masks", action="store_const", const=True,
                       help="also write masks/ (otherwise derived from the cutouts' alpha)")
    synth.add_argument("--overwrite", action="store_true")
    synth.set_defaults(func=cmd_dataset_synth)

    export = subparsers.add_parser(
        "dataset-export", help="export a raw EPBD folder to Parquet + README configs (load_dataset-ready)",
        description="Write the Hub-native form of EPBD, or add one IDR round's config to an existing export.")
    export.add_argument("raw_root", help="raw EPBD folder (metadata.csv, images/, cutouts/, scores/)")
    export.add_argument("output_dir", help="export folder (created; with --add-round: an existing export)")
    export.add_argument("--rounds", type=int, nargs="*", help="IDR rounds to export (default: all scored)")
    export.add_argument("--add-round", dest="add_round", type=int, metavar="K",
                        help="add round K's config to the existing export in output_dir, touching nothing else")
    export.add_argument("--threshold", type=float,
                        help="with --add-round: a custom gamma for every round (config idr_round_K_gamma<t>)")
    export.add_argument("--max-shard-size", dest="max_shard_size", default="500MB")
    export.add_argument("--license", help="license id for the dataset card")
    export.add_argument("--repo-id", dest="repo_id", help="Hub repo id used in the card's examples")
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(func=cmd_dataset_export)

    push = subparsers.add_parser(
        "dataset-push", help="upload an exported EPBD folder to a Hub dataset repo",
        description="Upload an export to the Hub. The token comes from HF_TOKEN or `hf auth login`.")
    push.add_argument("exported_dir")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_const", const=True, help="create the repo private")
    push.add_argument("--configs", nargs="+", help="upload only these configs (plus README.md)")
    push.add_argument("--revision", help="branch to push to (created if missing)")
    push.add_argument("--commit-message", dest="commit_message")
    push.set_defaults(func=cmd_dataset_push)
