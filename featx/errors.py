"""The one exception type for user mistakes.

A FeatxError carries a single line that names the file or option at fault and the fix. The CLI prints it
as `featx: error: <message>` and exits with `exit_code`, without a traceback; library users catch it like
any exception. It knows nothing of click: the library does not depend on its command line.
"""


class FeatxError(Exception):
    """`option`: the config field (featx.configs) the fix changes, where there is one, so that a recipe's error
    can say which key to set."""

    exit_code = 2

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(message)
        self.message, self.option = message, option
