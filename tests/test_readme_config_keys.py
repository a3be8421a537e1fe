"""The README's config-key tables cover every key that add_aqd_config adds (issue 19).

A key counts as documented when a row of a table under "## Config keys" names it: by its full
dotted path, or by its last part(s) under a heading or earlier key of the same row that gives
the parent (``### ... `MODEL.QUANT` ...`` + ``W_BITS``; ``MODEL.VGG.WIDTH_MULT`` / ``NORM``).
``A_X/Y`` abbreviates ``A_X`` and ``A_Y``."""
import re

from detectron2.config import get_cfg

import aqd_d2
from tests.conftest import REPO

ROOTS = ("MODEL.", "INPUT.", "AQD.", "SOLVER.", "DATASETS.", "TEST.", "DATALOADER.")


def _leaves(node, prefix=""):
    out = set()
    for k, v in node.items():
        path = f"{prefix}{k}"
        out |= _leaves(v, path + ".") if hasattr(v, "items") else {path}
    return out


def added_keys():
    return sorted(_leaves(aqd_d2.add_aqd_config(get_cfg())) - _leaves(get_cfg()))


def _expand(token: str):
    """``FOCAL_LOSS_ALPHA/GAMMA`` -> both names; ``A.B`` stays."""
    parts = token.split("/")
    out = [parts[0]]
    for p in parts[1:]:
        head = parts[0].rsplit("_", 1)[0] if "_" in parts[0] and "_" not in p and "." not in p else ""
        out.append(f"{head}_{p}" if head else p)
    return out


def documented_keys(text: str):
    section = text.split("## Config keys", 1)[1].split("\n## ", 1)[0]
    found = set()
    parents = []
    for line in section.splitlines():
        if line.startswith("#"):
            parents = [p.rstrip(".") + "." for p in re.findall(r"`([A-Z][A-Z0-9_.]*)`", line)]
            continue
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        key_cell = line.split("|")[1]
        row_parents = list(parents)
        for token in re.findall(r"`([A-Za-z0-9_./]+)`|([A-Z][A-Z0-9_./]{2,})", key_cell):
            for name in _expand(token[0] or token[1]):
                if name.startswith(ROOTS):
                    found.add(name)
                    row_parents.insert(0, name.rsplit(".", 1)[0] + ".")
                else:
                    candidates = [p + name for p in row_parents]
                    found.update(candidates)
                    if "." in name:  # AUTO.TRANSFORM / DELTA: DELTA is under ...AUTO.
                        row_parents = [c.rsplit(".", 1)[0] + "." for c in candidates] + row_parents
    return found


def test_every_added_key_is_in_a_readme_table():
    readme = (REPO / "README.md").read_text()
    missing = [k for k in added_keys() if k not in documented_keys(readme)]
    assert not missing, f"{len(missing)} config keys missing from the README tables: {missing}"
