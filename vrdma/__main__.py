import sys

from vrdma.cli import main

sys.exit(main())
