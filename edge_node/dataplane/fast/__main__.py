"""``python -m edge_node.dataplane.fast [--config FILE]``: the fast front without the CLI (tests, benchmarks)."""

from __future__ import annotations

import argparse
import logging

from edge_node.dataplane.fast.supervisor import serve_fast
from gazsi_cluster.config import load_settings

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=None)
    args = parser.parse_args()
    settings = load_settings(args.config)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise SystemExit(serve_fast(settings))
