import sys

from tools.fsx.cli import main

sys.exit(main())
