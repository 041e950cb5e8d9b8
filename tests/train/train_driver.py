"""Run `mmssl.train.cli.main` several times in one launched process (saves the start-up of
a launch per run).  argv[1]: a JSON list of argument lists."""

import json
import sys

from mmssl.train.cli import main

if __name__ == "__main__":
    for args in json.loads(sys.argv[1]):
        code = main(args)
        if code:
            sys.exit(code)
