"""The one exception type for user mistakes, and the one warning category.

A FeatxError carries a single line that names the file or option at fault and the fix. The CLI prints it
as `featx: error: <message>` and exits with `exit_code`, without a traceback; library users catch it like
any exception. It knows nothing of click: the library does not depend on its command line.

Library code reports what a user should hear about but that does not stop the work (a skipped image, a run
that does not learn) as `warnings.warn(message, FeatxWarning)`, never by printing: the CLI renders each as one
line, and library users filter or record them with the `warnings` module as they do any other.
"""


class FeatxError(Exception):
    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class FeatxWarning(UserWarning):
    """A single line, like FeatxError's message, about something that goes on regardless."""
