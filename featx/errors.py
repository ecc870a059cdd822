"""The one exception type for user mistakes.

A FeatxError carries a single line that names the file or option at fault and the fix. The CLI prints it
as `featx: error: <message>` and exits with `exit_code`, without a traceback; library users catch it like
any exception. It knows nothing of click: the library does not depend on its command line.
"""


class FeatxError(Exception):
    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
