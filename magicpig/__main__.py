import sys

from magicpig.cli.main import main

sys.exit(main())
