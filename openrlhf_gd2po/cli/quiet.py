"""Keep the CPU commands' terminal to their own progress bars and tables.

Called first thing by `gd2po-analyze` and `gd2po-cpu-demo` (the only callers), never by library
code: each filter names one known dependency message, so anything new still shows.
"""

import warnings


def quiet_dependencies() -> None:
    # torch imports pynvml for CUDA queries (none on a CPU) and pynvml warns that it is deprecated.
    warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)
