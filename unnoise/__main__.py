import sys

from unnoise.cli import main

sys.exit(main())
