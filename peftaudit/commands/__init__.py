"""One module per CLI subcommand: ``add_parser(subparsers)`` and ``run(args) -> int``.

Modules here import only the standard library at module level; the work they
call is imported inside ``run`` so ``peftaudit --help`` stays fast.
"""
