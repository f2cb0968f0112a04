import sys

from magicpig.cli import main

sys.exit(main())
