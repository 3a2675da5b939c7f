"""The `jaxgrm` command: data, sft, rl, distill, score, serve, demo, import-hf."""

from __future__ import annotations

import re
import time
from pathlib import Path

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="jaxgrm")
def main():
    """jaxgrm: generative relevance models trained with RL, in pure JAX."""


@main.command()
@click.option("--steps", default=200, show_default=True, help="Training steps of the tiny model.")
@click.option("--seed", default=0, show_default=True)
@click.option("--samples", default=4, show_default=True, help="Completions to print.")
def demo(steps: int, seed: int, samples: int):
    """Train a tokenizer and a tiny model on generated traces, then sample from it."""
    from jaxgrm.demo import run_demo

    run_demo(steps=steps, seed=seed, num_samples=samples)


def load_config(
    path: str, overrides: tuple[str, ...] = (), expected: type | None = None, what: str = ""
):
    """`get_config()` of a Python config file, with tyro-style overrides (`--rl.steps 10`);
    a usage error if it returns something other than an `expected` instance."""
    import importlib.util

    import tyro

    spec = importlib.util.spec_from_file_location("jaxgrm_user_config", path)
    if spec is None or spec.loader is None:
        raise click.BadParameter(f"{path}: not a Python file", param_hint="--config")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise click.BadParameter(f"{path} defines no get_config()", param_hint="--config")
    cfg = module.get_config()
    if expected is not None and not isinstance(cfg, expected):
        raise click.BadParameter(
            f"get_config() returned {type(cfg).__name__}, not {what or expected.__name__}",
            param_hint="--config",
        )
    if overrides:
        prog = f"jaxgrm {click.get_current_context().info_name} --config {path} --"
        cfg = tyro.cli(type(cfg), default=cfg, args=list(overrides), prog=prog)
    return cfg


def experiment_command(what: str):
    """A subcommand taking --config FILE, --workdir DIR and tyro overrides after `--`."""

    def decorate(fn):
        fn = click.argument("overrides", nargs=-1, type=click.UNPROCESSED)(fn)
        fn = click.option(
            "--workdir", required=True, type=click.Path(file_okay=False), help="Run directory."
        )(fn)
        fn = click.option(
            "--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
            help=f"A Python file whose get_config() returns {what} (experiments/configs/).",
        )(fn)  # fmt: skip
        context = {"ignore_unknown_options": True, "allow_extra_args": True}
        return main.command(context_settings=context)(fn)

    return decorate


@experiment_command("a WorldRLExperiment")
def rl(config_path: str, workdir: str, overrides: tuple[str, ...]):
    """GRPO with stepwise advantage masking, from an SFT warm-up, resumable.

    Extra arguments override config fields, e.g. `-- --rl.steps 20 --rl.loss.kl-coef 0.01`
    (`-- --help` lists them all). Rerunning with the same workdir resumes.
    """
    from jaxgrm.rl.experiment import WorldRLExperiment, run

    cfg = load_config(config_path, overrides, WorldRLExperiment, "a WorldRLExperiment")
    results = run(cfg, workdir)
    for mode, history in results.items():
        last = next((h for h in reversed(history) if "val/accuracy" in h), None)
        if last is not None:
            click.echo(
                f"{mode}: step {last['step']} validation accuracy {last['val/accuracy']:.3f}"
            )


# ---- jaxgrm sft --------------------------------------------------------------------------------
@experiment_command("an SFTExperiment")
def sft(config_path: str, workdir: str, overrides: tuple[str, ...]):
    """Warm-up supervised fine-tuning on teacher traces, resumable; ends in WORKDIR/bundle.

    Trains on the world teacher's traces or on a trace JSONL (`traces` in the config), with
    greedy validation every `sft.eval_every` steps. Extra arguments override config fields, e.g.
    `-- --sft.steps 20` (`-- --help` lists them all). Rerunning with the same workdir resumes.
    """
    from jaxgrm.traces import SFTExperiment, run_sft_experiment

    cfg = load_config(config_path, overrides, SFTExperiment, "an SFTExperiment")
    try:
        out = run_sft_experiment(cfg, workdir)
    except (FileNotFoundError, ValueError) as err:  # a missing or bad traces file
        raise click.ClickException(str(err)) from None
    click.echo(f"trained on {out['train']} traces; validation on {out['validation']} pairs")
    last = next((h for h in reversed(out["history"]) if "val/accuracy" in h), None)
    if last is not None:
        click.echo(f"step {last['step']} validation accuracy {last['val/accuracy']:.3f}")
    click.echo(f"bundle: {out['bundle']}")


# ---- jaxgrm distill ----------------------------------------------------------------------------
@experiment_command("a DistillExperiment")
def distill(config_path: str, workdir: str, overrides: tuple[str, ...]):
    """Distil a teacher bundle into a smaller student; ends in WORKDIR/bundle and report.json.

    `mode` sequence: SFT on the teacher's traces (rejection against the labels); logit:
    token-level KD on teacher-forced sequences. The report compares teacher and student on the
    same validation pairs (greedy metrics, pairs/s). Extra arguments override config fields,
    e.g. `-- --mode LOGIT --sft.steps 20` (`-- --help` lists them all). Rerunning resumes.
    """
    from jaxgrm.distill_run import DistillExperiment, run_distill_experiment

    cfg = load_config(config_path, overrides, DistillExperiment, "a DistillExperiment")
    try:
        out = run_distill_experiment(cfg, workdir)
    except (FileNotFoundError, ValueError) as err:  # a missing or bad bundle, no targets
        raise click.ClickException(str(err)) from None
    click.echo(f"{out['mode']} distillation on {out['train_pairs']} pairs")
    for who in ("teacher", "student"):
        sys_ = out[who]
        acc = ", ".join(f"{s} {m['accuracy']:.3f}" for s, m in sys_["metrics"].items())
        click.echo(
            f"{who}: {sys_['params']:,} params, accuracy {acc}, {sys_['pairs_per_s']:.1f} pairs/s"
        )
    if out["speedup"] is not None:
        click.echo(f"speed-up: {out['speedup']:.2f}x")
    click.echo(f"bundle: {out['bundle']}")
    click.echo(f"report: {Path(workdir) / 'report.json'}")


@main.command(name="import-hf")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
def import_hf(checkpoint: str):
    """Check that a Hugging Face checkpoint directory imports, and print its config."""
    from jaxgrm.model.hf import load_hf_checkpoint

    model = load_hf_checkpoint(checkpoint)
    click.echo(model.cfg)


# ---- jaxgrm score ------------------------------------------------------------------------------
@main.command()
@click.option(
    "--ckpt", required=True, type=click.Path(exists=True, file_okay=False),
    help="A model bundle: config.json, model.safetensors, tokenizer, jaxgrm.json.",
)  # fmt: skip
@click.option(
    "--input", "input_path", required=True, type=click.Path(exists=True, dir_okay=False),
    help="JSONL pairs: query, doc; optional id, scale, doc_title, qid.",
)  # fmt: skip
@click.option(
    "--output", required=True, type=click.Path(dir_okay=False),
    help="JSONL scores, appended to: ids already there are skipped (resume).",
)  # fmt: skip
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--trace", is_flag=True, help="Write each decoded response as `trace`.")
@click.option(
    "--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1),
    help="Most response tokens decoded per pair (reasoning format).",
)  # fmt: skip
@click.option(
    "--on-bad-row", type=click.Choice(["raise", "skip"]), default="raise", show_default=True,
    help="Stop at malformed input rows, or skip them (reported, counted, listed in "
    "OUTPUT.errors.jsonl).",
)  # fmt: skip
def score(ckpt, input_path, output, batch_size, trace, max_new_tokens, on_bad_row):
    """Score query-document pairs: grade, grade distribution, expected grade (resumable)."""
    from jaxgrm.bundle import load_bundle
    from jaxgrm.score import GradeScorer, score_file

    try:
        bundle = load_bundle(ckpt)
        scorer = GradeScorer(bundle, batch_size=batch_size, max_new_tokens=max_new_tokens)
        summary = score_file(
            scorer, input_path, output, trace=trace, on_bad_row=on_bad_row,
            log=lambda msg: click.echo(msg, err=True),
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as err:  # bad rows, bundle and checkpoint errors
        raise click.ClickException(str(err)) from None
    bad = sum(summary.bad.values())
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(summary.bad.items()))
    click.echo(
        f"{summary.rows} rows: scored {summary.scored} ({summary.invalid} without a valid "
        f"grade), {summary.already_done} already in {output}, {bad} bad"
        + (f" ({reasons}; listed in {summary.errors_path})" if bad else "")
    )


# ---- jaxgrm serve ------------------------------------------------------------------------------
@main.command()
@click.option(
    "--ckpt", required=True, type=click.Path(exists=True, file_okay=False),
    help="A model bundle: config.json, model.safetensors, tokenizer, jaxgrm.json.",
)  # fmt: skip
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1),
    help="Most response tokens decoded per pair (reasoning format).",
)  # fmt: skip
@click.option("--max-pairs", default=64, show_default=True, type=click.IntRange(min=1),
              help="Most pairs per request.")  # fmt: skip
@click.option("--max-field-chars", default=20_000, show_default=True, type=click.IntRange(min=1),
              help="Most characters of a query, doc or doc_title.")  # fmt: skip
@click.option("--max-body-bytes", default=4 * 1024 * 1024, show_default=True,
              type=click.IntRange(min=1), help="Largest request body.")  # fmt: skip
def serve(ckpt, host, port, batch_size, max_new_tokens, max_pairs, max_field_chars,
          max_body_bytes):  # fmt: skip
    """Serve a bundle over HTTP: POST /score, a page at /, GET /healthz."""
    from jaxgrm.bundle import load_bundle
    from jaxgrm.score import GradeScorer
    from jaxgrm.serve import ServeConfig, make_server

    try:
        scorer = GradeScorer(
            load_bundle(ckpt), batch_size=batch_size, max_new_tokens=max_new_tokens
        )
        config = ServeConfig(max_pairs, max_field_chars, max_body_bytes)
    except (FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    server = make_server(scorer, host, port, config)
    click.echo(f"serving {ckpt} at http://{host}:{server.port}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# ---- jaxgrm data -------------------------------------------------------------------------------
@main.group()
def data():
    """Build and inspect relevance datasets (TFDS builders, the synthetic world)."""


_DATA_DIR_HELP = "Prepared data sets live here [default: $JAXGRM_DATA_DIR, else ~/jaxgrm_data]."
_NAME_HELP = (
    "The TFDS config: for jsonl the name of your data set (and its default source; default: "
    "the file's stem), for world `default` or `small`."
)


@data.command(name="list")
def data_list():
    """List the data sets that can be built."""
    from jaxgrm.data.builders import BUILDERS

    for name, (_, summary) in BUILDERS.items():
        click.echo(f"{name:<12} {summary}")


@data.command(name="build")
@click.argument("name")
@click.option(
    "--manual-dir",
    type=click.Path(exists=True, path_type=Path),
    help="The raw files (e.g. ../shared/data/<set>); jsonl: a .jsonl file or a folder of them.",
)
@click.option("--data-dir", type=click.Path(path_type=Path), help=_DATA_DIR_HELP)
@click.option(
    "--on-bad-row",
    type=click.Choice(["raise", "skip"]),
    default="raise",
    show_default=True,
    help="Stop at the first malformed row, or skip such rows and count them per reason.",
)
@click.option("--name", "config_name", help=_NAME_HELP)
@click.option("--overwrite", is_flag=True, help="Rebuild even if this version is prepared.")
def data_build(name, manual_dir, data_dir, on_bad_row, config_name, overwrite):
    """Prepare data set NAME (see `jaxgrm data list`) as array_record, split by query."""
    from jaxgrm.data import builders
    from jaxgrm.data.builders.base import BadRow

    cls = _builder_class(name)
    config = config_name
    if name == "jsonl":
        from jaxgrm.data.builders.jsonl import JsonlConfig

        if manual_dir is None:
            raise click.UsageError("jsonl needs --manual-dir (a .jsonl file or a folder of them)")
        config_name = config_name or re.sub(r"\W", "_", manual_dir.resolve().stem)
        config, manual_dir = JsonlConfig(name=config_name, path=str(manual_dir)), None
    elif getattr(cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", None) and not _has_files(manual_dir):
        raise click.UsageError(
            f"{name} needs --manual-dir, a folder with its raw files: "
            f"{cls.MANUAL_DOWNLOAD_INSTRUCTIONS}"
        )
    start = time.perf_counter()
    try:
        builder = builders.build(
            name,
            manual_dir=manual_dir,
            data_dir=data_dir,
            on_bad_row=on_bad_row,
            config=config,
            overwrite=overwrite,
        )
    except BadRow as err:
        raise click.ClickException(
            f"bad row ({err.reason}): {err}\n"
            "Fix the row, or rerun with --on-bad-row=skip to skip such rows and count them."
        ) from None
    except (FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    report = getattr(builder, "build_report", None)
    if not builder.prepared_now:
        click.echo(f"{name}: already prepared at {builder.data_dir} (--overwrite rebuilds it)")
        return
    click.echo(f"{name}: prepared at {builder.data_dir} in {time.perf_counter() - start:.1f} s")
    if report is not None:
        for split, counts in report.splits.items():
            click.echo(f"  {split:<10} {counts['pairs']:>7} pairs {counts['queries']:>6} queries")
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(report.skipped.items())) or "none"
        click.echo(
            f"  rows read {report.rows_read}, written {report.rows_written}, "
            f"skipped {sum(report.skipped.values())} ({skipped})"
        )


@data.command(name="stats")
@click.argument("name")
@click.option("--data-dir", type=click.Path(path_type=Path), help=_DATA_DIR_HELP)
@click.option("--name", "config_name", default=None, help=_NAME_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
def data_stats(name, data_dir, config_name, as_json):
    """Pairs, queries and grades per split of prepared data set NAME, and skipped rows.

    `world` instead reports on the synthetic world itself (its default config, or --name's):
    grades, baselines and teacher error rates. `world/small` reads a prepared world.
    """
    import json

    if name == "world":
        try:
            from jaxgrm.data.world import WorldConfig, format_stats, stats_report
        except ImportError:
            try:  # while the world keeps its report in a module of its own
                from jaxgrm.data.world import WorldConfig
                from jaxgrm.data.world_stats import format_stats, stats_report
            except ImportError as err:
                raise click.ClickException(f"the synthetic world is unavailable: {err}") from None
        world = WorldConfig()
        if config_name:
            configs = _builder_class("world").builder_configs
            if config_name not in configs:
                raise click.UsageError(f"world configs: {', '.join(configs)}")
            world = configs[config_name].world
        report = stats_report(world)
        click.echo(json.dumps(report, indent=2, default=str) if as_json else format_stats(report))
        return
    from jaxgrm.data.stats import NotBuiltError, dataset_stats, format_stats

    _builder_class(name.split("/")[0])
    if config_name:
        name = f"{name}/{config_name}"
    elif name == "jsonl":
        name = f"jsonl/{_only_jsonl_name(data_dir)}"
    try:
        stats = dataset_stats(name, data_dir)
    except NotBuiltError as err:
        raise click.ClickException(f"{err}; run `jaxgrm data build {name}` first") from None
    click.echo(json.dumps(stats, indent=2, ensure_ascii=False) if as_json else format_stats(stats))


def _only_jsonl_name(data_dir: Path | None) -> str:
    from jaxgrm.data.builders import default_data_dir

    root = (data_dir or default_data_dir()) / "jsonl"
    names = sorted(p.name for p in root.glob("*") if list(p.glob("*/dataset_info.json")))
    if len(names) != 1:
        built = ", ".join(names) or "none"
        raise click.UsageError(f"name the JSONL data set with --name (built: {built})")
    return names[0]


def _has_files(folder: Path | None) -> bool:
    return folder is not None and folder.is_dir() and any(folder.iterdir())


def _builder_class(name: str):
    from jaxgrm.data.builders import BUILDERS, builder_class

    if name not in BUILDERS:
        raise click.UsageError(f"unknown data set {name!r}; choose from {', '.join(BUILDERS)}")
    try:
        return builder_class(name)
    except ImportError as err:
        raise click.ClickException(f"the {name} builder is not available: {err}") from None


if __name__ == "__main__":
    main()
