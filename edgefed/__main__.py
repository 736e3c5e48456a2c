import sys

from edgefed.cli import main

sys.exit(main())
