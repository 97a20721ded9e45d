import sys

from halos.cli import main

sys.exit(main())
