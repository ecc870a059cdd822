"""The one exception type for user mistakes.

A FeatxError carries a single line that names the file or option at fault and the fix. The CLI prints it
and exits with status 2, without a traceback; library users catch it like any exception.
"""

import click


class FeatxError(click.ClickException):
    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"featx: error: {self.format_message()}", err=True, file=file)
