"""`nanogpt4 ARGS...` under torchrun, with rank 0 a second slow to write an error line: torchrun ends every rank
as soon as one exits with an error, so a rank that left quietly at once could take rank 0's message with it."""

import os
import sys
import time

from nanogpt4.cli import main


class SlowErrors:
    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        if text.startswith("error: "):
            time.sleep(1.0)
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


if os.environ["RANK"] == "0":
    sys.stderr = SlowErrors(sys.stderr)
sys.exit(main())
