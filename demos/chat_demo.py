"""Launch the chat demo; the same as ``mmspec demo chat [options]`` (see ``--help``)."""

import argparse
import sys

from mmspec.app.demos import add_demo_args, demo_command

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_demo_args(parser)
    raise SystemExit(demo_command(parser.parse_args(["chat", *sys.argv[1:]])))
