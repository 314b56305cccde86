"""Rebuild data/calib.txt and data/eval.txt from the Debian package jargon-text.

    apt-get download jargon-text        # jargon-text_4.4.7-4.1_all.deb
    dpkg -x jargon-text_*.deb /tmp/jargon
    python data/make_data.py /tmp/jargon/usr/share/doc/jargon-text/jargon.txt.gz

The split is by line number of the decompressed jargon.txt (41630 lines):
  calib.txt = lines [0, 34000)        (Jargon File front matter + lexicon A..)
  eval.txt  = lines [36000, 37500)    (a later, disjoint stretch of the lexicon)
Lines [34000, 36000) are left out as a gap between the two.
"""
import gzip
import hashlib
import os
import sys

CALIB = (0, 34000)
EVAL = (36000, 37500)


def main(src):
    with gzip.open(src, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    here = os.path.dirname(os.path.abspath(__file__))
    for name, (a, b) in (("calib.txt", CALIB), ("eval.txt", EVAL)):
        text = "\n".join(lines[a:b]) + "\n"
        with open(os.path.join(here, name), "w", encoding="utf-8") as f:
            f.write(text)
        print(name, len(text.encode()), "bytes", hashlib.sha256(text.encode()).hexdigest())


if __name__ == "__main__":
    main(sys.argv[1])
