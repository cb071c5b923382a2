"""The `safetyneurons` command line. Thin: each command parses options and calls the library.

Commands live in sibling modules and are imported lazily, so `--help` stays fast.
User errors (safetyneurons.errors.UserError) print one clear line and exit with code 2, no traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

from ..errors import UserError

# command name -> (module, attribute). Modules are imported only when the command runs or lists help.
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("safetyneurons.cli.data", "data"),
    "twin": ("safetyneurons.cli.twin", "twin"),
    "contrast": ("safetyneurons.cli.contrast", "contrast"),
    "neurons": ("safetyneurons.cli.neurons", "neurons"),
    "extract": ("safetyneurons.cli.probe", "extract"),
    "train": ("safetyneurons.cli.probe", "train"),
    "evaluate": ("safetyneurons.cli.probe", "evaluate"),
    "guard": ("safetyneurons.cli.guard", "guard"),
    "serve": ("safetyneurons.cli.guard", "serve"),
    "patch": ("safetyneurons.cli.patch", "patch"),
    "run": ("safetyneurons.cli.run", "run"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        return self._load(name)

    @staticmethod
    def _load(name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)


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
        import os

        from ..wheels import ALLOW_UNPINNED_ENV

        os.environ[ALLOW_UNPINNED_ENV] = "1"


def main(argv=None) -> None:
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
