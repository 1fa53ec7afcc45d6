"""The README's API tour runs as written (its one python block), so the first code a user copies
works with the library as it is."""
from __future__ import annotations

import pathlib
import re
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_api_tour_runs(capsys):
    text = (ROOT / "README.md").read_text()
    tour = text[text.index("## API tour"):]
    block = re.search(r"```python\n(.*?)```", tour, re.S)
    assert block is not None, "README.md's API tour has no python block"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "sparse CSR is in beta" notice
        exec(compile(block.group(1), "README.md (API tour)", "exec"), {"__name__": "readme_tour"})
    assert "sigma_max" in capsys.readouterr().out  # its last line prints reg.stats()
