"""`python -m benchmarks.faust_peer --bootstrap B --topic-prefix P --data-dir D [--guarantee G] worker ...`"""

from __future__ import annotations

import argparse
import sys

from benchmarks.faust_peer import GUARANTEES, create_app

parser = argparse.ArgumentParser(
    prog="python -m benchmarks.faust_peer",
    description="the faust-streaming peer of the wallet processor; the arguments after "
    "these are faust's own (for example: worker -l warn)",
)
parser.add_argument("--bootstrap", required=True)
parser.add_argument("--topic-prefix", required=True)
parser.add_argument("--guarantee", choices=GUARANTEES, default="exactly_once")
parser.add_argument("--partitions", type=int, default=8)
parser.add_argument("--data-dir", required=True, help="faust's own folder (it would otherwise make one in the cwd)")
args, faust_argv = parser.parse_known_args()
app = create_app(args.bootstrap, args.topic_prefix, args.guarantee, args.partitions, args.data_dir)
# faust's command line reads sys.argv itself.
sys.argv = [sys.argv[0], *faust_argv]
app.main()
