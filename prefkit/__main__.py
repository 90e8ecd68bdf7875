import sys

from prefkit.cli import main

sys.exit(main())
