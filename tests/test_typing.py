"""convmoe ships ``py.typed``: a user's type checker must accept the documented entry points, including
``convmoe.patch(...)``, a package that is also callable (a module is "not callable" to mypy otherwise)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

USER_CODE = '''
import torch

import convmoe
from convmoe import patch

model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
patched: torch.nn.Module = convmoe.patch(model, targets="0")
again: torch.nn.Module = patch(model, targets="0", config=convmoe.MoEConfig(num_experts=2))
spec = convmoe.patch.patch_spec(model)
reveal_type(convmoe.patch(model, targets="0"))
'''


def test_mypy_accepts_the_callable_patch_package(tmp_path, monkeypatch):
    api = pytest.importorskip("mypy.api")
    (tmp_path / "user.py").write_text(USER_CODE)
    monkeypatch.setenv("MYPYPATH", str(Path(__file__).resolve().parents[1]))  # an editable install hides the package
    stdout, stderr, status = api.run([str(tmp_path / "user.py"), "--follow-imports=silent", "--no-error-summary",
                                      "--python-executable", sys.executable, "--cache-dir", str(tmp_path / "cache")])
    assert 'Revealed type is "torch.nn.modules.module.Module"' in stdout, stdout + stderr
    assert "error" not in stdout, stdout
    assert status == 0
