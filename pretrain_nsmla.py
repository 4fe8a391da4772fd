#!/usr/bin/env python
"""Pretrain a natively sparse MLA (NSMLA) model on megatron-core.

    python pretrain_nsmla.py                      # tiny model on the embedded corpus (CPU or GPU)
    torchrun --nproc_per_node 8 pretrain_nsmla.py --data-path ... --tokenizer-model ... [flags]

Flags follow Megatron-LM (`--help` lists them). Bad input stops with one `error:` line before
training starts.
"""

import sys
import warnings


def main(argv=None) -> int:
    # megatron-core warns at import time that Transformer Engine and apex are absent; both are optional.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*(Apex|apex) is not installed.*")
    from megatron_ext.arguments import ArgumentError
    from megatron_ext.distributed import shutdown
    from megatron_ext.training import pretrain

    try:
        pretrain(argv)
    except ArgumentError as err:
        print(f"pretrain_nsmla.py: error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
