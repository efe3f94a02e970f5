"""The ``convmoe zoo`` subcommand (registered in :mod:`convmoe.cli`): publish, table, check, push.

    convmoe zoo publish RUN_DIR --model-id ID [--seeds RUN ...] [--dense-twin RUN ...] [--float16]
                                 [--dense-model-id ID]   (an MoE run whose dense twin is a variant too)
                                 [--twin-of ID ...]      (a dense run, published as the twin of MoE variants)
    convmoe zoo table            regenerate zoo/README.md and re-render the cards from their metadata
    convmoe zoo check            schema, weights and their sha256, from_pretrained, plan.yaml and its budget, index up to date
    convmoe zoo reproduce [ID ...]  run each card's eval commands on its folder and compare with the card's numbers
    convmoe zoo push ID          upload zoo/ID to the Hub (after the checks)
"""

from __future__ import annotations

import argparse

from convmoe.engine.cli import parse_device
from convmoe.formatting import did_you_mean
from convmoe.zoo.check import check_zoo
from convmoe.zoo.listing import format_variants, list_variants
from convmoe.zoo.publish import publish
from convmoe.zoo.push import push_variant
from convmoe.zoo.reproduce import reproduce_variant
from convmoe.zoo.schema import require_zoo_dir, variant_folders
from convmoe.zoo.table import write_index


def _publish_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="the run whose best checkpoint is published (a `convmoe train` output folder)")
    parser.add_argument("--model-id", required=True, help="folder and Hub repo name, e.g. upernet-lite0-moe8-camvid")
    parser.add_argument("--seeds", nargs="+", default=[], metavar="RUN_DIR",
                        help="more runs of the same recipe with other trainer.seed values")
    parser.add_argument("--dense-twin", nargs="+", default=[], metavar="RUN_DIR",
                        help="runs of the dense recipe (the same recipe without MoE), one per seed")
    parser.add_argument("--float16", action="store_true",
                        help="store float16 weights (checked: predictions and metrics must stay close)")
    parser.add_argument("--config", default=None, help="the recipe the runs were trained from (default: the one in "
                        "--recipes-dir that reproduces the run's config with the fewest overrides)")
    parser.add_argument("--dense-config", default=None, help="the dense twin's recipe (default: found the same way)")
    parser.add_argument("--recipes-dir", default="configs", help="where recipes are searched (default: configs)")
    parser.add_argument("--zoo-dir", default="zoo", help="the zoo folder (default: zoo)")
    parser.add_argument("--repo-id", default=None, help="Hub repo id (default: convmoe/<model-id>)")
    parser.add_argument("--dataset", default=None, help="dataset key (default: read from the config)")
    parser.add_argument("--license", default=None, help="licence id (default: the dataset's)")
    parser.add_argument("--base-model", default=None,
                        help="Hub id of the exact weights training started from (left out by default)")
    parser.add_argument("--device", default=None, help="device for latency and analysis (default: cuda if available)")
    parser.add_argument("--latency-reps", type=int, default=30, help="timed passes (0: no latency; default 30)")
    parser.add_argument("--latency-warmup", type=int, default=5, help="untimed passes first (default 5)")
    parser.add_argument("--no-analysis", action="store_true", help="leave the routing analysis out of the card")
    parser.add_argument("--analysis-batches", type=int, default=None, help="val batches for the routing analysis")
    parser.add_argument("--note", action="append", default=[], help="a sentence for the card's Limitations")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing variant folder")
    parser.add_argument("--twin-of", nargs="+", default=[], metavar="MODEL_ID",
                        help="publish a dense run (no MoE block) as the dense twin of these MoE variants")
    parser.add_argument("--dense-model-id", default=None, metavar="MODEL_ID",
                        help="the variant the MoE run's dense twin is published as (linked from the card)")


def _run_publish(args: argparse.Namespace) -> int:
    device = parse_device(args.device) if args.device is not None else None
    result = publish(args.run_dir, args.model_id, dense_twin=args.dense_twin, seeds=args.seeds, float16=args.float16,
                     zoo_dir=args.zoo_dir, config=args.config, dense_config=args.dense_config,
                     recipes_dir=args.recipes_dir, repo_id=args.repo_id, dataset=args.dataset, license=args.license,
                     base_model=args.base_model, device=device, latency_warmup=args.latency_warmup,
                     latency_reps=args.latency_reps, analysis=not args.no_analysis,
                     analysis_batches=args.analysis_batches, notes=args.note, overwrite=args.overwrite,
                     twin_of=args.twin_of, dense_model_id=args.dense_model_id)
    meta = result.front_matter["convmoe"]
    monitor = meta["monitor"]
    print(f"published {result.folder}: {monitor} {meta['metrics'][monitor]:.4g} over seeds {meta['seeds']}, "
          f"{meta['weights']['dtype']} weights {meta['weights']['bytes'] / 1e6:.1f} MB")
    return 0


def _table_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--zoo-dir", default="zoo", help="the zoo folder (default: zoo)")


def _run_table(args: argparse.Namespace) -> int:
    print(f"wrote {write_index(require_zoo_dir(args.zoo_dir))}")
    return 0


def _check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--zoo-dir", default="zoo", help="the zoo folder (default: zoo)")
    parser.add_argument("--no-load", action="store_true", help="skip loading each variant with from_pretrained")


def _run_check(args: argparse.Namespace) -> int:
    problems = check_zoo(args.zoo_dir, load=not args.no_load)
    for problem in problems:
        print(problem)
    count = len(variant_folders(args.zoo_dir))
    print(f"{count} variant(s), {len(problems)} problem(s)")
    return 1 if problems else 0


def _reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_ids", nargs="*", metavar="MODEL_ID", help="the variants (default: all of --zoo-dir)")
    parser.add_argument("--zoo-dir", default="zoo", help="the zoo folder (default: zoo)")


def _run_reproduce(args: argparse.Namespace) -> int:
    zoo_dir = require_zoo_dir(args.zoo_dir)
    variants = variant_folders(zoo_dir)
    known = [folder.name for folder in variants]
    for model_id in args.model_ids:
        if model_id not in known:
            raise FileNotFoundError(f"{zoo_dir} has no variant {model_id!r}{did_you_mean(model_id, known)}; its "
                                    f"variants: {', '.join(known)}.")
    folders = [zoo_dir / model_id for model_id in args.model_ids] or variants
    results = [result for folder in folders for result in reproduce_variant(folder)]
    print("| variant | metric | card | measured | |\n|---|---|---|---|---|")
    for r in results:
        print(f"| `{r.model_id}` | {r.metric} | {r.card:.6g} | {r.measured:.6g} | {'same' if r.matches else 'DIFFERENT'} |")
    different = sum(not r.matches for r in results)
    print(f"{len(folders)} variant(s), {len(results)} number(s), {different} different")
    return 1 if different else 0


def _list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--zoo-dir", default="zoo", help="the zoo folder (default: zoo)")


def _run_list(args: argparse.Namespace) -> int:
    print(format_variants(list_variants(require_zoo_dir(args.zoo_dir))))
    return 0


def _push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_id", help="the variant in --zoo-dir, or its folder")
    parser.add_argument("--repo-id", default=None, help="Hub repo id (must be the card's hub_id, the default)")
    parser.add_argument("--zoo-dir", default="zoo", help="the zoo folder (default: zoo)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--token", default=None, help="Hub token (default: huggingface_hub's login)")
    parser.add_argument("--message", default=None, help="commit message")


def _run_push(args: argparse.Namespace) -> int:
    info = push_variant(args.model_id, repo_id=args.repo_id, zoo_dir=args.zoo_dir, private=args.private,
                        token=args.token, commit_message=args.message)
    print(f"pushed {args.model_id}: {getattr(info, 'commit_url', None) or getattr(info, 'oid', info)}")
    return 0


_SUBCOMMANDS = {
    "list": ("list the variants: dataset, headline metric, dense twin, FLOPs and latency against it", _list_arguments,
             _run_list),
    "publish": ("write zoo/<id>/ (weights, model card) from engine run folders", _publish_arguments, _run_publish),
    "table": ("regenerate zoo/README.md and re-render the cards from their metadata", _table_arguments, _run_table),
    "check": ("check every variant against the zoo schema, the size budget and the index", _check_arguments,
              _run_check),
    "reproduce": ("run each card's eval commands on its folder and compare with the card's numbers",
                  _reproduce_arguments, _run_reproduce),
    "push": ("upload a checked variant to the Hugging Face Hub", _push_arguments, _run_push),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``zoo`` subcommands and their arguments.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_arguments(parser)
        >>> args = parser.parse_args(["publish", "runs/a", "--model-id", "m", "--seeds", "runs/b", "runs/c"])
        >>> args.zoo_command, args.seeds
        ('publish', ['runs/b', 'runs/c'])
    """
    subparsers = parser.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND", required=True)
    for name, (help_text, add, run_command) in _SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add(sub)
        sub.set_defaults(zoo_run=run_command, command_prog=sub.prog)  # errors read "convmoe zoo check: error: ..."


def run(args: argparse.Namespace) -> int:
    """Run the chosen ``zoo`` subcommand; returns the exit status (1 when ``check`` finds problems).

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_arguments(parser)
        >>> run(parser.parse_args(["check", "--zoo-dir", "no/such/zoo"]))
        Traceback (most recent call last):
        ...
        FileNotFoundError: zoo folder no/such/zoo does not exist; pass --zoo-dir with the folder holding the variants (default: zoo, run from the repository root).
    """
    return args.zoo_run(args)
