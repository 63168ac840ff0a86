"""`python -m difusion ...`, as the `difusion` command (and `torchrun ... -m difusion train`)."""

from .cli import main

main()
