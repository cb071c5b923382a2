"""The `safetyneurons` command line. Thin: each command parses options and calls the library.

Commands live in sibling modules, imported only when a command runs or shows its own help: the command list
of `safetyneurons --help` comes from the short helps in COMMANDS, so it imports no command module (and no torch).
User errors (safetyneurons.errors.UserError) print one clear line and exit with code 2, no traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from safetyneurons.errors import UserError
from safetyneurons.wheels import ALLOW_UNPINNED_ENV

# command name -> (module, attribute, short help). The short help is the command's own, as click shows it
# (first sentence of the docstring); tests/test_cli_help.py checks the two agree.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "data": ("safetyneurons.cli.data", "data",
             "Named prompt datasets, the default splits, and user data import."),
    "twin": ("safetyneurons.cli.twin", "twin",
             "Build the safety-aligned twin of a base model by a LoRA refusal fine-tune, and print a before/after "
             "refusal table."),
    "contrast": ("safetyneurons.cli.contrast", "contrast",
                 "Rank every neuron by how much safety alignment changed it (inference-time activation "
                 "contrasting)."),
    "neurons": ("safetyneurons.cli.neurons", "neurons",
                "Select safety neurons from `contrast` change scores, and plot them."),
    "extract": ("safetyneurons.cli.probe", "extract",
                "Cache pooled activations of a model over a labelled split (safetensors shards + manifest)."),
    "train": ("safetyneurons.cli.probe", "train",
              "Train probes on safety neurons and controls, and report test metrics (report.json/.md, curves)."),
    "evaluate": ("safetyneurons.cli.probe", "evaluate",
                 "Score a trained probe on any labelled data (e.g. the held-out sources) and write a report."),
    "readouts": ("safetyneurons.cli.probe", "readouts",
                 "Measure the guard's readout variants side by side and pick one by the pre-registered rule."),
    "guard": ("safetyneurons.cli.guard", "guard",
              "Score PROMPTS (and/or --file) with a guard: probability of unsafe and whether it is flagged."),
    "serve": ("safetyneurons.cli.guard", "serve",
              "Serve a guard over HTTP: POST /v1/moderations (OpenAI moderation shape), POST "
              "/beta/litellm_basic_guardrail_api (LiteLLM generic guardrail), GET /v1/guard, GET /healthz; with "
              "--generate also POST /v1/chat/completions (OpenAI-compatible, guarded generation, streaming) and "
              "GET /v1/models."),
    "patch": ("safetyneurons.cli.patch", "patch",
              "Do the safety neurons cause the aligned model's behaviour? Dynamic activation patching."),
    "report": ("safetyneurons.cli.report", "report",
               "Regenerate docs/results.md and the README's headline tables from run directories and benchmark "
               "JSON."),
    "run": ("safetyneurons.cli.run", "run",
            "Run the whole pipeline: data, twin, contrast, safety neurons, heatmap, activations, probes with "
            "controls (random layer-matched and global neurons, largest-magnitude neurons, PCA, all features, "
            "text-only, length-only), held-out benchmark, guard."),
}


class _Listing(click.Group):
    """Stand-in for the command list: each command is a bare placeholder holding only its short help."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        return click.Command(name, help=COMMANDS[name][2]) if name in COMMANDS else None


class LazyGroup(click.Group):
    """Imports a command's module only when that command is resolved (to run it or show its own help)."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        """The command list of `--help`, from COMMANDS' short helps (click shortens them as for real commands)."""
        _Listing(self.name).format_commands(ctx, formatter)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="safetyneurons")
@click.option("--allow-unpinned", is_flag=True,
              help="Accept pypi: model references without a sha256 pin (recorded in the artifacts as "
                   "wheel_pinned: false). Default: refuse them.")
def app(allow_unpinned):
    """Find safety neurons by inference-time activation contrasting, probe them, and ship a prompt guard.

    Typical flow: data build -> twin -> contrast -> neurons select -> extract -> train -> guard/serve,
    or all of it at once with `safetyneurons run`.
    """
    if allow_unpinned:
        os.environ[ALLOW_UNPINNED_ENV] = "1"


def main(argv=None) -> None:
    # No progress bars from transformers or the hub (e.g. "Loading weights" of every model load): stderr keeps
    # this program's own bars, which --no-progress turns off. Read when huggingface_hub is first imported.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        app.main(args=argv, prog_name="safetyneurons", standalone_mode=False)
    except UserError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2 if e.exit_code in (1, 2) else e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
