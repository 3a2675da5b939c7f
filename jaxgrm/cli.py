"""The `jaxgrm` command. Subcommands of later stages say so plainly until they are built."""

from __future__ import annotations

import click

_PENDING = {
    "data": "build and inspect relevance datasets (TFDS builders, the synthetic world)",
    "sft": "warm-up supervised fine-tuning on teacher traces",
    "rl": "GRPO with stepwise advantage masking",
    "distill": "distil a trained model into a small student",
    "score": "score query-document pairs from a JSONL file",
    "serve": "serve relevance scoring over HTTP",
}


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


@main.command(name="import-hf")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
def import_hf(checkpoint: str):
    """Check that a Hugging Face checkpoint directory imports, and print its config."""
    from jaxgrm.model.hf import load_hf_checkpoint

    model = load_hf_checkpoint(checkpoint)
    click.echo(model.cfg)


def _pending(name: str, summary: str):
    @main.command(name=name, help=f"{summary[0].upper()}{summary[1:]} (not built yet).")
    def command():
        raise click.ClickException(f"`jaxgrm {name}` ({summary}) is not built yet.")

    return command


for _name, _summary in _PENDING.items():
    _pending(_name, _summary)


if __name__ == "__main__":
    main()
