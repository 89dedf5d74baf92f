"""``python -m autoglm_distill.data.convert {androidcontrol,aitw,gui_odyssey} --src PATH --out FOLDER``: see the
package docstring. Exits 0 when episodes were written, 1 when none could be (the report says why), 2 for bad
arguments or an unreadable input (the message names the fix)."""

from __future__ import annotations

import argparse
import sys

from autoglm_distill.data.convert import ON_UNMAPPABLE, REPORT_FILE, SOURCES, convert
from autoglm_distill.data.convert.common import ConvertError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m autoglm_distill.data.convert",
        description="Convert AndroidControl, AITW or GUI-Odyssey (Parquet/JSON/JSONL) into episode JSONL splits.",
    )
    p.add_argument("source", choices=sorted(SOURCES), help="which release --src holds")
    p.add_argument("--src", help="a .parquet/.json/.jsonl file or a folder of them")
    p.add_argument("--out", help="output folder (new, empty, or an earlier conversion with --overwrite)")
    p.add_argument("--images-dir", help="folder of the screenshots records name by file (GUI-Odyssey: screenshots/)")
    p.add_argument("--split-by", choices=("hash", "source"), help="hash of the episode id (default) or --splits-file")
    p.add_argument("--splits-file", help="the release's splits JSON (train/validation/test ids): --split-by source")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of episodes for val (default 0.05)")
    p.add_argument("--test-fraction", type=float, default=0.05, help="share for test with --split-by hash (0.05)")
    p.add_argument(
        "--on-unmappable",
        choices=ON_UNMAPPABLE,
        default="drop-step",
        help="an unmappable step is dropped alone (default) or with its whole episode; counted either way",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier conversion in --out")
    return p


def print_summary(report: dict) -> None:
    """A short table of the report's counts (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['source']} -> {report['out']}", show_header=True)
    table.add_column("count", justify="left")
    table.add_column("n", justify="right")
    splits = report["splits"]
    rows = [
        ("episodes", report["episodes"]),
        ("  train / val / test", f"{splits['train']} / {splits['val']} / {splits['test']}"),
        ("steps", report["steps"]),
        ("steps dropped", report["steps_dropped"]),
        ("episodes with dropped steps", report["episodes_with_dropped_steps"]),
        ("current_app Unknown (steps)", report["current_app_unknown"]),
        ("missing screenshots", report["missing_screenshots"]["count"]),
        ("episodes ending without a status", report["episodes_without_status"]),
    ]
    rows += [(f"finish(message={message!r})", n) for message, n in report["status_actions"].items()]
    rows += [(f"unmappable: {reason}", n) for reason, n in report["unmappable"]["by_reason"].items()]
    for name, value in rows:
        table.add_row(name, str(value))
    console = Console()
    console.print(table)
    if report["missing_screenshots"]["count"]:
        console.print(
            "Screenshots named but not found: pass --images-dir <the release's screenshot folder> (the episode reader "
            "refuses a step whose screenshot is missing)."
        )
    console.print(f"Every unmappable record, with its file and position: {report['out']}/{REPORT_FILE}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        report = convert(
            args.source,
            args.src,
            args.out,
            images_dir=args.images_dir,
            split_by=args.split_by,
            splits_file=args.splits_file,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            on_unmappable=args.on_unmappable,
            overwrite=args.overwrite,
        )
    except ConvertError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(report)
    if report["episodes"] == 0:
        print(f"error: no episode could be converted; see {report['out']}/{REPORT_FILE} for why.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
