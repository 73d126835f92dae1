"""One table and plot from suite runs of one model at different lengths, each run with its own example count or
baselines (`hf-memlm eval --suite ... --output-dir`):

    python scripts/merge_suite_reports.py eval/suite_4k/suite.json eval/suite_16k/suite.json \
        eval/suite_64k/suite.json --output-dir eval/suite

writes suite.json, suite.md and suite.png there, each suite's average recomputed by length
(`hf_memlm.evaluation.suite.merge_suite_results`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_memlm.evaluation import write_report
from hf_memlm.evaluation.suite import merge_suite_results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", help="suite.json files of one model")
    parser.add_argument("--output-dir", required=True, help="where the merged suite.json, suite.md and suite.png go")
    args = parser.parse_args(argv)
    reports = [json.loads(Path(path).read_text(encoding="utf-8")) for path in args.reports]
    try:
        merged = merge_suite_results(reports)
    except ValueError as error:
        parser.error(str(error))
    paths = write_report(merged, Path(args.output_dir))
    print("wrote: " + ", ".join(str(path) for path in paths.values()))


if __name__ == "__main__":
    main()
