import sys

from largefr.cli import main

sys.exit(main())
