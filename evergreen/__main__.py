import sys

from evergreen.cli import main

sys.exit(main())
