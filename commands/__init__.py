"""The `slos-serve` command line: every subcommand; argparse lives only here."""
