"""The ``selfsup`` command line: browse and validate the catalog, train and evaluate methods, build the site."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import textwrap
from pathlib import Path

from selfsup import catalog as cat

EPILOG = """examples:
  selfsup list --family contrastive --implemented
  selfsup show simclr
  selfsup bib simclr byol > refs.bib
  selfsup validate
"""


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit code 2."""


def _load(args) -> cat.Catalog:
    root = Path(args.root) if args.root else cat.ROOT
    catalog_dir = getattr(args, "catalog_dir", None)
    if catalog_dir and not Path(catalog_dir).is_dir():
        raise CLIError(f"--catalog-dir: {catalog_dir} is not a directory")
    catalog = cat.load_catalog(root, Path(catalog_dir) if catalog_dir else None)
    if catalog.problems and args.command != "validate":
        raise CLIError(
            f"the catalog has {len(catalog.problems)} problem(s); run 'selfsup validate' to list them"
        )
    return catalog


def _get(catalog: cat.Catalog, entry_id: str) -> cat.Entry:
    try:
        return catalog.get(entry_id)
    except KeyError as e:
        raise CLIError(e.args[0]) from None


# ------------------------------------------------------------------------------------------------


def cmd_validate(args) -> int:
    catalog = _load(args)
    if catalog.problems:
        for p in catalog.problems:
            print(p, file=sys.stderr)
        print(f"{len(catalog.problems)} problem(s) in the catalog", file=sys.stderr)
        return 1
    n_impl = sum(1 for e in catalog if e.implementation)
    print(f"catalog OK: {len(catalog)} entries, {n_impl} with implementations")
    return 0


def _parse_years(spec: str) -> tuple[int, int]:
    try:
        if "-" in spec:
            lo, hi = spec.split("-", 1)
            return int(lo) if lo else 0, int(hi) if hi else 9999
        return int(spec), int(spec)
    except ValueError:
        raise CLIError(f"--year expects YEAR or FROM-TO (e.g. 2020-2022), got {spec!r}") from None


def _check_choice(flag: str, value: str | None, choices: list[str]) -> None:
    if value is not None and value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise CLIError(f"{flag}: unknown value {value!r}{hint} (choose from {', '.join(choices)})")


def filter_entries(catalog: cat.Catalog, args) -> list[cat.Entry]:
    tax = catalog.taxonomy
    _check_choice("--family", args.family, tax.family_ids)
    _check_choice("--kind", args.kind, tax.kind_ids)
    _check_choice("--modality", args.modality, tax.modality_ids)
    lo, hi = _parse_years(args.year) if args.year else (0, 9999)
    out = []
    for e in catalog.sorted():
        if args.family and e.family != args.family and args.family not in e.also:
            continue
        if args.kind and e.kind != args.kind:
            continue
        if args.modality and args.modality not in e.modalities:
            continue
        if not lo <= e.year <= hi:
            continue
        if args.implemented and not e.implementation:
            continue
        out.append(e)
    return out


def _table(rows: list[list[str]], headers: list[str], max_width: dict[int, int]) -> str:
    def clip(s: str, i: int) -> str:
        w = max_width.get(i)
        return s if w is None or len(s) <= w else s[: w - 1] + "…"

    rows = [[clip(c, i) for i, c in enumerate(r)] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def cmd_list(args) -> int:
    catalog = _load(args)
    entries = filter_entries(catalog, args)
    if not entries:
        print("no entries match", file=sys.stderr)
        return 0
    rows = [
        [e.id, str(e.year), e.kind, e.family or "-", "yes" if e.implementation else "", e.title]
        for e in entries
    ]
    print(_table(rows, ["id", "year", "kind", "family", "impl", "title"], {5: 70}))
    print(f"\n{len(entries)} of {len(catalog)} entries")
    return 0


def cmd_show(args) -> int:
    catalog = _load(args)
    e = _get(catalog, args.id)
    wrap = lambda s: textwrap.fill(s, 100, initial_indent="  ", subsequent_indent="  ")  # noqa: E731
    authors = ", ".join(e.authors)
    if e.author_count and len(e.authors) < e.author_count:
        authors += f" (+{e.author_count - len(e.authors)} more)" if e.authors else f"{e.author_count} authors"
    print(f"{e.title}\n{authors}\n{e.venue or 'unpublished'}, {e.year}")
    print(f"id: {e.id}   kind: {e.kind}   family: {e.family or '-'} / {e.subfamily or '-'}")
    for label, value in [("arXiv", e.arxiv_url), ("DOI", e.doi), ("url", e.url), ("code", e.code)]:
        if value:
            print(f"{label}: {value}")
    if e.modalities:
        print(f"modalities: {', '.join(e.modalities)}")
    if e.tags:
        print(f"tags: {', '.join(e.tags)}")
    print(f"\nsummary:\n{wrap(e.summary)}\n\nkey idea:\n{wrap(e.key_idea)}")
    if e.loss_latex:
        print(f"\nloss:\n  {e.loss_latex}")
    if e.properties:
        print("\nproperties:")
        for k, v in e.properties.items():
            print(f"  {k}: {v}")
    if e.builds_on:
        print(f"\nbuilds on: {', '.join(e.builds_on)}")
    later = catalog.built_upon_by(e.id)
    if later:
        print(f"built upon by: {', '.join(x.id for x in later)}")
    if e.results:
        print("\nreported results:")
        for r in e.results:
            extra = ", ".join(x for x in [r.backbone, f"{r.epochs} ep" if r.epochs else None] if x)
            print(f"  {r.benchmark} {r.metric} = {r.value:g} ({extra}; {r.source})")
    if e.notes:
        print("\nnotes:")
        for n in e.notes:
            print(wrap("- " + n))
    if e.implementation:
        preset = f" (its preset {e.preset})" if e.preset else ""
        print(f"\nimplementation: {e.implementation}{preset}\nrun it: selfsup train {e.id}")
    print(f"\n{cat.bibtex(e)}")
    return 0


def cmd_bib(args) -> int:
    catalog = _load(args)
    entries = [_get(catalog, i) for i in args.ids] if args.ids else catalog.sorted()
    print("\n\n".join(cat.bibtex(e) for e in entries))
    return 0


def cmd_schema(args) -> int:
    text = cat.json_schema_text()
    if args.output:
        out = Path(args.output)
        if not out.parent.is_dir():
            raise CLIError(f"-o {args.output}: directory {out.parent} does not exist")
        try:
            out.write_text(text, encoding="utf-8")
        except OSError as e:
            raise CLIError(f"-o {args.output}: cannot write it ({e.strerror})") from None
    else:
        sys.stdout.write(text)
    return 0


# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="selfsup",
        description="A catalog of self-supervised learning methods with reference implementations.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--root", help="repository root holding catalog/ and taxonomy/ (default: this checkout)")
    p.add_argument("--debug", action="store_true", help="on an error, show the full traceback, not one line")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("validate", help="check every catalog entry; exit 1 and list all problems if any")
    s.add_argument("--catalog-dir", help="validate the entries in this directory instead of catalog/")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("list", help="list catalog entries as a table, with filters")
    s.add_argument("--family", help="family id, e.g. contrastive (also matches secondary families)")
    s.add_argument("--kind", help="method, theory, analysis, survey, benchmark or application")
    s.add_argument("--modality", help="modality id, e.g. image, video, audio")
    s.add_argument("--year", help="a year (2020) or a range (2019-2021, 2020-)")
    s.add_argument("--implemented", action="store_true", help="only entries with a reference implementation")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("show", help="show one entry in full, with its BibTeX")
    s.add_argument("id", help="catalog id, e.g. barlow-twins")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("bib", help="print BibTeX for the given ids, or for the whole catalog")
    s.add_argument("ids", nargs="*", metavar="ID")
    s.set_defaults(func=cmd_bib)

    s = sub.add_parser("schema", help="print the JSON Schema of a catalog entry")
    s.add_argument("-o", "--output", help="write to this file instead of stdout")
    s.set_defaults(func=cmd_schema)

    _add_train_commands(sub)
    _add_site_commands(sub)
    return p


METRICS = [("knn_top1", "k-NN top-1"), ("linear_top1", "linear top-1"), ("rankme", "RankMe"),
           ("feature_std", "feature std"), ("alignment", "alignment"), ("uniformity", "uniformity")]


def format_results(results: dict) -> str:
    rows = []
    for key, label in METRICS:
        a, b = results["trained"].get(key), results["random_init"].get(key)
        if a is None:
            continue
        fmt = (lambda v: f"{100 * v:.1f}%") if key.endswith("top1") else (lambda v: f"{v:.4g}")
        rows.append([label, fmt(a), fmt(b) if b is not None else "-"])
    head = (f"{results['method']} on {results['dataset']} ({results['backbone']}, {results['steps']} steps, "
            f"{results['train_seconds']:.0f} s on {results['device']})")
    return head + "\n" + _table(rows, ["metric", "trained", "random init"], {})


TRAIN_DEFAULTS = dict(data="digits", backbone="small_cnn", seed=0, workers=1, linear_epochs=100, preset="auto",
                      augment="device", checkpoint_minutes=10.0, collapse_threshold=1e-4, device="auto")


def cmd_train(args) -> int:
    from selfsup import data, methods, train

    given = {k: getattr(args, k) for k in TRAIN_DEFAULTS if getattr(args, k) is not None}
    try:
        overrides = methods.parse_overrides(args.set)
        common = dict(
            epochs=args.epochs, steps=args.steps, num_workers=given.get("workers"),
            linear_epochs=given.get("linear_epochs"), checkpoint_every=args.checkpoint_every,
            checkpoint_minutes=given.get("checkpoint_minutes"), collapse_threshold=given.get("collapse_threshold"),
        )
        if args.resume:
            if not args.out:
                raise CLIError("--resume needs --out RUN_DIR, the run to continue")
            fixed = dict(data=given.get("data"), data_dir=args.data_dir, backbone=given.get("backbone"),
                         image_size=args.image_size, batch_size=args.batch_size, seed=given.get("seed"),
                         preset=given.get("preset"), augment=given.get("augment"), overrides=overrides or None)
            results = train.resume(args.out, method=args.method, device=given.get("device"),
                                   progress=False if args.no_progress else None, **common, **fixed)
        else:
            settings = {**TRAIN_DEFAULTS, **given}
            rc = train.RunConfig(
                method=args.method, data=settings["data"], data_dir=args.data_dir, backbone=settings["backbone"],
                image_size=args.image_size, batch_size=args.batch_size, out=args.out, device=settings["device"],
                seed=settings["seed"], overrides=overrides, preset=settings["preset"], augment=settings["augment"],
                progress=not args.no_progress,
                **{**common, "num_workers": settings["workers"], "linear_epochs": settings["linear_epochs"],
                   "checkpoint_minutes": settings["checkpoint_minutes"],
                   "collapse_threshold": settings["collapse_threshold"]},
            )
            results = train.train(rc)
    except (methods.MethodError, data.DataError, train.TrainingError, train.backbones.BackboneError) as e:
        raise CLIError(str(e)) from None
    if results:
        print(format_results(results))
        print(f"run directory: {results['run_dir']}")
    return 0


def cmd_eval(args) -> int:
    import json

    from selfsup import data, methods, train

    run = Path(args.run_dir)
    try:
        results = train.evaluate_run(run, device=args.device, method=args.method)
    except (methods.MethodError, data.DataError, train.TrainingError, train.backbones.BackboneError) as e:
        raise CLIError(str(e)) from None
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_results(results))
    return 0


def cmd_bench(args) -> int:
    from selfsup import bench, data, methods, train

    out = Path(args.out) if args.out else cat.ROOT / "benchmarks" / "results" / f"{args.name}.json"
    ids = [m.strip() for m in args.methods.split(",")] if args.methods else None
    errors = (methods.MethodError, data.DataError, train.TrainingError, cat.CatalogError, train.backbones.BackboneError)
    try:
        if args.name == "overhead":
            record = bench.run_overhead(
                args.data, ids, out, data_dir=args.data_dir, backbone=args.backbone, batch_size=args.batch_size or 256,
                steps=args.steps or 60, device=args.device, workers=args.workers, preset=args.preset or "paper",
            )
            rows = [[r["method"], r["backbone"], f"{r['pure_step_s']:.3f} s", f"{r['train_step_device_s']:.3f} s",
                     f"{r['train_step_loader_s']:.3f} s", f"{r['device_ratio']:.2f}", f"{r['loader_ratio']:.2f}"]
                    for r in record["rows"]]
            print(_table(rows, ["method", "backbone", "pure step", "train (device)", "train (loader)", "ratio", "ratio (loader)"], {}))
        elif args.name == "epoch-hook":
            record = bench.run_epoch_hook(args.data, ids, out, data_dir=args.data_dir, backbone=args.backbone,
                                          device=args.device, workers=args.workers, preset=args.preset or "paper")
            rows = [[r["method"], r["backbone"], str(r["num_samples"]),
                     "–" if r["hook_features_s"] is None else f"{r['hook_features_s']:.1f} s", f"{r['hook_work_s']:.1f} s"]
                    for r in record["rows"]]
            print(_table(rows, ["method", "backbone", "images", "features", "work"], {}))
        else:
            record = bench.run_benchmark(
                args.name, args.data, ids, out, Path(args.runs_dir), data_dir=args.data_dir, backbone=args.backbone,
                epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, device=args.device,
                linear_epochs=args.linear_epochs, workers=args.workers, description=args.description or "",
                preset=args.preset or "auto", from_runs=args.from_runs,
            )
            rows = [[r["method"], f"{100 * r['knn_top1']:.1f}%", f"{100 * r['random_init_knn_top1']:.1f}%",
                     f"{r['train_seconds']:.0f} s"] for r in record["rows"]]
            print(_table(rows, ["method", "k-NN top-1", "random init", "train time"], {}))
    except errors as e:
        raise CLIError(str(e)) from None
    print(f"written to {out}")
    return 0


# Kept here (not imported from selfsup.backbones) so that the CLI starts without importing torch.
BACKBONE_HELP = "small_cnn (default), resnet18_cifar, resnet18, resnet50 or vit_tiny"


def _add_train_commands(sub) -> None:
    s = sub.add_parser(
        "train", help="train a method and report k-NN/linear accuracy beside the random-init baseline",
        description="Train METHOD (a catalog id with an implementation, or a path to a method file) and "
        "evaluate it. Epochs and batch size default to the method's Config (the paper's values).",
    )
    s.add_argument("method", help="catalog id (simclr, byol, ...) or path to a method .py file")
    s.add_argument("--data", help="digits (default, bundled), cifar10, cifar100, stl10, imagefolder, an ImageFolder "
                   "path, or an archive such as cifar10-jpeg.tar.gz")
    s.add_argument("--data-dir", help="where the data set lives (torchvision/imagefolder) or the extraction cache (archives)")
    s.add_argument("--backbone", help=BACKBONE_HELP)
    s.add_argument("--image-size", type=int, help="resize images to this side (default: the data set's; at least 8)")
    s.add_argument("--epochs", type=int, help="training epochs (default: the method's Config)")
    s.add_argument("--steps", type=int, help="training steps instead of epochs")
    s.add_argument("--batch-size", type=int, help="per-process batch size (default: the method's Config)")
    s.add_argument("--set", action="append", metavar="NAME=VALUE", help="override a Config field, e.g. --set temperature=0.2")
    s.add_argument("--preset", help="paper (the Config's defaults), a preset of the method file (small: its CPU "
                   "preset), or auto (default: small on digits, paper elsewhere)")
    s.add_argument("--augment", choices=["device", "loader"],
                   help="device (default): the views are made batched on the training device where the recipe "
                   "translates; loader: per image in the loader workers")
    s.add_argument("--out", help="run directory (default: runs/METHOD-DATA-BACKBONE); a fresh run needs it empty")
    s.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (--steps/--epochs may extend it)")
    s.add_argument("--device", help="auto (default), cpu, cuda, cuda:1")
    s.add_argument("--seed", type=int)
    s.add_argument("--workers", type=int, help="data-loader worker processes (default: 1)")
    s.add_argument("--linear-epochs", type=int, help="epochs of the linear probe (default: 100); 0 skips it")
    s.add_argument("--checkpoint-every", type=int, help="also checkpoint every N steps (checkpoints come at every "
                   "epoch end and every --checkpoint-minutes anyway)")
    s.add_argument("--checkpoint-minutes", type=float, help="minutes of training between checkpoints (default: 10)")
    s.add_argument("--collapse-threshold", type=float,
                   help="stop when the embedding std falls below this (default: 1e-4; 0 disables)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("bench", help="train every implemented method under one budget; write benchmarks/results/NAME.json",
                       description="NAME 'overhead' measures the harness: the pure model step beside the train step "
                       "with device and loader views (--data: e.g. the CIFAR-10 archive); 'epoch-hook' times one "
                       "whole-data-set epoch hook (k-means, Sinkhorn over the set) per method that has one; any other "
                       "NAME trains every method and records k-NN / linear accuracy beside random init.")
    s.add_argument("name", help="benchmark name, e.g. knn-digits, overhead or epoch-hook")
    s.add_argument("--data", default="digits", help="as for train (default: digits)")
    s.add_argument("--data-dir")
    s.add_argument("--methods", help="comma-separated ids (default: every implemented method)")
    s.add_argument("--backbone", default="small_cnn", help=BACKBONE_HELP)
    s.add_argument("--epochs", type=int)
    s.add_argument("--steps", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--device", default="auto")
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--linear-epochs", type=int, default=100)
    s.add_argument("--preset", help="as for train: paper, small or auto (default; paper for overhead)")
    s.add_argument("--description", help="one paragraph shown on the site")
    s.add_argument("--out", help="result file (default: benchmarks/results/NAME.json)")
    s.add_argument("--runs-dir", default="runs/bench", help="where the run directories go (default: runs/bench)")
    s.add_argument("--from-runs", nargs="+", metavar="RUN_DIR",
                   help="record these finished runs instead of training again; each must have been made with the "
                   "benchmark's settings and the method's current Config")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("eval", help="evaluate a run directory's last checkpoint")
    s.add_argument("run_dir")
    s.add_argument("--method", help="the method file of a run trained from a path (a run directory cannot choose code)")
    s.add_argument("--device", default="auto")
    s.add_argument("--json", action="store_true", help="print the results as JSON")
    s.set_defaults(func=cmd_eval)


def cmd_site(args) -> int:
    from selfsup import site  # mkdocs is only needed here

    root = Path(args.root) if args.root else cat.ROOT
    if args.action == "build":
        return site.build(root=root, out_dir=Path(args.out) if args.out else None, strict=args.strict)
    return site.serve(root=root, addr=args.addr)


def _add_site_commands(sub) -> None:
    s = sub.add_parser("site", help="build or serve the documentation site (needs the 'site' extra)")
    s.add_argument("action", choices=["build", "serve"], help="build to build/site, or serve with live reload")
    s.add_argument("--out", help="output directory for build (default: build/site)")
    s.add_argument("--strict", action="store_true", help="fail on any mkdocs warning")
    s.add_argument("--addr", default="127.0.0.1:8000", help="address for serve (default: 127.0.0.1:8000)")
    s.set_defaults(func=cmd_site)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # Every command reads the repository under --root: check it once, before any command runs.
        if args.root and not Path(args.root).is_dir():
            raise CLIError(f"--root {args.root}: no such directory")
        if args.root and not all((Path(args.root) / d).is_dir() for d in ("catalog", "taxonomy")):
            raise CLIError(f"--root {args.root}: not a selfsup repository (it needs catalog/ and taxonomy/)")
        return args.func(args)
    except (CLIError, cat.CatalogError) as e:
        if args.debug:
            e.__suppress_context__ = False  # show where the error came from, not only the one line
            raise
        if isinstance(e, cat.CatalogError):
            problems = "; ".join(str(p) for p in e.problems)
            print(f"selfsup {args.command}: error: the taxonomy is broken: {problems}", file=sys.stderr)
        else:
            print(f"selfsup {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"selfsup {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def run() -> None:
    """The console script. Under torchrun the process ends without interpreter finalisation: gloo's
    worker threads may still drop a tensor then, which aborts the process (pytorch/pytorch#190489)."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
