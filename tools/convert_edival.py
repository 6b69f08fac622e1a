#!/usr/bin/env python
"""Convert the EdiVal-Bench instruction CSV into an mtflow JSONL manifest.

    python tools/convert_edival.py --csv ../shared/data/edival/oai_instruction_generation_output.csv \
        --images /data/edival/images --out data/edival/manifest.jsonl [--allow-missing-images] [--split test]

Same as ``mtflow data convert-edival``; the logic lives in ``mtflow.data.edival``.
"""

from __future__ import annotations

from mtflow.data.edival import main

if __name__ == "__main__":
    raise SystemExit(main())
