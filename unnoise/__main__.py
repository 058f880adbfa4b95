import sys

from unnoise.cli.main import main

sys.exit(main())
