import sys

from ultrafedfm.cli import main

sys.exit(main())
