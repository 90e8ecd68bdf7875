"""Regenerate docs/models.md's zoo table from the decisions the code makes now: python -m tests.zoo_table"""

from __future__ import annotations

from tests.test_zoo import DOCS, table_rows

HEADER = "| architecture | layout used by default | why not a faster one |\n|---|---|---|\n"

if __name__ == "__main__":
    text = DOCS.read_text()
    head, rest = text.split("<!-- zoo table: start -->\n", 1)
    tail = rest.split("<!-- zoo table: end -->", 1)[1]
    DOCS.write_text(head + "<!-- zoo table: start -->\n" + HEADER + "\n".join(table_rows()) + "\n"
                    + "<!-- zoo table: end -->" + tail)
