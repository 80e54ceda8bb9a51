"""One module per ``opt-ray`` subcommand: ``add_parser(subparsers)`` + ``run(args)``."""
