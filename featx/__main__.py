"""`python -m featx ...`, which is also what `torchrun -m featx ...` runs on every rank."""

from featx.front.cli import main

main()
