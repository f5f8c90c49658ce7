import sys

from ctseg.cli import main

sys.exit(main())
