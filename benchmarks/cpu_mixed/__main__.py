"""`python -m benchmarks.cpu_mixed` (= `make bench`); children started with `--worker` come here too."""
import sys

from benchmarks.cpu_mixed import main

sys.exit(main())
