import sys

from synthesis_torch.cli import main

sys.exit(main())
