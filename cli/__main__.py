"""``python -m kdcache.cli``: the same as the ``kdcache`` console script."""

from kdcache.cli import main

main()
