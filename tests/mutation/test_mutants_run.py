"""The mutation runner swaps a mutant into the live module: function bodies, and the default
arguments of methods, ``__init__`` included (a default left unswapped is a survivor no test could kill)."""

from __future__ import annotations

import importlib.util
import sys

from mutants import mutated_code, sites_of
from mutants_run import transplant

SOURCE = '''
class Box:
    def __init__(self, grouped: bool = False):
        self.grouped = grouped

    def scaled(self, x, factor=2):
        return x * factor
'''


def test_a_mutated_default_of_init_and_of_a_method_is_swapped_in(tmp_path, monkeypatch):
    path = tmp_path / "mutant_box.py"
    path.write_text(SOURCE)
    spec = importlib.util.spec_from_file_location("mutant_box", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "mutant_box", module)
    spec.loader.exec_module(module)
    box_class = module.Box
    sites = {site.key: site.index for site in sites_of(path, "mutant_box")}
    assert sites == {"mutant_box:Box.__init__: `False` -> `True`": 0, "mutant_box:Box.scaled: `2` -> `3`": 1,
                     "mutant_box:Box.scaled: `x * factor` -> `x / factor`": 2}
    transplant(module, mutated_code(path, 0))
    assert box_class().grouped is True  # the class object tests already hold sees the mutant
    transplant(module, mutated_code(path, 1))
    assert box_class().grouped is False and box_class().scaled(5) == 15
    transplant(module, mutated_code(path, 2))
    assert box_class().scaled(5) == 2.5
