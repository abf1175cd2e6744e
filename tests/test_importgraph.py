from pathlib import Path

import pytest

from mpsclip.importgraph import build, check, dot, main


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_edges_top_level_lazy_relative_and_type_checking(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "mpsclip/__init__.py": "",
        "mpsclip/errors.py": "",
        "mpsclip/archive/__init__.py": "",
        "mpsclip/archive/store.py": "from ..errors import MPSCLIPError\nfrom typing import TYPE_CHECKING\n"
                                    "if TYPE_CHECKING:\n    from mpsclip.archive import search\n",
        "mpsclip/archive/search.py": "from mpsclip.archive import store\ndef f():\n    import mpsclip.kernels.maxsim\n",
        "kernels/__init__.py": "",
        "kernels/maxsim.py": "import numpy\nfrom mpsclip.errors import MPSCLIPError\n",
    })
    modules = build(root)
    assert modules["mpsclip.archive.store"].imports == {"mpsclip.errors"}  # TYPE_CHECKING import is no edge
    assert modules["mpsclip.archive.search"].imports == {"mpsclip.archive.store"}
    assert modules["mpsclip.archive.search"].lazy == {"mpsclip.kernels.maxsim"}
    assert modules["mpsclip.kernels.maxsim"].imports == {"mpsclip.errors"}  # the top-level folder, as installed
    assert check(modules) == ([], [])
    assert '"mpsclip.archive.search" -> "mpsclip.kernels.maxsim" [style=dashed];' in dot(modules)


def test_a_cycle_closed_by_a_lazy_import_fails_the_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _tree(tmp_path, {
        "mpsclip/__init__.py": "",
        "mpsclip/a.py": "from mpsclip import b\n",
        "mpsclip/b.py": "def f():\n    from mpsclip.a import x\n",
        "mpsclip/c.py": "import mpsclip.d\n",
        "mpsclip/d.py": "import mpsclip.c\n",
    })
    eager, lazy = check(build(root))
    assert eager == [["mpsclip.c", "mpsclip.d"]] and lazy == [["mpsclip.a", "mpsclip.b"]]
    assert main(["--check", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "cycle (with lazy imports): mpsclip.a <-> mpsclip.b" in out and "2 import cycles" in out


def test_this_checkout_has_no_import_cycles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--dot", str(tmp_path / "graph.dot")]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "[mpsclip.kernels]" in out and "no import cycles" in out.splitlines()[-1]
    assert (tmp_path / "graph.dot").read_text().startswith("digraph mpsclip {")
