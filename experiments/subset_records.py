"""Keep the records of the facts named in another JSONL file (its ``uuid`` fields), in the records' order.

    python experiments/subset_records.py --records data.jsonl --uuids_from edits.jsonl --output subset.jsonl

Deterministic (the same inputs write the same bytes); refuses an empty result.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=Path, required=True)
    parser.add_argument("--uuids_from", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    wanted = {
        json.loads(line)["uuid"] for line in args.uuids_from.read_text("utf-8").splitlines() if line.strip()
    }
    kept = [line for line in args.records.read_text("utf-8").splitlines() if line.strip()
            and json.loads(line)["uuid"] in wanted]  # fmt: skip
    if not kept:
        raise SystemExit(f"{args.records}: none of the {len(wanted)} facts of {args.uuids_from} is there")
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text("\n".join(kept) + "\n", encoding="utf-8")
    tmp.replace(args.output)
    print(f"{len(kept)} records of {len(wanted)} facts -> {args.output}")


if __name__ == "__main__":
    main()
