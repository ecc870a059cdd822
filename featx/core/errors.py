"""The one exception type for user mistakes, and the one warning category.

A FeatxError carries a single line that names the file or option at fault and the fix. The CLI prints it
as `featx: error: <message>` and exits with `exit_code`, without a traceback; library users catch it like
any exception. It knows nothing of click: the library does not depend on its command line.

Library code reports what a user should hear about but that does not stop the work (a skipped image, a run
that does not learn) as `warnings.warn(message, FeatxWarning)`, never by printing: the CLI renders each as one
line, and library users filter or record them with the `warnings` module as they do any other.
"""


class FeatxError(Exception):
    """`option`: the config field (featx.core.configs) the fix changes, where there is one, so that a recipe's error
    can say which key to set."""

    exit_code = 2

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(message)
        self.message, self.option = message, option


class FeatxWarning(UserWarning):
    """What a user should know that does not stop the work: a fallback taken, a choice `auto` made, a result
    that looks wrong. Library code warns through `warnings.warn(..., FeatxWarning)`, never print; the CLI shows
    each as one line `featx: warning: <message>`."""
