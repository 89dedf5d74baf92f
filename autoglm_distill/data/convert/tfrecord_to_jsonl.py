"""TFRecord (the Google Cloud releases of AndroidControl and AITW) -> JSONL that ``autoglm_distill.data.convert``
reads. It needs tensorflow, which this project does not ship: copy this one file to a machine that has it
(``pip install tensorflow``) and run::

    python tfrecord_to_jsonl.py android_control-*-of-* --out android_control.jsonl
    python tfrecord_to_jsonl.py general-*-of-* --out aitw_general.jsonl

Each ``tf.train.Example`` becomes one JSON line holding every feature as a list (the converter unwraps one-element
lists): int64 and float features as numbers, bytes features as UTF-8 text, or base64 for screenshots, accessibility
trees and anything that is not UTF-8. The files are read as GZIP-compressed, as both releases ship them.
No import of this project: the file stands alone.
"""

from __future__ import annotations

import argparse
import base64
import json

# Always base64: image bytes (AITW's are raw pixels, which can happen to be valid UTF-8) and serialised protos.
BINARY_FEATURES = ("image/encoded", "screenshots", "accessibility_trees")


def feature_values(kind: str, values: list, binary: bool = False) -> list:
    """The JSON form of one feature's values; ``kind`` is ``bytes_list``, ``float_list`` or ``int64_list``. Bytes
    become UTF-8 text, or base64 when ``binary`` or not UTF-8."""
    if kind != "bytes_list":
        return [float(v) if kind == "float_list" else int(v) for v in values]
    return [_text(value, binary) for value in values]


def _text(value: bytes, binary: bool) -> str:
    if not binary:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return base64.b64encode(value).decode("ascii")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", help="TFRecord files (GZIP)")
    parser.add_argument("--out", required=True, help="the JSONL file to write")
    parser.add_argument("--compression", default="GZIP", help="GZIP (the releases) or '' for none")
    args = parser.parse_args(argv)
    import tensorflow as tf  # only here: the rest of the file is testable without it

    with open(args.out, "w", encoding="utf-8") as out:
        for raw in tf.data.TFRecordDataset(args.files, compression_type=args.compression):
            example = tf.train.Example.FromString(raw.numpy())
            record = {}
            for name, feature in example.features.feature.items():
                kind = feature.WhichOneof("kind")
                values = list(getattr(feature, kind).value) if kind else []
                record[name] = feature_values(kind, values, name in BINARY_FEATURES) if kind else []
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
