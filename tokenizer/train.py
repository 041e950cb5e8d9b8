"""Train a tokenizer; the same as `mmssl tokenizer train ...`.

python tokenizer/train.py --default                  # rebuild tokenizer/default
python tokenizer/train.py --out DIR corpus.jsonl     # see --help for all options
"""

import sys
from pathlib import Path

try:
    from mmssl.tokenizer.train import main
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mmssl.tokenizer.train import main

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(args if args[:1] == ["train"] else ["train", *args]))
