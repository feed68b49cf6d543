"""Write the xP3-format sample the multilingual demo trains on: ``data_mixtures/demo_data/xp3_sample/``.

xP3 (Muennighoff et al. 2023) is prompted data stored as jsonl, one folder per language and one file per
dataset and prompt, each row ``{"inputs": ..., "targets": ...}``. xP3 itself is on the Hugging Face Hub
only, so the demo ships a sample in the same layout, prompted by this project from data it may redistribute:
the first ``--rows`` rows of XCOPA's *test* split (CC BY 4.0) in five languages, each rendered with that
language's five machine-translated xP3mt prompts. The demo evaluates on XCOPA's *validation* rows, so no
evaluated row is trained on; the six other XCOPA languages are never trained on (the demo's eval mixture
declares them in ``eval.held_out_languages``).

Usage (needs ``../shared/data/multilingual``, the shared folder next to the checkout)::

    python scripts/make_xp3_sample.py [--rows 60] [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import datasets
import yaml

from train.data.tasks import load_task_file

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "data_mixtures" / "demo_data" / "xp3_sample"
SHARED_XCOPA = REPO.parent / "shared" / "data" / "multilingual" / "xcopa" / "data"
TRAIN_LANGUAGES = ("et", "ht", "id", "it", "sw")  # the demo trains on these; the other six stay zero-shot
NOTICE = """\
# xp3_sample: XCOPA test rows prompted in xP3's format (derived data)

Written by `scripts/make_xp3_sample.py` (rerun it to reproduce these files byte for byte). Layout as xP3:
`<language>/<dataset>_<prompt>.jsonl`, rows `{{"inputs", "targets"}}`.

- Data: the first {rows} rows of XCOPA's test split (`data/<lang>/test.<lang>.jsonl`) in {languages}, from
  github cambridgeltl/xcopa e2e9d7f, CC BY 4.0 (legal code: `../xcopa/LICENSE.md`). XCOPA: Ponti et al. 2020,
  "XCOPA: A Multilingual Dataset for Causal Commonsense Reasoning"; translated from COPA, Roemmele et al. 2011.
  Changes: each row rendered with a prompt (below); nothing else.
- Prompts: the machine-translated xP3mt PromptSource templates of each language (`../../templates/xp3mt`,
  Apache-2.0, github Muennighoff/promptsource branch xp3mt c1b46f8).
"""


def render(rows: int) -> dict[Path, str]:
    """File path -> its jsonl text, for every training language and prompt."""
    tasks = [{"name": f"xcopa_{code}", "source": {"type": "jsonl", "data_files": str(SHARED_XCOPA / code / f"test.{code}.jsonl")},
              "split": "test", "templates": {"file": str(REPO / "data_mixtures" / "templates" / "xp3mt" / "xcopa" / code /
                                                        "templates.yaml")},
              "metadata": {"dataset": f"xcopa/{code}", "language": code}} for code in TRAIN_LANGUAGES]
    tmp = OUT.parent / ".xp3_sample_tasks.yaml"
    tmp.write_text(yaml.safe_dump({"tasks": tasks}), encoding="utf-8")
    try:
        task_file = load_task_file(tmp)
    finally:
        tmp.unlink()
    files: dict[Path, str] = {}
    for code in TRAIN_LANGUAGES:
        for row in task_file.tasks[f"xcopa_{code}"].prompted(rows).to_list():
            stem = "".join(c if c.isalnum() else "_" for c in row["template"]).strip("_")
            path = OUT / code / f"xcopa_{stem}.jsonl"
            line = json.dumps({"inputs": row["inputs"], "targets": row["targets"][0]}, ensure_ascii=False)
            files[path] = files.get(path, "") + line + "\n"
    files[OUT / "NOTICE.md"] = NOTICE.format(rows=rows, languages=", ".join(TRAIN_LANGUAGES))
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=60, help="XCOPA test rows per language")
    parser.add_argument("--check", action="store_true", help="exit 1 when the shipped files differ")
    args = parser.parse_args()
    if not SHARED_XCOPA.is_dir():
        print(f"make_xp3_sample: {SHARED_XCOPA} not found (the shared data folder beside the checkout)", file=sys.stderr)
        return 2
    datasets.disable_progress_bars()
    files = render(args.rows)
    if args.check:
        stale = [str(p) for p, text in files.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
        print("\n".join(stale) or "xp3_sample is up to date")
        return 1 if stale else 0
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    print(f"wrote {len(files)} files under {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
