import sys

from tools.campaign.cli import main

sys.exit(main())
