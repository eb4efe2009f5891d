import sys

from pmi_pipeline.cli import main

sys.exit(main())
