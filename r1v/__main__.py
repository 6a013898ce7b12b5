import sys

from r1v.cli import main

sys.exit(main())
