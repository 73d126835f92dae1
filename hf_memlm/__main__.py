import sys

from hf_memlm.cli import main

sys.exit(main())
