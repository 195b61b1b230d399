import sys

from trl_diffpo.cli import main

sys.exit(main())
