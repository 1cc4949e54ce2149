import sys

from nanogpt4.cli import main

sys.exit(main())
