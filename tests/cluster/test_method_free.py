"""cluster/ runs any registered method and any pipeline: no file under it names a method (the
registry's names, as whole words) or a paper. A method or pipeline lives in system/ and jobs/."""
from __future__ import annotations

import re
from pathlib import Path

from system.methods import registry

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
PAPERS = ("eostok", "alitok", "semtok", "vapi", "vaπ", "va-pi", "llamagen")


def test_no_file_under_cluster_names_a_method_or_paper():
    names = registry.names()
    assert {"eostok", "vapi", "ar"} <= set(names)  # the registry is what the test reads
    words = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")  # registry names are lower-case identifiers
    papers = re.compile("|".join(map(re.escape, PAPERS)), re.IGNORECASE)
    found = []
    for path in sorted(CLUSTER.rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            for m in [*words.finditer(line), *papers.finditer(line)]:
                found.append(f"{path.relative_to(CLUSTER.parent)}:{i}: {m.group(0)!r} in {line.strip()[:100]}")
    assert not found, "cluster/ names methods or papers:\n" + "\n".join(found)
