import sys

from mpsclip.cli import main

sys.exit(main())
