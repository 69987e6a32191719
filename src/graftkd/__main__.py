import sys

from graftkd.cli import main

sys.exit(main())
