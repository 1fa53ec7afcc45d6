import sys

from regkernels.bench.runner import main

sys.exit(main())
