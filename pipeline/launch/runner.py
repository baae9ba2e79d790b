"""DeepSpeed's runner (the `deepspeed` command) as the launcher starts it: DeepSpeed's own `main`,
in a process that imports DeepSpeed without mlflow (dist.import_deepspeed)."""

import sys

from ..core.dist import import_deepspeed

if __name__ == "__main__":
    import_deepspeed()
    from deepspeed.launcher.runner import main

    sys.exit(main())
