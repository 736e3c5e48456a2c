"""The command-line layer: the `edgefed` console script. It sees every package and owns argparse;
the packages below it expose plain functions and frozen configurations, never parsers."""
